--- The parallel layout from pmp.train.flags.parallel: one process unless started by mpirun, else
--- Megatron's tensor / pipeline / context / data parallelism, the data-parallel size being what the
--- others leave of the world.
local M = {}

local function check(ok, message, ...)
  if not ok then error(string.format(message, ...), 0) end
end

--- pmp.dist.init with the flags' sizes, after checking that the flags fit together. Returns pmp.dist's
--- layout (tp, pp, cp, dp, world, rank, *_rank) plus virtual (model chunks per pipeline rank),
--- accumulation (micro batches per step on each rank) and is_logger (the last rank: last pipeline
--- stage, last tensor-, context- and data-parallel rank, which logs, as in Megatron). A nil
--- opts.global_batch_size becomes micro batch x data-parallel size, as Megatron's. Turns
--- --sequence-parallel off at tensor-parallel size 1, as Megatron does.
function M.init(opts)
  local tp, pp, cp = opts.tensor_model_parallel_size, opts.pipeline_model_parallel_size, opts.context_parallel_size
  local ep = opts.expert_model_parallel_size or 1
  check(ep == 1 or (opts.num_experts or 0) > 0, '--expert-model-parallel-size %d needs --num-experts', ep)
  check(ep == 1 or (opts.num_experts % ep == 0), '--num-experts %d is not divisible by --expert-model-parallel-size %d',
    opts.num_experts or 0, ep)
  local got, layout = pcall(require('pmp.dist').init, { tp = tp, pp = pp, cp = cp, ep = ep,
    timeout = opts.distributed_timeout_minutes * 60 })
  if not got then error((tostring(layout):gsub('^pmp%.dist%.init: ', '')), 0) end
  local dp = layout.dp
  if opts.sequence_parallel and tp == 1 then opts.sequence_parallel = false end

  -- Context parallelism cuts every sequence into 2 x cp chunks (pmp.nn.context_parallel); sequence
  -- parallelism then cuts a rank's two chunks into tp slices.
  check(opts.seq_length % (2 * cp) == 0, '--seq-length %d is not divisible by 2 x --context-parallel-size %d ' ..
    '(each rank holds two chunks of every sequence)', opts.seq_length, cp)
  check(not opts.sequence_parallel or (opts.seq_length / cp) % tp == 0, '--sequence-parallel needs --seq-length %d / ' ..
    '--context-parallel-size %d divisible by --tensor-model-parallel-size %d', opts.seq_length, cp, tp)
  -- Megatron's default global batch: one micro batch per data-parallel rank (pmp.train.megatron_defaults)
  if opts.global_batch_size == nil then opts.global_batch_size = opts.micro_batch_size * dp end
  check(opts.global_batch_size % (opts.micro_batch_size * dp) == 0, '--global-batch-size %d is not a multiple of ' ..
    '--micro-batch-size %d x data-parallel size %d', opts.global_batch_size, opts.micro_batch_size, dp)
  layout.accumulation = opts.global_batch_size / (opts.micro_batch_size * dp)

  -- Interleaved pipeline: each stage holds `virtual` chunks of --num-layers-per-virtual-pipeline-stage
  -- layers (Megatron: virtual size = num_layers / pp / that), and a step needs a multiple of pp micro batches.
  layout.virtual = 1
  local per_virtual = opts.num_layers_per_virtual_pipeline_stage
  if per_virtual > 0 then
    check(pp > 1, '--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1')
    check(opts.num_layers % (pp * per_virtual) == 0, '--num-layers %d is not a multiple of ' ..
      '--pipeline-model-parallel-size %d x --num-layers-per-virtual-pipeline-stage %d', opts.num_layers, pp, per_virtual)
    layout.virtual = opts.num_layers / (pp * per_virtual)
    check(layout.accumulation % pp == 0, 'the interleaved schedule needs the micro batches per step (%d) to be a ' ..
      'multiple of --pipeline-model-parallel-size %d', layout.accumulation, pp)
  end
  layout.is_logger = layout.rank == layout.world - 1
  return layout
end

