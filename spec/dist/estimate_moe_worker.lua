-- Run by spec/estimate_spec.lua on every rank of 4: what a MoE GPT really holds per rank, for
-- pmp.estimate to be checked against. In two layouts, one after the other: TP=2 x EP=2 (experts whole
-- on each tensor-parallel rank, expert-data-parallel 1) and EP=2 x DP=4 (expert-data-parallel 2), each
-- with the distributed optimizer, as recipes/pretrain.lua splits the model. Prints from every rank:
--   HOLDS layout rank parameters expert_parameters optimizer_shard_elements
local expert_parallel = require 'pmp.nn.expert_parallel'
local SETTINGS = { num_layers = 2, hidden_size = 16, num_attention_heads = 2, ffn_hidden_size = 32, vocab_size = 64,
  make_vocab_size_divisible_by = 16, tie_embeddings = false, num_moe_experts = 4, moe_router_topk = 2,
  moe_ffn_hidden_size = 24, moe_grouped_gemm = true, moe_shared_expert_intermediate_size = 8,
  moe_shared_expert_gate = true, moe_layer_freq = { 0, 1 } }

for _, name in ipairs({ 'tp2ep2', 'ep2dp4' }) do
  local layout = pmp.dist.init(name == 'tp2ep2' and { tp = 2, ep = 2 } or { ep = 2 })
  local config = {}
  for k, v in pairs(SETTINGS) do config[k] = v end
  config.tensor_model_parallel_size = layout.tp
  pmp.manual_seed(1)
  local model = pmp.nn.GPTModel(config)
  pmp.nn.parallel.tensor_parallel(model)
  expert_parallel.expert_parallel(model, { data_size = layout.dp * layout.cp })
  local ddp = pmp.dist.ddp.DistributedDataParallel(model, { distributed_optimizer = true, experts = {
    match = expert_parallel.is_expert_parameter, group = pmp.dist.group('edp'), divisor = layout.dp * layout.cp } })
  expert_parallel.reduced_elsewhere(model)
  local optimizer = pmp.optim.DistributedOptimizer(model:parameters(), { ddp = ddp })
  local parameters, experts, shard = 0, 0, 0
  for _, pair in ipairs(model:named_parameters()) do
    parameters = parameters + pair[2]:numel()
    if expert_parallel.is_expert_parameter(pair[1]) then experts = experts + pair[2]:numel() end
  end
  for _, bucket in ipairs(optimizer.buckets) do
    for _, segment in ipairs(bucket.segments) do shard = shard + segment.length end
  end
  print(string.format('HOLDS %s %d %d %d %d', name, layout.rank, parameters, experts, shard))
end
