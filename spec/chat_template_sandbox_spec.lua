require 'busted.runner'()
-- The chat-template sandbox: what transformers' template environment (jinja2's
-- ImmutableSandboxedEnvironment plus its TemplateNamespace, transformers 5.25
-- utils/chat_template_utils.py) refuses, pmp refuses too, naming the offending attribute; what it
-- renders harmlessly, pmp renders the same way.
local ct = require 'pmp.chat_template'
local fails_with = require('spec.support.expect').fails_with

local function render(source) return ct.render(source, { x = { 1, 2 }, d = pmp.json.decode('{"a": 1}') }) end

describe('chat_template sandbox', function()
  it('refuses underscore-prefixed namespace attributes given as keywords', function()
    fails_with(function() render('{% set ns = namespace(_x=1) %}{{ ns._x }}') end,
      'Chat templates cannot store underscore-prefixed attributes on a namespace', "'_x'")
  end)

  -- transformers' TemplateNamespace checks every way a name is stored, not only keywords
  it('refuses underscore-prefixed namespace attributes set later or given as a mapping', function()
    fails_with(function() render('{% set ns = namespace(a=1) %}{% set ns._x = 2 %}{{ ns.a }}') end,
      'Chat templates cannot store underscore-prefixed attributes on a namespace', "'_x'")
    fails_with(function() render('{% set ns = namespace({"_y": 1}) %}{{ ns.a }}') end,
      'Chat templates cannot store underscore-prefixed attributes on a namespace', "'_y'")
    assert.are.equal('2', render('{% set ns = namespace({"a": 1}) %}{% set ns.a = 2 %}{{ ns.a }}'))
  end)

  it('refuses the list and dict methods that would mutate the context', function()
    fails_with(function() render('{{ x.append(3) }}') end, 'append')
    fails_with(function() render('{{ x.pop() }}') end, 'pop')
    fails_with(function() render('{{ d.update({"b": 2}) }}') end, 'update')
    fails_with(function() render('{{ d.clear() }}') end, 'clear')
  end)

  it('renders dunder attributes as undefined, as jinja2 does', function()
    assert.are.equal('', render('{{ x.__class__ }}'))
    assert.are.equal('', render('{{ d.__class__ }}'))
  end)
end)
