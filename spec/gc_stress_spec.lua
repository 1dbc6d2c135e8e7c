require 'busted.runner'()
-- Tensor handles against an eager collector. A handle's raw pointer (t.ptr) is no reference for
-- LuaJIT's collector: a handle made for one C call and dead before it is freed under the pointer
-- ("free(): invalid pointer", or another tensor's data read in its place). Representative work (tensor
-- ops that make such temporaries, a GPTModel's forward/backward and AdamW steps, a checkpoint round
-- trip, a tokenizer on its Python-made fixture cases) runs here with the collector collecting every
-- few hundred VM instructions (a count hook, for interpreted code) and in its most eager incremental
-- setting (pause 0: compiled code too, where hooks do not run); results must equal those of a run
-- without the stress, and the closed forms or fixtures where there are some.
local pmp = require 'pmp'
local json = require 'pmp.json'
local pio = require 'pmp.io'
local tokenizer = require 'pmp.tokenizer'

local ROOT = package.loaded['pmp.root']

local function under_gc_stress(fn)
  local pause = collectgarbage('setpause', 0)
  local stepmul = collectgarbage('setstepmul', 1000)
  debug.sethook(function() collectgarbage() end, '', 300)
  local ok, err = pcall(fn)
  debug.sethook()
  collectgarbage('setpause', pause)
  collectgarbage('setstepmul', stepmul)
  if not ok then error(err, 0) end
end

local function values(t) return t:reshape(-1):totable() end

describe('tensor handles under an eager collector', function()
  it('ops that make temporary handles for their C call give the closed-form results', function()
    under_gc_stress(function()
      for _ = 1, 20 do
        local a = pmp.tensor({ { 1, -2, 3 }, { 4, 5, -6 } })
        assert.are.same({ 3, 0, 5, 6, 7, -4 }, values(a + 2))           -- a number turned tensor
        assert.are.same({ 1, 4, -1, -2, -3, 8 }, values(2 - a))
        assert.are.same({ 1, 0, 3, 4, 5, 0 }, values(pmp.where(a:gt(0), a, 0)))
        assert.are.equal(5, a:max():item())                              -- a flattened view
        assert.are.equal(4, a:argmax():item())
        assert.are.same({ 7, 7, 7, 7, 7, 7 }, values(a:clone():copy_(7)))
        assert.are.same({ 1, -2, 3, 4, 5, -6 }, values(a:to('f64'):to('i64')))
        local loss = pmp.nn.functional.cross_entropy(pmp.zeros(4, 3), pmp.tensor({ 0, 1, 2, 1 }, { dtype = 'i64' }))
        assert.is_true(math.abs(loss:item() - math.log(3)) < 1e-6)      -- uniform logits: log(classes)
      end
    end)
  end)

  local config = { num_layers = 2, hidden_size = 16, num_attention_heads = 4, num_query_groups = 2, vocab_size = 13,
    ffn_hidden_size = 24, dtype = 'f32' }
  local ids = pmp.tensor({ { 1, 5, 12, 0, 5, 7 }, { 3, 3, 9, 2, 11, 4 } }, { dtype = 'i64' })

  -- Three AdamW steps of a fresh model; the losses and the model.
  local function train()
    pmp.manual_seed(5)
    local model = pmp.nn.GPTModel(config)
    local opt = pmp.optim.AdamW(model:parameters(), { lr = 1e-2 })
    local losses = {}
    for step = 1, 3 do
      local logits = model(ids:narrow(2, 1, 5))
      local loss = pmp.nn.functional.cross_entropy(logits, ids:narrow(2, 2, 5))
      loss:backward()
      opt:step()
      opt:zero_grad()
      losses[step] = loss:item()
    end
    return losses, model, opt
  end

  it('GPTModel forward/backward and AdamW steps, then a checkpoint round trip, match the unstressed run', function()
    local want_losses, want_model = train()
    local dir = os.tmpname()
    os.remove(dir)
    finally(function() pio.remove_tree(dir) end)
    under_gc_stress(function()
      local losses, model, opt = train()
      assert.are.same(want_losses, losses)
      local want = want_model:state_dict()
      for name, t in pairs(model:state_dict()) do
        assert.are.same(values(want[name]), values(t), name)
      end
      pmp.checkpoint.save(dir, 3, model, opt, {})
      pmp.manual_seed(6)
      local loaded = pmp.nn.GPTModel(config)
      pmp.checkpoint.load(dir, loaded, pmp.optim.AdamW(loaded:parameters(), { lr = 1e-2 }))
      for name, t in pairs(loaded:state_dict()) do
        assert.are.same(values(want[name]), values(t), name)
      end
    end)
  end)

  it('a tokenizer encodes its Python-made fixture cases', function()
    local tokenizer_json, cases = nil, {}
    for line in io.lines(ROOT .. '/spec/fixtures/tokenizer_cases.jsonl') do
      local c = json.decode(line)
      if c.tokenizer_json and not tokenizer_json then
        tokenizer_json = c
      elseif tokenizer_json and c.tokenizer == tokenizer_json.tokenizer_name and c.text then
        cases[#cases + 1] = c
      end
    end
    assert.is_true(#cases > 0, 'no cases for the first synthetic tokenizer of the fixture')
    under_gc_stress(function()
      local tok = tokenizer.from_json(json.decode(tokenizer_json.tokenizer_json), { path = tokenizer_json.tokenizer_name })
      for _, c in ipairs(cases) do
        local got = tok:encode(c.text, { add_special_tokens = c.add_special_tokens })
        assert.are.same(c.ids, got, c.text)
        assert.are.same(c.ids, tok:encode_batch({ c.text, c.text }, { add_special_tokens = c.add_special_tokens })[2])
      end
    end)
  end)
end)
