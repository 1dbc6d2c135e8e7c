--- pmp.serve.engine: continuous batching over a paged KV cache, for offline generation and RL rollouts.
---
---   local engine = require('pmp.serve.engine').new(model, {
---     block_size = 16,        -- tokens per KV-cache block
---     num_blocks = 1024,      -- the whole cache: the engine never holds more
---     max_batch = 32,         -- sequences decoded together
---     max_context = nil,      -- positions per sequence (default: the model's max_position_embeddings)
---     eos_ids = {},           -- tokens that end a sequence
---     tokenizer = nil,        -- needed for stop strings; results then carry text
---     prefix_caching = true,  -- reuse the cached blocks of prompts that share a prefix
---     seed = 0,               -- seeds for requests that give none: seed + the request's number
---   })
---   engine:add{ id = 'a', prompt = {ids...}, max_tokens = 16, temperature = 0, top_k = 0, top_p = 1,
---               repetition_penalty = 1, seed = nil, stop = {strings}, n = 1, logprobs = false }
---   while engine:busy() do
---     for _, result in ipairs(engine:step()) do ... end
---   end
---   -- or: local results = engine:run(requests, on_result)   (results in the order of requests)
---
--- A result: { id, number (1-based order of add), prompt_tokens, samples = { { tokens = {ids},
--- finish_reason = 'eos' | 'stop' | 'length', logprobs = {...} (when asked), text = (with a tokenizer) }
--- ... n of them } }. engine.stats counts prompt_tokens, cached_prompt_tokens (found in the prefix
--- cache), generated_tokens, finished_requests, steps and peak_batch (most sequences running at once);
--- engine.blocks.peak is the most KV-cache blocks held at once. add raises a Lua error naming the field
--- for a bad request and leaves the engine as it was, so a caller can report it and go on.
---
--- Each step admits waiting sequences while there are batch slots and blocks (a sequence is admitted
--- only when the cache can hold its prompt and all of its max_tokens, so running sequences never
--- stall; blocks are still taken only as tokens arrive), prefills each admitted prompt past its cached
--- prefix, then runs one forward over every running sequence, each at its own position. Sequences
--- leave as they finish and free their blocks; full prompt blocks stay findable by their prefix.
---
--- Tokens are chosen by pmp.sample, as pmp.generate chooses them, each sequence drawing from a
--- pmp.Generator of its own: sample 1 of a request with seed s from pmp.Generator(s), sample k from
--- pmp.Generator(s + (k - 1) * 0x9E3779B97F4A7C15) (uint64, wrapping; the golden-ratio step keeps the n
--- samples' seeds apart from each other and from nearby request seeds). A seed is a non-negative integer
--- number below 2^53 or a uint64 cdata (pmp.rl.streams.key's). So a seeded request's tokens are those
--- pmp.generate gives its prompt with generator = pmp.Generator(s), alone or beside any other requests.
local tensor = require 'pmp.tensor'
local block_pool = require 'pmp.serve.block_pool'
local paged_kv_cache = require 'pmp.serve.paged_kv_cache'
local ffi = require 'ffi'
local sampling = require 'pmp.sampling'
local token_choice = require 'pmp.serve.token_choice'

local M = {}

local Engine = {}
Engine.__index = Engine

local REQUEST_FIELDS = { id = true, prompt = true, max_tokens = true, temperature = true, top_k = true,
  top_p = true, repetition_penalty = true, seed = true, stop = true, n = true, logprobs = true }
M.REQUEST_FIELDS = REQUEST_FIELDS

local SAMPLE_SEED_STEP = 0x9E3779B97F4A7C15ULL

--- The seed of sample k (1-based) of a request with seed s (see the top).
function M.sample_seed(seed, k)
  return ffi.cast('uint64_t', seed) + (k - 1) * SAMPLE_SEED_STEP
end

--- Why the engine cannot run model (a sentence), or nil when it can: tensor- and context-parallel
--- models, score heads, and families whose attention the paged cache does not compute (multi-latent
--- attention, ALiBi, sliding windows) are refused.
function M.unsupported(model)
  local c = model.config
  if type(c) ~= 'table' or not model.decode then return 'the model must be a pmp GPTModel' end
  if model.tensor_parallel or model.context_parallel then
    return 'a tensor- or context-parallel model cannot generate; use the whole model'
  end
  if model.score then return 'a model with a score head does not generate' end
  if c.multi_latent_attention then return 'multi-latent attention is not supported by the paged cache' end
  if c.position_embedding_type == 'alibi' then return 'ALiBi models are not supported by the paged cache' end
  local window = c.sliding_window
  if type(window) == 'table' then
    for _, w in ipairs(window) do if w and w ~= 0 then window = w break end end
    if type(window) == 'table' then window = nil end
  end
  if window and window ~= 0 then return 'sliding-window attention is not supported by the paged cache' end
end

local function positive_integer(options, key, default)
  local v = options[key]
  if v == nil then return default end
  if type(v) ~= 'number' or v < 1 or v % 1 ~= 0 then
    error(string.format('serve.engine: %s must be a positive integer, got %s', key, tostring(v)), 3)
  end
  return v
end

function M.new(model, options)
  options = options or {}
  local reason = M.unsupported(model)
  if reason then error('serve.engine: ' .. reason, 2) end
  local block_size = positive_integer(options, 'block_size', 16)
  local num_blocks = positive_integer(options, 'num_blocks', 1024)
  local max_context = positive_integer(options, 'max_context', model.config.max_position_embeddings)
  if not max_context then error('serve.engine: the model has no max_position_embeddings; give options.max_context', 2) end
  local eos = {}
  for _, id in ipairs(options.eos_ids or {}) do eos[id] = true end
  return setmetatable({
    model = model, tokenizer = options.tokenizer, eos = eos,
    block_size = block_size, max_context = max_context,
    max_batch = positive_integer(options, 'max_batch', 32),
    prefix_caching = options.prefix_caching ~= false,
    seed = options.seed or 0,
    blocks = block_pool.new(num_blocks),
    cache = paged_kv_cache.new(num_blocks, block_size),
    waiting = {}, running = {}, requests_added = 0,
    stats = { prompt_tokens = 0, cached_prompt_tokens = 0, generated_tokens = 0, finished_requests = 0, steps = 0,
      peak_batch = 0 },
  }, Engine)
end

local function blocks_for(tokens, block_size) return math.ceil(tokens / block_size) end

-- A request checked and completed with its defaults (errors name the field).
function Engine:check_request(r)
  local function fail(fmt, ...)
    error('request' .. (r.id ~= nil and ' ' .. tostring(r.id) or '') .. ': ' .. string.format(fmt, ...), 3)
  end
  if type(r) ~= 'table' then error('serve.engine: a request must be a table', 3) end
  for k in pairs(r) do
    if not REQUEST_FIELDS[k] then fail("unknown field '%s'", tostring(k)) end
  end
  if type(r.prompt) ~= 'table' or #r.prompt == 0 then fail('prompt must be a non-empty list of token ids') end
  for _, id in ipairs(r.prompt) do
    if type(id) ~= 'number' or id % 1 ~= 0 or id < 0 or id >= self.model.config.vocab_size then
      fail('prompt holds %s, not a token id below the vocabulary size %d', tostring(id), self.model.config.vocab_size)
    end
  end
  if #r.prompt >= self.max_context then
    fail('the prompt has %d tokens; the context holds %d (the prompt and at least one new token)', #r.prompt,
      self.max_context)
  end
  local function number(key, default, lo, hi, integer)
    local v = r[key]
    if v == nil then return default end
    if type(v) ~= 'number' or v < lo or v > hi or (integer and v % 1 ~= 0) then
      fail('%s must be %s in [%s, %s], got %s', key, integer and 'an integer' or 'a number', tostring(lo), tostring(hi),
        tostring(v))
    end
    return v
  end
  local out = {
    id = r.id, prompt = r.prompt,
    max_tokens = math.min(number('max_tokens', 16, 1, math.huge, true), self.max_context - #r.prompt),
    n = number('n', 1, 1, math.huge, true),
    seed = type(r.seed) == 'cdata' and ffi.istype('uint64_t', r.seed) and r.seed or number('seed', nil, 0, 2 ^ 53, true),
    sampling = { temperature = number('temperature', 0, 0, math.huge), top_k = number('top_k', 0, 0, math.huge, true),
      top_p = number('top_p', 1, 0, 1), repetition_penalty = number('repetition_penalty', 1, 0, math.huge),
      logprobs = r.logprobs or false },
    stop = r.stop or {},
  }
  if out.sampling.top_p == 0 then fail('top_p must be above 0') end
  if out.sampling.repetition_penalty == 0 then fail('repetition_penalty must be above 0') end
  if type(out.sampling.logprobs) ~= 'boolean' then fail('logprobs must be true or false') end
  if type(out.stop) ~= 'table' then fail('stop must be a list of strings') end
  for _, s in ipairs(out.stop) do
    if type(s) ~= 'string' or s == '' then fail('stop must be a list of non-empty strings') end
  end
  if #out.stop > 0 and not self.tokenizer then fail('stop strings need the engine to have a tokenizer') end
  local need = blocks_for(#r.prompt + out.max_tokens, self.block_size)
  if need > self.blocks.num_blocks then
    fail('needs %d KV-cache blocks for its prompt and max_tokens; the cache has %d', need, self.blocks.num_blocks)
  end
  return out
end

--- Queues a request (see the top); its n samples become n sequences.
function Engine:add(request)
  local r = self:check_request(request)
  self.requests_added = self.requests_added + 1
  r.number = self.requests_added
  r.result = { id = r.id, number = r.number, prompt_tokens = #r.prompt, samples = {} }
  r.unfinished = r.n
  local seed = r.seed or (self.seed + r.number)
  for k = 1, r.n do
    local tokens = {}
    for i, id in ipairs(r.prompt) do tokens[i] = id end
    self.waiting[#self.waiting + 1] = {
      request = r, sample = k, tokens = tokens, prompt_length = #tokens, generated = {},
      logprobs = r.sampling.logprobs and {} or nil, blocks = {}, sampling = r.sampling,
      -- each sample draws from its own generator, whatever else runs
      generator = sampling.Generator(M.sample_seed(seed, k)),
      promised = blocks_for(#tokens + r.max_tokens, self.block_size),
    }
  end
end

function Engine:busy() return #self.waiting > 0 or #self.running > 0 end

-- Blocks promised to running sequences that they have not taken yet.
function Engine:outstanding()
  local n = 0
  for _, seq in ipairs(self.running) do n = n + seq.promised - #seq.blocks end
  return n
end

-- Takes the cached blocks of the prompt's longest known prefix of full blocks (leaving at least its
-- last token to compute, whose logits give the first new token).
function Engine:take_prefix(seq)
  if not self.prefix_caching then return end
  local key, bs = '', self.block_size
  seq.keys = {}
  for j = 1, math.floor((seq.prompt_length - 1) / bs) do
    key = block_pool.prefix_key(key, seq.tokens, (j - 1) * bs + 1, bs)
    local b = self.blocks:lookup(key)
    if not b then break end
    seq.blocks[j], seq.keys[j] = b, key
  end
end

function Engine:release(seq)
  for _, b in ipairs(seq.blocks) do self.blocks:release(b) end
  seq.blocks = {}
end

-- The block slot of position p (0-based) of seq, taking a fresh block when p starts one.
function Engine:slot(seq, p)
  local j = math.floor(p / self.block_size) + 1
  if not seq.blocks[j] then
    seq.blocks[j] = assert(self.blocks:allocate(), 'serve.engine: a promised block was not free')
  end
  return seq.blocks[j] * self.block_size + p % self.block_size
end

-- One forward of each sequence's last `count` tokens at their own positions, their keys and values
-- going into the cache; returns the logits of each sequence's last position [N, V].
function Engine:forward(sequences, count)
  local ids, positions, slots, tables, lengths = {}, {}, {}, {}, {}
  local widest = 0
  for n, seq in ipairs(sequences) do
    ids[n], positions[n], slots[n] = {}, {}, {}
    for p = #seq.tokens - count, #seq.tokens - 1 do
      ids[n][#ids[n] + 1] = seq.tokens[p + 1]
      positions[n][#positions[n] + 1] = p
      slots[n][#slots[n] + 1] = self:slot(seq, p)
    end
    lengths[n] = #seq.tokens
    widest = math.max(widest, #seq.blocks)
  end
  for n, seq in ipairs(sequences) do
    tables[n] = {}
    for j = 1, widest do tables[n][j] = seq.blocks[j] or 0 end   -- entries past a sequence's length are never read
  end
  local function i64(t) return tensor.tensor(t, { dtype = 'i64' }) end
  self.cache:set_batch(i64(slots), i64(tables), i64(lengths))
  local logits = self.model:decode(i64(ids), { positions = i64(positions), paged = self.cache, last_only = true })
  return logits:select(2, 1)
end

-- Whether seq ends after its newest token, and why.
function Engine:finish_reason(seq)
  local id = seq.generated[#seq.generated]
  if self.eos[id] then return 'eos' end
  local stop = seq.request.stop
  if #stop > 0 then
    local text = self.tokenizer:decode(seq.generated)
    for _, s in ipairs(stop) do
      if text:find(s, 1, true) then return 'stop' end
    end
  end
  if #seq.generated >= seq.request.max_tokens then return 'length' end
end

function Engine:sample_result(seq, reason)
  local out = { tokens = seq.generated, logprobs = seq.logprobs, finish_reason = reason }
  if self.tokenizer then
    out.text = self.tokenizer:decode(seq.generated)
    if reason == 'stop' then
      for _, s in ipairs(seq.request.stop) do
        local at = out.text:find(s, 1, true)
        if at then out.text = out.text:sub(1, at - 1) end
      end
    end
  end
  return out
end

-- Appends the chosen tokens; returns the results of requests whose last sample ended.
function Engine:accept(sequences, ids, logprobs, finished)
  local still = {}
  for n, seq in ipairs(sequences) do
    seq.generated[#seq.generated + 1] = ids[n]
    seq.tokens[#seq.tokens + 1] = ids[n]
    if seq.logprobs then seq.logprobs[#seq.logprobs + 1] = logprobs[n] end
    self.stats.generated_tokens = self.stats.generated_tokens + 1
    local reason = self:finish_reason(seq)
    if reason then
      self:release(seq)
      local r = seq.request
      r.result.samples[seq.sample] = self:sample_result(seq, reason)
      r.unfinished = r.unfinished - 1
      if r.unfinished == 0 then
        self.stats.finished_requests = self.stats.finished_requests + 1
        finished[#finished + 1] = r.result
      end
    else
      still[#still + 1] = seq
    end
  end
  return still
end

-- Admits the first waiting sequence if a batch slot and its blocks are free, prefills it and picks its
-- first token; returns whether it did, and the sequence when it goes on running.
function Engine:admit(finished)
  local seq = self.waiting[1]
  if not seq or #self.running >= self.max_batch then return false end
  self:take_prefix(seq)
  local cached = #seq.blocks
  if seq.promised - cached > self.blocks:free_count() - self:outstanding() then
    self:release(seq)
    return false
  end
  table.remove(self.waiting, 1)
  self.stats.prompt_tokens = self.stats.prompt_tokens + seq.prompt_length
  self.stats.cached_prompt_tokens = self.stats.cached_prompt_tokens + cached * self.block_size
  local logits = self:forward({ seq }, seq.prompt_length - cached * self.block_size)
  -- the prompt's full blocks are now a prefix later prompts can find
  if self.prefix_caching then
    local bs = self.block_size
    for j = 1, math.floor(seq.prompt_length / bs) do
      seq.keys[j] = seq.keys[j] or block_pool.prefix_key(seq.keys[j - 1] or '', seq.tokens, (j - 1) * bs + 1, bs)
      self.blocks:register(seq.blocks[j], seq.keys[j])
    end
  end
  local ids, logprobs = token_choice.choose(logits, { seq })
  local kept = self:accept({ seq }, ids, logprobs, finished)[1]
  if kept then self.running[#self.running + 1] = kept end
  return true, kept
end

--- One engine step: admissions (with their prefills), then one decode forward over all running
--- sequences. Returns the results of the requests that finished in it.
function Engine:step()
  local finished = {}
  local was_training = self.model.training
  self.model:eval()
  require('pmp').no_grad(function()
    local decoding, admitted = {}, {}
    for n, seq in ipairs(self.running) do decoding[n] = seq end
    while true do
      local ok, seq = self:admit(finished)
      if not ok then break end
      admitted[#admitted + 1] = seq
    end
    self.stats.peak_batch = math.max(self.stats.peak_batch, #self.running)
    self.running = {}
    if #decoding > 0 then
      local ids, logprobs = token_choice.choose(self:forward(decoding, 1), decoding)
      self.running = self:accept(decoding, ids, logprobs, finished)
    end
    for _, seq in ipairs(admitted) do self.running[#self.running + 1] = seq end
  end)
  if was_training then self.model:train() end
  self.stats.steps = self.stats.steps + 1
  return finished
end

--- Adds every request, steps until all are done, and returns their results in the order given;
--- on_result(result), when given, sees each as it finishes.
function Engine:run(requests, on_result)
  local first = self.requests_added + 1
  for _, r in ipairs(requests) do self:add(r) end
  local results = {}
  while self:busy() do
    for _, result in ipairs(self:step()) do
      results[result.number - first + 1] = result
      if on_result then on_result(result) end
    end
  end
  return results
end

return M
