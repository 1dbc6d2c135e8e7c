--- Sentence splitting for tools/preprocess_data.lua --split-sentences: a simple, documented stand-in
--- for the NLTK punkt model Megatron-LM loads (pmp has no trained punkt parameters):
---
---   sentences.split(text, keep_newlines) -> list of strings
---
--- A sentence ends after a run of '.', '!' or '?' (then any closing quotes or brackets: " ' ) ] }
--- ” ’ ») that is followed by ASCII whitespace and then more text. The whitespace between two
--- sentences is dropped, or with keep_newlines kept at the end of the first (Megatron's
--- --keep-newlines language variables do that); the text's trailing whitespace is dropped, its
--- leading whitespace stays with the first sentence, and a blank text has no sentence.
--- Unlike punkt it knows no abbreviations ("Mr. Smith" is two sentences) and does not look at the
--- case of the next word.
local M = {}

local ENDERS = { ['.'] = true, ['!'] = true, ['?'] = true }
local CLOSERS = { '"', "'", ')', ']', '}', '\226\128\157', '\226\128\153', '\194\187' }   -- ” ’ »

-- The position after the closing marks that start at i.
local function skip_closers(text, i)
  while true do
    local moved = false
    for _, c in ipairs(CLOSERS) do
      if text:sub(i, i + #c - 1) == c then
        i, moved = i + #c, true
        break
      end
    end
    if not moved then return i end
  end
end

function M.split(text, keep_newlines)
  local out, start, i = {}, 1, 1
  while true do
    local run = text:find('[%.!%?]', i)
    if not run then break end
    local after = run
    while ENDERS[text:sub(after, after)] do after = after + 1 end
    after = skip_closers(text, after)
    local space_end = select(2, text:find('^%s+', after))
    if space_end and space_end < #text then
      out[#out + 1] = text:sub(start, keep_newlines and space_end or after - 1)
      start = space_end + 1
      i = start
    else
      i = after
    end
  end
  local last = text:sub(start):gsub('%s+$', '')
  if last:find('%S') then out[#out + 1] = last end
  return out
end

return M
