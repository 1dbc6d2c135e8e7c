--- pmp.models: Hugging Face checkpoints in and out of pmp's GPTModel.
---
---   local model = pmp.models.from_pretrained('path/to/hf_dir', {dtype = 'bf16'})
---   model:save_pretrained('out_dir')                  -- config.json + model.safetensors (sharded when large)
---   local model = pmp.models.from_config(hf_config)   -- a fresh random model of an HF config table
--
-- Families live in models/<model_type>.lua (models/llama.lua, models/qwen3.lua, ...). Each one returns
--   model_type, architectures    the HF names
--   config(read)                 HF config.json -> GPTModel config (read: see M.reader)
--   hf_config(config)            GPTModel config -> HF config.json (for models not loaded from HF)
--   mapping                      THE table between pmp (Megatron-Core) and HF parameter names/layouts
--   ignore                       optional Lua patterns of HF tensor names to skip on load (buffers)
-- This file holds no family knowledge: it only interprets those tables, in both directions, so loading,
-- saving (and Megatron conversion) are driven by the same mapping.
--
-- A mapping entry is { pmp_name, hf_name_or_names, pack = ..., tp = ..., tied = ... } where names may
-- hold '{L}' for the layer index (0-based on both sides) and
--   pack = nil       one HF tensor, same layout
--          'vocab'   rows padded from vocab_size to padded_vocab_size (zeros) on load, cut on save
--          'qkv'     {q, k, v} packed per query group: [q heads of group g, k_g, v_g] for g = 0..ng-1
--          'gate_up' {gate, up} concatenated along dim 1: [gate; up]
--          'offset'  the HF tensor has `offset` rows before the pmp tensor's (OPT's position table, offset =
--                    2): skipped on load, written as zeros on save
--   tp   = Megatron's tensor-parallel split: 'column' (dim 1; qkv by whole groups, gate_up per half),
--          'row' (dim 2), 'vocab' (dim 1 of the padded table) or nil (replicated)
--   tied = true      the entry's pmp parameter is absent when embeddings are tied; its HF tensor, if a
--                    file has it anyway, is ignored (transformers overwrites it with the embedding)
--   when = fn        the entry holds only for models whose GPTModel config makes fn(config) true (a
--                    family whose HF names depend on the block layout, e.g. Falcon's norms)
-- Entries whose pmp parameter the model does not have (e.g. biases that the config turns off) are
-- skipped, so a file that still holds their HF tensors is rejected as having unexpected weights.
local json = require 'pmp.json'
local loading = require 'pmp.models.loading'
local pio = require 'pmp.io'
local safetensors = require 'pmp.safetensors'
local tensor = require 'pmp.tensor'
local transformer = require 'pmp.nn.transformer'

local M = {}

-- Megatron's default --make-vocab-size-divisible-by.
M.DEFAULT_VOCAB_MULTIPLE = 128

local DTYPE_NAMES = { f32 = 'float32', bf16 = 'bfloat16', f16 = 'float16', f64 = 'float64' }
local DTYPE_FROM_HF = { float32 = 'f32', bfloat16 = 'bf16', float16 = 'f16', float64 = 'f64' }
local DTYPE_ALIASES = { float = 'f32', float32 = 'f32', bfloat16 = 'bf16', half = 'f16', float16 = 'f16',
  double = 'f64', float64 = 'f64', f32 = 'f32', bf16 = 'bf16', f16 = 'f16', f64 = 'f64' }

local function copy_table(t)
  local out = {}
  for k, v in pairs(t) do out[k] = v end
  return out
end

---------------------------------------------------------------------------------------------------
-- Families

local function models_dir()
  local root = package.loaded['pmp.root']
  return root and (root .. '/models') or 'models'
end

--- The model_types with a family file in models/ (files that return a table with model_type).
function M.known_families()
  local out = {}
  local ok, names = pcall(pio.listdir, models_dir())
  if not ok then return out end
  for _, file in ipairs(names) do
    local name = file:match('^([%w_]+)%.lua$')
    if name then
      local loaded, family = pcall(require, 'models.' .. name)
      if loaded and type(family) == 'table' and family.model_type == name then out[#out + 1] = name end
    end
  end
  table.sort(out)
  return out
end

-- The family table for an HF model_type; an unknown one is an error that lists the known ones.
function M.family(model_type)
  if type(model_type) ~= 'string' or not model_type:match('^[%w_]+$')
      or not package.searchpath('models.' .. model_type, package.path) then
    error(string.format("pmp.models: unknown model_type '%s' (supported: %s)", tostring(model_type),
      table.concat(M.known_families(), ', ')), 2)
  end
  local family = require('models.' .. model_type)
  if type(family) ~= 'table' or family.model_type ~= model_type or type(family.mapping) ~= 'table' then
    error("pmp.models: models/" .. model_type .. ".lua does not define the family '" .. model_type .. "'", 2)
  end
  return family
end

---------------------------------------------------------------------------------------------------
-- Reading HF configs

-- A reader over an HF config table for the family's config(): read(key) -> the value or nil (JSON null
-- is nil), read:need(key) -> the value or an error naming the key and the file, read:number(key,
-- default), read:fail(msg). read.raw is the table.
function M.reader(hf, source)
  local r = { raw = hf, source = source or 'config' }
  local function get(key)
    local v = hf[key]
    if v == json.null then return nil end
    return v
  end
  function r.need(_, key)
    local v = get(key)
    if v == nil then error(string.format("%s: missing key '%s'", r.source, key), 0) end
    return v
  end
  function r.fail(_, msg) error(r.source .. ': ' .. msg, 0) end
  function r.number(_, key, default)
    local v = get(key)
    if v == nil then v = default end
    if v ~= nil and type(v) ~= 'number' then r:fail(string.format("key '%s' must be a number, got %s", key, type(v))) end
    return v
  end
  function r.positive_int(self, key, default)
    local v = self:number(key, default)
    if v == nil then self:need(key) end
    if v <= 0 or v ~= math.floor(v) then self:fail(string.format("key '%s' must be a positive integer, got %s", key, tostring(v))) end
    return v
  end
  function r.bool(_, key, default)
    local v = get(key)
    if v == nil then return default end
    if type(v) ~= 'boolean' then r:fail(string.format("key '%s' must be true or false, got %s", key, tostring(v))) end
    return v
  end
  return setmetatable(r, { __call = function(_, key) return get(key) end })
end

-- RoPE settings from either spelling: transformers v5's rope_parameters {rope_type, rope_theta, ...} or
-- the older top-level rope_theta + rope_scaling {type | rope_type, factor, ...}. Returns base, scaling
-- (nil, or a table with type = 'linear' | 'llama3') and rotary_percent.
function M.read_rope(read, default_theta)
  local params = read('rope_parameters')
  local scaling
  if params ~= nil then
    if type(params) ~= 'table' then read:fail("key 'rope_parameters' must be an object") end
    for _, v in pairs(params) do
      if type(v) == 'table' and v ~= json.null then
        read:fail("per-layer-type rope_parameters are not supported by this family")
      end
    end
    scaling = params
  else
    scaling = read('rope_scaling')
    if scaling ~= nil and type(scaling) ~= 'table' then read:fail("key 'rope_scaling' must be an object or null") end
  end
  -- a nested value of the wrong type must fail, not fall back to a default that gives other logits
  local where = params ~= nil and 'rope_parameters' or 'rope_scaling'
  local function nested(key, kind)
    local v = scaling and scaling[key]
    if v == nil or v == json.null then return nil end
    if type(v) ~= kind then read:fail(string.format("key '%s.%s' must be a %s, got %s", where, key, kind, tostring(v))) end
    return v
  end
  local base = nested('rope_theta', 'number') or read:number('rope_theta') or default_theta or 10000
  local percent = nested('partial_rotary_factor', 'number') or read:number('partial_rotary_factor', 1.0)
  local kind = nested('rope_type', 'string') or nested('type', 'string')
  if kind == nil or kind == 'default' then return base, nil, percent end
  local function factor(key, default)
    local v = scaling[key]
    if v == nil or v == json.null then v = default end
    if type(v) ~= 'number' then
      read:fail(string.format("rope scaling '%s' needs the number '%s' (%s.%s), got %s", kind, key, where, key, tostring(v)))
    end
    return v
  end
  if kind == 'linear' then return base, { type = 'linear', factor = factor('factor') }, percent end
  if kind == 'llama3' then
    return base, {
      type = 'llama3',
      factor = factor('factor'),
      low_freq_factor = factor('low_freq_factor'),
      high_freq_factor = factor('high_freq_factor'),
      original_max_position_embeddings = factor('original_max_position_embeddings', read:number('max_position_embeddings')),
    }, percent
  end
  read:fail(string.format("rope type '%s' is not supported (supported: default, linear, llama3)", tostring(kind)))
end

-- The inverse of read_rope, in transformers v5's spelling.
function M.write_rope(config)
  local p = { rope_type = 'default', rope_theta = config.rotary_base or 10000 }
  local s = config.rope_scaling
  if s then
    p.rope_type = s.type or s.rope_type
    for _, key in ipairs({ 'factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings' }) do
      p[key] = s[key]
    end
  end
  if config.rotary_percent and config.rotary_percent ~= 1 then p.partial_rotary_factor = config.rotary_percent end
  return p
end

function M.dtype_name(dtype)
  local d = DTYPE_ALIASES[dtype]
  if not d then error("pmp.models: unknown dtype '" .. tostring(dtype) .. "' (f32, bf16, f16, f64)", 3) end
  return d
end

---------------------------------------------------------------------------------------------------
-- The mapping engine

local function subst(name, layer, expert)
  name = name:gsub('{L}', tostring(layer))
  if expert then name = name:gsub('{E}', tostring(expert)) end
  return name
end

-- The mapping with '{L}' expanded for config.num_layers layers and '{E}' for config.num_moe_experts
-- experts: list of { pmp = name, hf = {names}, pack, tp, tied }.
function M.expand_mapping(family, config)
  local out = {}
  for k, entry in ipairs(family.mapping) do
    local pmp_name, hf = entry[1], entry[2]
    if type(pmp_name) ~= 'string' or (type(hf) ~= 'string' and type(hf) ~= 'table') then
      error(string.format('pmp.models: %s mapping entry %d is malformed', family.model_type, k), 2)
    end
    local hf_list = type(hf) == 'table' and hf or { hf }
    local layers = pmp_name:find('{L}', 1, true) and config.num_layers or 1
    if entry.when and not entry.when(config) then layers = 0 end
    local experts = pmp_name:find('{E}', 1, true) and (config.num_moe_experts or 0) or 1
    for layer = 0, layers - 1 do
      for expert = 0, experts - 1 do
        local names = {}
        for i, n in ipairs(hf_list) do names[i] = subst(n, layer, expert) end
        out[#out + 1] = { pmp = subst(pmp_name, layer, expert), hf = names, pack = entry.pack, tp = entry.tp,
          tied = entry.tied, offset = entry.offset }
      end
    end
  end
  -- the scalar head of *ForSequenceClassification (num_labels 1) has one name in every family
  if config.head == 'score' then out[#out + 1] = { pmp = 'score.weight', hf = { 'score.weight' } } end
  return out
end

-- HF tensor i of a pmp tensor under its entry (a view where the layout allows, a copy otherwise).
-- in_place: for qkv, the strided view [groups, heads, d, ...] of the parameter instead of a copy; it
-- holds the HF tensor's elements in the same row-major order, for writers ('qkv_concat' is always a copy).
local function unpack_piece(entry, t, config, i, in_place)
  if entry.pack == nil then return t end
  if entry.pack == 'qkv_concat' then
    local pieces = {}
    for k = 1, 3 do pieces[k] = unpack_piece({ pack = 'qkv' }, t, config, k) end
    return tensor.cat(pieces, 1)
  end
  if entry.pack == 'vocab' then return t:narrow(1, 1, config.vocab_size) end
  if entry.pack == 'offset' then
    local shape = t.shape
    shape[1] = entry.offset
    return tensor.cat({ tensor.zeros(shape, { dtype = t.dtype }), t }, 1)
  end
  if entry.pack == 'gate_up' then
    local half = t:size(1) / 2
    return t:narrow(1, i == 1 and 1 or half + 1, half)
  end
  local ng, d = config.num_query_groups, config.kv_channels
  local qpg = config.num_attention_heads / ng
  local shape = t.shape
  local grouped_shape, flat = { ng, qpg + 2, d }, { -1 }
  for k = 2, #shape do
    grouped_shape[#grouped_shape + 1] = shape[k]
    flat[#flat + 1] = shape[k]
  end
  local start, count = ({ 1, qpg + 1, qpg + 2 })[i], i == 1 and qpg or 1
  local piece = t:contiguous():view(grouped_shape):narrow(2, start, count)
  if in_place then return piece end
  return piece:contiguous():view(flat)
end

-- Calls fn(hf_name, entry, t, i) for the i-th HF tensor of every entry that `state` (pmp name ->
-- tensor) holds. Names the mapping does not know are an error.
local function each_hf_piece(family, state, config, fn)
  local known = {}
  for _, entry in ipairs(M.expand_mapping(family, config)) do
    known[entry.pmp] = true
    local t = state[entry.pmp]
    if t ~= nil then
      for i, name in ipairs(entry.hf) do fn(name, entry, t, i) end
    end
  end
  for name in pairs(state) do
    if not known[name] then
      error(string.format("pmp.models: the %s mapping has no entry for '%s'", family.model_type, name), 3)
    end
  end
end

-- pmp tensors (name -> tensor: a state_dict, or gradients by parameter name) -> HF tensors by HF name.
-- Names the mapping does not know are an error; tensors of entries absent from `state` are skipped.
function M.export(family, state, config)
  local out = {}
  each_hf_piece(family, state, config, function(name, entry, t, i) out[name] = unpack_piece(entry, t, config, i) end)
  return out
end

-- The HF tensors of a model as safetensors.deferred entries in dtype: views of the parameters, which
-- the writer converts on the way, so a save holds at most one tensor's temporary.
local function deferred_export(family, model, dtype)
  local config, out = model.config, {}
  each_hf_piece(family, model:state_dict(), config, function(name, entry, t, i)
    out[name] = safetensors.deferred(dtype, loading.hf_shapes(entry, t.shape, config)[i], function()
      return unpack_piece(entry, t, config, i, true)
    end)
  end)
  return out
end

---------------------------------------------------------------------------------------------------
-- Building, loading, saving

-- A *ForSequenceClassification config must have one label. A causal LM's weights (no score.weight)
-- become a score model with a zero head (a critic initialised from a policy): its lm_head is dropped.
-- catalog: the files' tensors (pmp.models.loading.catalog), adjusted here.
function M.check_score_config(hf, source, catalog)
  local weights = catalog.tensors
  local labels = 0
  if type(hf.id2label) == 'table' then for _ in pairs(hf.id2label) do labels = labels + 1 end end
  if type(hf.num_labels) == 'number' then labels = hf.num_labels end
  if labels > 1 then
    error(string.format('%s: num_labels is %d; the score head has one output (num_labels = 1)', source, labels), 0)
  end
  if weights['score.weight'] == nil then
    local sample = weights['model.embed_tokens.weight']
    if not sample then error(source .. ': no score.weight and no model.embed_tokens.weight', 0) end
    weights['lm_head.weight'] = nil
    loading.add_tensor(catalog, 'score.weight', tensor.zeros({ 1, sample.shape[2] }, { dtype = sample.dtype }))
  end
end

-- GPTModel config for an HF config table. options: dtype, head ('score': a scalar head, see
-- GPTModel), make_vocab_size_divisible_by (128),
-- tensor_model_parallel_size (1), config (a table of GPTModel settings that override, e.g.
-- recompute_granularity). Returns the config and the family.
function M.config_from_hf(hf, options, source)
  options = options or {}
  source = source or 'config'
  if type(hf) ~= 'table' or json.is_array(hf) then error(source .. ': not a JSON object', 0) end
  local model_type = hf.model_type
  if model_type == nil or model_type == json.null then error(source .. ": missing key 'model_type'", 0) end
  local ok, family = pcall(M.family, model_type)
  if not ok then error(source .. ': ' .. tostring(family):gsub('^pmp%.models: ', ''), 0) end
  local config = family.config(M.reader(hf, source))
  config.make_vocab_size_divisible_by = options.make_vocab_size_divisible_by or M.DEFAULT_VOCAB_MULTIPLE
  config.tensor_model_parallel_size = options.tensor_model_parallel_size
  config.head = options.head
  for k, v in pairs(options.config or {}) do config[k] = v end
  return config, family
end

local function attach(model, family, hf)
  rawset(model, 'hf', { model_type = family.model_type, config = hf })
  return model
end

--- A fresh (randomly initialized) GPTModel for an HF config table (or the path of a config.json).
function M.from_config(hf, options)
  options = options or {}
  local source = 'config'
  if type(hf) == 'string' then
    source = hf
    hf = json.read(hf)
  end
  local config, family = M.config_from_hf(hf, options, source)
  config.dtype = M.dtype_name(options.dtype or 'f32')
  return attach(transformer.GPTModel(config), family, hf)
end

-- The family as it reads a checkpoint saved from its bare base model, whose tensor names lack the
-- prefix the *ForCausalLM class adds (family.base_prefix: BLOOM's published files have 'h.0...' for
-- 'transformer.h.0...'): a copy whose mapping drops the prefix, or the family itself.
local function family_for_names(family, catalog)
  local prefix = family.base_prefix
  if not prefix then return family end
  for name in pairs(catalog.tensors) do
    if name:sub(1, #prefix) == prefix then return family end
  end
  local mapping = {}
  for k, entry in ipairs(family.mapping) do
    local copy = copy_table(entry)
    local names = type(entry[2]) == 'table' and entry[2] or { entry[2] }
    copy[2] = {}
    for i, n in ipairs(names) do copy[2][i] = n:sub(1, #prefix) == prefix and n:sub(#prefix + 1) or n end
    mapping[k] = copy
  end
  local bare = copy_table(family)
  bare.mapping = mapping
  return bare
end

--- Loads a Hugging Face model directory (config.json + model.safetensors or sharded
--- model-0000i-of-0000N.safetensors with model.safetensors.index.json). options:
---   dtype                          parameter dtype (default: that of the file's tensors)
---   make_vocab_size_divisible_by   vocabulary padding multiple (default 128; 1 turns padding off)
---   tensor_model_parallel_size     also multiplies the padding (default 1)
---   config                         GPTModel settings to override (e.g. {recompute_granularity = 'full'})
---   head                           'score': a *ForSequenceClassification model with num_labels 1 (reward
---                                  model, critic); model(ids) gives values [B, T] and
---                                  pmp.rl.sequence_scores the score at the last non-pad token. A causal
---                                  LM directory loads with a zero-initialised head.
---   mmap                           true: parameters whose bytes in the file already have their dtype and
---                                  layout are copy-on-write views of the file's mapping, not copies
---                                  (loads in the time to map; pages are read when first used; training
---                                  never writes to the file). See pmp.models.loading.
---   split                          function(model) -> this rank's part of it under pipeline / tensor
---                                  parallelism, e.g. function(m) return pmp.train.parallel.split(m, opts,
---                                  layout, true) end: called on the whole model built uninitialized (it
---                                  must not read the weights); only the tensors, rows and columns of the
---                                  part it returns are read from the files. from_pretrained returns that
---                                  part (not with mmap).
function M.from_pretrained(dir, options)
  options = options or {}
  if type(dir) ~= 'string' then error('from_pretrained: expects a directory path', 2) end
  if not pio.is_dir(dir) then error('from_pretrained: ' .. dir .. ' is not a directory', 0) end
  local config_path = dir .. '/config.json'
  if not pio.is_file(config_path) then error('from_pretrained: ' .. dir .. ' has no config.json', 0) end
  local hf = json.read(config_path)
  local config, family = M.config_from_hf(hf, options, config_path)
  local has_single = pio.is_file(dir .. '/model.safetensors')
  if not has_single and not pio.is_file(dir .. '/model.safetensors.index.json') then
    error('from_pretrained: ' .. dir .. ' has no model.safetensors or model.safetensors.index.json' ..
      (pio.is_file(dir .. '/pytorch_model.bin') and ' (pytorch_model.bin is not supported; convert it to safetensors)' or ''), 0)
  end
  local catalog = loading.catalog(dir)
  if options.head == 'score' then M.check_score_config(hf, config_path, catalog) end
  local names = family_for_names(family, catalog)
  config.dtype = options.dtype and M.dtype_name(options.dtype) or loading.file_dtype(names, catalog, subst)
  config.init = false
  local model = transformer.GPTModel(config)
  model.config.init = nil   -- a model built later from this config is initialized as usual
  local entries, source = M.expand_mapping(names, model.config), 'from_pretrained ' .. dir
  if options.split then
    model = loading.fill_parts(model, options.split, names, entries, catalog, options, source)
  else
    loading.fill(model, names, entries, catalog, options, source)
  end
  return attach(model, family, hf)
end

-- The family of a model: the one it was loaded with, or options.model_type.
local function family_of(model, options)
  local model_type = (options and options.model_type) or (rawget(model, 'hf') and model.hf.model_type)
  if model_type == nil then
    error('save_pretrained: the model was not made by pmp.models; pass {model_type = "llama" | ...}', 3)
  end
  return M.family(model_type)
end

-- The HF tensors of a model (name -> tensor), in dtype (default: the model's).
function M.hf_state_dict(model, options)
  options = options or {}
  local family = family_of(model, options)
  local out = M.export(family, model:state_dict(), model.config)
  if options.dtype then
    local dtype = M.dtype_name(options.dtype)
    for name, t in pairs(out) do
      if t.dtype ~= dtype then out[name] = t:to(dtype) end
    end
  end
  return out, family
end

-- The HF config.json table of a model: the one it was loaded with (dtype updated), else the family's
-- rendering of model.config.
function M.hf_config(model, options)
  options = options or {}
  local family = family_of(model, options)
  local dtype = M.dtype_name(options.dtype or model.config.dtype)
  local hf = rawget(model, 'hf') and model.hf.model_type == family.model_type and model.hf.config
  local out
  if hf then
    out = copy_table(hf)
    if out.torch_dtype ~= nil and out.dtype == nil then out.torch_dtype = DTYPE_NAMES[dtype] else out.dtype = DTYPE_NAMES[dtype] end
  else
    out = family.hf_config(model.config)
    out.model_type = family.model_type
    out.architectures = json.array(copy_table(family.architectures))
    out.dtype = DTYPE_NAMES[dtype]
  end
  if model.config.head == 'score' then
    out.architectures = json.array({ (family.architectures[1]:gsub('ForCausalLM$', 'ForSequenceClassification')) })
    out.id2label, out.label2id, out.num_labels = { ['0'] = 'LABEL_0' }, { LABEL_0 = 0 }, nil
    -- transformers finds the last non-pad token only with a pad id
    if options.pad_token_id then out.pad_token_id = options.pad_token_id end
  end
  return out
end

--- A GPTModel with a score head and the trunk of `model` (weights copied): a reward model or critic
--- initialised from a policy. The head starts at zero, so every score starts at 0.
function M.score_model(model)
  local config = copy_table(model.config)
  config.head = 'score'
  local scored = transformer.GPTModel(config)
  local state = model:state_dict()
  state['output_layer.weight'] = nil
  state['score.weight'] = tensor.zeros({ 1, config.hidden_size }, { dtype = config.dtype })
  scored:load_state_dict(state)
  if rawget(model, 'hf') then rawset(scored, 'hf', model.hf) end
  return scored
end

--- Writes dir/config.json and dir/model.safetensors (or shards of at most max_shard_size, default
--- '5GB', with model.safetensors.index.json), as transformers' save_pretrained lays them out.
--- options: dtype (default the model's), max_shard_size, model_type (for models not made by pmp.models).
--- Tensors are written one at a time straight from the parameters (each shard and the index written to
--- a temporary and renamed), so saving needs no second copy of the model.
function M.save_pretrained(model, dir, options)
  options = options or {}
  if type(dir) ~= 'string' or dir == '' then error('save_pretrained: expects a directory path', 2) end
  local tensors = deferred_export(family_of(model, options), model, M.dtype_name(options.dtype or model.config.dtype))
  local config = M.hf_config(model, options)
  pio.mkdir_p(dir)
  safetensors.save_sharded(dir, tensors, { max_shard_size = options.max_shard_size or '5GB' })
  pio.write_atomic(dir .. '/config.json', json.encode(config, { indent = 2 }) .. '\n')
  return dir
end

-- HF dtype string ('bfloat16', ...) -> pmp dtype name, or nil.
function M.dtype_from_hf(name) return DTYPE_FROM_HF[name] end

return M
