--- Megatron-LM's legacy `torch` checkpoints (docs/formats.md §4.3), read and written:
---
---   DIR/latest_checkpointed_iteration.txt          an iteration, or 'release'
---   DIR/iter_NNNNNNN/ (or DIR/release/)
---     mp_rank_TT/model_optim_rng.pt (PP = 1), mp_rank_TT_PPP/model_optim_rng.pt (PP > 1): a torch.save
---     dict {args (argparse.Namespace), checkpoint_version 3.0, iteration, model (or model0, model1, ...
---     one per virtual pipeline stage), optionally optimizer, opt_param_scheduler, rng_state}
---
---   local ckpt = megatron.open(dir, {true_vocab_size = n})   -- ckpt.config: the GPTModel config from args
---   local t = ckpt:tensor('decoder.layers.3.mlp.linear_fc1.weight')   -- whole (TP parts joined)
---   local model, ckpt = megatron.load_model(dir, options)              -- a GPTModel in this process
---   megatron.save(dir, {names, shapes, tensor = fn, config, tp, pp, ...})   -- any layout, tensor by tensor
---
--- Names are pmp's (Megatron-Core's local layer spec, layers numbered over the whole model). Megatron
--- numbers layers from 0 on each pipeline stage and chunk; the Transformer Engine spec fuses the norms
--- into the next linear (`self_attention.linear_qkv.layer_norm_weight` is `input_layernorm.weight`,
--- `mlp.linear_fc1.layer_norm_weight` is `pre_mlp_layernorm.weight`); both specs carry `_extra_state`
--- entries (None for local linears, an empty uint8 tensor for Transformer Engine modules) that hold no
--- weights. Reading accepts both specs; writing makes the one asked for. The model config comes from
--- the checkpoint's args; the true vocabulary size (args keep only the padded one) from
--- options.true_vocab_size, else args.vocab_size when it was set, else the padded size.
---
--- Megatron-Core's torch_dist checkpoints (pmp.checkpoint.torch_dist) go through the same functions:
--- open, load_model and load_into recognize them; save writes one with spec.format = 'torch_dist'.
local C = require('pmp.ffi').C
local io_ = require 'pmp.io'
local tensor = require 'pmp.tensor'
local sharding = require 'pmp.dist.sharding'
local pipeline = require 'pmp.dist.pipeline'
local P = require 'pmp.checkpoint.torch_pickle'
local Z = require 'pmp.checkpoint.torch_zip'

local M = {}

-- pmp's own checkpoints share Megatron's tracker and directory names
local checkpoint = require 'pmp.checkpoint'
local layout_file = require 'pmp.checkpoint.layout'

M.TRACKER = checkpoint.TRACKER
M.MODEL_FILE = 'model_optim_rng.pt'
M.CHECKPOINT_VERSION = 3.0

local function fail(fmt, ...) error('megatron checkpoint: ' .. string.format(fmt, ...), 0) end

-- The tracker's content: an iteration number or 'release'; nil when there is no tracker.
function M.tracker(dir)
  local path = io_.join(dir, M.TRACKER)
  if not io_.is_file(path) then return nil end
  local text = io_.read_file(path):match('^%s*(.-)%s*$')
  if text == 'release' then return 'release' end
  local n = tonumber(text:match('^%d+$'))
  if not n then fail("%s holds '%s', not an iteration number or 'release'", path, text) end
  return n
end

function M.iteration_dir(dir, iteration)
  if iteration == 'release' then return io_.join(dir, 'release') end
  return checkpoint.iteration_root(dir, iteration)
end

M.rank_dir_name = layout_file.rank_dir_name

-- Whether dir holds a Megatron checkpoint: a tracker naming a directory with rank .pt files (torch
-- format) or a distributed checkpoint (torch_dist format, pmp.checkpoint.torch_dist).
function M.is_checkpoint(dir)
  local ok, iteration = pcall(M.tracker, dir)
  if not ok or iteration == nil then return false end
  local root = M.iteration_dir(dir, iteration)
  return io_.is_file(io_.join(root, 'mp_rank_00', M.MODEL_FILE)) or io_.is_file(io_.join(root, 'mp_rank_00_000', M.MODEL_FILE))
    or require('pmp.checkpoint.torch_dist').is_dist_dir(root)
end

---------------------------------------------------------------------------------------------------
-- Names: Megatron's (per stage, either spec) <-> pmp's

