-- The pmp side of tools/bench_load.sh:
--   pmp tools/bench_load.lua load DIR copy|mmap OUT.json
--       from_pretrained(DIR, {dtype = 'bf16'}) (mmap: {mmap = true}) in this fresh process, then the first
--       token pmp.generate makes (greedy) from an 8-token prompt (time to first token = load_s +
--       first_token_s), then one forward of 8 tokens; writes {load_s, rss_load_kib, first_token_s,
--       forward_s, rss_forward_kib} (VmHWM after loading, and after the token and the forward)
--   pmp tools/bench_load.lua save DIR SAVE_DIR ROUNDS OUT.json
--       loads DIR, then ROUNDS times, in alternating order: `dd if=/dev/zero bs=8M conv=fsync` of the bytes
--       the save writes, and save_pretrained(SAVE_DIR) (500MB shards, as DIR's), removing each output; writes
--       {save_s = {...}, dd_s = {...}, bytes, rss_before_kib, rss_save_kib}
--   mpirun -np N pmp tools/bench_load.lua split DIR TP PP OUT_PREFIX
--       every rank loads its part of DIR under TP x PP (from_pretrained with split, {dtype = 'bf16'}); each
--       writes OUT_PREFIX<rank>.json: {load_s, rss_load_kib, bytes_read (from the files)}
local clock = require 'pmp.clock'
local json = require 'pmp.json'
local pio = require 'pmp.io'

local function vm_hwm_kib()
  local f = assert(io.open('/proc/self/status'))
  local kib = f:read('*a'):match('\nVmHWM:%s*(%d+)')
  f:close()
  assert(kib, 'no VmHWM in /proc/self/status')
  return tonumber(kib)
end

local function write_json(path, t) pio.write_atomic(path, json.encode(t) .. '\n') end

local cmd = arg[1]
if cmd == 'load' then
  local dir, mode, out = arg[2], arg[3], arg[4]
  local t0 = clock.now()
  local model = pmp.models.from_pretrained(dir, { dtype = 'bf16', mmap = mode == 'mmap' })
  local load_s = clock.now() - t0
  local rss_load = vm_hwm_kib()
  model:eval()
  t0 = clock.now()
  pmp.generate(model, { { 11, 12, 13, 14, 15, 16, 17, 18 } }, { max_new_tokens = 1 })
  local first_token_s = clock.now() - t0
  local ids = pmp.arange(8):view(1, 8)
  t0 = clock.now()
  pmp.no_grad(function() model(ids) end)
  write_json(out, { load_s = load_s, rss_load_kib = rss_load, first_token_s = first_token_s, forward_s = clock.now() - t0,
    rss_forward_kib = vm_hwm_kib() })
elseif cmd == 'save' then
  local dir, save_dir, rounds, out = arg[2], arg[3], tonumber(arg[4]), arg[5]
  local model = pmp.models.from_pretrained(dir, { dtype = 'bf16' })
  local rss_before = vm_hwm_kib()
  local bytes = 0
  for _, name in ipairs(pio.listdir(dir)) do
    if name:match('%.safetensors$') then bytes = bytes + pio.size(dir .. '/' .. name) end
  end
  local save_s, dd_s = {}, {}
  -- each timed write starts after a sync, with the previous output removed; the order swaps every round
  local function dd(r)
    os.execute('sync')
    local t0 = clock.now()
    assert(os.execute(string.format('dd if=/dev/zero of=%s.dd bs=8M count=%d conv=fsync status=none',
      save_dir, math.ceil(bytes / 2^23))) == 0, 'dd failed')
    dd_s[r] = clock.now() - t0
    os.remove(save_dir .. '.dd')
  end
  local function save(r)
    os.execute('sync')
    local t0 = clock.now()
    model:save_pretrained(save_dir, { max_shard_size = '500MB' })
    save_s[r] = clock.now() - t0
    pio.remove_tree(save_dir)
  end
  for r = 1, rounds do
    if r % 2 == 1 then dd(r) save(r) else save(r) dd(r) end
  end
  write_json(out, { save_s = save_s, dd_s = dd_s, bytes = bytes, rss_before_kib = rss_before, rss_save_kib = vm_hwm_kib() })
elseif cmd == 'split' then
  local dir, out = arg[2], arg[5]
  local layout = pmp.dist.init{ tp = tonumber(arg[3]), pp = tonumber(arg[4]) }
  layout.virtual = 1
  local flags = { decoder_first_pipeline_num_layers = 0, decoder_last_pipeline_num_layers = 0, sequence_parallel = false }
  local loading = require 'pmp.models.loading'
  local t0 = clock.now()
  pmp.models.from_pretrained(dir, { dtype = 'bf16', split = function(whole)
    return require('pmp.train.parallel').split(whole, flags, layout, true)
  end })
  write_json(out .. layout.rank .. '.json', { load_s = clock.now() - t0, rss_load_kib = vm_hwm_kib(),
    bytes_read = loading.bytes_read })
else
  io.stderr:write('usage: pmp tools/bench_load.lua load DIR copy|mmap OUT.json | save DIR SAVE_DIR ROUNDS OUT.json | ' ..
    'split DIR TP PP OUT_PREFIX\n')
  os.exit(2)
end
