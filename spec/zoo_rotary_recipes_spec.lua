require 'busted.runner'()
-- recipes/generate.lua and recipes/sft.lua --load a model directory of each rotary family (glm, glm4,
-- qwen, chatglm): tiny random models of the fixtures' configs with a 32k SentencePiece-style vocabulary
-- and that tokenizer (../shared/tokenizers/sp32k; the families' own tokenizer files are not what this
-- checks). SFT trains and --save-hf writes the family's directory back.
local shell = require 'spec.support.shell'

local FIXTURES = shell.root .. '/spec/fixtures/zoo_rotary/'
local TOKENIZER = shell.root .. '/../shared/tokenizers/sp32k/'
local NAMES = { 'glm', 'glm4', 'qwen', 'chatglm' }

-- A model directory of family `name` with the sp32k tokenizer; returns its HF config.
local function write_model(name, dir)
  local hf = pmp.json.read(FIXTURES .. name .. '/config.json')
  hf[name == 'chatglm' and 'padded_vocab_size' or 'vocab_size'] = 32000
  hf.eos_token_id = 2
  pmp.models.from_config(hf):save_pretrained(dir)
  for _, file in ipairs({ 'tokenizer.json', 'tokenizer_config.json' }) do
    shell.write_file(dir .. '/' .. file, pmp.io.read_file(TOKENIZER .. file))
  end
  return hf
end

describe('rotary family recipes', function()
  local test = pmp.io.is_file(TOKENIZER .. 'tokenizer.json') and it or pending
  for _, name in ipairs(NAMES) do
    test(name .. ': generate.lua and sft.lua --load its directory; --save-hf writes the family back', function()
      local dir = shell.temp_dir()
      local hf = write_model(name, dir .. '/base')
      local out, err, status = shell.run_pmp({ shell.root .. '/recipes/generate.lua', '--load', dir .. '/base',
        '--prompt', 'Once upon a time', '--max-new-tokens', '4' })
      assert.are.equal(0, status, err .. out)
      assert.matches('Once upon a time', out)
      shell.write_file(dir .. '/data.jsonl', table.concat({
        '{"instruction": "Say hello.", "input": "", "output": "Hello there!"}',
        '{"instruction": "Name a color.", "input": "", "output": "Blue."}',
      }, '\n') .. '\n')
      out, err, status = shell.run_pmp({ shell.root .. '/recipes/sft.lua', '--load', dir .. '/base', '--data-path',
        dir .. '/data.jsonl', '--chat-template', 'alpaca', '--seq-length', '32', '--micro-batch-size', '1',
        '--global-batch-size', '2', '--train-iters', '2', '--log-interval', '1', '--lr', '1e-3', '--save-hf', dir .. '/out' })
      assert.are.equal(0, status, err .. out)
      local losses = 0
      for _ in out:gmatch('lm loss: [%d.E+-]+') do losses = losses + 1 end
      assert.are.equal(2, losses, out)
      local tuned = pmp.models.from_pretrained(dir .. '/out')
      assert.are.equal(name, tuned.hf.model_type)
      assert.are.equal(hf.architectures[1], pmp.json.read(dir .. '/out/config.json').architectures[1])
      shell.remove_dir(dir)
    end)
  end
end)