local TE_NORMS = {
  ['self_attention.linear_qkv.layer_norm_weight'] = 'input_layernorm.weight',
  ['self_attention.linear_qkv.layer_norm_bias'] = 'input_layernorm.bias',
  ['mlp.linear_fc1.layer_norm_weight'] = 'pre_mlp_layernorm.weight',
  ['mlp.linear_fc1.layer_norm_bias'] = 'pre_mlp_layernorm.bias',
}
local LOCAL_NORMS = {}
for te, name in pairs(TE_NORMS) do LOCAL_NORMS[name] = te end

-- A stage's key as pmp's name within the stage (nil for weightless entries), and whether it is the
-- Transformer Engine spelling.
local function from_megatron(key)
  if key:match('_extra_state$') then return nil end
  local prefix, rest = key:match('^(decoder%.layers%.%d+%.)(.*)$')
  if prefix and TE_NORMS[rest] then return prefix .. TE_NORMS[rest], true end
  return key, false
end

M.name_from_megatron = from_megatron

local function to_megatron(name, impl)
  if impl ~= 'transformer_engine' then return name end
  local prefix, rest = name:match('^(decoder%.layers%.%d+%.)(.*)$')
  if prefix and LOCAL_NORMS[rest] then return prefix .. LOCAL_NORMS[rest] end
  return name
end
M.name_to_megatron = to_megatron

