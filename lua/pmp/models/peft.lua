--- LoRA adapters on the models of pmp.models under Hugging Face PEFT's names, and PEFT's files
--- (adapter_config.json + adapter_model.safetensors) in and out.
---   local peft = require 'pmp.models.peft'
---   peft.apply(model, {rank = 8, alpha = 16, dropout = 0.05, targets = {'q_proj', 'v_proj'}})
---   peft.save(model, 'adapter_dir', {base = 'HF_DIR'})   -- what PeftModel.from_pretrained reads
---   peft.load(model, 'adapter_dir')                       -- an adapter PEFT (or pmp) wrote
---   peft.merge(model)                                     -- adapters added into the weights, removed
--- A family's targets are PEFT's module names, derived from its mapping (models/<family>.lua): every
--- per-layer linear weight (tp 'column' or 'row'), one target per Hugging Face tensor, so the fused
--- linear_qkv carries q_proj, k_proj and v_proj and linear_fc1 gate_proj and up_proj. Apply adapters
--- after pmp.dist.pipeline.stage and pmp.nn.parallel.tensor_parallel: a pipeline stage (or its virtual
--- chunks) gets the adapters of the layers it holds, split like their layers. The initial A of every
--- layer is drawn whole, in layer order, from the shared seed on every rank, so a run gives the same
--- adapters whatever the layout. state_dict and save gather them over tensor- and pipeline-parallel ranks.
--- A score model (head 'score', pmp.models' *ForSequenceClassification) takes PEFT's SEQ_CLS adapters: its
--- head stays trainable and is saved and loaded with them as base_model.model.score.weight.
local json = require 'pmp.json'
local pio = require 'pmp.io'
local safetensors = require 'pmp.safetensors'
local lora = require 'pmp.nn.lora'
local sharding = require 'pmp.dist.sharding'
local models = require 'pmp.models'
local pipeline = require 'pmp.dist.pipeline'

local M = {}

local PREFIX = 'base_model.model.'   -- PEFT's prefix of the base model's module names
-- A score model (config.head 'score', a *ForSequenceClassification model) is PEFT's SEQ_CLS task: its head
-- trains whole beside the adapters and is saved with them, under its Hugging Face name, as PEFT's
-- modules_to_save keeps it (PEFT lists the head names it looks for: classifier and score).
local SCORE_KEY, SEQ_CLS_HEADS = PREFIX .. 'score.weight', { 'classifier', 'score' }
M.CONFIG_FILE, M.WEIGHTS_FILE = 'adapter_config.json', 'adapter_model.safetensors'

local function subst(name, layer) return (name:gsub('{L}', tostring(layer))) end

--- The LoRA targets of a family: a list of fused layers {module = pmp path with {L}, pack, tp, pieces =
--- {{name = PEFT target name, hf_module = HF module path with {L}}, ...}}.
function M.targets(family)
  local out = {}
  for _, entry in ipairs(family.mapping) do
    local pmp_name, hf = entry[1], entry[2]
    if (entry.tp == 'column' or entry.tp == 'row') and pmp_name:find('{L}', 1, true) and pmp_name:match('%.weight$') then
      local pieces = {}
      for i, name in ipairs(type(hf) == 'table' and hf or { hf }) do
        local module = name:gsub('%.weight$', '')
        pieces[i] = { name = module:match('([^.]+)$'), hf_module = module }
      end
      out[#out + 1] = { module = (pmp_name:gsub('%.weight$', '')), pack = entry.pack, tp = entry.tp, pieces = pieces }
    end
  end
  return out
end

local function family_of(model, options)
  -- a model loaded already split carries its identity itself; a pipeline.Chunks cut up later, on its
  -- first chunk (the model it cut up)
  local hf = rawget(model, 'hf') or rawget(pipeline.chunks(model)[1], 'hf')
  local model_type = options.model_type or (hf and hf.model_type)
  if not model_type then error('peft: the model was not made by pmp.models; pass {model_type = "llama" | ...}', 3) end
  return models.family(model_type)
end

-- The set of piece names that `wanted` (PEFT's target_modules: a list of names, each matching a
-- module whose path ends with it, or 'all-linear') selects; a name that selects nothing is an error.
local function chosen_pieces(family, wanted, source)
  local all, known, chosen = {}, {}, {}
  for _, target in ipairs(M.targets(family)) do
    for _, piece in ipairs(target.pieces) do
      all[#all + 1] = piece
      known[#known + 1] = piece.name
    end
  end
  if wanted == 'all-linear' then
    for _, piece in ipairs(all) do chosen[piece.name] = true end
    return chosen
  end
  if type(wanted) ~= 'table' or #wanted == 0 then
    error(string.format("%s: LoRA target modules must be a list of names or 'all-linear', got %s", source,
      type(wanted) == 'table' and 'an empty list' or tostring(wanted)), 0)
  end
  for _, name in ipairs(wanted) do
    local found = false
    for _, piece in ipairs(all) do
      if type(name) == 'string' and (piece.name == name or piece.hf_module:sub(-#name - 1) == '.' .. name) then
        chosen[piece.name], found = true, true
      end
    end
    if not found then
      error(string.format("%s: LoRA target '%s' does not exist in the %s family (its targets: %s)", source,
        tostring(name), family.model_type, table.concat(known, ', ')), 0)
    end
  end
  return chosen
end

-- The rows of piece i of a fused layer with out_local rows on this rank.
local function piece_rows(pack, i, out_local, config)
  if pack == 'gate_up' then return out_local / 2 end
  if pack ~= 'qkv' then return out_local end
  local d, per_group = config.kv_channels, config.num_attention_heads / config.num_query_groups
  local groups = out_local / ((per_group + 2) * d)
  return groups * (i == 1 and per_group or 1) * d
end

-- The model (or virtual chunk) of chunks that holds global layer `layer`, and the layer's index in it;
-- nil when another pipeline stage holds it.
local function holder(chunks, layer)
  for _, chunk in ipairs(chunks) do
    local p = chunk.pipeline
    if not p then return chunk, layer end
    if layer >= p.layer_offset and layer < p.layer_offset + p.num_layers then return chunk, layer - p.layer_offset end
  end
  return nil
end

local function module_at(model, path)
  local m = model
  for part in path:gmatch('[^.]+') do
    m = m[part]
    if m == nil then error("peft: the model has no module '" .. path .. "'", 4) end
  end
  return m
end

--- Freezes the model and gives its target layers adapters. options: rank, alpha (default rank),
--- dropout (0), rslora (scaling alpha / sqrt(rank)), targets (PEFT's target_modules: names or
--- 'all-linear'), model_type (for a model not made by pmp.models), source (names the options in errors).
--- Parameters left to train: the adapters (and a score model's head). Returns the model.
function M.apply(model, options)
  local source = options.source or 'LoRA'
  if rawget(model, 'lora') then error('peft.apply: the model already has adapters', 2) end
  local rank = options.rank
  if type(rank) ~= 'number' or rank < 1 or rank ~= math.floor(rank) then
    error(string.format('%s: the LoRA rank must be a positive integer, got %s', source, tostring(rank)), 0)
  end
  local alpha, dropout = options.alpha or rank, options.dropout or 0
  if type(alpha) ~= 'number' or alpha <= 0 then error(string.format('%s: lora alpha must be a positive number, got %s', source, tostring(alpha)), 0) end
  if type(dropout) ~= 'number' or dropout < 0 or dropout >= 1 then
    error(string.format('%s: lora dropout must be in [0, 1), got %s', source, tostring(dropout)), 0)
  end
  local family = family_of(model, options)
  local chosen = chosen_pieces(family, options.targets, source)
  local config, chunks = model.config, pipeline.chunks(model)
  local tp = chunks[1].tensor_parallel
  local tp_size, tp_rank = tp and tp.group.size or 1, tp and tp.group.rank or 0
  -- every parameter of the base model frozen, adapted layers or not, but a score head
  model:apply(lora.freeze)
  local seq_cls, head = config.head == 'score', nil
  if seq_cls then
    for _, chunk in ipairs(chunks) do head = head or chunk.score end
    if head then lora.unfreeze(head) end
  end
  local targets = M.targets(family)
  -- each target's whole input width (the layers of a family have the same shapes), for the draws of
  -- the layers other ranks hold
  local in_features = {}
  for t, target in ipairs(targets) do
    for layer = 0, config.num_layers - 1 do
      local chunk, k = holder(chunks, layer)
      if chunk then
        in_features[t] = module_at(chunk, subst(target.module, k)).in_features
        break
      end
    end
  end
  -- entries: this rank's adapters; keys: the PEFT tensor names of the whole model's
  local entries, keys = {}, { [SCORE_KEY] = seq_cls or nil }
  for layer = 0, config.num_layers - 1 do
    local chunk, k = holder(chunks, layer)
    for t, target in ipairs(targets) do
      local path = chunk and subst(target.module, k)
      local linear = chunk and module_at(chunk, path)
      local pieces, added = {}, {}
      for i, piece in ipairs(target.pieces) do
        local p = { name = piece.name, adapt = chosen[piece.name] }
        if p.adapt then
          local key = PREFIX .. subst(piece.hf_module, layer)
          keys[key .. '.lora_A.weight'], keys[key .. '.lora_B.weight'] = true, true
          local A = lora.initial_A(rank, in_features[t], chunk and linear.weight.dtype)
          if chunk then
            local name = path .. '.lora.' .. piece.name
            p.A, p.out = sharding.shard(name .. '.A', A, config, tp_size, tp_rank), piece_rows(target.pack, i, linear.weight:size(1), config)
            added[#added + 1] = { key = key, name = name, layer = layer, target = piece.name }
          end
        elseif chunk then
          p.out = piece_rows(target.pack, i, linear.weight:size(1), config)
        end
        pieces[i] = p
      end
      if #added > 0 then
        local adapters = lora.attach(linear, { pieces = pieces, pack = target.pack, kv_channels = config.kv_channels,
          per_group = config.num_attention_heads / config.num_query_groups, rank = rank, alpha = alpha,
          dropout = dropout, rslora = options.rslora })
        for _, e in ipairs(added) do
          e.adapter = adapters[e.target]
          entries[#entries + 1] = e
        end
      end
    end
  end
  local first = chunks[1]
  if first.embedding and rawget(first.decoder, 'recompute') then
    -- pmp.autograd.recompute links a re-run layer into the graph through inputs that need a gradient;
    -- a frozen embedding's output needs none, so the adapters would get none: give it one (what
    -- transformers' enable_input_require_grads does for gradient checkpointing with PEFT)
    rawset(first.embedding, 'forward', function(self, ids)
      local x = self.word_embeddings(ids)
      if require('pmp').is_grad_enabled() and not x.requires_grad then x:requires_grad_() end
      return x
    end)
  end
  local names = {}
  for name in pairs(chosen) do names[#names + 1] = name end
  table.sort(names)
  rawset(model, 'lora', { rank = rank, alpha = alpha, dropout = dropout, rslora = options.rslora or false,
    targets = names, family = family, entries = entries, keys = keys, task_type = seq_cls and 'SEQ_CLS' or 'CAUSAL_LM',
    head = head })
  return model
end

local function adapters_of(model, op)
  local state = rawget(model, 'lora')
  if not state then error('peft.' .. op .. ': the model has no adapters (peft.apply or peft.load first)', 3) end
  return state
end

local function tensor_parallel_of(model) return pipeline.chunks(model)[1].tensor_parallel end

-- The whole tensor of adapter parameter `name` (this rank's part t) under tensor parallelism.
local function whole(model, name, t)
  local tp = tensor_parallel_of(model)
  local rule = tp and sharding.rule(name, model.config)
  if not rule then return t:detach() end
  return tp.group:all_gather(t:detach(), { dim = rule.dim })
end

-- Pipeline stage 0 receives the tensors (name -> tensor) of the other stages of its pipeline group and
-- returns them all; the other stages send theirs and return nil. A header of f64 values comes first:
-- per tensor its two dims and its name's bytes.
local function gather_stages(tensors, group)
  local tensor = require 'pmp.tensor'
  local names = {}
  for name in pairs(tensors) do names[#names + 1] = name end
  table.sort(names)
  if group.rank > 0 then
    local header = { #names }
    for _, name in ipairs(names) do
      local shape = tensors[name].shape
      header[#header + 1], header[#header + 2], header[#header + 3] = shape[1], shape[2], #name
      for k = 1, #name do header[#header + 1] = name:byte(k) end
    end
    group:send(tensor.tensor({ #header }, { dtype = 'f64' }), 0)
    group:send(tensor.tensor(header, { dtype = 'f64' }), 0)
    for _, name in ipairs(names) do group:send(tensors[name]:contiguous(), 0) end
    return nil
  end
  local dtype = tensors[names[1]].dtype
  for stage = 1, group.size - 1 do
    local length = tensor.empty({ 1 }, { dtype = 'f64' })
    group:recv(length, stage)
    local header = tensor.empty({ length:item() }, { dtype = 'f64' })
    group:recv(header, stage)
    header = header:totable()
    local at = 2
    for _ = 1, header[1] do
      local rows, cols, n = header[at], header[at + 1], header[at + 2]
      local bytes = {}
      for k = 1, n do bytes[k] = string.char(header[at + 2 + k]) end
      at = at + 3 + n
      local t = tensor.empty({ rows, cols }, { dtype = dtype })
      group:recv(t, stage)
      tensors[table.concat(bytes)] = t
    end
  end
  return tensors
end

--- The adapter tensors under PEFT's names, whole: gathered over tensor-parallel ranks, and from the
--- other pipeline stages onto the first (every rank of the model's groups calls it; a stage after the
--- first gets nil).
function M.state_dict(model)
  local out = {}
  for _, e in ipairs(adapters_of(model, 'state_dict').entries) do
    out[e.key .. '.lora_A.weight'] = whole(model, e.name .. '.A', e.adapter.A)
    out[e.key .. '.lora_B.weight'] = whole(model, e.name .. '.B', e.adapter.B)
  end
  local head = adapters_of(model, 'state_dict').head
  if head then out[SCORE_KEY] = head.weight:detach() end
  if not pipeline.chunks(model)[1].pipeline then return out end
  return gather_stages(out, require('pmp.dist').group('pp'))
end

--- PEFT's adapter_config.json table for the model's adapters. base: base_model_name_or_path.
function M.adapter_config(model, base)
  local state = adapters_of(model, 'adapter_config')
  return {
    peft_type = 'LORA', task_type = state.task_type, base_model_name_or_path = base or json.null,
    r = state.rank, lora_alpha = state.alpha, lora_dropout = state.dropout, use_rslora = state.rslora,
    target_modules = json.array({ unpack(state.targets) }), bias = 'none', fan_in_fan_out = false, use_dora = false,
    inference_mode = true, init_lora_weights = true, layers_to_transform = json.null,
    modules_to_save = state.task_type == 'SEQ_CLS' and json.array({ unpack(SEQ_CLS_HEADS) }) or json.null,
    layers_pattern = json.null, rank_pattern = {}, alpha_pattern = {}, revision = json.null,
  }
end

--- Writes dir/adapter_config.json and dir/adapter_model.safetensors as PEFT's save_pretrained does
--- (each file written to a temporary and renamed; the config last). Every rank calls it (the tensors
--- are gathered over tensor- and pipeline-parallel ranks); rank 0 of the world writes. options: base (the base
--- model's directory or name, recorded as base_model_name_or_path).
function M.save(model, dir, options)
  options = options or {}
  local tensors = M.state_dict(model)
  if require('pmp.dist').rank() ~= 0 then return dir end
  pio.mkdir_p(dir)
  safetensors.save(pio.join(dir, M.WEIGHTS_FILE), tensors, { format = 'pt' })
  pio.write_atomic(pio.join(dir, M.CONFIG_FILE), json.encode(M.adapter_config(model, options.base), { indent = 2 }) .. '\n')
  return dir
end

local function shape_string(shape) return '[' .. table.concat(shape, ',') .. ']' end

-- The settings of an adapter_config.json that pmp applies; anything else PEFT can express is an error
-- naming the key.
local function read_adapter_config(path)
  local c = json.read(path)
  local function fail(msg) error(path .. ': ' .. msg, 0) end
  local function null(v) return v == nil or v == json.null end
  if c.peft_type ~= 'LORA' then fail(string.format("peft_type is '%s'; only LORA adapters are supported", tostring(c.peft_type))) end
  local task_type = null(c.task_type) and 'CAUSAL_LM' or c.task_type
  if task_type ~= 'CAUSAL_LM' and task_type ~= 'SEQ_CLS' then
    fail(string.format("task_type is '%s'; only CAUSAL_LM and SEQ_CLS adapters are supported", tostring(c.task_type)))
  end
  if task_type == 'SEQ_CLS' and not null(c.modules_to_save) then
    -- PEFT adds its head names; the score head is the one a pmp score model has
    local heads = {}
    for _, name in ipairs(SEQ_CLS_HEADS) do heads[name] = true end
    for _, name in ipairs(type(c.modules_to_save) == 'table' and c.modules_to_save or { c.modules_to_save }) do
      if not heads[name] then fail(string.format("modules_to_save names '%s'; only a SEQ_CLS head (%s) is supported",
        tostring(name), table.concat(SEQ_CLS_HEADS, ', '))) end
    end
  end
  for _, key in ipairs({ 'use_dora', 'fan_in_fan_out', 'lora_bias' }) do
    if c[key] == true then fail(key .. ' is true, which pmp does not support') end
  end
  if not null(c.bias) and c.bias ~= 'none' then fail(string.format("bias is '%s'; only 'none' is supported", tostring(c.bias))) end
  if task_type == 'CAUSAL_LM' and not null(c.modules_to_save) then fail('modules_to_save is set, which pmp does not support') end
  for _, key in ipairs({ 'layers_to_transform', 'layers_pattern', 'layer_replication' }) do
    if not null(c[key]) then fail(key .. ' is set, which pmp does not support') end
  end
  for _, key in ipairs({ 'rank_pattern', 'alpha_pattern' }) do
    if type(c[key]) == 'table' and next(c[key]) ~= nil then fail(key .. ' is not empty, which pmp does not support') end
  end
  local targets = c.target_modules
  if type(targets) == 'string' and targets ~= 'all-linear' then
    fail(string.format("target_modules is the regular expression '%s'; give a list of module names", targets))
  end
  return { rank = c.r, alpha = c.lora_alpha, dropout = c.lora_dropout or 0, rslora = c.use_rslora == true,
    targets = targets, base = not null(c.base_model_name_or_path) and c.base_model_name_or_path or nil, source = path,
    task_type = task_type }
end

--- Gives the model the adapters of a PEFT directory (adapter_config.json + adapter_model.safetensors)
--- and their values. An adapter that does not fit the model (a target the family lacks, a tensor of
--- another shape, a layer the model does not have, a missing tensor) is an error naming it, and leaves
--- the model without adapters only if the config itself is refused. Returns the model.
function M.load(model, dir, options)
  options = options or {}
  local config_path, weights_path = pio.join(dir, M.CONFIG_FILE), pio.join(dir, M.WEIGHTS_FILE)
  if not pio.is_file(config_path) then error(dir .. ': no ' .. M.CONFIG_FILE .. ' (not a PEFT adapter directory)', 0) end
  if not pio.is_file(weights_path) then
    error(dir .. ': no ' .. M.WEIGHTS_FILE .. (pio.is_file(pio.join(dir, 'adapter_model.bin')) and
      ' (adapter_model.bin is not supported; save the adapter with safe_serialization)' or ''), 0)
  end
  local settings = read_adapter_config(config_path)
  settings.model_type = options.model_type
  local seq_cls = model.config.head == 'score'
  if (settings.task_type == 'SEQ_CLS') ~= seq_cls then
    error(string.format("%s: task_type is '%s' but the model is a %s", config_path, settings.task_type,
      seq_cls and 'score model (SEQ_CLS)' or 'causal LM (CAUSAL_LM)'), 0)
  end
  local tensors = safetensors.load(weights_path)
  M.apply(model, settings)
  local state = model.lora
  local tp = tensor_parallel_of(model)
  local tp_size, tp_rank = tp and tp.group.size or 1, tp and tp.group.rank or 0
  local function about()
    return settings.base and (' (the adapter was made for ' .. settings.base .. ')') or ''
  end
  local expected = state.keys   -- the whole model's: a pipeline stage skips those of the others
  local keys = {}
  for key in pairs(tensors) do keys[#keys + 1] = key end
  table.sort(keys, safetensors.natural_less)
  for _, key in ipairs(keys) do
    if not expected[key] then
      error(string.format("%s: tensor '%s' is not an adapter of this %s model's targets (%s) in its %d layers%s",
        weights_path, key, state.family.model_type, table.concat(state.targets, ', '), model.config.num_layers, about()), 0)
    end
  end
  require('pmp').no_grad(function()
    for _, e in ipairs(state.entries) do
      for _, slot in ipairs({ 'A', 'B' }) do
        local key = e.key .. '.lora_' .. slot .. '.weight'
        local t = tensors[key]
        if not t then error(string.format("%s: no tensor '%s'%s", weights_path, key, about()), 0) end
        local param, name = e.adapter[slot], e.name .. '.' .. slot
        local want = param.shape
        local rule = tp and sharding.rule(name, model.config)
        if rule then want[rule.dim] = want[rule.dim] * tp_size end
        if shape_string(t.shape) ~= shape_string(want) then
          error(string.format("%s: '%s' has shape %s but layer %d's %s takes %s with rank %d%s", weights_path, key,
            shape_string(t.shape), e.layer, e.target, shape_string(want), state.rank, about()), 0)
        end
        param:copy_(sharding.shard(name, t, model.config, tp_size, tp_rank))
      end
    end
    if state.head then
      local t, weight = tensors[SCORE_KEY], state.head.weight
      if not t then error(string.format("%s: no tensor '%s' (the score head a SEQ_CLS adapter saves)%s", weights_path,
        SCORE_KEY, about()), 0) end
      if shape_string(t.shape) ~= shape_string(weight.shape) then
        error(string.format("%s: '%s' has shape %s but the score head is %s%s", weights_path, SCORE_KEY,
          shape_string(t.shape), shape_string(weight.shape), about()), 0)
      end
      weight:copy_(t)
    end
  end)
  return model
end

--- Adds every adapter into its layer's weight and removes it; the model is a plain trainable model again
--- (unfrozen), computing what it computed with the adapters, and save_pretrained writes the merged
--- weights. Returns the model.
function M.merge(model)
  adapters_of(model, 'merge')
  model:apply(function(m) if lora.is_adapted(m) then lora.merge(m) end end)
  model:apply(lora.unfreeze)
  local first = pipeline.chunks(model)[1]
  if first.embedding then rawset(first.embedding, 'forward', nil) end
  rawset(model, 'lora', nil)
  return model
end

return M
