--- The model a fine-tuning run starts from, named by --load: a Hugging Face directory (kind 'hf'), a
--- pretraining checkpoint (kind 'pmp'), or a fine-tuning checkpoint, which records its base in its
--- state (base_model) and is resumed. Also the chat template its conversations are rendered with.
local io_ = require 'pmp.io'
local Checkpoints = require 'pmp.train.checkpoints'

local M = {}

--- Returns the base {kind, dir} and, when dir is a fine-tuning checkpoint, its info table to resume
--- from (pmp.train.Checkpoints.info).
function M.locate(dir)
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
  local model = require('pmp.models').from_pretrained(base.dir, { dtype = options.dtype,
    config = { recompute_granularity = options.recompute_granularity },
    split = split })
  return model, require('pmp.tokenizer').from_pretrained(base.dir), base.dir
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