-- The weightless entries each spec's modules add, after the layer's (or model's) weights.
local LAYER_EXTRA = {
  ['local'] = { 'self_attention.linear_qkv._extra_state', 'self_attention.linear_proj._extra_state',
    'mlp.linear_fc1._extra_state', 'mlp.linear_fc2._extra_state' },
  transformer_engine = { 'self_attention.linear_qkv._extra_state', 'self_attention.core_attention._extra_state',
    'self_attention.linear_proj._extra_state', 'mlp.linear_fc1._extra_state', 'mlp.linear_fc2._extra_state' },
}

M.LAYER_EXTRA = LAYER_EXTRA

---------------------------------------------------------------------------------------------------
-- The model config from args

-- The llama3 RoPE scaling settings Megatron's --use-rope-scaling does not take from flags.
local MEGATRON_LLAMA3 = { low_freq_factor = 1, high_freq_factor = 4, original_max_position_embeddings = 8192 }

local function arg(args, key)
  local v = args[key]
  if v == P.None then return nil end
  return v
end

-- The GPTModel config of a checkpoint's args (an argparse.Namespace). source names the file in errors.
function M.config_from_args(args, options, source)
  options = options or {}
  local function need(key)
    local v = arg(args, key)
    if v == nil then fail("%s: args lacks '%s'", source, key) end
    return v
  end
  local function unsupported(what) fail('%s: %s is not supported by pmp', source, what) end
  local heads = need('num_attention_heads')
  local hidden = need('hidden_size')
  local position = arg(args, 'position_embedding_type') or (arg(args, 'use_rotary_position_embeddings') and 'rope')
    or 'learned_absolute'
  if position ~= 'rope' then unsupported("position_embedding_type '" .. tostring(position) .. "' (only rope)") end
  if arg(args, 'rotary_interleaved') then unsupported('rotary_interleaved') end
  if arg(args, 'apply_layernorm_1p') then unsupported('apply_layernorm_1p') end
  if (arg(args, 'num_experts') or 0) > 0 then unsupported('a mixture of experts (num_experts)') end
  local activation = 'gelu'
  if arg(args, 'swiglu') then activation = 'swiglu'
  elseif arg(args, 'squared_relu') then unsupported('squared_relu')
  elseif arg(args, 'openai_gelu') then activation = 'gelu_tanh' end
  local bias = arg(args, 'add_bias_linear')
  if bias == nil then bias = true end   -- Megatron's default
  local padded = need('padded_vocab_size')
  local vocab = options.true_vocab_size or arg(args, 'vocab_size') or padded
  if vocab > padded then fail('%s: the true vocabulary size %d is larger than padded_vocab_size %d', source, vocab, padded) end
  local scaling
  if arg(args, 'use_rope_scaling') then
    scaling = { type = 'llama3', factor = arg(args, 'rope_scaling_factor') or 8 }
    for key, fixed in pairs(MEGATRON_LLAMA3) do scaling[key] = fixed end
  elseif arg(args, 'rotary_seq_len_interpolation_factor') then
    scaling = { type = 'linear', factor = arg(args, 'rotary_seq_len_interpolation_factor') }
  end
  local groups = arg(args, 'group_query_attention') and need('num_query_groups') or heads
  return {
    num_layers = need('num_layers'),
    hidden_size = hidden,
    ffn_hidden_size = arg(args, 'ffn_hidden_size') or 4 * hidden,
    num_attention_heads = heads,
    num_query_groups = groups,
    kv_channels = arg(args, 'kv_channels') or hidden / heads,
    vocab_size = vocab,
    padded_vocab_size = padded,
    make_vocab_size_divisible_by = arg(args, 'make_vocab_size_divisible_by'),
    max_position_embeddings = arg(args, 'max_position_embeddings'),
    seq_length = arg(args, 'seq_length'),
    normalization = arg(args, 'normalization') or 'LayerNorm',
    norm_epsilon = arg(args, 'norm_epsilon') or 1e-5,
    activation = activation,
    rotary_base = arg(args, 'rotary_base') or 10000,
    rotary_percent = arg(args, 'rotary_percent') or 1.0,
    rope_scaling = scaling,
    add_qkv_bias = arg(args, 'add_qkv_bias') or bias,
    add_proj_bias = bias,
    add_mlp_bias = bias,
    qk_layernorm = arg(args, 'qk_layernorm') or nil,
    tie_embeddings = not arg(args, 'untie_embeddings_and_output_weights'),
  }
end

local ARGS_DTYPE = { float32 = 'f32', float = 'f32', bfloat16 = 'bf16', float16 = 'f16', half = 'f16' }

---------------------------------------------------------------------------------------------------
-- Reading

local Checkpoint = {}
Checkpoint.__index = Checkpoint

-- The rank directories of root: tp and pp sizes, checked to be complete.
local function scan_layout(root)
  if not io_.is_dir(root) then fail('%s is missing (%s names it)', root, M.TRACKER) end
  local tp, pp, seen, count = 0, 0, {}, 0
  for _, name in ipairs(io_.listdir(root)) do
    if name:match('^mp_rank_') then
      local t, p, e = name:match('^mp_rank_(%d%d)_?(%d*)_?(%d*)$')
      if not t then fail('%s: unexpected rank directory %s', root, name) end
      if e ~= '' then fail('%s: expert-parallel checkpoints (%s) are not supported', root, name) end
      t, p = tonumber(t), p ~= '' and tonumber(p) or nil
      tp = math.max(tp, t + 1)
      pp = math.max(pp, (p or 0) + 1)
      seen[name] = true
      count = count + 1
    end
  end
  if count == 0 then fail('%s holds no mp_rank_* directory', root) end
  if count ~= tp * pp then fail('%s holds %d rank directories for tp=%d pp=%d', root, count, tp, pp) end
  for t = 0, tp - 1 do
    for p = 0, pp - 1 do
      local name = M.rank_dir_name(t, p, pp)
      if not seen[name] then fail('%s lacks %s (tp=%d pp=%d)', root, name, tp, pp) end
    end
  end
  return tp, pp
end

-- The loaded file of stage p (0-based) and TP rank t: {path, value, chunks = {state dicts}}.
function Checkpoint:file(p, t)
  local key = p .. ':' .. t
  if self.files[key] then return self.files[key] end
  local path = io_.join(self.root, M.rank_dir_name(t, p, self.pp), M.MODEL_FILE)
  if not io_.is_file(path) then fail('%s is missing', path) end
  local value, report = Z.load(path)
  for name, n in pairs(report) do self.report[name] = (self.report[name] or 0) + n end
  if P.kind_of(value) ~= 'Dict' then fail('%s does not hold a dict', path) end
  local chunks = {}
  if value.model ~= nil then
    chunks[1] = value.model
  else
    while value['model' .. #chunks] ~= nil do chunks[#chunks + 1] = value['model' .. #chunks] end
  end
  if #chunks == 0 then fail("%s holds no 'model' (nor 'model0', ...)", path) end
  for v, sd in ipairs(chunks) do
    if P.kind_of(sd) ~= 'Dict' then fail('%s: model chunk %d is not a dict', path, v - 1) end
  end
  local f = { path = path, value = value, chunks = chunks }
  self.files[key] = f
  return f
end

-- Layers of each (stage, chunk) from the first TP rank's keys; global numbering runs over chunks
-- first (chunk 0 of every stage, then chunk 1, ...), as Megatron interleaves virtual stages.
function Checkpoint:index()
  local chunks = #self:file(0, 0).chunks
  self.chunks = chunks
  self.where = {}      -- pmp global name -> {p, v, key}
  self.names = {}
  local offset = 0
  for v = 1, chunks do
    for p = 0, self.pp - 1 do
      local f = self:file(p, 0)
      if #f.chunks ~= chunks then fail('%s holds %d model chunks, %s holds %d', f.path, #f.chunks, self:file(0, 0).path, chunks) end
      local sd, count = f.chunks[v], 0
      for _, key in ipairs(P.keys(sd)) do
        local layer = tonumber(key:match('^decoder%.layers%.(%d+)%.'))
        if layer then count = math.max(count, layer + 1) end
      end
      for _, key in ipairs(P.keys(sd)) do
        local name, te = from_megatron(key)
        if te then self.transformer_impl = 'transformer_engine' end
        if key:match('core_attention%._extra_state$') then self.transformer_impl = 'transformer_engine' end
        if name then
          local value = sd[key]
          if not tensor.is_tensor(value) then
            fail('%s: %s is a %s, not a tensor', f.path, key, tostring(P.kind_of(value) or type(value)))
          end
          local global = sharding.shift_layer(name, offset)
          if global == 'output_layer.weight' and self.config.tie_embeddings then
            -- the last stage's copy of the tied word embeddings
          elseif self.where[global] then
            fail('%s: %s is held twice (also by %s)', f.path, global, self:file(self.where[global].p, 0).path)
          else
            self.where[global] = { p = p, v = v, key = key }
            self.names[#self.names + 1] = global
          end
        end
      end
      offset = offset + count
    end
  end
  if offset ~= self.config.num_layers then
    fail('%s: the rank files hold %d layers, args.num_layers is %d', self.root, offset, self.config.num_layers)
  end
  table.sort(self.names)
end

--- Opens the checkpoint in dir, of either format (a torch_dist one through pmp.checkpoint.torch_dist,
--- with the same interface). options: iteration (default: the tracker's), true_vocab_size, config
--- (GPTModel settings that override those from args, or the whole config for a checkpoint without args).
function M.open(dir, options)
  options = options or {}
  local iteration = options.iteration or M.tracker(dir)
  if iteration == nil then fail('%s has no %s', dir, M.TRACKER) end
  local root = M.iteration_dir(dir, iteration)
  local torch_dist = require 'pmp.checkpoint.torch_dist'
  if io_.is_dir(root) and torch_dist.is_dist_dir(root) then return torch_dist.open(dir, root, iteration, options, M) end
  local tp, pp = scan_layout(root)
  local self = setmetatable({ dir = dir, root = root, iteration = iteration, tp = tp, pp = pp, files = {}, report = {},
    transformer_impl = 'local' }, Checkpoint)
  local first = self:file(0, 0)
  local args = first.value.args
  if args ~= nil and args ~= P.None and P.kind_of(args) ~= 'Namespace' then
    fail('%s: args is a %s, not an argparse.Namespace', first.path, tostring(P.kind_of(args)))
  end
  self.args = args ~= P.None and args or nil
  local config = {}
  if self.args then config = M.config_from_args(self.args, options, first.path) end
  for k, v in pairs(options.config or {}) do config[k] = v end
  if not config.num_layers then fail('%s has no args; pass the model config', first.path) end
  self.config = config
  self.checkpoint_version = first.value.checkpoint_version
  if type(self.checkpoint_version) == 'number' and self.checkpoint_version < 2 then
    fail('%s: checkpoint_version %s orders the QKV rows as Megatron did before 2.0; only 2.0 and later are read',
      first.path, tostring(self.checkpoint_version))
  end
  self.saved_iteration = first.value.iteration
  self:index()
  local dtype = self.args and arg(self.args, 'params_dtype')
  local embedding = self.where['embedding.word_embeddings.weight']
  self.dtype = embedding and self:file(embedding.p, 0).chunks[embedding.v][embedding.key].dtype
    or (dtype and ARGS_DTYPE[dtype.name]) or 'f32'
  return self
end

--- The whole shape of pmp global name `name`, without reading its data.
function Checkpoint:shape(name)
  local w = self.where[name]
  if not w then fail('%s holds no %s', self.root, name) end
  local shape = { unpack(self:file(w.p, 0).chunks[w.v][w.key].shape) }
  local rule = sharding.rule(name, self.config)
  if rule then shape[rule.dim] = shape[rule.dim] * self.tp end
  return shape
end

--- The whole tensor of pmp global name `name`: its TP parts joined (a replicated one as rank 0 has it,
--- a view of the mapped file). options.copy: always a new tensor, and the pages of the file it was
--- read from leave resident memory (for reading a checkpoint once, tensor by tensor).
function Checkpoint:tensor(name, options)
  local w = self.where[name]
  if not w then fail('%s holds no %s', self.root, name) end
  local function part(t)
    local f = self:file(w.p, t)
    local v = f.chunks[w.v][w.key]
    if not tensor.is_tensor(v) then fail('%s lacks %s', f.path, w.key) end
    return v
  end
  local parts = {}
  local split = self.tp > 1 and sharding.rule(name, self.config)
  for t = 0, split and self.tp - 1 or 0 do parts[t + 1] = part(t) end
  if not split and not (options and options.copy) then return parts[1] end
  local out = split and sharding.unshard(name, parts, self.config) or parts[1]:clone()
  if options and options.copy then
    for _, p in ipairs(parts) do C.pmp_mapping_drop_pages(p.ptr) end
  end
  return out
end

--- Copies part `rank` of `tp` of pmp global name `name` of checkpoint ckpt (either format: it has
--- :shape(name) and a config) into dst; part_of(t) gives saved part t of saved_tp (1 when the checkpoint
--- holds the whole tensor). pmp.dist.sharding.copy_part makes no whole tensor or other temporary. A
--- vocabulary table saved with another padding takes the true vocabulary's rows (config.vocab_size) and
--- zeros after them, as Megatron re-pads to the model's padded size. Raises when dst is not that part's
--- shape.
function M.copy_saved_part(ckpt, name, dst, tp, rank, config, part_of, saved_tp)
  local whole, limit = ckpt:shape(name), nil
  local vocab = name == 'embedding.word_embeddings.weight' or name == 'output_layer.weight'
  if vocab and whole[1] ~= config.padded_vocab_size and config.vocab_size <= whole[1] then
    whole[1], limit = config.padded_vocab_size, config.vocab_size
  end
  local want = sharding.shard_shape(name, whole, config, tp)
  if table.concat(want, ',') ~= table.concat(dst.shape, ',') then
    fail('%s: %s is [%s] for this rank, the model has [%s]', ckpt.root, name, table.concat(want, ','),
      table.concat(dst.shape, ','))
  end
  sharding.copy_part(name, dst, part_of, saved_tp, tp, rank, config, limit)
end

--- Copies part `rank` of `tp` of pmp global name `name` into dst, straight from the rank files' tensors.
function Checkpoint:copy_part(name, dst, tp, rank, config)
  local w = self.where[name]
  if not w then fail('%s holds no %s', self.root, name) end
  local read = {}
  local function part_of(t)
    local f = self:file(w.p, t)
    local v = f.chunks[w.v][w.key]
    if not tensor.is_tensor(v) then fail('%s lacks %s', f.path, w.key) end
    read[#read + 1] = v
    return v
  end
  M.copy_saved_part(self, name, dst, tp, rank, config, part_of, sharding.rule(name, self.config) and self.tp or 1)
  for _, v in ipairs(read) do C.pmp_mapping_drop_pages(v.ptr) end
end

-- Settings that change the model's function without changing any weight's shape or name.
local SAME_SETTINGS = { 'normalization', 'activation', 'rotary_base', 'rotary_percent', 'kv_channels', 'num_query_groups',
  'tie_embeddings' }

-- Copies the checkpoint's weights into this rank's part of model, one tensor at a time.
local function fill(ckpt, model)
  local chunks = pipeline.chunks(model)
  local config = chunks[1].config
  for _, key in ipairs(SAME_SETTINGS) do
    local mine, theirs = config[key], ckpt.config[key]
    if theirs ~= nil and mine ~= theirs then
      fail('%s was saved with %s = %s, the model has %s', ckpt.root, key, tostring(theirs), tostring(mine))
    end
  end
  local layout = require('pmp.dist').layout()
  local loaded = {}
  require('pmp').no_grad(function()
    for _, chunk in ipairs(chunks) do
      local offset = chunk.pipeline and chunk.pipeline.layer_offset or 0
      local own = chunk:state_dict()
      local names = {}
      for name in pairs(own) do names[#names + 1] = name end
      table.sort(names)   -- the same first error on every run
      for _, name in ipairs(names) do
        local p = own[name]
        local global = sharding.shift_layer(name, offset)
        if global == 'output_layer.weight' and ckpt.config.tie_embeddings then global = 'embedding.word_embeddings.weight' end
        ckpt:copy_part(global, p, layout.tp, layout.tp_rank, config)
        loaded[global] = true
      end
    end
  end)
  -- a whole model must take every weight (a stage takes its own)
  if #chunks == 1 and not chunks[1].pipeline then
    local unexpected = {}
    for _, name in ipairs(ckpt.names) do
      if not loaded[name] then unexpected[#unexpected + 1] = name end
    end
    if #unexpected > 0 then
      fail('%s holds weights the model lacks: %s', ckpt.root, table.concat(unexpected, ', '))
    end
  end
end

--- Loads the checkpoint's weights into this rank's part of model (a pmp.dist.pipeline stage or Chunks,
--- tensor-parallel or not, or a whole model): each weight is joined from the checkpoint's TP parts and
--- cut for this rank. The model's settings must be the checkpoint's (its args): a difference is an
--- error naming the setting or the weight. Returns the opened checkpoint. options: as for open.
function M.load_into(dir, model, options)
  local ckpt = M.open(dir, options)
  fill(ckpt, model)
  return ckpt
end

--- This process's part of a GPTModel with the checkpoint's weights, and the opened checkpoint:
--- split(model) -> the part (pmp.train.parallel.split with unfilled), given the whole model built
--- uninitialized; only the part it keeps is read from the files. options: as for open, plus dtype
--- (default: the checkpoint's) and build (GPTModel settings that are not the architecture, such as
--- recompute_granularity).
function M.load_model_part(dir, split, options)
  options = options or {}
  local ckpt = M.open(dir, options)
  local build = {}
  for k, v in pairs(ckpt.config) do build[k] = v end
  for k, v in pairs(options.build or {}) do build[k] = v end
  build.dtype, build.init = options.dtype or ckpt.dtype, false
  local whole = require('pmp.nn').GPTModel(build)
  whole.config.init = nil
  local model = split(whole)
  fill(ckpt, model)
  return model, ckpt
end

--- A GPTModel with the checkpoint's weights, in this process, and the opened checkpoint. options: as
--- for load_model_part.
function M.load_model(dir, options)
  return M.load_model_part(dir, function(model) return model end, options)
end

---------------------------------------------------------------------------------------------------
-- Writing

local function float_args(fields)
  for _, key in ipairs({ 'rotary_base', 'rotary_percent', 'norm_epsilon', 'init_method_std', 'hidden_dropout',
    'attention_dropout' }) do
    if type(fields[key]) == 'number' then fields[key] = P.float(fields[key]) end
  end
  return fields
end

-- Megatron's args for a model config and layout (what Megatron-LM reads back with --use-checkpoint-args
-- and checks on load).
function M.args_for(config, layout, extra)
  local a = {
    num_layers = config.num_layers, hidden_size = config.hidden_size, ffn_hidden_size = config.ffn_hidden_size,
    num_attention_heads = config.num_attention_heads, kv_channels = config.kv_channels,
    group_query_attention = config.num_query_groups ~= config.num_attention_heads,
    num_query_groups = config.num_query_groups,
    max_position_embeddings = config.max_position_embeddings or config.seq_length or 4096,
    seq_length = config.seq_length or config.max_position_embeddings or 4096,
    position_embedding_type = 'rope', use_rotary_position_embeddings = true,
    rotary_base = config.rotary_base or 10000, rotary_percent = config.rotary_percent or 1.0,
    rotary_interleaved = false,
    normalization = config.normalization or 'RMSNorm', norm_epsilon = config.norm_epsilon or 1e-5,
    swiglu = config.activation == 'swiglu', openai_gelu = config.activation == 'gelu_tanh',
    add_bias_linear = config.add_mlp_bias or false, add_qkv_bias = config.add_qkv_bias or false,
    qk_layernorm = config.qk_layernorm or false,
    untie_embeddings_and_output_weights = not config.tie_embeddings,
    padded_vocab_size = config.padded_vocab_size, vocab_size = config.vocab_size,
    make_vocab_size_divisible_by = config.make_vocab_size_divisible_by or 128,
    tensor_model_parallel_size = layout.tp, pipeline_model_parallel_size = layout.pp,
    virtual_pipeline_model_parallel_size = layout.vp > 1 and layout.vp or P.None,
    num_layers_per_virtual_pipeline_stage = layout.vp > 1 and config.num_layers / (layout.pp * layout.vp) or P.None,
    decoder_first_pipeline_num_layers = layout.first_stage_layers or P.None,
    transformer_impl = layout.transformer_impl, ckpt_format = 'torch',
    params_dtype = P.dtype(Z.TORCH_DTYPE[layout.dtype]), bf16 = layout.dtype == 'bf16', fp16 = layout.dtype == 'f16',
    -- no learned position embedding (Megatron compares this on load, defaulting to true when absent)
    add_position_embedding = false,
    consumed_train_samples = 0, consumed_valid_samples = 0,
  }
  if config.rope_scaling then
    local s = config.rope_scaling
    if s.type == 'llama3' then
      -- Megatron fixes all but the factor
      for key, fixed in pairs(MEGATRON_LLAMA3) do
        if s[key] ~= fixed then
          error(string.format("megatron checkpoint: Megatron's --use-rope-scaling fixes %s at %s; this model has %s",
            key, fixed, tostring(s[key])), 0)
        end
      end
      a.use_rope_scaling, a.rope_scaling_factor = true, s.factor
    elseif s.type == 'linear' then
      a.rotary_seq_len_interpolation_factor = s.factor
    end
  end
  if config.add_proj_bias ~= config.add_mlp_bias then
    error('megatron checkpoint: Megatron has one add_bias_linear for linear_proj and the MLP; this model has ' ..
      'add_proj_bias ~= add_mlp_bias', 0)
  end
  for k, v in pairs(extra or {}) do a[k] = v end
  return P.namespace(float_args(a))
end

-- The weight names of one stage's chunk in Megatron's module order: names (pmp globals, sorted or not)
-- of layers [first, first + count) renumbered from 0, with the embedding on the first stage and the
-- final norm and output layer on the last.
local LAYER_ORDER = { 'input_layernorm.weight', 'input_layernorm.bias', 'self_attention.linear_proj.weight',
  'self_attention.linear_proj.bias', 'self_attention.linear_qkv.weight', 'self_attention.linear_qkv.bias',
  'self_attention.q_layernorm.weight', 'self_attention.q_layernorm.bias', 'self_attention.k_layernorm.weight',
  'self_attention.k_layernorm.bias', 'pre_mlp_layernorm.weight', 'pre_mlp_layernorm.bias', 'mlp.linear_fc1.weight',
  'mlp.linear_fc1.bias', 'mlp.linear_fc2.weight', 'mlp.linear_fc2.bias' }

--- Writes a Megatron torch checkpoint of any layout, tensor by tensor. spec:
---   names         the pmp global names of the weights (a model's state_dict keys)
---   shapes        name -> whole shape
---   tensor(name)  the whole tensor (called when its part is written; any dtype)
---   config        the GPTModel config
---   tp, pp, vp    parallel sizes (default 1), first_stage_layers (--decoder-first-pipeline-num-layers)
---   transformer_impl  'local' (default) or 'transformer_engine'
---   dtype         of the saved weights (default f32), iteration (default 'release'), args (extra fields)
---   progress(done, total, name)  called after each tensor part is written
---   format        'torch' (default) or 'torch_dist' (pmp.checkpoint.torch_dist.save: one copy of each
---                 weight that Megatron-Core reads into any layout)
--- The iteration directory is written to a temporary one and renamed, then the tracker is rewritten.
function M.save(dir, spec)
  local format = spec.format or 'torch'
  if format == 'torch_dist' then return require('pmp.checkpoint.torch_dist').save(dir, spec, M) end
  if format ~= 'torch' then fail("format '%s' (torch, torch_dist)", tostring(format)) end
  local config = spec.config
  local tp, pp, vp = spec.tp or 1, spec.pp or 1, spec.vp or 1
  local impl = spec.transformer_impl or 'local'
  if impl ~= 'local' and impl ~= 'transformer_engine' then fail("transformer_impl '%s' (local, transformer_engine)", impl) end
  local dtype = spec.dtype or 'f32'
  local iteration = spec.iteration or 'release'
  sharding.check_config(config, tp)
  local chunk_ranges = vp > 1 and pipeline.chunk_layers(config.num_layers, pp, vp, spec.first_stage_layers)
    or nil
  local stages = not chunk_ranges and sharding.stage_layers(config.num_layers, pp, spec.first_stage_layers) or nil
  local layout = { tp = tp, pp = pp, vp = vp, first_stage_layers = spec.first_stage_layers, transformer_impl = impl,
    dtype = dtype }
  local args = M.args_for(config, layout, spec.args)
  local known = {}
  for _, name in ipairs(spec.names) do known[name] = true end
  local total, done = tp * #spec.names, 0

  local placed = {}   -- the weights some rank file holds
  -- The state dict of chunk v of stage p on TP rank t.
  local function chunk_state(p, v, t)
    local range = chunk_ranges and chunk_ranges[p + 1][v] or stages[p + 1]
    local first_chunk = p == 0 and v == 1
    local last_chunk = p == pp - 1 and v == vp
    local sd = P.dict(true)
    local function add(global, key)
      placed[global] = true
      local shape = { unpack(spec.shapes[global]) }
      local rule = sharding.rule(global, config)
      if rule and tp > 1 then shape[rule.dim] = shape[rule.dim] / tp end
      P.set(sd, key, Z.deferred(dtype, shape, function()
        local part = sharding.shard(global, spec.tensor(global), config, tp, t)
        done = done + 1
        if spec.progress then spec.progress(done, total, global) end
        return part
      end))
    end
    if first_chunk then add('embedding.word_embeddings.weight', 'embedding.word_embeddings.weight') end
    for i = 0, range.count - 1 do
      local prefix = 'decoder.layers.' .. (range.first + i) .. '.'
      for _, rest in ipairs(LAYER_ORDER) do
        if known[prefix .. rest] then add(prefix .. rest, to_megatron('decoder.layers.' .. i .. '.' .. rest, impl)) end
      end
      for _, extra in ipairs(LAYER_EXTRA[impl]) do
        P.set(sd, 'decoder.layers.' .. i .. '.' .. extra, impl == 'local' and P.None or tensor.empty({ 0 }, { dtype = 'u8' }))
      end
    end
    if last_chunk then
      add('decoder.final_layernorm.weight', 'decoder.final_layernorm.weight')
      if known['decoder.final_layernorm.bias'] then add('decoder.final_layernorm.bias', 'decoder.final_layernorm.bias') end
      if known['output_layer.weight'] then
        add('output_layer.weight', 'output_layer.weight')
      elseif pp > 1 then
        -- tied: the last stage keeps its own copy of the word embeddings as its output layer
        local shape = { unpack(spec.shapes['embedding.word_embeddings.weight']) }
        if tp > 1 then shape[1] = shape[1] / tp end
        P.set(sd, 'output_layer.weight', Z.deferred(dtype, shape, function()
          return sharding.shard('output_layer.weight', spec.tensor('embedding.word_embeddings.weight'), config, tp, t)
        end))
      end
      P.set(sd, 'output_layer._extra_state', impl == 'local' and P.None or tensor.empty({ 0 }, { dtype = 'u8' }))
    end
    return sd
  end

  -- every weight has its place in Megatron's layout before anything is written
  for p = 0, pp - 1 do
    for v = 1, vp do chunk_state(p, v, 0) end
  end
  local unplaced = {}
  for _, name in ipairs(spec.names) do
    if not placed[name] then unplaced[#unplaced + 1] = name end
  end
  if #unplaced > 0 then fail('%s: no place in a Megatron GPT model for %s', dir, table.concat(unplaced, ', ')) end

  local root = M.iteration_dir(dir, iteration)
  io_.mkdir_p(dir)
  io_.remove_stale_temporaries(dir)
  io_.replace_dir_atomic(root, function(tmp)
    for p = 0, pp - 1 do
      for t = 0, tp - 1 do
        local rank_dir = io_.join(tmp, M.rank_dir_name(t, p, pp))
        io_.mkdir_p(rank_dir)
        local value = P.dict(false)
        P.set(value, 'args', args)
        P.set(value, 'checkpoint_version', P.float(M.CHECKPOINT_VERSION))
        P.set(value, 'iteration', iteration == 'release' and 0 or iteration)
        if vp == 1 then
          P.set(value, 'model', chunk_state(p, 1, t))
        else
          for v = 1, vp do P.set(value, 'model' .. (v - 1), chunk_state(p, v, t)) end
        end
        Z.save(io_.join(rank_dir, M.MODEL_FILE), value)
      end
    end
  end)
  io_.write_atomic(io_.join(dir, M.TRACKER), tostring(iteration) .. '\n')
  return root
end

--- Writes model (a whole GPTModel in this process) as a Megatron torch checkpoint; options as for
--- M.save (tp, pp, vp, transformer_impl, dtype (default the model's), iteration, args, progress).
function M.save_model(dir, model, options)
  local spec = {}
  for k, v in pairs(options or {}) do spec[k] = v end
  local state = model:state_dict()
  spec.names, spec.shapes = {}, {}
  for name, t in pairs(state) do
    spec.names[#spec.names + 1] = name
    spec.shapes[name] = t.shape
  end
  table.sort(spec.names)
  spec.tensor = function(name) return state[name] end
  spec.config = model.config
  spec.dtype = spec.dtype or model.config.dtype
  return M.save(dir, spec)
end

return M
