--- Flag sets that training recipes share, with Megatron-LM's names (pmp.args specs). A recipe parses
--- the sets it uses plus its own flags; its own spec for a flag that a set also has replaces the set's
--- in place (another default or help text), keeping the replaced spec's bounds unless it sets its own:
---   local flags = pmp.train.flags
---   local opts = flags.parse(arg, { flags.training, flags.optimizer, { { '--lr', 1e-5, 'peak learning rate' } } },
---     { usage = 'pmp recipes/x.lua [flags]' })
local args = require 'pmp.args'

local M = {}

--- The GPT that pmp.train.model.gpt builds.
M.model = {
  { '--num-layers', 4, 'transformer layers', integer = true, min = 1 },
  { '--hidden-size', 192, 'model width', integer = true, min = 1 },
  { '--ffn-hidden-size', 0, 'MLP width (0: 8/3 of hidden for SwiGLU, rounded to 64)', integer = true, min = 0 },
  { '--num-attention-heads', 6, 'attention heads', integer = true, min = 1 },
  { '--num-query-groups', 0, 'KV heads for GQA (0: as many as attention heads)', integer = true, min = 0 },
  { '--hidden-dropout', 0.0, 'dropout on residual branches', min = 0, below = 1 },
  { '--init-method-std', 0.02, 'weight init standard deviation', min = 0 },
  { '--rotary-base', 10000, 'RoPE theta', above = 0 },
  { '--norm-epsilon', 1e-5, 'RMSNorm epsilon', above = 0 },
  { '--untie-embeddings-and-output-weights', false, 'separate output layer' },
  { '--make-vocab-size-divisible-by', 128, 'pad the vocabulary to a multiple of this times the tensor-parallel size', integer = true, min = 1 },
}

--- Mixture of experts (pmp.nn.moe), Megatron-LM's names; --num-experts 0 keeps every MLP dense.
M.moe = {
  { '--num-experts', 0, 'experts per MoE layer (0: dense MLPs)', integer = true, min = 0 },
  { '--moe-router-topk', 2, 'experts each token is routed to', integer = true, min = 1 },
  { '--moe-ffn-hidden-size', 0, "each expert's MLP width (0: --ffn-hidden-size's)", integer = true, min = 0 },
  { '--moe-shared-expert-intermediate-size', 0, 'width of the shared experts every token passes through (0: none)', integer = true, min = 0 },
  { '--moe-shared-expert-gate', false, "scale the shared experts' output by a learned sigmoid gate (Qwen2-MoE)" },
  { '--moe-shared-expert-overlap', false, "run the shared experts while the tokens' all-to-alls are in flight (expert parallelism; same results)" },
  { '--moe-router-pre-softmax', false, 'softmax over all experts before top-k, no renormalisation (Qwen2-MoE)' },
  { '--moe-router-load-balancing-type', 'aux_loss', 'aux_loss (Switch Transformer), seq_aux_loss (per sequence) or none', choices = { 'aux_loss', 'seq_aux_loss', 'none' } },
  { '--moe-router-score-function', 'softmax', 'softmax or sigmoid (DeepSeek-V3)', choices = { 'softmax', 'sigmoid' } },
  { '--moe-router-enable-expert-bias', false, 'aux-loss-free balancing: a per-expert bias on the choice, moved towards the mean load each step (sigmoid)' },
  { '--moe-router-bias-update-rate', 1e-3, 'step of the expert bias update', min = 0 },
  { '--moe-router-num-groups', 0, 'expert groups for group-limited routing (0: none)', integer = true, min = 0 },
  { '--moe-router-group-topk', 0, 'groups each token may choose experts from', integer = true, min = 0 },
  { '--moe-router-topk-scaling-factor', 0.0, 'multiplies the routing probabilities (0: none)', min = 0 },
  { '--moe-expert-capacity-factor', 0.0, 'cap each expert at this multiple of its even share of tokens, dropping the rest (0: dropless)', min = 0 },
  { '--moe-token-drop-policy', 'probs', 'which tokens an expert over capacity keeps: probs (highest) or position (first)', choices = { 'probs', 'position' } },
  { '--moe-token-dispatcher-type', 'alltoall', 'how tokens reach the experts of other expert-parallel ranks (alltoall)' },
  { '--moe-aux-loss-coeff', 0.0, 'weight of the load-balancing loss', min = 0 },
  { '--moe-z-loss-coeff', 0.0, 'weight of the router z-loss', min = 0 },
  { '--moe-grouped-gemm', false, 'experts as one grouped GEMM (instead of one expert after another)' },
  { '--moe-layer-freq', '1', 'MoE layer every N layers from the first, or a 0/1 list per layer: "[0,1,1,1]" or "([0]*1+[1]*3)"' },
}

