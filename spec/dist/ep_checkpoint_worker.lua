-- Run by spec/dist_ep_spec.lua on every rank: a small MoE GPT with its experts split over the
-- expert-parallel group (arg[2] ranks) takes one AdamW step, is saved with pmp.checkpoint.save into
-- arg[1], and computes its logits on a fixed batch (the same on every rank); rank 0 writes them to
-- arg[1]/logits.safetensors for the spec to compare with the checkpoint loaded into one process.
local step = require 'pmp.train.step'
local expert_parallel = require 'pmp.nn.expert_parallel'

local dir, ep_size = arg[1], tonumber(arg[2])
local layout = pmp.dist.init { ep = ep_size }

local config = { num_layers = 2, hidden_size = 16, num_attention_heads = 2, vocab_size = 40, dtype = 'f32',
  num_moe_experts = 4, moe_router_topk = 2, moe_ffn_hidden_size = 24, moe_grouped_gemm = true,
  moe_shared_expert_intermediate_size = 8, moe_layer_freq = { 1, 1 } }
pmp.manual_seed(3)
local ids = pmp.randint(0, 40, { 2, 8 }):long()
local targets = pmp.randint(0, 40, { 2, 8 }):long()

pmp.manual_seed(11)
local model = expert_parallel.expert_parallel(pmp.nn.GPTModel(config), { data_size = layout.dp })
-- a step moves each expert by its own gradient, so that no expert equals its freshly seeded self
local optimizer = pmp.optim.AdamW(model:parameters(), { lr = 1e-2 })
step.forward_backward(model, { { ids = ids, targets = targets } })
step.finish_grads(model, nil)
optimizer:step()
pmp.checkpoint.save(dir, 1, model, optimizer)

local logits = model(ids)
if layout.rank == 0 then pmp.safetensors.save(pmp.io.join(dir, 'logits.safetensors'), { logits = logits }) end
print(string.format('SAVED %d', layout.rank))
