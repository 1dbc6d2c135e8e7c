require 'busted.runner'()
-- pmp.json: the encoder's deterministic output, round trips, and the decoder's strictness and errors.
local json = require 'pmp.json'

local fails_with = require('spec.support.expect').fails_with

describe('json.encode', function()
  it('encodes scalars, with integers printed without a fraction', function()
    assert.equal('null', json.encode(json.null))
    assert.equal('true', json.encode(true))
    assert.equal('false', json.encode(false))
    assert.equal('0', json.encode(0))
    assert.equal('-7', json.encode(-7))
    assert.equal('42', json.encode(42.0))
    assert.equal('9007199254740992', json.encode(2 ^ 53))
    assert.equal('-0', json.encode(-0.0))
    assert.equal('1.5', json.encode(1.5))
    assert.equal('0.1', json.encode(0.1))
    assert.equal('1e+300', json.encode(1e300))
    assert.equal('"hi"', json.encode('hi'))
  end)

  it('prints floats that read back to the same double', function()
    local values = { 0.1, 1 / 3, 2 / 3, -1e-300, 5e-324, 1.7976931348623157e308, 2 ^ 53 + 2, 123456789.123456789,
                     3.141592653589793, 1e21, 1e-7, 0.30000000000000004 }
    for _, x in ipairs(values) do
      local s = json.encode(x)
      assert.equal(x, tonumber(s), 'value ' .. s)
      assert.equal(x, json.decode(s))
    end
    math.randomseed(7)
    for _ = 1, 500 do
      local x = (math.random() - 0.5) * 10 ^ math.random(-30, 30)
      assert.equal(x, json.decode(json.encode(x)))
    end
  end)

  it('escapes what JSON requires and passes UTF-8 through', function()
    assert.equal([["a\"b\\c\n\t\r\b\f\u0001\u001f/"]], json.encode('a"b\\c\n\t\r\b\f\1\31/'))
    assert.equal('"h\195\169 \226\130\172 \240\159\152\128"', json.encode('h\195\169 \226\130\172 \240\159\152\128'))
    assert.equal('"a\\u0000b"', json.encode('a\0b'))
  end)

  it('sorts object keys, nests, and tells arrays from objects', function()
    assert.equal('{"a":[1,2,{"x":null}],"b":{"c":true,"d":"e"},"z":1}',
      json.encode({ z = 1, b = { d = 'e', c = true }, a = { 1, 2, { x = json.null } } }))
  end)

  it('encodes an empty table as {} unless it is marked as an array', function()
    assert.equal('{}', json.encode({}))
    assert.equal('[]', json.encode(json.array()))
    assert.equal('[]', json.encode(json.array({})))
    assert.equal('{"list":[],"map":{}}', json.encode({ list = json.array(), map = {} }))
    assert.equal('[1,2]', json.encode(json.array({ 1, 2 })))
    assert.is_true(json.is_array(json.array()))
  end)

  it('takes an explicit key order, globally or per table', function()
    assert.equal('{"dtype":"F32","shape":[2],"data_offsets":[0,8],"a":1}',
      json.encode({ a = 1, shape = { 2 }, dtype = 'F32', data_offsets = { 0, 8 } },
        { key_order = { 'dtype', 'shape', 'data_offsets' } }))
    local t = json.ordered({ b = 1, a = 2, c = 3 }, { 'c', 'b' })
    assert.equal('{"c":3,"b":1,"a":2}', json.encode(t))
    assert.equal('{"x":{"c":3,"b":1,"a":2}}', json.encode({ x = t }))
  end)

  it('pretty-prints with an indent', function()
    assert.equal('{\n  "a": [\n    1,\n    2\n  ],\n  "b": {},\n  "c": []\n}',
      json.encode({ a = { 1, 2 }, b = {}, c = json.array() }, { indent = 2 }))
    assert.equal('[\n\t1\n]', json.encode({ 1 }, { indent = '\t' }))
  end)

  it('encodes 64-bit integer cdata exactly', function()
    assert.equal('[9007199254740993,18446744073709551615]', json.encode({ 9007199254740993LL, 18446744073709551615ULL }))
  end)

  it('refuses what JSON cannot hold', function()
    fails_with(function() json.encode(0 / 0) end, 'json.encode', 'nan')
    fails_with(function() json.encode({ x = math.huge }) end, 'inf', '$.x')
    fails_with(function() json.encode({ -math.huge }) end, '-inf', '$[1]')
    local t = { a = {} }
    t.a.b = t
    fails_with(function() json.encode(t) end, 'cycle', '$.a.b')
    fails_with(function() json.encode({ 1, 2, x = 3 }) end, 'mixes array entries with string keys')
    fails_with(function() json.encode({ [1] = 1, [3] = 3 }) end, 'sparse array')
    fails_with(function() json.encode({ [true] = 1 }) end, 'key of type boolean')
    fails_with(function() json.encode({ [1.5] = 1 }) end, 'key of type number')
    fails_with(function() json.encode({ f = print }) end, 'cannot encode a function', '$.f')
    fails_with(function() json.encode('\255') end, 'invalid UTF-8')
    fails_with(function() json.encode(json.array({ a = 1 })) end, 'marked as an array')
  end)

  it('encodes shared (non-cyclic) tables twice', function()
    local shared = { 1 }
    assert.equal('{"a":[1],"b":[1]}', json.encode({ a = shared, b = shared }))
  end)
end)

