--- Simple tokenizers for pretraining from text: characters (as nanoGPT's char-level models) and bytes.
--- HF tokenizer.json support lives in pmp.tokenizer.
local M = {}

local UTF8_CHAR = '[%z\1-\127\194-\244][\128-\191]*'

-- The distinct characters of a text, sorted by code point: a reproducible vocabulary.
local CharTokenizer = {}
CharTokenizer.__index = CharTokenizer

-- Appends to chars the characters of text not yet in seen (for vocabularies built over many texts).
function M.add_chars(text, seen, chars)
  for c in text:gmatch(UTF8_CHAR) do
    if not seen[c] then
      seen[c] = true
      chars[#chars + 1] = c
    end
  end
end

function M.char_from_text(text)
  local seen, chars = {}, {}
  M.add_chars(text, seen, chars)
  table.sort(chars)
  return M.char(chars)
end

-- chars: the vocabulary, id k-1 for chars[k].
function M.char(chars)
  local ids = {}
  for k, c in ipairs(chars) do ids[c] = k - 1 end
  return setmetatable({ type = 'char', chars = chars, ids = ids, vocab_size = #chars }, CharTokenizer)
end

function CharTokenizer:encode(text)
  local out, ids = {}, self.ids
  for c in text:gmatch(UTF8_CHAR) do
    local id = ids[c]
    if id == nil then error(string.format("char tokenizer: '%s' is not in the vocabulary", c), 2) end
    out[#out + 1] = id
  end
  return out
end

function CharTokenizer:decode(ids)
  local parts = {}
  for k, id in ipairs(ids) do parts[k] = self.chars[id + 1] or '?' end
  return table.concat(parts)
end

function CharTokenizer:state() return { type = 'char', chars = self.chars } end

local ByteTokenizer = {}
ByteTokenizer.__index = ByteTokenizer

function M.byte() return setmetatable({ type = 'byte', vocab_size = 256 }, ByteTokenizer) end

function ByteTokenizer:encode(text)
  local out = {}
  for k = 1, #text do out[k] = text:byte(k) end
  return out
end

function ByteTokenizer:decode(ids)
  local parts = {}
  for k, id in ipairs(ids) do parts[k] = string.char(id % 256) end
  return table.concat(parts)
end

function ByteTokenizer:state() return { type = 'byte' } end

-- Rebuilds a tokenizer from what state() returned (stored in checkpoints).
function M.from_state(state)
  if state.type == 'char' then return M.char(state.chars) end
  if state.type == 'byte' then return M.byte() end
  error("tokenizer: unknown type '" .. tostring(state.type) .. "'", 2)
end

return M
