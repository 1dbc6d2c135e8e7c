--- Megatron-LM's values for the flags a run leaves out (megatron/training/arguments.py of Megatron-Core
--- r0.12), applied by recipes/pretrain.lua when the run reads Megatron's data: indexed datasets
--- (--data-path PREFIX or a blend, --train-data-path). The embedded corpus and plain text files are pmp's
--- own inputs, which no Megatron run script names, so those runs keep pmp's small defaults and
--- `pmp recipes/pretrain.lua` stays a quick demo.
local M = {}

--- Megatron's default of each flag whose pmp default differs (pmp's own defaults equal Megatron's for
--- --adam-beta1 0.9, --adam-eps 1e-8, --clip-grad 1.0, --init-method-std 0.02, --seed 1234,
--- --norm-epsilon 1e-5, --rotary-base 10000, --make-vocab-size-divisible-by 128, --split '969, 30, 1',
--- tied embeddings). --save-interval 0 is Megatron's None: a checkpoint only at the end.
M.VALUES = {
  { '--hidden-dropout', 0.1 },
  { '--attention-dropout', 0.1 },
  { '--weight-decay', 0.01 },
  { '--adam-beta2', 0.999 },
  { '--lr-decay-style', 'linear' },
  { '--min-lr', 0 },
  { '--lr-warmup-iters', 0 },
  { '--eval-interval', 1000 },
  { '--eval-iters', 100 },
  { '--log-interval', 100 },
  { '--save-interval', 0 },
  { '--exit-signal-handler', false },
  { '--normalization', 'LayerNorm' },
  { '--position-embedding-type', 'learned_absolute' },
  { '--swiglu', false },
  { '--disable-bias-linear', false },
}

--- Flags Megatron has no default for (it stops without them).
M.REQUIRED = { '--num-layers', '--hidden-size', '--num-attention-heads', '--max-position-embeddings', '--seq-length',
  '--micro-batch-size', '--lr' }

local function key_of(flag) return (flag:gsub('^%-%-', ''):gsub('%-', '_')) end

local function fail(text, ...) error(string.format(text, ...), 0) end

--- Whether opts (parsed flags) make a run read Megatron's indexed data, which brings Megatron's defaults.
function M.applies(opts)
  if opts.train_data_path then return true end
  return require('pmp.train.data').is_indexed(opts)
end

--- With Megatron's data, sets every flag the command line left out (given: the keys it gave) to
--- Megatron's value and fails naming a flag Megatron requires. Also Megatron's derived defaults: --ffn-hidden-size
--- (4 x hidden, or with --swiglu 8/3 x hidden rounded down to 64) and --global-batch-size (left nil here;
--- pmp.train.parallel.init makes it micro batch x data-parallel size). Returns true when it applied.
function M.apply(opts, given)
  if not M.applies(opts) then return false end
  for _, flag in ipairs(M.REQUIRED) do
    if not given[key_of(flag)] then fail('%s is required with indexed data (Megatron has no default for it)', flag) end
  end
  if not (given.train_iters or given.train_samples) then
    fail('--train-iters or --train-samples is required with indexed data (Megatron has no default for them)')
  end
  for _, entry in ipairs(M.VALUES) do
    local key = key_of(entry[1])
    if not given[key] then opts[key] = entry[2] end
  end
  if not given.ffn_hidden_size then
    opts.ffn_hidden_size = opts.swiglu and math.floor(4 * opts.hidden_size * 2 / 3 / 64) * 64 or 4 * opts.hidden_size
    if opts.ffn_hidden_size == 0 then
      fail("--hidden-size %d: Megatron's --swiglu default --ffn-hidden-size rounds down to 0; give --ffn-hidden-size",
        opts.hidden_size)
    end
  end
  if not given.global_batch_size then opts.global_batch_size = nil end
  return true
end

return M
