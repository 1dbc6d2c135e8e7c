--- How a GPTModel's parameters are cut across tensor-parallel ranks and pipeline stages, in Megatron-LM's
--- layout (docs/formats.md §2). One table serves the parallel layers, checkpoint saving and
--- resharding on load:
---   * word_embeddings / output_layer: vocabulary rows split evenly (the padded vocabulary);
---   * linear_qkv: rows, which are grouped per KV head, so each rank holds whole KV groups;
---   * multi-latent attention: linear_q_proj, linear_q_up_proj, linear_kv_up_proj rows (whole heads);
---     linear_q_down_proj, linear_kv_down_proj and their norms whole on every rank;
---   * linear_fc1: rows; for gated MLPs ([gate; up]) each rank holds its slice of gate then of up;
---   * linear_proj, linear_fc2 weights: columns (their biases are whole on every rank);
---   * norms and everything else: whole on every rank;
---   * mixture-of-experts layers (router, experts, shared experts): whole on every rank (Megatron's
---     --expert-tensor-parallel-size 1; experts are split by expert parallelism instead, pmp.nn.moe);
---   * LoRA adapters: see rule.
--- Pipeline stages hold consecutive layers, numbered from 0 on each stage as Megatron's per-rank
--- checkpoints number them.
local tensor = require 'pmp.tensor'

local M = {}

-- The tensor-parallel rule of parameter `name`: nil (replicated) or {dim = 1 or 2, gated = bool}.
function M.rule(name, config)
  if name:match('%.mlp%.experts%.') or name:match('%.mlp%.shared_experts%.') or name:match('%.mlp%.router%.') then
    return nil
  end
  -- LoRA adapters (pmp.nn.lora) split like their layer: B by rows after a column-parallel one, A by
  -- columns before a row-parallel one; the other factor is whole on every rank
  local layer, factor = name:match('%.([%w_]+)%.lora%.[%w_]+%.([AB])$')
  if layer then
    if factor == 'B' and (layer == 'linear_qkv' or layer == 'linear_fc1') then return { dim = 1 } end
    if factor == 'A' and (layer == 'linear_proj' or layer == 'linear_fc2') then return { dim = 2 } end
    return nil
  end
  if name:match('word_embeddings%.weight$') or name:match('^output_layer%.weight$') then return { dim = 1 } end
  if name:match('linear_qkv%.weight$') or name:match('linear_qkv%.bias$') then return { dim = 1 } end
  -- multi-latent attention: the up-projections' rows are whole heads; the down-projections stay whole
  if name:match('linear_q_proj%.weight$') or name:match('linear_q_up_proj%.weight$')
    or name:match('linear_kv_up_proj%.weight$') then
    return { dim = 1 }
  end
  if name:match('linear_fc1%.weight$') or name:match('linear_fc1%.bias$') then
    return { dim = 1, gated = (config.activation or 'swiglu') == 'swiglu' }
  end
  if name:match('linear_proj%.weight$') or name:match('linear_fc2%.weight$') then return { dim = 2 } end
  return nil
end

-- Checks that a config can be split tp ways; returns nothing or raises naming the key.
function M.check_config(config, tp)
  local function divisible(key, value)
    if value % tp ~= 0 then
      error(string.format('tensor parallel size %d: %s (%d) is not divisible by it', tp, key, value), 3)
    end
  end
  divisible('num_attention_heads', config.num_attention_heads)
  divisible('num_query_groups', config.num_query_groups or config.num_attention_heads)
  divisible('ffn_hidden_size', config.ffn_hidden_size)
  divisible('padded_vocab_size', config.padded_vocab_size)
end

-- Rank `rank` (0-based) of tp's part of the full tensor of parameter `name` (a new contiguous tensor).
function M.shard(name, full, config, tp, rank)
  local rule = M.rule(name, config)
  if not rule or tp == 1 then return full:clone() end
  local size = full:size(rule.dim)
  if rule.gated then
    local half = size / 2
    if half % tp ~= 0 then error(string.format("shard '%s': gated size %d not divisible by %d", name, half, tp), 2) end
    local n = half / tp
    return tensor.cat({ full:narrow(rule.dim, 1 + rank * n, n), full:narrow(rule.dim, 1 + half + rank * n, n) }, rule.dim)
  end
  if size % tp ~= 0 then error(string.format("shard '%s': size %d of dim %d is not divisible by %d", name, size, rule.dim, tp), 2) end
  local n = size / tp
  return full:narrow(rule.dim, 1 + rank * n, n):contiguous()
end

