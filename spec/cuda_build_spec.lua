-- The CUDA backend must compile wherever nvcc is (CI has no GPU, so it is built, not run, here;
-- tools/gpu_check.sh runs it on a GPU machine).
local shell = require 'spec.support.shell'

local nvcc = os.getenv('CUDA_HOME') and (os.getenv('CUDA_HOME') .. '/bin/nvcc') or '/usr/local/cuda/bin/nvcc'
local has_nvcc = io.open(nvcc, 'r') ~= nil

describe('the CUDA backend', function()
  local build = has_nvcc and it or pending
  build('compiles with nvcc and links NCCL and exports the ABI in core/pmp/nccl.h', function()
    local _, err, status = shell.run('cd ' .. shell.quote(shell.root) .. ' && make -s cuda')
    assert.are.equal(0, status, err)
    local symbols = shell.run('nm -D --defined-only ' .. shell.quote(shell.root .. '/build/libpmp_cuda.so'))
    local header = io.open(shell.root .. '/core/pmp/nccl.h'):read('*a')
    local declared = 0
    for name in header:gmatch('(pmp_nccl_[%w_]+)%(') do
      declared = declared + 1
      assert.truthy(symbols:find(' T ' .. name .. '\n', 1, true), name .. ' is not exported')
    end
    assert.is_true(declared >= 9)
    local libs = shell.run('ldd ' .. shell.quote(shell.root .. '/build/libpmp_cuda.so'))
    assert.truthy(libs:find('libnccl'), libs)
  end)
end)
