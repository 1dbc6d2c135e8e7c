--- Items taken in a seeded random order that is drawn anew for every pass over them (epoch). The
--- order comes from its own stream (seed + epoch) and leaves the global generator as it was, so
--- training randomness (dropout) does not depend on where epochs start. position counts the items
--- taken, the data position a checkpoint stores.
---   local rows = Epochs(list, seed); rows:take(4); rows:seek(saved_position)
local ffi = require 'ffi'
local C = require('pmp.ffi').C
local tensor = require 'pmp.tensor'

local Epochs = {}
Epochs.__index = Epochs

function Epochs.new(items, seed)
  if #items == 0 then error('Epochs: no items', 2) end
  return setmetatable({ items = items, seed = seed, position = 0, order = nil }, Epochs)
end

function Epochs:_shuffle(epoch)
  local saved = ffi.new('uint64_t[4]')
  C.pmp_rng_get_state(saved)
  tensor.manual_seed(self.seed + epoch)
  local keys = tensor.rand(#self.items, { dtype = 'f64' }):totable()
  C.pmp_rng_set_state(saved)
  local order = {}
  for k = 1, #self.items do order[k] = k end
  table.sort(order, function(a, b) return keys[a] < keys[b] end)
  self.order = order
end

--- The next n items.
function Epochs:take(n)
  local out, count = {}, #self.items
  for _ = 1, n do
    if self.position % count == 0 then self:_shuffle(self.position / count) end
    out[#out + 1] = self.items[self.order[self.position % count + 1]]
    self.position = self.position + 1
  end
  return out
end

--- Continues after `position` items, as if they had been taken.
function Epochs:seek(position)
  self.position = position
  if position > 0 then self:_shuffle(math.floor((position - 1) / #self.items)) end
end

return setmetatable(Epochs, { __call = function(_, ...) return Epochs.new(...) end })
