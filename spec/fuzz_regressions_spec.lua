require 'busted.runner'()
-- Inputs that `make fuzz` (tools/fuzz.sh) once found failing, run through the same targets
-- (tools/fuzz/targets.lua): each must now be accepted or refused with a message written for the user,
-- never reach an unchecked path (a Lua VM error). Under `make sanitize` the engine's part is also
-- checked for memory errors and undefined behaviour (the empty Split-regex piece was a NULL + 0).
local targets = require 'tools.fuzz.targets'
local root = package.loaded['pmp.root']

local function input(name)
  local file = assert(io.open(root .. '/spec/fixtures/fuzz/' .. name, 'rb'))
  local data = file:read('*a')
  file:close()
  return data
end

describe('fuzz findings', function()
  teardown(function() pmp.io.remove_tree(targets.scratch) end)

  it('tell the VM\'s own errors from messages that quote user text', function()
    local _, vm_error = pcall(function() local t; return t.field end)
    assert.is_true(targets.is_internal_error(vm_error))
    assert.is_false(targets.is_internal_error("safetensors: x.safetensors: tensor 'bad argument #1': shape [1]"))
    assert.is_false(targets.is_internal_error('pmp.tokenizer: tokenizer.json: model: missing or not an object'))
  end)

  for _, case in ipairs({
    { 'chat_template', 'chat_template-truncated-utf8' },
    { 'chat_template', 'chat_template-truncated-utf8-in-loop' },
    { 'split_regex', 'split_regex-empty' },
    { 'safetensors', 'safetensors-message-quoting-user-text' },
  }) do
    it(case[2] .. ' gives no VM error', function()
      local ok, message = pcall(targets[case[1]], input(case[2]))
      assert.is_true(ok or not targets.is_internal_error(message), tostring(message))
    end)
  end

  it('a template ending inside a UTF-8 sequence still renders its text', function()
    local template = pmp.chat_template.compile('{{ "ab" }}\xe6\x97')
    assert.are.equal('ab\xe6\x97', template:render({}))
  end)
end)
