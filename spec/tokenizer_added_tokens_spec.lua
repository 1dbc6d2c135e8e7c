require 'busted.runner'()
-- Added tokens are cut out of the text leftmost-longest, before the model sees it: a tiny tokenizer
-- whose added tokens are prefixes of one another, against the ids the `tokenizers` package gives
-- (tools/make_added_token_cases.py -> spec/fixtures/tokenizer_added_tokens.json).
local root = package.loaded['pmp.root']
local fixture = pmp.json.decode(pmp.io.read_file(root .. '/spec/fixtures/tokenizer_added_tokens.json'))

describe('pmp.tokenizer added tokens', function()
  local tok = require('pmp.tokenizer').from_json(fixture.tokenizer)
  for _, case in ipairs(fixture.cases) do
    it('matches the longest added token at the leftmost position: ' .. case.text, function()
      assert.are.same(case.ids, tok:encode(case.text))
    end)
  end
end)
