--- Pipeline parallelism: each rank of the 'pp' group holds consecutive transformer layers of one
--- GPTModel and micro-batches flow through the stages with Megatron-LM's 1F1B schedules.
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
-- Interleaved (virtual) stages, Megatron's --num-layers-per-virtual-pipeline-stage: each rank holds
-- several non-consecutive blocks of layers (model chunks) and runs the interleaved 1F1B schedule, which
-- divides the pipeline bubble by the number of chunks at the cost of that much more point-to-point
-- traffic.
--
--   local model = pipeline.stage(model, {virtual_stages = 2})   -- a pipeline.Chunks of 2 GPTModels
--   for _, chunk in ipairs(pipeline.chunks(model)) do pmp.nn.parallel.tensor_parallel(chunk) end
--   ... then as above: forward_backward, sync_embedding_grads and the optimizer take the Chunks.
--
-- With a pipeline of one stage every function here degrades to the single-process computation
-- (forward_backward is then plain gradient accumulation over the micro-batches).
local tensor = require 'pmp.tensor'
local Module = require 'pmp.nn.module'
local layers = require 'pmp.nn.layers'
local transformer = require 'pmp.nn.transformer'
local sharding = require 'pmp.dist.sharding'

local M = {}

-- Activations travel downstream and their gradients upstream on the same pair of ranks; separate
-- tags keep the two streams from ever matching each other's receives.
local FORWARD_TAG, BACKWARD_TAG = 17, 18

local function pp_group(options)
  return (options and options.group) or require('pmp.dist').group('pp')
end

---------------------------------------------------------------------------------------------------
-- Model chunks

-- One rank's virtual pipeline stages, kept as Megatron keeps them (a list of models): chunk v
-- (0-based) is the child 'model<v>', the name Megatron's checkpoints give it, and items lists the
-- chunks in order. Being a Module, it gives parameters(), to(), train() and optimizers every chunk;
-- it has no forward: pipeline.forward_backward runs the chunks.
M.Chunks = Module:extend('PipelineChunks')
function M.Chunks:init(chunks)
  rawset(self, 'items', {})
  rawset(self, 'config', chunks[1].config)
  for v, chunk in ipairs(chunks) do
    self['model' .. (v - 1)] = chunk
    self.items[v] = chunk
  end
end
function M.Chunks:forward()
  error('pipeline.Chunks has no forward: run its chunks with pipeline.forward_backward', 2)
end
function M.Chunks:extra_repr()
  local p = self.items[1].pipeline
  return string.format('%s; %d virtual stages of pipeline stage %d of %d', self.items[1]:extra_repr(), #self.items,
    p.stage, p.stages)
end

-- Whether model is a pipeline.Chunks.
function M.is_chunks(model)
  local mt = type(model) == 'table' and getmetatable(model)
  return mt and mt.__class == M.Chunks or false
end

-- The models a rank runs: the chunks of a pipeline.Chunks, else {model}.
function M.chunks(model)
  if M.is_chunks(model) then return model.items end
  return { model }
end

-- A chunk after the first: a GPTModel made of parts of the model pipeline.stage cut up (the first
-- chunk is that model itself). GPTModel:init would build and initialize a whole model, drawing random
-- numbers the single process does not draw.
local ChunkDecoder = transformer.TransformerDecoder:extend('TransformerDecoder')
function ChunkDecoder:init(kept, recompute)
  self.layers = layers.ModuleList(kept)
  if recompute then rawset(self, 'recompute', true) end
end

local Chunk = transformer.GPTModel:extend('GPTModel')
function Chunk:init(config, rotary_pos_emb)
  rawset(self, 'config', config)
  self.rotary_pos_emb = rotary_pos_emb
end