--- Multi-latent attention (pmp.nn.mla, DeepSeek-V2/V3), Megatron-LM's names.
M.mla = {
  { '--multi-latent-attention', false, 'attention through a compressed key/value latent (DeepSeek-V2/V3)' },
  { '--q-lora-rank', 0, 'rank of the query projection (0: a direct projection)', integer = true, min = 0 },
  { '--kv-lora-rank', 32, 'width of the key/value latent', integer = true, min = 1 },
  { '--qk-head-dim', 16, 'query/key dims per head without RoPE', integer = true, min = 1 },
  { '--qk-pos-emb-head-dim', 8, 'query/key dims per head with RoPE (one rotary key shared by all heads)', integer = true, min = 1 },
  { '--v-head-dim', 16, 'value dims per head', integer = true, min = 1 },
}

--- Sequences, batches and steps.
M.training = {
  { '--seq-length', 64, 'tokens per sample', integer = true, min = 1 },
  { '--micro-batch-size', 16, 'samples per forward/backward', integer = true, min = 1 },
  { '--global-batch-size', 16, 'samples per optimizer step (a multiple of the micro batch)', integer = true, min = 1 },
  { '--train-iters', 300, 'optimizer steps', integer = true, min = 0 },
  { '--seed', 1234, 'random seed', integer = true, min = 0 },
  { '--check-for-nan-in-loss-and-grad', true, 'skip (and count) a step whose gradient norm is NaN or Inf' },
  { '--max-nan-iterations-in-a-row', 5, 'stop the run after this many skipped non-finite steps in a row', integer = true, min = 1 },
}

--- AdamW, its learning-rate schedule and gradient clipping (pmp.train.optimizer).
M.optimizer = {
  { '--lr', 1e-3, 'peak learning rate', min = 0 },
  { '--min-lr', 1e-4, 'final learning rate', min = 0 },
  { '--lr-warmup-iters', 30, 'linear warmup steps', integer = true, min = 0 },
  { '--lr-decay-iters', 0, 'steps of decay (0: train-iters)', integer = true, min = 0 },
  { '--lr-decay-style', 'cosine', 'cosine, linear, constant or WSD', choices = { 'cosine', 'linear', 'constant', 'WSD' } },
  { '--lr-wsd-decay-iters', 0, 'WSD: length of the final anneal', integer = true, min = 0 },
  { '--weight-decay', 0.1, 'AdamW decoupled weight decay (not on norms and biases)', min = 0 },
  { '--adam-beta1', 0.9, 'AdamW beta1', min = 0, below = 1 },
  { '--adam-beta2', 0.95, 'AdamW beta2', min = 0, below = 1 },
  { '--adam-eps', 1e-8, 'AdamW epsilon', above = 0 },
  { '--clip-grad', 1.0, 'global gradient-norm clipping (0: off)', min = 0 },
}

--- Dtype and activation memory.
M.precision = {
  { '--bf16', false, 'bf16 parameters and activations, f32 master weights and optimizer state' },
  { '--recompute-granularity', nil, "'full': re-run each layer's forward in backward to save memory" },
}

--- The Megatron layout under mpirun (pmp.train.parallel); the data-parallel size is what is left.
M.parallel = {
  { '--tensor-model-parallel-size', 1, 'tensor-parallel ranks (run under mpirun)', integer = true, min = 1 },
  { '--pipeline-model-parallel-size', 1, 'pipeline stages (run under mpirun)', integer = true, min = 1 },
  { '--sequence-parallel', false, 'norms and dropout on sequence shards of the tensor-parallel group' },
  { '--expert-model-parallel-size', 1, 'ranks that split the experts of each MoE layer, tokens sent by all-to-all (run under mpirun)', integer = true, min = 1 },
  { '--context-parallel-size', 1, 'ranks that split every sequence, attention gathering keys and values (run under mpirun)', integer = true, min = 1 },
  { '--decoder-first-pipeline-num-layers', 0, 'layers on the first pipeline stage (0: even split)', integer = true, min = 0 },
  { '--decoder-last-pipeline-num-layers', 0, 'layers on the last pipeline stage (0: even split)', integer = true, min = 0 },
  { '--num-layers-per-virtual-pipeline-stage', 0, 'layers per virtual pipeline stage: the interleaved schedule (0: off)', integer = true, min = 0 },
  { '--use-distributed-optimizer', false, 'shard f32 master weights and Adam moments over data-parallel ranks (ZeRO-1)' },
  { '--overlap-grad-reduce', true, 'reduce gradient buckets during backward (--overlap-grad-reduce=false: after it)' },
  { '--distributed-timeout-minutes', 10, 'a collective that makes no progress this long ends the job', above = 0 },
}

