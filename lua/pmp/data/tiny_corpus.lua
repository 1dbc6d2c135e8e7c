--- The embedded default corpus: English-like sentences from a small grammar, and sums written out,
--- generated deterministically so the pretraining recipe runs with no download and no data files.
--- A model can learn both the grammar and the arithmetic, so the loss keeps falling for a while.
local M = {}

local words = {
  determiner = { 'the', 'a', 'every', 'one', 'that' },
  adjective = { 'old', 'quick', 'red', 'quiet', 'small', 'bright', 'tired', 'clever' },
  noun = { 'cat', 'dog', 'king', 'sailor', 'river', 'garden', 'lantern', 'horse', 'child', 'storm' },
  verb = { 'sees', 'follows', 'remembers', 'carries', 'paints', 'hears', 'finds', 'guards' },
  adverb = { 'slowly', 'at night', 'again', 'with care', 'in the rain' },
}

function M.generate(lines, seed)
  local state = seed or 7
  local function pick(list)
    state = (state * 1103515245 + 12345) % 2147483648
    return list[math.floor(state / 65536) % #list + 1]
  end
  local function number(limit)
    state = (state * 1103515245 + 12345) % 2147483648
    return math.floor(state / 65536) % limit
  end
  local out = {}
  for k = 1, lines or 6000 do
    if k % 3 == 0 then
      local a, b = number(50), number(50)
      out[k] = string.format('%d + %d = %d.', a, b, a + b)
    else
      local subject = pick(words.determiner) .. ' ' .. pick(words.adjective) .. ' ' .. pick(words.noun)
      local object = pick(words.determiner) .. ' ' .. pick(words.noun)
      out[k] = string.format('%s %s %s %s.', subject, pick(words.verb), object, pick(words.adverb))
    end
  end
  return table.concat(out, '\n') .. '\n'
end

return M
