--- pmp.serve.block_pool: which KV-cache blocks are free, who holds each, and which hold a known prefix.
---
---   pool = block_pool.new(num_blocks)
---   local b = pool:allocate()          -- a 0-based block id with one holder (nil when none is left)
---   pool:retain(b); pool:release(b)    -- holders come and go; at zero the block is free again
---   pool:register(b, key)              -- b holds the full block of tokens that key names
---   local hit = pool:lookup(key)       -- that block, now with one more holder, or nil
---
--- A freed block keeps its contents and its key until it is handed out again, so a later request with
--- the same prefix can still find it: free blocks are handed out least recently freed first. Keys name
--- the whole prefix up to the block's end (see prefix_key), so equal keys mean equal keys and values.
local M = {}

local Pool = {}
Pool.__index = Pool

function M.new(num_blocks)
  if type(num_blocks) ~= 'number' or num_blocks < 1 or num_blocks % 1 ~= 0 then
    error('block_pool: num_blocks must be a positive integer, got ' .. tostring(num_blocks), 2)
  end
  local pool = setmetatable({ num_blocks = num_blocks, holders = {}, key_of = {}, block_of = {},
    newer = {}, older = {}, used = 0, peak = 0 }, Pool)
  -- the free blocks as a list from least to most recently freed; 'head' and 'tail' are its ends
  pool.newer.head, pool.older.tail = 'tail', 'head'
  for b = 0, num_blocks - 1 do
    pool.holders[b] = 0
    pool:push_free(b)
  end
  return pool
end

function Pool:push_free(b)
  local last = self.older.tail
  self.newer[last], self.older[b] = b, last
  self.newer[b], self.older.tail = 'tail', b
end

function Pool:unlink_free(b)
  local before, after = self.older[b], self.newer[b]
  self.newer[before], self.older[after] = after, before
  self.newer[b], self.older[b] = nil, nil
end

--- Blocks that allocate can still hand out (free ones, cached prefixes included).
function Pool:free_count() return self.num_blocks - self.used end

local function take(self, b)
  if self.holders[b] == 0 then
    self:unlink_free(b)
    self.used = self.used + 1
    if self.used > self.peak then self.peak = self.used end
  end
  self.holders[b] = self.holders[b] + 1
end

function Pool:allocate()
  local b = self.newer.head
  if b == 'tail' then return nil end
  local key = self.key_of[b]
  if key then self.key_of[b], self.block_of[key] = nil, nil end
  take(self, b)
  return b
end

function Pool:retain(b) take(self, b) end

function Pool:release(b)
  local n = self.holders[b]
  if not n or n < 1 then error('block_pool: release of block ' .. tostring(b) .. ', which has no holder', 2) end
  self.holders[b] = n - 1
  if n == 1 then
    self.used = self.used - 1
    self:push_free(b)
  end
end

function Pool:register(b, key)
  if self.block_of[key] or self.key_of[b] then return end   -- the prefix is cached already
  self.block_of[key], self.key_of[b] = b, key
end

function Pool:lookup(key)
  local b = self.block_of[key]
  if b then take(self, b) end
  return b
end

--- The key of the full block ids[first .. first + size - 1] after the prefix named by parent_key ('' at
--- the start): every token up to the block's end, so two sequences share it only if they agree on all.
function M.prefix_key(parent_key, ids, first, size)
  return parent_key .. table.concat(ids, ',', first, first + size - 1) .. ';'
end

return M
