-- What the tokenizer kinds (tokenizer.json, SentencePiece, tiktoken) share: checking input text,
-- cutting it at added or special tokens, and the batch forms of encode and decode.
local ffi = require 'ffi'
local C = require('pmp.ffi').C

local M = {}

local count_box = ffi.new('int64_t[1]')

--- Raises unless text is a valid UTF-8 string, naming the calling function fname (the error points
--- at the caller of the function that checks).
function M.check_text(text, fname)
  if type(text) ~= 'string' then error('pmp.tokenizer: ' .. fname .. ' expects a string, got ' .. type(text), 3) end
  local bad = C.pmp_tok_utf8_check(text, #text)
  if bad >= 0 then
    error(string.format('pmp.tokenizer: %s: text is not valid UTF-8 (byte 0x%02X at offset %d)', fname,
      text:byte(tonumber(bad) + 1), tonumber(bad)), 3)
  end
end

--- The spans of text cut by a token trie (pmp_tok_added, leftmost-longest): a list of
--- {start, end, id} with 0-based [start, end) byte offsets and id -1 for the text between tokens.
function M.spans(trie, text)
  local spans = C.pmp_tok_added_split(trie, text, #text, count_box)
  if spans == nil then error('pmp.tokenizer: encode: ' .. ffi.string(C.pmp_last_error()), 0) end
  local list = {}
  for k = 0, tonumber(count_box[0]) - 1 do
    list[#list + 1] = { tonumber(spans[3 * k]), tonumber(spans[3 * k + 1]), tonumber(spans[3 * k + 2]) }
  end
  return list
end

--- tok:encode_batch({texts}, opts) -> a list of id lists, one text at a time.
function M.encode_batch(self, texts, opts)
  if type(texts) ~= 'table' then error('pmp.tokenizer: encode_batch expects a list of strings, got ' .. type(texts), 2) end
  local out = {}
  for i = 1, #texts do out[i] = self:encode(texts[i], opts) end
  return out
end

--- tok:decode_batch({id lists}, opts) -> a list of texts.
function M.decode_batch(self, list, opts)
  local out = {}
  for i = 1, #list do out[i] = self:decode(list[i], opts) end
  return out
end

return M