-- Layers of every model chunk under interleaving, as Megatron places them (get_transformer_layer_offset):
-- the model is cut into `virtual` rounds of num_layers / virtual consecutive layers, and each round is
-- split over the pp ranks as stage_layers splits a whole model (the first and last rank taking
-- first_stage_layers / virtual and last_stage_layers / virtual of it). Rank p's chunk v is stage p of
-- round v, so a micro-batch visits ranks 0, 1, ..., pp - 1, then rank 0 again for the next round.
-- Returns out[p + 1][v + 1] = {first = global 0-based layer, count}.
function M.chunk_layers(num_layers, pp, virtual, first_stage_layers, last_stage_layers)
  local function divides(n) return n == nil or n % virtual == 0 end
  local ok, stages = false, nil
  if divides(num_layers) and divides(first_stage_layers) and divides(last_stage_layers) then
    ok, stages = pcall(sharding.stage_layers, num_layers / virtual, pp,
      first_stage_layers and first_stage_layers / virtual, last_stage_layers and last_stage_layers / virtual)
  end
  if not ok then
    error(string.format('pipeline: %d layers cannot be split into %d virtual stages on each of %d stages ' ..
      '(first stage %s, last stage %s layers)', num_layers, virtual, pp, tostring(first_stage_layers or 'even'),
      tostring(last_stage_layers or 'even')), 2)
  end
  local round, out = num_layers / virtual, {}
  for p = 1, pp do
    out[p] = {}
    for v = 1, virtual do out[p][v] = { first = (v - 1) * round + stages[p].first, count = stages[p].count } end
  end
  return out
end

