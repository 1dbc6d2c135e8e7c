require 'busted.runner'()
-- Memory: loops that drop large tensors run in bounded memory (resident set and the engine's own
-- count), the caching allocator reuses blocks and reports in_use/peak/cached truthfully, and autograd
-- graphs are freed whether or not backward runs.
--
-- Tensors are made inside helper functions: a local that went out of scope in the running function
-- can still sit in a live stack slot, where collectgarbage() would see it; a returned-from frame cannot.

local MiB = 1024 * 1024

local function rss_bytes()
  local f = assert(io.open('/proc/self/status', 'r'))
  local text = f:read('*a')
  f:close()
  return assert(tonumber(text:match('VmRSS:%s*(%d+)%s*kB')), 'no VmRSS in /proc/self/status') * 1024
end

local function in_use() return pmp.memory.stats().in_use end

local function settle()
  collectgarbage()
  collectgarbage()
end

local function mib(bytes) return string.format('%.1f MiB', bytes / MiB) end

describe('memory', function()
  describe('a loop over large tensors', function()
    it('keeps resident memory and engine memory bounded, and returns to the baseline', function()
      local ELEMENTS = 25 * MiB                         -- 100 MiB of f32
      -- three nearby sizes, so the cache sees more than one block size
      local sizes = { ELEMENTS, ELEMENTS - 1 * MiB, ELEMENTS + 1 * MiB }

      local function step(i)
        local n = sizes[i % #sizes + 1]
        local t = pmp.full({ n }, i % 7)              -- written, so its pages are resident
        if i % 10 == 0 then
          -- arithmetic makes more temporaries of the same size
          local u = t:add(t):mul(t)
          return u:numel()
        end
        return t:numel()
      end

      settle()
      local rss0, used0 = rss_bytes(), in_use()
      pmp.memory.reset_peak()
      local max_rss_growth = 0
      for i = 1, 200 do
        assert.is_true(step(i) > 0)
        max_rss_growth = math.max(max_rss_growth, rss_bytes() - rss0)
      end
      local peak_growth = pmp.memory.stats().peak - used0
      settle()
      local used1 = in_use()

      -- 200 x 100 MiB = 20 GiB allocated in all; unbounded growth would be obvious
      assert.is_true(max_rss_growth < 1536 * MiB, 'resident set grew by ' .. mib(max_rss_growth))
      assert.is_true(peak_growth < 1536 * MiB, 'engine in_use peaked ' .. mib(peak_growth) .. ' above the baseline')
      assert.is_true(math.abs(used1 - used0) < MiB,
        'in_use did not return to the baseline: ' .. mib(used0) .. ' before, ' .. mib(used1) .. ' after')
    end)
  end)

  describe('the caching allocator', function()
    local function make_and_drop(rows, cols) return pmp.empty(rows, cols):numel() end

    it('serves repeated allocations of one shape from its cache', function()
      settle()
      make_and_drop(1000, 1000)                        -- the first one may be a miss
      settle()
      local before = pmp.memory.stats()
      for _ = 1, 50 do
        make_and_drop(1000, 1000)
        settle()
      end
      local after = pmp.memory.stats()
      assert.is_true(after.allocs - before.allocs >= 50, 'allocs went from ' .. before.allocs .. ' to ' .. after.allocs)
      assert.is_true(after.cache_hits - before.cache_hits >= 50,
        'cache_hits went from ' .. before.cache_hits .. ' to ' .. after.cache_hits)
      assert.is_true(after.cached >= 4e6, 'a freed 4 MB block should be cached, cached = ' .. after.cached)
      assert.are.equal(before.in_use, after.in_use)
    end)

    it('gives cached blocks back on empty_cache', function()
      make_and_drop(1000, 1000)
      settle()
      assert.is_true(pmp.memory.stats().cached > 0)
      pmp.memory.empty_cache()
      local emptied = pmp.memory.stats()
      assert.are.equal(0, emptied.cached)
      make_and_drop(1000, 1000)                        -- nothing to reuse now
      assert.are.equal(emptied.cache_hits, pmp.memory.stats().cache_hits)
    end)

    it('tracks the peak, which reset_peak brings down to in_use', function()
      settle()
      local s = pmp.memory.stats()
      assert.is_true(s.peak >= s.in_use)
      pmp.memory.reset_peak()
      s = pmp.memory.stats()
      assert.are.equal(s.in_use, s.peak)

      local base = s.in_use
      local function hold_two()
        local x = pmp.zeros(4 * MiB)                  -- 16 MiB
        local y = pmp.zeros(2 * MiB)                  -- 8 MiB
        local during = pmp.memory.stats()
        assert.is_true(during.in_use >= base + 24 * MiB, 'in_use ' .. mib(during.in_use) .. ' with 24 MiB held')
        assert.is_true(during.peak >= during.in_use)
        return x:numel() + y:numel()
      end
      hold_two()
      settle()
      s = pmp.memory.stats()
      assert.are.equal(base, s.in_use)
      assert.is_true(s.peak >= base + 24 * MiB, 'peak ' .. mib(s.peak) .. ' forgot the 24 MiB held')
      pmp.memory.reset_peak()
      s = pmp.memory.stats()
      assert.are.equal(s.in_use, s.peak)
    end)
  end)

  describe('autograd loops', function()
    local D, B = 256, 1024

    local function parameters()
      pmp.manual_seed(0)
      local w = pmp.randn(D, D):mul(pmp.full({}, 0.05)):detach():requires_grad_()
      local b = pmp.zeros(D, { requires_grad = true })
      return w, b
    end

    -- a few fixed input batches: the activations, gradients and graph nodes are what each step makes anew
    local inputs = {}
    local function batch(i)
      local k = i % 4 + 1
      if not inputs[k] then inputs[k] = pmp.randn(B, D) end
      return inputs[k]
    end

    local step_count = 0
    local function forward(w, b)
      step_count = step_count + 1
      local h = batch(step_count):matmul(w):add(b):relu()
      local g = h:mul(h:sigmoid())                     -- more saved tensors in the graph
      return g:mul(g):mean()
    end

    local function train_step(w, b)
      local loss = forward(w, b)
      loss:backward()
      local value = loss:item()
      w.grad, b.grad = nil, nil
      return value
    end

    local function forward_only(w, b) return forward(w, b):item() end

    local function check_bounded(step)
      local w, b = parameters()
      for i = 1, 4 do batch(i) end
      settle()
      local rss0, used0 = rss_bytes(), in_use()
      local max_rss_growth = 0
      for i = 1, 100 do
        local value = step(w, b)
        assert.is_true(value == value, 'loss is NaN at step ' .. i)
        max_rss_growth = math.max(max_rss_growth, rss_bytes() - rss0)
      end
      settle()
      local used1 = in_use()
      -- each step allocates ~10 MiB of activations and gradients, ~1 GiB over the loop
      assert.is_true(max_rss_growth < 1536 * MiB, 'resident set grew by ' .. mib(max_rss_growth))
      assert.is_true(math.abs(used1 - used0) < MiB,
        'in_use did not return to the baseline: ' .. mib(used0) .. ' before, ' .. mib(used1) .. ' after')
      assert.is_nil(w.grad)
      return w, b
    end

    it('frees the graph and its saved tensors after each backward', function()
      local w = check_bounded(train_step)
      -- the graph was really built and used: one more step leaves a gradient behind
      local loss = forward(w, select(2, parameters()))
      loss:backward()
      assert.are.same({ D, D }, w.grad.shape)
    end)

    it('frees graphs that are dropped without a backward', function()
      check_bounded(forward_only)
    end)

    it('frees everything under no_grad too', function()
      check_bounded(function(w, b) return pmp.no_grad(forward_only, w, b) end)
    end)
  end)
end)
