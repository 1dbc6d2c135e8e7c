require 'busted.runner'()
-- recipes/pretrain.lua --load of a Hugging Face model directory (spec/fixtures/hf/qwen2_tied, made by
-- transformers): a new run starts from its weights and config.json. At --lr 0 the saved checkpoint must
-- give transformers' logits for the fixture's input ids; the run then resumes from its own checkpoint
-- without architecture flags, and flags that contradict config.json are refused by name.
local shell = require 'spec.support.shell'
local reference_fixture = require 'spec.support.reference_fixture'

local FIXTURE = shell.root .. '/spec/fixtures/hf/qwen2_tied'
local SMALL = { '--seq-length', '16', '--micro-batch-size', '2', '--global-batch-size', '2', '--eval-iters', '1',
  '--sample-length', '0', '--log-interval', '1' }

local function pretrain(...)
  local args = { shell.root .. '/recipes/pretrain.lua' }
  for _, list in ipairs({ SMALL, ... }) do
    for _, a in ipairs(list) do args[#args + 1] = a end
  end
  return shell.run_pmp(args)
end

describe('recipes/pretrain.lua --load HF_DIR', function()
  local dir
  before_each(function() dir = shell.temp_dir() end)
  after_each(function() shell.remove_dir(dir) end)

  it("starts a new run from the model's weights, and resumes from its own checkpoint", function()
    local out, err, status = pretrain({ '--load', FIXTURE, '--lr', '0', '--min-lr', '0', '--train-iters', '1',
      '--save', dir .. '/ck' })
    assert.are.equal(0, status, err)
    assert.matches('pretrain: a new run from the weights of the Hugging Face model in ', out)
    assert.matches(' iteration +1/ +1 | consumed samples: +2 |', out)
    local ref = reference_fixture.read(FIXTURE)
    local model = pmp.checkpoint.load_model(dir .. '/ck')
    model:eval()
    local diff = (model(ref.ids) - ref.logits):abs():max():item()
    assert.is_true(diff < 1e-4, 'logits differ from transformers\' by ' .. diff)
    assert.are.equal(2, model.config.num_layers)

    local resumed, err2, status2 = pretrain({ '--load', dir .. '/ck', '--save', dir .. '/ck', '--lr', '1e-3',
      '--train-iters', '2' })
    assert.are.equal(0, status2, err2)
    assert.matches('loaded checkpoint from .- at iteration 1', resumed)
    assert.matches(' iteration +2/ +2 | consumed samples: +4 |', resumed)
  end)

  it('refuses flags that contradict config.json and a tokenizer beyond its vocabulary', function()
    local cases = {
      { { '--num-layers', '3' }, '%-%-num%-layers 3 disagrees with .-qwen2_tied/config.json %(2%)' },
      { { '--hidden-size', '64' }, '%-%-hidden%-size 64 disagrees with .-config.json %(32%)' },
      { { '--tokenizer-type', 'byte' }, "the data's byte tokenizer has 256 tokens, more than the model's vocabulary of 150" },
    }
    for _, case in ipairs(cases) do
      local _, err, status = pretrain({ '--load', FIXTURE, '--train-iters', '1', '--save', '' }, case[1])
      assert.are_not.equal(0, status, case[2])
      assert.matches(case[2], err)
    end
  end)
end)