--- Every rank built the whole model from the same seed; this keeps its pipeline stage (a
--- pmp.dist.pipeline.Chunks of this rank's chunks under the interleaved schedule) and its tensor- and
--- context-parallel part, so the initial weights are the single-process model's whatever the layout.
--- Casts to bf16 with --bf16, to f16 with --fp16. Returns the model this rank trains. unfilled: the model
--- was built uninitialized for a checkpoint to fill next (pmp.models.from_pretrained's split): no weight
--- is read.
function M.split(model, opts, layout, unfilled)
  local pipeline, parallel = require 'pmp.dist.pipeline', require 'pmp.nn.parallel'
  model = pipeline.stage(model, {
    unfilled = unfilled,
    first_stage_layers = opts.decoder_first_pipeline_num_layers > 0 and opts.decoder_first_pipeline_num_layers or nil,
    last_stage_layers = opts.decoder_last_pipeline_num_layers > 0 and opts.decoder_last_pipeline_num_layers or nil,
    virtual_stages = layout.virtual,
  })
  for _, chunk in ipairs(pipeline.chunks(model)) do
    parallel.tensor_parallel(chunk, { sequence_parallel = opts.sequence_parallel, unfilled = unfilled })
    parallel.context_parallel(chunk)
    -- a pipeline stage of dense layers only (--moe-layer-freq) has no experts to split
    local ep = require 'pmp.nn.expert_parallel'
    if layout.ep > 1 and ep.has_moe_layer(chunk) then ep.expert_parallel(chunk, { data_size = layout.dp * layout.cp }) end
  end
  if opts.bf16 then model:to('bf16') end
  if opts.fp16 then model:to('f16') end
  return model
end

--- Data parallelism: gradient buckets averaged (or reduce-scattered for the distributed optimizer) over
--- the data- and context-parallel ranks ('dp_cp') while backward runs. Context-parallel ranks hold the
--- same parameters, each with the gradient of its part of the sequences, so they need the average too.
--- nil when there is nothing to reduce. Under expert parallelism the experts' gradients are left to
--- pmp.nn.expert_parallel.finish_expert_grads, except with the distributed optimizer: then, as in
--- Megatron, they are buckets of their own, reduce-scattered over the expert-data-parallel ranks
--- holding the same experts and sharded over them.
function M.data_parallel(model, opts, layout)
  if layout.dp == 1 and layout.cp == 1 and not opts.use_distributed_optimizer then return nil end
  local expert_parallel = require 'pmp.nn.expert_parallel'
  local options = { overlap = opts.overlap_grad_reduce, distributed_optimizer = opts.use_distributed_optimizer }
  if layout.ep > 1 and opts.use_distributed_optimizer then
    options.experts = { match = expert_parallel.is_expert_parameter, group = require('pmp.dist').group('edp'),
      divisor = layout.dp * layout.cp }
    for _, chunk in ipairs(require('pmp.dist.pipeline').chunks(model)) do expert_parallel.reduced_elsewhere(chunk) end
  elseif layout.ep > 1 then
    options.skip = expert_parallel.is_expert_parameter
  end
  return require('pmp.dist.ddp').DistributedDataParallel(model, options)
end

--- A last-stage loss averaged over the data- and context-parallel ranks (which all hold one: a
--- context-parallel rank its share of the mean over whole sequences, see pmp.nn.context_parallel);
--- nil stays nil (other pipeline stages).
function M.mean_loss(loss, layout)
  if loss == nil or layout.dp * layout.cp == 1 then return loss end
  local t = require('pmp.tensor').tensor({ loss }, { dtype = 'f64' })
  require('pmp.dist').group('dp_cp'):all_reduce(t, 'avg')
  return t:item()
end

local AUX_NAMES = { 'load_balancing_loss', 'seq_load_balancing_loss', 'z_loss' }

-- Each pipeline stage tracked the auxiliary losses of its own MoE layers (aux and layers as
-- pmp.nn.moe.take_aux_losses gives them, nil on a stage without any): every stage gets those of the
-- whole model, averaged over all MoE layers and the per-layer loads listed in stage (= layer) order.
local function join_stages(aux, layers)
  local tensor, group = require 'pmp.tensor', require('pmp.dist').group('pp')
  local loads = aux and aux.expert_load_imbalance or {}
  local longest = group:all_reduce(tensor.tensor({ #loads }, { dtype = 'f64' }), 'max'):item()
  local mine = {}
  for _, name in ipairs(AUX_NAMES) do
    local n = aux and aux[name] and layers[name] or 0
    mine[#mine + 1], mine[#mine + 2] = n > 0 and aux[name] * n or 0, n
  end
  mine[#mine + 1] = #loads
  for k = 1, longest do mine[#mine + 1] = loads[k] or 0 end
  local all = group:all_gather(tensor.tensor(mine, { dtype = 'f64' })):totable()
  local out, width, any = {}, #mine, false
  for k, name in ipairs(AUX_NAMES) do
    local sum, count = 0, 0
    for s = 0, group.size - 1 do sum, count = sum + all[s * width + 2 * k - 1], count + all[s * width + 2 * k] end
    if count > 0 then out[name], any = sum / count, true end
  end
  local joined, first = {}, 2 * #AUX_NAMES + 1
  for s = 0, group.size - 1 do
    for k = 1, all[s * width + first] do joined[#joined + 1] = all[s * width + first + k] end
  end
  if #joined > 0 then out.expert_load_imbalance, any = joined, true end
  return any and out or nil
end

--- pmp.nn.moe.take_aux_losses() (aux and layers) joined over the pipeline stages and averaged over the
--- data- and context-parallel ranks, as Megatron logs them (ranks of one pipeline stage hold the same
--- MoE layers, so the same entries); nil stays nil.
function M.mean_aux_losses(aux, layout, layers)
  if layout.pp > 1 then aux = join_stages(aux, layers) end
  if aux == nil or layout.dp * layout.cp == 1 then return aux end
  local names, values = {}, {}
  for name in pairs(aux) do names[#names + 1] = name end
  table.sort(names)
  for _, name in ipairs(names) do
    for _, v in ipairs(type(aux[name]) == 'table' and aux[name] or { aux[name] }) do values[#values + 1] = v end
  end
  local t = require('pmp.tensor').tensor(values, { dtype = 'f64' })
  require('pmp.dist').group('dp_cp'):all_reduce(t, 'avg')
  local averaged, at = t:totable(), 0
  for _, name in ipairs(names) do
    if type(aux[name]) == 'table' then
      for k = 1, #aux[name] do aux[name][k] = averaged[at + k] end
      at = at + #aux[name]
    else
      at = at + 1
      aux[name] = averaged[at]
    end
  end
  return aux
end

--- The whole model of a run under a parallel layout, on rank 0 (nil on the others; the model itself on
--- one process), for writing it out as one (e.g. save_pretrained). Every rank writes its part as a
--- checkpoint under `parts_dir` (pmp.checkpoint joins parts of any layout), rank 0 rebuilds the model
--- from it and removes it. hf: the Hugging Face identity (model.hf) the model was loaded with, if any.
function M.gather_model(model, layout, hf, parts_dir)
  if layout.world == 1 then return model end
  local checkpoint, io_ = require 'pmp.checkpoint', require 'pmp.io'
  checkpoint.save(parts_dir, 0, model, nil, { model_config = model.config })
  if layout.rank ~= 0 then return nil end
  local whole = checkpoint.read_whole_model(parts_dir)
  io_.remove_tree(parts_dir)
  if hf then rawset(whole, 'hf', hf) end
  return whole
end

--- One line describing a parallel layout for the log; nil on one process.
function M.describe(opts, layout)
  if layout.world == 1 then return nil end
  return string.format('%d processes: tensor-parallel %d%s, pipeline-parallel %d%s, context-parallel %d, ' ..
    'data-parallel %d%s%s', layout.world, layout.tp, opts.sequence_parallel and ' (sequence parallel)' or '', layout.pp,
    layout.virtual > 1 and string.format(' (%d virtual stages each)', layout.virtual) or '', layout.cp, layout.dp,
    opts.use_distributed_optimizer and ' (distributed optimizer)' or '',
    layout.ep > 1 and string.format(', expert-parallel %d', layout.ep) or '')
end

return M