-- The shape of each of tp's parts of parameter `name` whose full tensor has shape `shape` (a new table).
function M.shard_shape(name, shape, config, tp)
  local out = {}
  for i, n in ipairs(shape) do out[i] = n end
  local rule = M.rule(name, config)
  if not rule or tp == 1 then return out end
  local size = shape[rule.dim]
  if size % (rule.gated and 2 * tp or tp) ~= 0 then
    error(string.format("shard '%s': size %d of dim %d is not divisible by %s%d", name, size, rule.dim,
      rule.gated and '2 x ' or '', tp), 2)
  end
  out[rule.dim] = size / tp
  return out
end

-- Copies part `rank` of tp of parameter `name` into dst from the saved_tp parts it was saved as, without
-- making the whole tensor or any other temporary: each saved part's rows (or columns) that dst holds
-- are copied straight into their place (gated tensors half by half). part_of(r) gives saved part r
-- (0-based); only the parts that overlap dst are asked for. limit: how much of the whole tensor's cut
-- dimension the saved parts fill (a vocabulary table re-padded to another size: the true vocabulary);
-- dst's rows past it become zeros.
function M.copy_part(name, dst, part_of, saved_tp, tp, rank, config, limit)
  local rule = M.rule(name, config)
  if not rule then
    dst:copy_(part_of(0))
    return
  end
  local d, halves = rule.dim, rule.gated and 2 or 1
  local first = part_of(0)
  local n_src, n_dst = first:size(d) / halves, dst:size(d) / halves
  local extent = math.min(limit or math.huge, n_src * saved_tp)
  local lo_dst = rank * n_dst   -- where dst starts in each half of the whole tensor
  for h = 0, halves - 1 do
    for r = 0, saved_tp - 1 do
      local lo, hi = math.max(lo_dst, r * n_src), math.min(lo_dst + n_dst, (r + 1) * n_src, extent)
      if hi > lo then
        local src = (r == 0 and first or part_of(r)):narrow(d, h * n_src + lo - r * n_src + 1, hi - lo)
        dst:narrow(d, h * n_dst + lo - lo_dst + 1, hi - lo):copy_(src)
      end
    end
    local filled = math.max(0, math.min(n_dst, extent - lo_dst))
    if filled < n_dst then dst:narrow(d, h * n_dst + filled + 1, n_dst - filled):zero_() end
  end
end

-- The full tensor of parameter `name` from its tp parts, in rank order.
function M.unshard(name, parts, config)
  local rule = M.rule(name, config)
  if not rule or #parts == 1 then return parts[1]:clone() end
  if rule.gated then
    local gates, ups = {}, {}
    for k, p in ipairs(parts) do
      local n = p:size(rule.dim) / 2
      gates[k] = p:narrow(rule.dim, 1, n)
      ups[k] = p:narrow(rule.dim, 1 + n, n)
    end
    return tensor.cat({ tensor.cat(gates, rule.dim), tensor.cat(ups, rule.dim) }, rule.dim)
  end
  return tensor.cat(parts, rule.dim)
end

-- Layers of each pipeline stage: a list of {first = global 0-based index, count}, one per stage.
-- first_stage_layers (Megatron's --decoder-first-pipeline-num-layers) gives the first stage that many
-- and splits the rest evenly; last_stage_layers likewise for the last.
function M.stage_layers(num_layers, pp, first_stage_layers, last_stage_layers)
  local counts = {}
  local rest, stages = num_layers, pp
  if first_stage_layers then rest, stages = rest - first_stage_layers, stages - 1 end
  if last_stage_layers then rest, stages = rest - last_stage_layers, stages - 1 end
  if stages < 0 or rest < 0 or (stages == 0 and rest ~= 0) or (stages > 0 and rest % stages ~= 0) then
    error(string.format('pipeline: %d layers cannot be split into %d stages (first stage %s, last stage %s layers)',
      num_layers, pp, tostring(first_stage_layers or 'even'), tostring(last_stage_layers or 'even')), 2)
  end
  local even = stages > 0 and rest / stages or 0
  for s = 1, pp do counts[s] = even end
  if first_stage_layers then counts[1] = first_stage_layers end
  if last_stage_layers then counts[pp] = last_stage_layers end
  local out, first = {}, 0
  for s = 1, pp do
    out[s] = { first = first, count = counts[s] }
    first = first + counts[s]
  end
  return out
end

-- 'decoder.layers.3.mlp...' -> 'decoder.layers.(3 + offset).mlp...'; other names unchanged.
function M.shift_layer(name, offset)
  local prefix, index, rest = name:match('^(decoder%.layers%.)(%d+)(.*)$')
  if not prefix then return name end
  return prefix .. (tonumber(index) + offset) .. rest
end

-- The stage (1-based) holding global layer `layer` (0-based), from a stage_layers list.
function M.stage_of_layer(stages, layer)
  for s, st in ipairs(stages) do
    if layer >= st.first and layer < st.first + st.count then return s end
  end
  return nil
end

return M
