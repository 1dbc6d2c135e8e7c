--- pmp.summary(model, {seq = T, batch = B}): a table of parameters, activation memory and forward
--- FLOPs per embedding, per transformer block and per output part, with totals, for B sequences of T
--- tokens. pmp.summary.rows(model, options) returns the same numbers as a table.
--
-- The numbers come from the modules' shapes, not from running the model:
--   FLOPs: matrix products only, 2 per multiply-add, as Megatron-LM and the scaling-law papers count:
--     a Linear 2 * tokens * in * out, attention 4 * B * T * S * heads * head_dim for its score and
--     value products (S keys per query: T, or the sliding window; the full T x T is counted even though
--     causal kernels skip the masked half), the logits 2 * tokens * hidden * vocab. Norms, activation
--     functions and softmax are not counted.
--   Activation memory: the tensors backward keeps, in the model's dtype: the inputs of every Linear,
--     norm and activation function, attention's q, k, v and output, and the logits. The engine keeps
--     somewhat more (copies made by layout changes, the loss's softmax, dropout masks): for a small
--     Llama-style model in f32 the estimate was 80% of the memory a forward pass left in use.
--     Recompute (recompute_granularity = 'full') is not taken into account.
-- Parameters of a tensor- or pipeline-parallel model are this rank's.
local Module = require 'pmp.nn.module'

local summary = {}

local DTYPE_BYTES = { f64 = 8, f32 = 4, bf16 = 2, f16 = 2 }

-- The costs a module adds itself, beyond its children: flops, activation bytes.
local function own_cost(m, shape, dtype_bytes)
  local tokens = shape.batch * shape.seq
  local weight = m._parameters.values.weight
  if m.in_features and m.out_features and weight then
    return 2 * tokens * weight:numel(), tokens * weight:size(2) * dtype_bytes
  end
  local name = m.__name
  if name == 'RMSNorm' or name == 'LayerNorm' then return 0, tokens * m.dim * dtype_bytes end
  if name == 'SelfAttention' then
    local d, heads, groups = m.config.kv_channels, m.num_heads, m.num_query_groups
    local keys = (m.window and m.window > 0) and math.min(m.window, shape.seq) or shape.seq
    local flops = 4 * shape.batch * shape.seq * keys * heads * d
    return flops, tokens * ((heads + 2 * groups) * d + heads * d) * dtype_bytes
  end
  if name == 'MLP' then return 0, tokens * m.linear_fc1.weight:size(1) * dtype_bytes end
  return 0, 0
end

-- flops, activation bytes of a module and everything below it.
local function cost(m, shape, dtype_bytes)
  local flops, bytes = own_cost(m, shape, dtype_bytes)
  for _, child in ipairs(m:children()) do
    local f, b = cost(child, shape, dtype_bytes)
    flops, bytes = flops + f, bytes + b
  end
  return flops, bytes
end

local function is_list(m) return m.__name == 'ModuleList' end

local function holds_list(m)
  for _, child in ipairs(m:children()) do
    if is_list(child) then return true end
  end
  return false
end

-- {name, module} per row: the model's children, with a child that holds a ModuleList (the decoder)
-- opened up into its other children and one row per list item (each block).
local function row_modules(m, prefix, out)
  for _, pair in ipairs(m:named_children()) do
    local name, child = prefix .. pair[1], pair[2]
    if is_list(child) then
      for _, item in ipairs(child:named_children()) do out[#out + 1] = { name .. '.' .. item[1], item[2] } end
    elseif holds_list(child) then
      row_modules(child, name .. '.', out)
    else
      out[#out + 1] = { name, child }
    end
  end
  return out
end

local function positive_integer(options, key)
  local v = options[key]
  if type(v) ~= 'number' or v < 1 or v % 1 ~= 0 then
    error(string.format('pmp.summary: options.%s must be a positive integer, got %s', key, tostring(v)), 0)
  end
  return v
end

--- summary.rows(model, {seq = T, batch = B (1)}) -> {rows = {{name, params, activation_bytes, flops}},
--- total = {params, activation_bytes, flops}, tokens, dtype} (see pmp.summary for what is counted).
function summary.rows(model, options)
  if not Module.is_module(model) then error('pmp.summary: expected an nn module as the model', 2) end
  options = options or {}
  local shape = { seq = positive_integer(options, 'seq'), batch = options.batch == nil and 1 or positive_integer(options, 'batch') }
  local first = model:parameters()[1]
  local dtype = first and first.dtype or 'f32'
  local dtype_bytes = DTYPE_BYTES[dtype] or 4
  local rows = {}
  local config = rawget(model, 'config')
  local logits_computed_here = model.__name == 'GPTModel' and config ~= nil
  for _, pair in ipairs(row_modules(model, '', {})) do
    local name, m = pair[1], pair[2]
    local flops, bytes = cost(m, shape, dtype_bytes)
    -- GPTModel multiplies by the output weight's first vocab_size rows itself (the logits row below)
    if logits_computed_here and name == 'output_layer' then flops, bytes = 0, 0 end
    rows[#rows + 1] = { name = name, params = m:num_parameters(), activation_bytes = bytes, flops = flops }
  end
  local own_params = #model._parameters.names > 0 and 0 or nil
  for _, p in ipairs(model._parameters.names) do own_params = own_params + model._parameters.values[p]:numel() end
  if own_params then rows[#rows + 1] = { name = '(own parameters)', params = own_params, activation_bytes = 0, flops = 0 } end
  if logits_computed_here and model.decoder and model.decoder.final_layernorm then
    local tokens = shape.batch * shape.seq
    local width = config.word_embedding_size or config.hidden_size   -- after output_projection, if any
    rows[#rows + 1] = { name = '(logits)', params = 0, flops = 2 * tokens * width * config.vocab_size,
      activation_bytes = tokens * (width + config.vocab_size) * dtype_bytes }
  end
  local total = { params = 0, activation_bytes = 0, flops = 0 }
  for _, row in ipairs(rows) do
    for key in pairs(total) do total[key] = total[key] + row[key] end
  end
  return { rows = rows, total = total, tokens = shape.batch * shape.seq, batch = shape.batch, seq = shape.seq, dtype = dtype }
end

local function human(n, units, step)
  local i = 1
  while n >= step and i < #units do n, i = n / step, i + 1 end
  return i == 1 and string.format('%d %s', n, units[1]) or string.format('%.2f %s', n, units[i])
end

local function count(n) return (human(n, { '', 'K', 'M', 'B', 'T' }, 1000):gsub(' $', '')) end
local function bytes(n) return human(n, { 'B', 'KiB', 'MiB', 'GiB', 'TiB' }, 1024) end
local function flops(n) return human(n, { 'FLOP', 'KFLOP', 'MFLOP', 'GFLOP', 'TFLOP', 'PFLOP' }, 1000) end

--- summary.text(model, options) -> the table pmp.summary prints.
function summary.text(model, options)
  local s = summary.rows(model, options)
  local width = #'total'
  for _, row in ipairs(s.rows) do width = math.max(width, #row.name) end
  local format = '%-' .. width .. 's  %12s  %14s  %16s'
  local lines = {
    string.format('%s, batch %d x seq %d = %d tokens, %s', model.__name, s.batch, s.seq, s.tokens, s.dtype),
    string.format(format, 'layer', 'params', 'activations', 'forward FLOPs'),
  }
  for _, row in ipairs(s.rows) do
    lines[#lines + 1] = string.format(format, row.name, count(row.params), bytes(row.activation_bytes), flops(row.flops))
  end
  lines[#lines + 1] = string.format(format, 'total', count(s.total.params), bytes(s.total.activation_bytes), flops(s.total.flops))
  return table.concat(lines, '\n')
end

return setmetatable(summary, { __call = function(_, model, options) print(summary.text(model, options)) end })
