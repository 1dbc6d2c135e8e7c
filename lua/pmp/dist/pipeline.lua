-- Pipeline parallelism: each rank of the 'pp' group holds consecutive transformer layers of one
-- GPTModel and micro-batches flow through the stages with Megatron-LM's non-interleaved 1F1B schedule.
--
--   local pipeline = require 'pmp.dist.pipeline'
--   pipeline.stage(model)                                   -- every rank built the whole model first
--   pmp.nn.parallel.tensor_parallel(model)                  -- optional, after stage
--   local opt = pmp.optim.AdamW(model:parameters(), ...)
--   local loss = pipeline.forward_backward(model, micro_batches)   -- a number on the last stage
--   pipeline.sync_embedding_grads(model)                    -- tied embeddings: before opt:step()
--   opt:step()
--   print(pipeline.broadcast_loss(loss))                    -- the same number on every stage
--
-- With a pipeline of one stage every function here degrades to the single-process computation
-- (forward_backward is then plain gradient accumulation over the micro-batches).
local tensor = require 'pmp.tensor'
local layers = require 'pmp.nn.layers'
local sharding = require 'pmp.dist.sharding'

local M = {}

-- Activations travel downstream and their gradients upstream on the same pair of ranks; separate
-- tags keep the two streams from ever matching each other's receives.
local FORWARD_TAG, BACKWARD_TAG = 17, 18

local function pp_group(options)
  return (options and options.group) or require('pmp.dist').group('pp')
end

