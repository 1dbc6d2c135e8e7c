--- GPT training samples from one token stream, as Megatron's GPTDataset builds them: consecutive
--- windows of seq_length + 1 tokens overlapping by one token (inputs and shifted targets), visited in
--- a shuffled order that depends only on the seed, so a run resumes from a count of consumed samples.
local tensor = require 'pmp.tensor'

local Dataset = {}
Dataset.__index = Dataset

-- A small deterministic generator (xorshift32) for the shuffle: independent of the tensor RNG.
local bit = require 'bit'
local function shuffled(n, seed)
  local state = bit.tobit(seed * 2654435761 % 4294967296 + 1)
  local function next_u32()
    state = bit.bxor(state, bit.lshift(state, 13))
    state = bit.bxor(state, bit.rshift(state, 17))
    state = bit.bxor(state, bit.lshift(state, 5))
    return state % 4294967296
  end
  local order = {}
  for k = 1, n do order[k] = k - 1 end
  for k = n, 2, -1 do
    local j = next_u32() % k + 1
    order[k], order[j] = order[j], order[k]
  end
  return order
end

-- tokens: an i64 tensor [n]; seq_length: tokens per sample (plus one for the shifted target).
function Dataset.new(tokens, seq_length, seed)
  local n = tokens:numel()
  local count = math.floor((n - 1) / seq_length)
  if count < 1 then
    error(string.format('dataset: %d tokens are too few for one sample of %d tokens', n, seq_length + 1), 2)
  end
  return setmetatable({ tokens = tokens, seq_length = seq_length, count = count, seed = seed or 1234, epochs = {} }, Dataset)
end

function Dataset:sample_start(index)
  local epoch = math.floor(index / self.count)
  local order = self.epochs[epoch]
  if not order then
    order = shuffled(self.count, self.seed + epoch)
    self.epochs = { [epoch] = order }
  end
  return order[index % self.count + 1] * self.seq_length
end

-- Samples first .. first + size - 1 as inputs and targets, each [size, seq_length].
function Dataset:batch(first, size)
  local rows = {}
  for k = 1, size do rows[k] = self.tokens:narrow(1, self:sample_start(first + k - 1) + 1, self.seq_length + 1) end
  local block = tensor.stack(rows, 1)
  return block:narrow(2, 1, self.seq_length), block:narrow(2, 2, self.seq_length)
end

-- Splits a token tensor by Megatron-style weights ("969,30,1") into train/valid/test streams.
function Dataset.split(tokens, weights)
  local parts, total = {}, 0
  for w in tostring(weights):gmatch('[^,]+') do
    local v = tonumber(w)
    if not v or v < 0 then error("dataset: bad --split '" .. tostring(weights) .. "'", 0) end
    parts[#parts + 1] = v
    total = total + v
  end
  if total <= 0 then error("--split '" .. tostring(weights) .. "' has no positive weight", 0) end
  while #parts < 3 do parts[#parts + 1] = 0 end
  local n, start, out = tokens:numel(), 0, {}
  for k = 1, 3 do
    local len = k == 3 and n - start or math.floor(n * parts[k] / total + 0.5)
    len = math.min(len, n - start)
    out[k] = len > 0 and tokens:narrow(1, start + 1, len) or nil
    start = start + len
  end
  return out[1], out[2], out[3]
end

return setmetatable(Dataset, { __call = function(_, ...) return Dataset.new(...) end })
