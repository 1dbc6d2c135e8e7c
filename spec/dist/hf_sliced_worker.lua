-- Run by spec/dist_hf_sliced_spec.lua on every rank: loads Hugging Face directories straight into this
-- rank's pipeline stage and tensor-parallel part (from_pretrained with split), and the whole model in
-- the same process as the reference.
--   hf_sliced_worker.lua TP PP DIR...
-- Prints, per directory and rank:
--   READ dir rank bytes_read_for_the_part bytes_read_for_the_whole_model bytes_the_part_holds
--   DIFFER dir rank name        for every parameter whose bits are not the whole model's part
--   LOSS dir loss reference     (the last rank) the mean loss of one batch after the load
--   LOGITS dir rank max_abs_diff max_abs_reference   (PP = 1) logits against the whole model's
local expect = require 'spec.support.expect'
local loading = require 'pmp.models.loading'
local sharding = require 'pmp.dist.sharding'
local pipeline = require 'pmp.dist.pipeline'
local train_parallel = require 'pmp.train.parallel'
local step = require 'pmp.train.step'

local tp, pp = tonumber(arg[1]), tonumber(arg[2])
local layout = pmp.dist.init{ tp = tp, pp = pp }
layout.virtual = 1
local opts = { decoder_first_pipeline_num_layers = 0, decoder_last_pipeline_num_layers = 0, sequence_parallel = false }

pmp.manual_seed(1234)
local tokens = pmp.randint(0, 150, { 2, 9 })
local ids, targets = tokens:narrow(2, 1, 8):contiguous(), tokens:narrow(2, 2, 8):contiguous()

for k = 3, #arg do
  local dir = arg[k]
  local name = dir:match('([^/]+)/?$')
  local before = loading.bytes_read
  local model = pmp.models.from_pretrained(dir, { split = function(whole)
    return train_parallel.split(whole, opts, layout, true)
  end })
  local part_bytes = loading.bytes_read - before
  before = loading.bytes_read
  local whole = pmp.models.from_pretrained(dir)
  local whole_bytes = loading.bytes_read - before

  local reference, held = whole:state_dict(), 0
  for _, chunk in ipairs(pipeline.chunks(model)) do
    local tparallel = chunk.tensor_parallel
    for local_name, p in pairs(chunk:state_dict()) do
      held = held + p:numel() * p:element_size()
      local global = sharding.shift_layer(local_name, chunk.pipeline and chunk.pipeline.layer_offset or 0)
      local full = reference[global]
      if global == 'output_layer.weight' and whole.config.tie_embeddings then
        full = reference['embedding.word_embeddings.weight']
      end
      local want = full and sharding.shard(global, full, whole.config, tparallel and tp or 1, layout.tp_rank)
      if not want or not expect.same_bits(want, p) then print(string.format('DIFFER %s %d %s', name, layout.rank, global)) end
    end
  end
  print(string.format('READ %s %d %d %d %d', name, layout.rank, part_bytes, whole_bytes, held))

  local loss = step.forward_backward(model, { { ids = ids, targets = targets } }, { forward_only = true })
  local want = step.forward_backward(whole, { { ids = ids, targets = targets } }, { forward_only = true })
  if layout.rank == layout.world - 1 then print(string.format('LOSS %s %.10g %.10g', name, loss, want)) end
  if pp == 1 then
    local got, ref = pmp.no_grad(function() return model(ids), whole(ids) end)
    print(string.format('LOGITS %s %d %.6g %.6g', name, layout.rank, (got - ref):abs():max():item(), ref:abs():max():item()))
  end
end
