--- pmp.serve.paged_kv_cache: the keys and values of every running sequence, in fixed-size blocks.
---
--- Each attention layer owns two pools [num_blocks, Hkv, block_size, D] (made at its first call, in the
--- dtype of its keys); a sequence's positions live in the blocks its block table names (position s in
--- block table[s // block_size], slot s % block_size). Which blocks a sequence holds is decided by
--- pmp.serve.block_pool; this module only moves keys and values and runs the attention.
---
---   cache = paged_kv_cache.new(num_blocks, block_size)
---   cache:set_batch(slots [N, T], block_tables [N, M], lengths [N])   -- before each forward
---   model:decode(ids, { positions = ..., paged = cache, last_only = true })
---
--- The C ops are reachable directly for tests and other engines:
---   paged_kv_cache.write(pool, src [N, Hkv, T, D], slots [N, T])     (in place; negative slots skipped)
---   paged_kv_cache.attention(q [N, Hq, T, D], k_pool, v_pool, block_tables, lengths, scale) -> [N, Hq, T, D]
local tensor = require 'pmp.tensor'
local C = require('pmp.ffi').C

local M = {}

function M.write(pool, src, slots)
  if C.pmp_paged_kv_write_(pool.ptr, src.ptr, slots.ptr) ~= 0 then
    error(require('ffi').string(C.pmp_last_error()), 2)
  end
  return pool
end

function M.attention(q, k_pool, v_pool, block_tables, lengths, scale)
  return tensor.wrap(C.pmp_paged_attention(q.ptr, k_pool.ptr, v_pool.ptr, block_tables.ptr, lengths.ptr, scale or 0),
    q, k_pool, v_pool, block_tables, lengths)
end

local Cache = {}
Cache.__index = Cache

function M.new(num_blocks, block_size)
  return setmetatable({ num_blocks = num_blocks, block_size = block_size, pools = {} }, Cache)
end

--- The layout of the next forward: where each new position's key goes (flat slots), each sequence's
--- block table and its number of keys once the new ones are written.
function Cache:set_batch(slots, block_tables, lengths)
  self.slots, self.block_tables, self.lengths = slots, block_tables, lengths
end

-- Called by each attention layer (pmp.nn.transformer) with its rotated q [N, Hq, T, D], k and v [N, Hkv, T, D].
function Cache:attention(layer, q, k, v)
  if layer.window or layer.alibi_slopes then
    error('paged_kv_cache: sliding-window and ALiBi attention are not supported by the paged cache', 3)
  end
  local pools = self.pools[layer]
  if not pools then
    local shape = { self.num_blocks, k:size(2), self.block_size, k:size(4) }
    pools = { k = tensor.zeros(shape, { dtype = k.dtype }), v = tensor.zeros(shape, { dtype = v.dtype }) }
    self.pools[layer] = pools
  end
  M.write(pools.k, k, self.slots)
  M.write(pools.v, v, self.slots)
  return M.attention(q, pools.k, pools.v, self.block_tables, self.lengths)
end

return M