--- Pretraining text and its validation split (pmp.train.data).
M.data = {
  { '--data-path', nil, 'a text file, an indexed dataset PREFIX, or weighted prefixes "0.3 a 0.7 b" (default: the embedded corpus)', multiple = true },
  { '--split', '969, 30, 1', 'train,valid,test weights' },
  { '--data-cache-path', nil, "where indexed data's sample indices are cached, as Megatron (default <prefix>/cache/GPTDataset_indices)" },
  { '--tokenizer-type', 'char', 'char, byte, or HuggingFaceTokenizer (Megatron name; with --tokenizer-model)' },
  { '--tokenizer-model', nil, 'Hugging Face tokenizer directory (tokenizer.json)' },
  { '--eval-interval', 100, 'steps between validations', integer = true, min = 0 },
  { '--eval-iters', 10, 'global batches per validation, each validation reading on through the split', integer = true, min = 0 },
}

--- Checkpoint cadence (pmp.train.Checkpoints).
M.checkpoint = {
  { '--save', nil, 'checkpoint directory (none if not given or "")' },
  { '--save-interval', 150, 'steps between checkpoints (0: only at the end)', integer = true, min = 0 },
  { '--exit-interval', 0, 'stop (saving a checkpoint) after an iteration divisible by this (0: never)', integer = true, min = 0 },
  { '--load', nil, 'resume from this checkpoint directory' },
  { '--override-checkpoint', false, 'start a fresh run even though --save holds a checkpoint (it is replaced)' },
  { '--exit-duration-in-mins', 0, 'stop (saving a checkpoint) after this many minutes (0: no limit)', min = 0 },
  { '--exit-signal-handler', true, 'on SIGTERM or SIGINT finish the iteration, save and exit (a second Ctrl-C exits at once)' },
}

--- Log lines, TensorBoard and the op profiler (pmp.train.Logger).
M.logging = {
  { '--log-interval', 20, 'steps between log lines', integer = true, min = 1 },
  { '--tensorboard-dir', nil, 'write TensorBoard event files here' },
  { '--profile', false, 'time every engine op from --profile-step-start to --profile-step-end and print the table' },
  { '--profile-step-start', 10, 'first profiled iteration', integer = true, min = 1 },
  { '--profile-step-end', 12, 'last profiled iteration', integer = true, min = 1 },
}

-- Whether a spec sets any of pmp.args' bounds.
local function has_bounds(spec)
  for _, field in ipairs(args.bounds) do
    if spec[field] ~= nil then return true end
  end
  return false
end

-- spec with the bounds of the spec it replaces: a recipe that changes a flag's default or help text must
-- not drop the check on its value by leaving the bounds out.
local function with_bounds_of(replaced, spec)
  if has_bounds(spec) then return spec end
  local out = {}
  for key, value in pairs(spec) do out[key] = value end
  for _, field in ipairs(args.bounds) do out[field] = replaced[field] end
  return out
end

--- The specs of the sets in order, a later spec of a flag replacing the earlier one where it stood
--- (with its bounds when it sets none).
function M.merge(sets)
  local specs, position = {}, {}
  for _, set in ipairs(sets) do
    for _, spec in ipairs(set) do
      local at = position[spec[1]]
      if at then
        specs[at] = with_bounds_of(specs[at], spec)
      else
        specs[#specs + 1] = spec
        position[spec[1]] = #specs
      end
    end
  end
  return specs
end

--- pmp.args.parse over the merged sets.
function M.parse(argv, sets, options)
  return args.parse(argv, M.merge(sets), options)
end

return M
