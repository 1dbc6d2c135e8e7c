--- Token sampling on the engine (pmp.sample), and generators (pmp.Generator): random streams apart from
--- the default one that pmp.manual_seed seeds.
local ffi = require 'ffi'
local C = require('pmp.ffi').C
local tensor = require 'pmp.tensor'

local M = {}

local Generator = {}
Generator.__index = Generator

local function check_seed(seed, where)
  -- 64-bit seeds (pmp.rl.streams.key's) come as uint64/int64 cdata
  if type(seed) == 'cdata' and (ffi.istype('uint64_t', seed) or ffi.istype('int64_t', seed)) then return seed end
  if type(seed) ~= 'number' or seed ~= math.floor(seed) then error(where .. ': seed must be an integer', 3) end
  return seed < 0 and seed + 2 ^ 64 or seed
end

--- pmp.Generator(seed): a random stream of its own (xoshiro256**, as the default generator): it draws
--- what pmp.manual_seed(seed) would start. g:manual_seed(seed) restarts it; g:uniform() draws from [0, 1).
function M.Generator(seed)
  local g = setmetatable({ state = ffi.new('pmp_generator') }, Generator)
  C.pmp_generator_seed(g.state, check_seed(seed, 'Generator'))
  return g
end

--- g:manual_seed(seed): restarts the stream.
function Generator:manual_seed(seed)
  C.pmp_generator_seed(self.state, check_seed(seed, 'Generator:manual_seed'))
end

--- g:uniform(): the next number in [0, 1).
function Generator:uniform() return C.pmp_generator_uniform(self.state) end

local function is_generator(x) return getmetatable(x) == Generator end
M.is_generator = is_generator

-- The C array of row generators, or nil for the default generator.
local function generator_array(generator, rows)
  if generator == nil then return nil end
  local array = ffi.new('pmp_generator *[?]', math.max(rows, 1))
  if is_generator(generator) then
    for b = 0, rows - 1 do array[b] = generator.state end
    return array
  end
  if type(generator) ~= 'table' or #generator ~= rows then
    error('sample: options.generator must be a pmp.Generator or a list of ' .. rows .. ' of them (one per row)', 3)
  end
  for b = 1, rows do
    if not is_generator(generator[b]) then error('sample: options.generator[' .. b .. '] is not a pmp.Generator', 3) end
    array[b - 1] = generator[b].state
  end
  return array
end

-- seen as an i64 tensor: a tensor as is, a list of id lists padded with -1.
local function seen_tensor(seen)
  if seen == nil or tensor.is_tensor(seen) then return seen end
  if type(seen) ~= 'table' then error('sample: options.seen must be a tensor [B, S] or a list of id lists', 3) end
  local longest = 0
  for b, ids in ipairs(seen) do
    if type(ids) ~= 'table' then error('sample: options.seen[' .. b .. '] must be a list of ids', 3) end
    longest = math.max(longest, #ids)
  end
  if longest == 0 then return nil end   -- nothing to penalise
  local padded = {}
  for b, ids in ipairs(seen) do
    padded[b] = {}
    for s = 1, longest do padded[b][s] = ids[s] or -1 end
  end
  return tensor.tensor(padded, { dtype = 'i64' })
end

local function number_option(options, key, default)
  local v = options[key]
  if v == nil then return default end
  if type(v) ~= 'number' then error('sample: options.' .. key .. ' must be a number', 3) end
  return v
end

--- pmp.sample(logits, options) -> ids, logprobs: one token per row of logits [B, V] (any float dtype),
--- as transformers' logits processors choose it (repetition penalty, temperature, top-k, top-p, in that
--- order; core/pmp/ops.h, pmp_sample, has the exact rules).
---   options: temperature (1; 0 = greedy: the first largest logit, as torch.argmax), top_k (0 = off),
---            top_p (1 = off), repetition_penalty (1 = off), seen (the ids each row has seen, for the
---            penalty: an integer tensor [B, S] or a list of B id lists; negative ids are padding),
---            generator (one pmp.Generator for all rows, drawing for them in row order, or a list of B,
---            one per row; without it rows draw from the default generator, which a given one leaves
---            untouched)
---   ids: i64 [B]; logprobs: [B] (f64 for f64 logits, else f32), each chosen token's log-probability
---   under the penalised, temperature-scaled distribution before top-k/top-p.
function M.sample(logits, options)
  options = options or {}
  if not tensor.is_tensor(logits) or logits.ptr.ndim ~= 2 then
    error('sample: logits must be a tensor [batch, vocab], got ' .. (tensor.is_tensor(logits) and
      'shape [' .. table.concat(logits:size(), ',') .. ']' or type(logits)), 2)
  end
  local top_k = number_option(options, 'top_k', 0)
  if top_k ~= math.floor(top_k) then error('sample: options.top_k must be an integer', 2) end
  local seen = seen_tensor(options.seen)
  local rows = tonumber(logits.ptr.sizes[0])
  local generators = generator_array(options.generator, rows)
  local ids, logprobs = ffi.new('pmp_tensor *[1]'), ffi.new('pmp_tensor *[1]')
  local rc = C.pmp_sample(logits.ptr, seen and seen.ptr or nil, number_option(options, 'repetition_penalty', 1),
    number_option(options, 'temperature', 1), top_k, number_option(options, 'top_p', 1), generators, ids, logprobs)
  if rc ~= 0 then error(ffi.string(C.pmp_last_error()), 2) end
  -- logits, seen and the generators' states stay referenced until here, past the call
  return tensor.wrap(ids[0], logits, seen, options), tensor.wrap(logprobs[0])
end

return M
