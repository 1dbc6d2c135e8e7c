-- A tiny Qwen3-shaped Hugging Face model directory with Qwen3's real tokenizer (from ../shared), for
-- specs that run recipes on HF models.
local M = {}

M.TOKENIZER = package.loaded['pmp.root'] .. '/../shared/tokenizers/qwen3'

function M.available() return pmp.io.is_file(M.TOKENIZER .. '/tokenizer.json') end

-- Writes the model into dir; returns its tokenizer.
function M.write(dir)
  local shell = require 'spec.support.shell'
  local tok = pmp.tokenizer.from_pretrained(M.TOKENIZER)
  local hf = pmp.json.decode(pmp.io.read_file(package.loaded['pmp.root'] .. '/spec/fixtures/hf/qwen3/config.json'))
  hf.vocab_size, hf.hidden_size, hf.num_hidden_layers = tok.vocab_size, 16, 1
  hf.intermediate_size, hf.head_dim, hf.num_attention_heads, hf.num_key_value_heads = 32, 8, 2, 1
  pmp.models.from_config(hf):save_pretrained(dir)
  for _, name in ipairs({ 'tokenizer.json', 'tokenizer_config.json' }) do
    shell.write_file(dir .. '/' .. name, pmp.io.read_file(M.TOKENIZER .. '/' .. name))
  end
  return tok
end

return M