-- Turns a GPTModel that this rank built whole (same seed everywhere, so the weights are the single
-- process's) into this rank's stage, in place, and returns it. options: group (the 'pp' group),
-- first_stage_layers / last_stage_layers (Megatron's --decoder-first/last-pipeline-num-layers; the
-- other stages split the rest evenly), virtual_stages (default 1; see below). The stage's layers are
-- renumbered from 0, as Megatron's per-rank checkpoints number them; model.pipeline records the
-- stage, its global layer offset and count, and whether it holds the embedding (is_first) and the
-- final norm and output layer (is_last; with the output projection, if any). options.unfilled: the
-- model's weights are not read (a model built uninitialized that a checkpoint fills next), so the last
-- stage's copy of tied embeddings is left uninitialized too.
-- With virtual_stages = V > 1 the rank keeps V chunks (see chunk_layers) and stage returns them as a
-- pipeline.Chunks; the model itself becomes the first chunk. Each chunk's pipeline field also has
-- virtual_stage (0-based) and virtual_stages; is_first holds on rank 0's first chunk only, is_last on
-- the last rank's last chunk only.
function M.stage(model, options)
  options = options or {}
  local group = pp_group(options)
  local virtual = options.virtual_stages or 1
  if type(virtual) ~= 'number' or virtual < 1 or virtual % 1 ~= 0 then
    error('pipeline.stage: virtual_stages must be a positive integer, got ' .. tostring(virtual), 2)
  end
  if group.size == 1 then
    if virtual > 1 then
      error(string.format("pipeline.stage: virtual_stages = %d needs a pipeline of more than one stage (group '%s' " ..
        'has one rank)', virtual, group.name or 'pp'), 2)
    end
    return model
  end
  if M.is_chunks(model) or model.pipeline then
    local p = M.chunks(model)[1].pipeline
    error(string.format('pipeline.stage: the model is already stage %d of %d', p.stage, p.stages), 2)
  end
  if model.tensor_parallel then
    -- the last stage's copy of tied embeddings is made from the whole embedding, then split like it
    error('pipeline.stage: make the pipeline stage before pmp.nn.parallel.tensor_parallel splits the model', 2)
  end
  local config = model.config
  local rank, size = group.rank, group.size
  local ok, mine
  if virtual == 1 then
    ok, mine = pcall(sharding.stage_layers, config.num_layers, size, options.first_stage_layers,
      options.last_stage_layers)
    mine = ok and { mine[rank + 1] } or mine
  else
    ok, mine = pcall(M.chunk_layers, config.num_layers, size, virtual, options.first_stage_layers,
      options.last_stage_layers)
    mine = ok and mine[rank + 1] or mine
  end
  if not ok then error(mine, 2) end   -- raised here, the message points at the caller's line

  -- what the chunks are made of, taken before the model becomes the first of them
  local all, embedding, final_layernorm = model.decoder.layers.items, model.embedding, model.decoder.final_layernorm
  local output, output_projection = model.output_layer, model.output_projection
  if rank == size - 1 and config.tie_embeddings then
    -- Megatron's last stage holds its own copy of the word embeddings as output_layer.weight; the
    -- two copies stay equal because sync_embedding_grads gives both the summed gradient.
    local width = embedding.word_embeddings.weight:size(2)
    -- (uninitialized: drawing its values would move this rank's generator away from the single process's)
    output = layers.Linear(width, config.padded_vocab_size, { bias = false, dtype = config.dtype, init = false })
    if not options.unfilled then output.weight = embedding.word_embeddings.weight:detach():clone():requires_grad_() end
  end
  local chunks = {}
  for v = 1, virtual do
    local is_first, is_last = rank == 0 and v == 1, rank == size - 1 and v == virtual
    local kept = {}
    for k = 1, mine[v].count do kept[k] = all[mine[v].first + k] end
    local chunk = model
    if v == 1 then
      model.decoder.layers = layers.ModuleList(kept)
    else
      chunk = Chunk(config, model.rotary_pos_emb)
      chunk.decoder = ChunkDecoder(kept, rawget(model.decoder, 'recompute'))
    end
    chunk.embedding = is_first and embedding or nil
    chunk.decoder.final_layernorm = is_last and final_layernorm or nil
    chunk.output_layer = is_last and output or nil
    chunk.output_projection = is_last and output_projection or nil
    rawset(chunk, 'pipeline', { stage = rank, stages = size, virtual_stage = v - 1, virtual_stages = virtual,
      layer_offset = mine[v].first, num_layers = mine[v].count, is_first = is_first, is_last = is_last })
    chunks[v] = chunk
  end
  if virtual == 1 then return model end
  return M.Chunks(chunks)
end

---------------------------------------------------------------------------------------------------
-- Tied embeddings

-- The weight shared by the first stage (embedding) and the last (output layer) when the model ties
-- them and has more than one stage; nil otherwise (and on middle stages).
local function tied_weight(model)
  for _, chunk in ipairs(M.chunks(model)) do
    local p = chunk.pipeline
    if p and chunk.config.tie_embeddings then
      if p.is_first then return chunk.embedding.word_embeddings.weight end
      if p.is_last then return chunk.output_layer.weight end
    end
  end
  return nil
end

-- Sums the gradient of the tied word-embedding weight over the first and last stage (the 'embedding'
-- group, or options.group), so both copies take the same optimizer step. Call it after
-- forward_backward and before the optimizer step, on every rank (middle stages return at once).
-- model: a stage, or the pipeline.Chunks of one (the copies are on rank 0's first chunk and the last
-- rank's last chunk).
function M.sync_embedding_grads(model, options)
  local weight = tied_weight(model)
  if not weight then return end
  local group = (options and options.group) or require('pmp.dist').group('embedding')
  if weight.grad == nil then weight.grad = tensor.zeros(weight.shape, { dtype = weight.dtype }) end
  group:all_reduce(weight.grad, 'sum')
end

---------------------------------------------------------------------------------------------------
-- Schedules

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

local function check_chunks(chunks, group)
  local V = #chunks
  if group.size == 1 and V == 1 then return end
  for v, chunk in ipairs(chunks) do
    local p = chunk.pipeline
    if not (p and p.stage == group.rank and p.stages == group.size and (p.virtual_stages or 1) == V
        and (p.virtual_stage or 0) == v - 1) then
      local what = V > 1 and string.format('chunk %d of %d is not virtual stage %d', v, V, v - 1) or
        (p and (p.virtual_stages or 1) > 1) and 'the model is one chunk of a pipeline.Chunks (pass the Chunks)' or
        'the model is not'
      error(string.format("pipeline.forward_backward: %s of stage %d of %d (call pipeline.stage with group '%s')",
        what, group.rank, group.size, group.name or 'pp'), 3)
    end
  end
end

-- Megatron's schedule table (get_schedule_table, with microbatch_group_size_per_vp_stage = pp): the
-- order of forwards on every rank as a list of {micro-batch, chunk}. Micro-batches go in groups of
-- group_size; a group goes through chunk 1, then chunk 2, ..., before the next group starts.
local function schedule_table(n, V, group_size)
  local out = {}
  for first = 1, n, group_size do
    for v = 1, V do
      for k = first, math.min(first + group_size - 1, n) do out[#out + 1] = { k, v } end
    end
  end
  return out
end

-- The dtype of a chunk's activations: its parameters' (a model cast by :to, as --bf16 and --fp16 do,
-- keeps the config.dtype it was built with).
local function parameter_dtype(chunk)
  local first = chunk:parameters()[1]
  return first and first.dtype or chunk.config.dtype
end

-- One forward_backward call: this rank's place in the pipeline, the schedule, the sends in flight
-- and the loss summed so far.
local Run = {}
Run.__index = Run

local function new_run(chunks, micro_batches, group, options)
  local rank, size, V = group.rank, group.size, #chunks
  local hidden_shape = options.hidden_shape
  if not hidden_shape then
    -- under sequence parallelism (pmp.nn.parallel) each rank passes on its slice of the sequence
    local ids = micro_batches[1].ids
    local tp = chunks[1].tensor_parallel
    local T = (tp and tp.sequence_parallel) and ids:size(2) / tp.group.size or ids:size(2)
    hidden_shape = { ids:size(1), T, chunks[1].config.hidden_size }
  end
  return setmetatable({
    chunks = chunks, micro_batches = micro_batches, group = group, options = options,
    rank = rank, size = size, V = V, forward_only = options.forward_only,
    scale = options.loss_scale or 1 / #micro_batches,
    hidden_shape = hidden_shape, dtype = options.dtype or parameter_dtype(chunks[1]),
    -- the neighbours of every chunk: virtual stage v * pp + rank follows v * pp + rank - 1, on the
    -- previous rank or (on rank 0) on the last rank for the previous chunk
    previous = (rank - 1) % size, next_ = (rank + 1) % size,
    order = schedule_table(#micro_batches, V, size),
    sends = {}, loss_sum = 0,
  }, Run)
end

function Run:where(v)
  return self.V > 1 and string.format('stage %d chunk %d', self.rank, v - 1) or 'stage ' .. self.rank
end

function Run:receive(peer, tag, what, k, v)
  local t = tensor.empty(self.hidden_shape, { dtype = self.dtype })
  local group = self.group
  local ok, err = pcall(group.recv, group, t, peer, { tag = tag })
  if not ok then
    error(string.format('pipeline: %s receiving the %s of micro-batch %d from stage %d: %s', self:where(v), what, k,
      peer, tostring(err)), 0)
  end
  return t
end

-- Sends overlap with compute; finished ones are dropped so that their buffers (and the activation's
-- graph, which a sent output keeps alive) can go.
function Run:send(t, peer, tag)
  local open = {}
  for _, h in ipairs(self.sends) do
    if h:is_completed() then h:wait() else open[#open + 1] = h end
  end
  open[#open + 1] = self.group:send(t, peer, { tag = tag, async = true })
  self.sends = open
end

-- Micro-batch k's forward through chunk v; returns {k, v, input, output} for its backward.
function Run:forward(k, v)
  local rank, size = self.rank, self.size
  local mb, is_first, is_last = self.micro_batches[k], rank == 0 and v == 1, rank == size - 1 and v == self.V
  local input = mb.ids
  if not is_first then
    input = self:receive(self.previous, FORWARD_TAG, 'activations', k, v)
    if not self.forward_only then input:requires_grad_() end
  end
  local output = self.chunks[v](input, is_last and mb.targets or nil, mb.options)
  if is_last then
    self.loss_sum = self.loss_sum + output:item()
  else
    self:send(output, self.next_, FORWARD_TAG)
  end
  return { k = k, v = v, input = input, output = output }
end

-- One forward's backward; the graph it walked is freed once `step` is dropped by the caller.
function Run:backward(step, final)
  local k, v = step.k, step.v
  -- Only the schedule's final backward may let data-parallel buckets start: under the interleaved
  -- schedule other micro-batches' backwards follow the last micro-batch's first one, and with
  -- activation recompute their graphs only read the parameters again when they run.
  local before_last_backward = self.options.before_last_backward
  if final and before_last_backward then before_last_backward() end
  if self.rank == self.size - 1 and v == self.V then
    (step.output * self.scale):backward()
  else
    step.output:backward(self:receive(self.next_, BACKWARD_TAG, 'output gradient', k, v))
  end
  if not (self.rank == 0 and v == 1) then
    self:send(step.input.grad or tensor.zeros(self.hidden_shape, { dtype = self.dtype }), self.previous, BACKWARD_TAG)
  end
end

-- forward_only: every forward in schedule order.
local function run_forwards(run)
  for _, e in ipairs(run.order) do run:forward(e[1], e[2]) end
end

-- The 1F1B schedules: warm-up forwards, then one forward and one backward at a time, then the
-- remaining backwards. Backward j is that of the oldest outstanding forward of the chunk the reversed
-- table names.
local function run_one_forward_one_backward(run)
  local order, rank, size, V = run.order, run.rank, run.size, run.V
  local total = #order
  local warmup = V == 1 and size - rank - 1 or 2 * (size - rank - 1) + (V - 1) * size
  warmup = math.min(warmup, total)
  local in_flight = {}    -- per chunk, the forwards whose backward has not run yet, oldest first
  for v = 1, V do in_flight[v] = {} end
  local function run_forward(j)
    local list = in_flight[order[j][2]]
    list[#list + 1] = run:forward(order[j][1], order[j][2])
  end
  local function run_backward(j) run:backward(table.remove(in_flight[V + 1 - order[j][2]], 1), j == total) end
  for j = 1, warmup do run_forward(j) end
  for j = 1, total - warmup do
    run_forward(warmup + j)
    run_backward(j)
  end
  for j = total - warmup + 1, total do run_backward(j) end
end

-- Runs forward and backward of every micro-batch through the pipeline, accumulating gradients into
-- the stage's parameters, with Megatron's schedules:
--   * one chunk per rank (forward_backward_pipelining_without_interleaving): stage s runs pp - s - 1
--     warm-up forwards, then alternates one forward with one backward, then drains the backwards;
--   * V chunks (forward_backward_pipelining_with_interleaving): the forwards follow schedule_table,
--     the backwards the same table with the chunks reversed (chunk V - v + 1 where the table says v);
--     stage s runs 2 (pp - s - 1) + (V - 1) pp warm-up forwards, then one forward and one backward at
--     a time, then the remaining backwards. The number of micro-batches must be a multiple of pp.
-- Sends are asynchronous and each receive waits just before its data is used, which keeps the order
-- of every stage's computation that of Megatron's schedule.
--   model: the stage (pipeline.stage), or its pipeline.Chunks.
--   micro_batches: a list of {ids = [mb, T] i64, targets = [mb, T] i64, options = GPTModel forward
--     options (optional)}, the same list on every rank; the first stage reads ids, the last targets.
--   options: group ('pp'), forward_only (forwards only, without recording the graph: validation),
--     hidden_shape (the activation between stages; default {mb, T, hidden_size}, with T / tp under
--     sequence parallelism), dtype (the activation dtype; default the model's), loss_scale (default
--     1 / #micro_batches: the gradient is that of the mean loss), before_last_backward (called on
--     every stage just before its final backward, after every forward, e.g. to let data-parallel
--     gradient buckets start reducing).
-- Returns the mean loss over the micro-batches on the last stage, nil on the others.
function M.forward_backward(model, micro_batches, options)
  options = options or {}
  check_micro_batches(micro_batches)
  local group = pp_group(options)
  local chunks = M.chunks(model)
  check_chunks(chunks, group)
  local size, V, n = group.size, #chunks, #micro_batches
  if V > 1 and not options.forward_only and n % size ~= 0 then
    error(string.format("pipeline.forward_backward: the interleaved schedule needs a number of micro-batches that " ..
      "is a multiple of the pipeline size %d (group '%s'), got %d", size, group.name or 'pp', n), 2)
  end
  local run = new_run(chunks, micro_batches, group, options)
  if options.forward_only then
    require('pmp').no_grad(run_forwards, run)
  else
    run_one_forward_one_backward(run)
  end
  for _, h in ipairs(run.sends) do h:wait() end
  if run.rank == size - 1 then return run.loss_sum / n end
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
