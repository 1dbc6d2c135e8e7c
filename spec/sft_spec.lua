require 'busted.runner'()
-- SFT data: formats, assistant-only labels, and packing whose loss equals the unpacked loss.
local sft = pmp.data.sft

-- ChatML, the format Qwen uses, written out directly so these tests do not depend on a template engine.
local function chatml(messages, add_generation_prompt)
  local parts = {}
  for _, m in ipairs(messages) do parts[#parts + 1] = '<|im_start|>' .. m.role .. '\n' .. m.content .. '<|im_end|>\n' end
  if add_generation_prompt then parts[#parts + 1] = '<|im_start|>assistant\n' end
  return table.concat(parts)
end

-- A byte tokenizer with the two ChatML markers as single special tokens.
local Bytes = {}
function Bytes:encode(text)
  local ids, k = {}, 1
  while k <= #text do
    if text:sub(k, k + 11) == '<|im_start|>' then ids[#ids + 1], k = 256, k + 12
    elseif text:sub(k, k + 9) == '<|im_end|>' then ids[#ids + 1], k = 257, k + 10
    else ids[#ids + 1], k = text:byte(k), k + 1 end
  end
  return ids
end

describe('pmp.data.sft', function()
  it('detects and converts alpaca, sharegpt and messages records', function()
    assert.are.equal('alpaca', sft.detect_format({ instruction = 'a', input = '', output = 'b' }))
    assert.are.same({ { role = 'user', content = 'Add.\n\n2+2' }, { role = 'assistant', content = '4' } },
      sft.to_messages({ instruction = 'Add.', input = '2+2', output = '4' }))
    assert.are.same({ { role = 'system', content = 's' }, { role = 'user', content = 'hi' }, { role = 'assistant', content = 'yo' } },
      sft.to_messages({ system = 's', conversations = { { from = 'human', value = 'hi' }, { from = 'gpt', value = 'yo' } } }))
    local m = { { role = 'user', content = 'x' } }
    assert.are.equal(m, sft.to_messages({ messages = m }))
    assert.has_error(function() sft.to_messages({ text = 'plain' }) end)
    assert.has_error(function() sft.to_messages({ conversations = { { from = 'robot', value = 'x' } } }) end)
  end)

  it('trains only assistant tokens, end-of-turn included, over several turns', function()
    local messages = { { role = 'system', content = 'S' }, { role = 'user', content = 'Q1' }, { role = 'assistant', content = 'A1' },
      { role = 'user', content = 'Q2' }, { role = 'assistant', content = 'A2' } }
    local s = sft.tokenize(messages, { tokenizer = Bytes, render = chatml })
    assert.are.same(Bytes:encode(chatml(messages, false)), s.ids)
    local trained = {}
    for k, id in ipairs(s.ids) do
      if s.mask[k] then trained[#trained + 1] = id < 256 and string.char(id) or (id == 257 and '<E>' or '<S>') end
    end
    -- exactly the two answers, each with its end-of-turn token and newline
    assert.are.equal('A1<E>\nA2<E>\n', table.concat(trained))
    local all = sft.tokenize(messages, { tokenizer = Bytes, render = chatml, train_on_prompt = true })
    for k in ipairs(all.ids) do assert.is_true(all.mask[k]) end
  end)

  it('locates answers by their prompts when the template rewrites earlier turns', function()
    -- like Qwen3: the last answer carries an empty thinking block that disappears once a turn follows
    local function thinking(messages, gen)
      local parts = {}
      for k, m in ipairs(messages) do
        local content = m.content
        if m.role == 'assistant' and k == #messages then content = '<think></think>' .. content end
        parts[#parts + 1] = '<|im_start|>' .. m.role .. '\n' .. content .. '<|im_end|>\n'
      end
      if gen then parts[#parts + 1] = '<|im_start|>assistant\n' end
      return table.concat(parts)
    end
    local messages = { { role = 'user', content = 'Q1' }, { role = 'assistant', content = 'A1' },
      { role = 'user', content = 'Q2' }, { role = 'assistant', content = 'A2' } }
    local s = sft.tokenize(messages, { tokenizer = Bytes, render = thinking, end_of_turn_id = 257 })
    assert.are.same(Bytes:encode(thinking(messages, false)), s.ids)
    local trained = {}
    for k, id in ipairs(s.ids) do
      if s.mask[k] then trained[#trained + 1] = id < 256 and string.char(id) or (id == 257 and '<E>' or '<S>') end
    end
    assert.are.equal('A1<E><think></think>A2<E>', table.concat(trained))
    local ok, message = pcall(sft.tokenize, messages, { tokenizer = Bytes, render = thinking })
    assert.is_false(ok)
    assert.matches('no end_of_turn_id', message)
  end)

  it('packs samples so that the loss equals the unpacked loss', function()
    pmp.manual_seed(4)
    local samples = {}
    for k = 1, 5 do
      local q, a = string.rep('q', k + 2), string.rep('a', 7 - k)
      samples[k] = sft.tokenize({ { role = 'user', content = q }, { role = 'assistant', content = a } }, { tokenizer = Bytes, render = chatml })
    end
    local model = pmp.nn.GPTModel({ num_layers = 2, hidden_size = 32, num_attention_heads = 4, vocab_size = 258, dtype = 'f64' })
    local function loss_sum(rows)
      local batch = sft.collate(rows)
      local count = batch.targets:ne(sft.IGNORE_INDEX):sum():item()
      local total = model(batch.inputs, batch.targets, { positions = batch.positions, first_key = batch.first_key, reduction = 'sum' })
      return total:item(), count
    end
    local packed_rows = sft.pack(samples, 64)
    assert.is_true(#packed_rows < #samples)
    local packed, n_packed = loss_sum(packed_rows)
    local unpacked, n_unpacked = loss_sum(sft.pad(samples, 64))
    assert.are.equal(n_unpacked, n_packed)
    assert.is_near(unpacked, packed, 1e-9 * math.abs(unpacked))
    -- and a row never mixes documents in attention: the first key of each token is its document start
    local row = packed_rows[1]
    for t = 1, #row.inputs do assert.is_true(row.first_key[t] <= t - 1 and row.positions[t] == t - 1 - row.first_key[t]) end
  end)
end)