describe('json.decode', function()
  it('decodes literals, numbers, strings, arrays and objects', function()
    assert.equal(json.null, json.decode('null'))
    assert.equal(true, json.decode(' true '))
    assert.equal(false, json.decode('\t\r\nfalse'))
    assert.equal(0, json.decode('0'))
    assert.equal(-12.75, json.decode('-12.75'))
    assert.equal(1e10, json.decode('1e10'))
    assert.equal(0.01, json.decode('1E-2'))
    assert.equal(2500, json.decode('2.5e+3'))
    local negzero = json.decode('-0')
    assert.equal(0, negzero)
    assert.equal(-math.huge, 1 / negzero)
    assert.same({ a = { 1, 2, { b = 'c' } }, d = {} }, json.decode('{"a":[1,2,{"b":"c"}],"d":{}}'))
  end)

  it('turns every escape into the right bytes', function()
    assert.equal('"\\/\b\f\n\r\t', json.decode([["\"\\\/\b\f\n\r\t"]]))
    assert.equal('A', json.decode([["\u0041"]]))
    assert.equal('\195\169', json.decode([["\u00e9"]]))                -- é
    assert.equal('\226\130\172', json.decode([["\u20AC"]]))            -- €
    assert.equal('\240\159\152\128', json.decode([["\ud83d\ude00"]]))  -- 😀 (surrogate pair)
    assert.equal('\244\143\191\191', json.decode([["\uDBFF\uDFFF"]]))  -- U+10FFFF
    assert.equal('a\0b', json.decode([["a\u0000b"]]))
    assert.equal('h\195\169', json.decode('"h\195\169"'))              -- raw UTF-8
  end)

  it('marks decoded arrays so that [] survives a round trip', function()
    assert.equal('{"a":[],"b":{}}', json.encode(json.decode('{"a":[],"b":{}}')))
    assert.is_true(json.is_array(json.decode('[]')))
  end)

  it('uses the null option', function()
    local marker = {}
    assert.equal(marker, json.decode('[null]', { null = marker })[1])
  end)

  it('keeps the last duplicate key, or refuses duplicates when asked', function()
    assert.equal(2, json.decode('{"a":1,"a":2}').a)
    fails_with(function() json.decode('{"a":1,"a":2}', { duplicate_keys = 'error' }) end, 'duplicate key "a"', 'at byte 7')
  end)

  it('remembers key order when asked, and the encoder uses it', function()
    local text = '{"z":1,"a":{"y":2,"b":3},"m":[]}'
    local v = json.decode(text, { ordered = true })
    assert.same({ 'z', 'a', 'm' }, json.keys(v))
    assert.equal(text, json.encode(v))
  end)

  it('round-trips a structure through encode and decode', function()
    local value = {
      name = 'pmp', version = 1, ratio = 0.125, tags = { 'a', 'b', '\226\130\172' }, nested = { { x = 1 }, { y = false } },
      empty_list = json.array(), empty_map = {}, none = json.null, text = 'line\nnext\t"quoted"',
    }
    local once = json.encode(value)
    assert.equal(once, json.encode(json.decode(once)))
    assert.same(json.decode(once), json.decode(json.encode(json.decode(once), { indent = 4 })))
  end)

  it('names the byte offset of every syntax error', function()
    fails_with(function() json.decode('{"a":1,}') end, 'expected a string key', 'at byte 7')
    fails_with(function() json.decode('[1 2]') end, "expected ',' or ']'", 'at byte 3')
    fails_with(function() json.decode('{"a" 1}') end, "expected ':'", 'at byte 5')
    fails_with(function() json.decode('"abc') end, 'unterminated string', 'at byte 0')
    fails_with(function() json.decode('01') end, 'leading zero', 'at byte 0')
    fails_with(function() json.decode('1.') end, 'digits must follow', 'at byte 1')
    fails_with(function() json.decode('1e') end, 'bad exponent', 'at byte 1')
    fails_with(function() json.decode('-') end, 'invalid number', 'at byte 0')
    fails_with(function() json.decode('.5') end, 'unexpected character', 'at byte 0')
    fails_with(function() json.decode('tru') end, 'unexpected character', 'at byte 0')
    fails_with(function() json.decode('[nul]') end, 'unexpected character', 'at byte 1')
    fails_with(function() json.decode('"a\1"') end, 'control character 0x01', 'at byte 2')
    fails_with(function() json.decode('"a\nb"') end, 'control character 0x0a')
    fails_with(function() json.decode([["\q"]]) end, 'invalid escape \\q', 'at byte 1')
    fails_with(function() json.decode([["\u12"]]) end, 'expected 4 hex digits')
    fails_with(function() json.decode([["\ud800"]]) end, 'lone high surrogate')
    fails_with(function() json.decode([["\ud800\u0041"]]) end, 'not followed by a low one')
    fails_with(function() json.decode([["\udc00"]]) end, 'lone low surrogate')
    fails_with(function() json.decode('"\255"') end, 'invalid UTF-8', 'at byte 1')
    fails_with(function() json.decode('"\192\128"') end, 'invalid UTF-8')         -- overlong
    fails_with(function() json.decode('"\237\160\128"') end, 'invalid UTF-8')     -- encoded surrogate
    fails_with(function() json.decode('1 2') end, 'trailing characters', 'at byte 2')
    fails_with(function() json.decode('') end, 'unexpected end', 'at byte 0')
    fails_with(function() json.decode('   ') end, 'unexpected end')
    fails_with(function() json.decode('[1,') end, 'unexpected end')
    fails_with(function() json.decode('{"a":1') end, 'unexpected end inside an object')
    fails_with(function() json.decode(string.rep('[', 5000)) end, 'nesting deeper than 1000')
    fails_with(function() json.decode(nil) end, 'expects a string')
  end)

  it('reads files and names them in errors', function()
    local path = os.tmpname()
    local f = assert(io.open(path, 'wb'))
    f:write('{"ok": [1, 2]}')
    f:close()
    assert.same({ ok = { 1, 2 } }, json.read(path))
    f = assert(io.open(path, 'wb'))
    f:write('{"ok": [1, 2}')
    f:close()
    fails_with(function() json.read(path) end, path, 'at byte 12')
    os.remove(path)
    fails_with(function() json.read(path) end, 'cannot open', path)
  end)

  it('is reachable as pmp.json', function()
    assert.equal(json, pmp.json)
  end)
end)