-- Turns a GPTModel that this rank built whole (same seed everywhere, so the weights are the single
-- process's) into this rank's stage, in place, and returns it. options: group (the 'pp' group),
-- first_stage_layers / last_stage_layers (Megatron's --decoder-first/last-pipeline-num-layers; the
-- other stages split the rest evenly). The stage's layers are renumbered from 0, as Megatron's per-rank
-- checkpoints number them; model.pipeline records the stage, its global layer offset and count.
function M.stage(model, options)
  options = options or {}
  local group = pp_group(options)
  if group.size == 1 then return model end
  if model.pipeline then
    error(string.format('pipeline.stage: the model is already stage %d of %d', model.pipeline.stage, model.pipeline.stages), 2)
  end
  if model.tensor_parallel then
    -- the last stage's copy of tied embeddings is made from the whole embedding, then split like it
    error('pipeline.stage: make the pipeline stage before pmp.nn.parallel.tensor_parallel splits the model', 2)
  end
  local config = model.config
  local ok, stages = pcall(sharding.stage_layers, config.num_layers, group.size, options.first_stage_layers,
    options.last_stage_layers)
  if not ok then error(stages, 2) end   -- raised here, the message points at the caller's line
  local mine = stages[group.rank + 1]
  local is_first, is_last = group.rank == 0, group.rank == group.size - 1
  local all = model.decoder.layers.items
  local kept = {}
  for k = 1, mine.count do kept[k] = all[mine.first + k] end
  model.decoder.layers = layers.ModuleList(kept)
  if is_last and config.tie_embeddings then
    -- Megatron's last stage holds its own copy of the word embeddings as output_layer.weight; the
    -- two copies stay equal because sync_embedding_grads gives both the summed gradient.
    local output = layers.Linear(config.hidden_size, config.padded_vocab_size, { bias = false, dtype = config.dtype })
    output.weight = model.embedding.word_embeddings.weight:detach():clone():requires_grad_()
    model.output_layer = output
  end
  if not is_first then model.embedding = nil end
  if not is_last then
    model.decoder.final_layernorm = nil
    model.output_layer = nil
  end
  rawset(model, 'pipeline', { stage = group.rank, stages = group.size, layer_offset = mine.first,
    num_layers = mine.count, is_first = is_first, is_last = is_last })
  return model
end

-- The weight shared by the first stage (embedding) and the last (output layer) when the model ties
-- them and has more than one stage; nil otherwise.
local function tied_weight(model)
  local p = model.pipeline
  if not p or not model.config.tie_embeddings then return nil end
  if p.is_first then return model.embedding.word_embeddings.weight end
  if p.is_last then return model.output_layer.weight end
  return nil
end

-- Sums the gradient of the tied word-embedding weight over the first and last stage (the 'embedding'
-- group, or options.group), so both copies take the same optimizer step. Call it after
-- forward_backward and before the optimizer step, on every rank (middle stages return at once).
function M.sync_embedding_grads(model, options)
  local weight = tied_weight(model)
  if not weight then return end
  local group = (options and options.group) or require('pmp.dist').group('embedding')
  if weight.grad == nil then weight.grad = tensor.zeros(weight.shape, { dtype = weight.dtype }) end
  group:all_reduce(weight.grad, 'sum')
end

local function check_micro_batches(micro_batches)
  if type(micro_batches) ~= 'table' or #micro_batches == 0 then
    error('pipeline.forward_backward: expected a non-empty list of micro-batches {ids = [mb, T], targets = [mb, T]}', 3)
  end
  for k, mb in ipairs(micro_batches) do
    if not tensor.is_tensor(mb.ids) or not tensor.is_tensor(mb.targets) then
      error(string.format('pipeline.forward_backward: micro-batch %d needs ids and targets tensors', k), 3)
    end
  end
end

-- Runs forward and backward of every micro-batch through the pipeline (Megatron's 1F1B: stage s runs
-- pp - s - 1 warm-up forwards, then alternates one forward with one backward, then drains the
-- remaining backwards), accumulating gradients into the stage's parameters.
--   micro_batches: a list of {ids = [mb, T] i64, targets = [mb, T] i64, options = GPTModel forward
--     options (optional)}, the same list on every rank; the first stage reads ids, the last targets.
--   options: group ('pp'), forward_only (forwards only, without recording the graph: validation),
--     hidden_shape (the activation between stages; default {mb, T, hidden_size}, with T / tp under
--     sequence parallelism), dtype (the activation dtype; default the model's), loss_scale (default
--     1 / #micro_batches: the gradient is that of the mean loss), before_last_backward (called on
--     every stage just before the last micro-batch's backward, e.g. to let data-parallel gradient
--     buckets start reducing).
-- Returns the mean loss over the micro-batches on the last stage, nil on the others.
function M.forward_backward(model, micro_batches, options)
  options = options or {}
  check_micro_batches(micro_batches)
  local group = pp_group(options)
  local info = model.pipeline
  if group.size > 1 and not (info and info.stage == group.rank and info.stages == group.size) then
    error(string.format('pipeline.forward_backward: the model is not stage %d of %d (call pipeline.stage with group %s)',
      group.rank, group.size, group.name or 'pp'), 2)
  end
  local rank, size = group.rank, group.size
  local is_first, is_last = rank == 0, rank == size - 1
  local n = #micro_batches
  local forward_only = options.forward_only
  local scale = options.loss_scale or 1 / n
  local ids = micro_batches[1].ids
  local hidden_shape = options.hidden_shape
  if not hidden_shape then
    -- under sequence parallelism (pmp.nn.parallel) each rank passes on its slice of the sequence
    local tp = model.tensor_parallel
    local T = (tp and tp.sequence_parallel) and ids:size(2) / tp.group.size or ids:size(2)
    hidden_shape = { ids:size(1), T, model.config.hidden_size }
  end
  local dtype = options.dtype or model.config.dtype
  local sends, loss_sum = {}, 0

  local function receive(peer, tag, what, k)
    local t = tensor.empty(hidden_shape, { dtype = dtype })
    local ok, err = pcall(function() group:recv(t, peer, { tag = tag }) end)
    if not ok then
      error(string.format('pipeline: stage %d receiving the %s of micro-batch %d from stage %d: %s', rank, what, k,
        peer, tostring(err)), 0)
    end
    return t
  end
  -- Sends overlap with compute; finished ones are dropped so that their buffers (and the activation's
  -- graph, which a sent output keeps alive) can go.
  local function send(t, peer, tag)
    local open = {}
    for _, h in ipairs(sends) do
      if h:is_completed() then h:wait() else open[#open + 1] = h end
    end
    open[#open + 1] = group:send(t, peer, { tag = tag, async = true })
    sends = open
  end

  -- One micro-batch's forward; returns {input, output} for its backward.
  local function forward(k)
    local mb = micro_batches[k]
    local input = mb.ids
    if not is_first then
      input = receive(rank - 1, FORWARD_TAG, 'activations', k)
      if not forward_only then input:requires_grad_() end
    end
    local output = model(input, is_last and mb.targets or nil, mb.options)
    if is_last then
      loss_sum = loss_sum + output:item()
    else
      send(output, rank + 1, FORWARD_TAG)
    end
    return { input = input, output = output }
  end

  -- One micro-batch's backward; the graph it walked is freed once `step` is dropped by the caller.
  local function backward(k, step)
    if k == n and options.before_last_backward then options.before_last_backward() end
    if is_last then
      (step.output * scale):backward()
    else
      step.output:backward(receive(rank + 1, BACKWARD_TAG, 'output gradient', k))
    end
    if not is_first then
      send(step.input.grad or tensor.zeros(hidden_shape, { dtype = dtype }), rank - 1, BACKWARD_TAG)
    end
  end

  if forward_only then
    require('pmp').no_grad(function()
      for k = 1, n do forward(k) end
    end)
  else
    local warmup = math.min(size - rank - 1, n)
    local in_flight = {}    -- forwards whose backward has not run yet, oldest first
    local next_backward = 1
    for k = 1, n do
      in_flight[#in_flight + 1] = forward(k)
      if k > warmup then
        backward(next_backward, table.remove(in_flight, 1))
        next_backward = next_backward + 1
      end
    end
    while next_backward <= n do
      backward(next_backward, table.remove(in_flight, 1))
      next_backward = next_backward + 1
    end
  end
  for _, h in ipairs(sends) do h:wait() end
  if is_last then return loss_sum / n end
  return nil
end

-- The last stage's loss (a number, or nil elsewhere) on every rank of the pipeline, for logging.
function M.broadcast_loss(loss, options)
  local group = pp_group(options)
  if group.size == 1 then return loss end
  local t = tensor.tensor({ loss or 0 }, { dtype = 'f64' })
  group:broadcast(t, group.size - 1)
  return t:item()
end

return M
