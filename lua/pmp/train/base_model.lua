--- The model a fine-tuning run starts from, named by --load: a Hugging Face directory (kind 'hf'), a
--- pretraining checkpoint (kind 'pmp'), a Megatron-LM checkpoint of either format (kind 'megatron':
--- the architecture from its args, the tokenizer from --tokenizer-model, a Hugging Face directory), or
--- a fine-tuning checkpoint, which records its base in its state (base_model) and is resumed. Also the
--- chat template its conversations are rendered with.
local io_ = require 'pmp.io'
local Checkpoints = require 'pmp.train.checkpoints'
local megatron = require 'pmp.checkpoint.megatron'

local M = {}

--- Returns the base {kind, dir[, tokenizer]} and, when dir is a fine-tuning checkpoint, its info table
--- to resume from (pmp.train.Checkpoints.info). tokenizer_model: the --tokenizer-model directory, which
--- a Megatron-LM checkpoint needs (its files hold no tokenizer).
function M.locate(dir, tokenizer_model)
  if megatron.is_checkpoint(dir) then
    if not tokenizer_model then
      error(dir .. ' is a Megatron-LM checkpoint, which holds no tokenizer: give --tokenizer-model HF_DIR (the ' ..
        'Hugging Face directory of its tokenizer)', 0)
    end
    return { kind = 'megatron', dir = dir, tokenizer = tokenizer_model }, nil
  end
  local info = Checkpoints.info(dir)
  if info then
    if type(info.state.base_model) == 'table' then return info.state.base_model, info end
    if type(info.layout.model_config) == 'table' then return { kind = 'pmp', dir = dir }, nil end
    error(dir .. ' is neither an SFT checkpoint nor a pretraining checkpoint', 0)
  end
  if not io_.is_file(io_.join(dir, 'config.json')) then
    error(dir .. ' has neither config.json nor latest_checkpointed_iteration.txt', 0)
  end
  return { kind = 'hf', dir = dir }, nil
end

--- The base's model, its tokenizer, and the directory holding its chat template (nil for a pretraining
--- tokenizer without one). options: dtype and recompute_granularity for a Hugging Face model (a
--- pretraining checkpoint's model is built as it was saved); split(model) -> this process's part of the
--- model (pmp.train.parallel.split with unfilled), given the whole model built uninitialized: only the
--- part it keeps is read from the files.
function M.load(base, options)
  local split = options.split or function(model) return model end
  if base.kind == 'pmp' then
    -- under mpirun each rank reads only its part
    local model, info = require('pmp.checkpoint').load_model_part(base.dir, split)
    local state = info.state.tokenizer
    -- a pretraining run with a Hugging Face tokenizer brings that tokenizer's chat template along
    return model, require('pmp.data.dataset_tokenizer').from_state(state), state.type == 'hf' and state.model or nil
  end
  if base.kind == 'megatron' then
    local tokenizer = require('pmp.tokenizer').from_pretrained(base.tokenizer)
    local padded = megatron.open(base.dir).config.padded_vocab_size
    if tokenizer.vocab_size > padded then
      error(string.format('--tokenizer-model %s has %d tokens, more than the %d vocabulary rows of the Megatron-LM ' ..
        'checkpoint %s', base.tokenizer, tokenizer.vocab_size, padded, base.dir), 0)
    end
    -- the tokenizer's size is the true vocabulary (args keep only the padded one)
    local model = megatron.load_model_part(base.dir, split, { true_vocab_size = tokenizer.vocab_size,
      dtype = options.dtype, build = { recompute_granularity = options.recompute_granularity } })
    return model, tokenizer, base.tokenizer
  end
  local model = require('pmp.models').from_pretrained(base.dir, { dtype = options.dtype,
    config = { recompute_granularity = options.recompute_granularity },
    split = split })
  return model, require('pmp.tokenizer').from_pretrained(base.dir), base.dir
end

--- The HF family --save-hf writes the base's model as: nil for a Hugging Face base (the model keeps its
--- own), else model_type (--model-type), else for a Megatron-LM checkpoint its tokenizer directory's
--- config.json model_type, else llama (a pretraining checkpoint's architecture).
function M.model_type(base, model_type)
  if base.kind == 'hf' then
    if model_type then error('--model-type is for a checkpoint in --load; ' .. base.dir .. ' is a Hugging Face model', 0) end
    return nil
  end
  if model_type then return model_type end
  local config = base.kind == 'megatron' and io_.join(base.tokenizer, 'config.json')
  if config and io_.is_file(config) then
    local hf = require('pmp.json').decode(io_.read_file(config))
    if type(hf.model_type) == 'string' then return hf.model_type end
  end
  return 'llama'
end

-- The architecture settings a Hugging Face family must keep for its config.json to describe the model.
local ARCHITECTURE = { 'num_layers', 'hidden_size', 'ffn_hidden_size', 'num_attention_heads', 'num_query_groups',
  'kv_channels', 'normalization', 'activation', 'add_qkv_bias', 'add_proj_bias', 'add_mlp_bias', 'qk_layernorm',
  'tie_embeddings', 'rotary_percent' }

--- Fails (naming --model-type) when family model_type cannot hold the whole model `whole`: its
--- config.json would describe another architecture, or its mapping lacks one of the weights. Run
--- before training, so that --save-hf does not fail (or write a wrong model) at the end.
function M.check_family(whole, model_type)
  local models = require 'pmp.models'
  local family = models.family(model_type)
  local function refuse(why) error('--model-type ' .. model_type .. ' cannot hold the model of --load: ' .. why, 0) end
  local ok, hf = pcall(family.hf_config, whole.config)
  if not ok then refuse(tostring(hf)) end
  hf.model_type = model_type
  local described = models.config_from_hf(hf, nil, 'models/' .. model_type .. '.lua')
  for _, key in ipairs(ARCHITECTURE) do
    local want, got = whole.config[key] or false, described[key] or false
    if want ~= got then refuse(string.format('its %s is %s, the family writes %s', key, tostring(want), tostring(got))) end
  end
  local known = {}
  for _, entry in ipairs(models.expand_mapping(family, whole.config)) do known[entry.pmp] = true end
  local names = {}
  for name in pairs(whole:state_dict()) do names[#names + 1] = name end
  table.sort(names)
  for _, name in ipairs(names) do
    if not known[name] then refuse(string.format("models/%s.lua has no entry for '%s'", model_type, name)) end
  end
end

--- render(messages, add_generation_prompt) -> text: the built-in template `builtin` (chatml, llama3,
--- alpaca) when given, else the one in template_dir; an error names base_dir when there is neither.
function M.chat_renderer(tokenizer, template_dir, builtin, base_dir)
  local chat_template = require 'pmp.chat_template'
  if builtin then
    local template = chat_template.compile(chat_template.builtin(builtin))
    return function(messages, add_generation_prompt)
      return (template:render({ messages = messages, add_generation_prompt = add_generation_prompt,
        bos_token = tokenizer.bos_token or '', eos_token = tokenizer.eos_token or '' }))
    end
  end
  if not template_dir then
    error(base_dir .. ' has no chat template (its tokenizer is ' .. tostring(tokenizer.type) ..
      '): give --chat-template chatml, llama3 or alpaca', 0)
  end
  return function(messages, add_generation_prompt)
    return chat_template.apply(template_dir, messages, { add_generation_prompt = add_generation_prompt })
  end
end

return M
