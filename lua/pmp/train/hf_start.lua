--- recipes/pretrain.lua --load of a Hugging Face model directory: continued pretraining from its
--- weights, as Megatron's --load of a converted checkpoint with --finetune (iteration 0, a fresh
--- optimizer and data position). Its config.json is the architecture: a model flag the command line
--- gives must agree with it. Its tokenizer (when it has a tokenizer.json) tokenizes text data.
local pio = require 'pmp.io'

local M = {}

--- Whether dir is a Hugging Face model directory (config.json) rather than a checkpoint.
function M.is_hf_dir(dir)
  if not dir or not pio.is_file(pio.join(dir, 'config.json')) then return false end
  if require('pmp.checkpoint.megatron').is_checkpoint(dir) then return false end
  return require('pmp.checkpoint').latest_iteration(dir) == nil
end

-- Model flags and the GPTModel config value each must equal.
local CHECKED = {
  { 'num_layers', function(c) return c.num_layers end },
  { 'hidden_size', function(c) return c.hidden_size end },
  { 'ffn_hidden_size', function(c) return c.ffn_hidden_size end },
  { 'num_attention_heads', function(c) return c.num_attention_heads end },
  { 'num_query_groups', function(c) return c.num_query_groups end },
  { 'kv_channels', function(c) return c.kv_channels or c.hidden_size / c.num_attention_heads end },
  { 'rotary_base', function(c) return c.rotary_base end },
  { 'norm_epsilon', function(c) return c.norm_epsilon end },
  { 'normalization', function(c) return c.normalization or 'RMSNorm' end },
  { 'untie_embeddings_and_output_weights', function(c) return not c.tie_embeddings end },
}

--- The tokenizer directory for the data when the flags name none (dir when it holds a tokenizer.json).
function M.tokenizer_model(opts, dir)
  if opts.tokenizer_model or not pio.is_file(pio.join(dir, 'tokenizer.json')) then return opts.tokenizer_model end
  return dir
end

--- The model of dir (f32), its dropouts --hidden-dropout's and --attention-dropout's; fails naming a
--- given flag that disagrees with config.json, or a tokenizer with ids beyond the model's vocabulary.
function M.model(dir, opts, given, tokenizer)
  local model = require('pmp.models').from_pretrained(dir, { dtype = 'f32', config = {
    recompute_granularity = opts.recompute_granularity, hidden_dropout = opts.hidden_dropout,
    attention_dropout = opts.attention_dropout } })
  local config = model.config
  for _, check in ipairs(CHECKED) do
    local key, value = check[1], check[2](config)
    if given[key] and opts[key] ~= value then
      error(string.format('--%s %s disagrees with %s/config.json (%s): --load of a Hugging Face model takes its ' ..
        'architecture', (key:gsub('_', '-')), tostring(opts[key]), dir, tostring(value)), 0)
    end
  end
  if opts.padded_vocab_size and opts.padded_vocab_size ~= config.padded_vocab_size then
    error(string.format('--extra-vocab-size makes %d rows, but %s/config.json has %d', opts.padded_vocab_size, dir,
      config.padded_vocab_size), 0)
  end
  if tokenizer.vocab_size > config.vocab_size then
    error(string.format('--load %s: the data\'s %s tokenizer has %d tokens, more than the model\'s vocabulary of %d',
      dir, tokenizer.type or 'its', tokenizer.vocab_size, config.vocab_size), 0)
  end
  model:train()
  return model
end

return M
