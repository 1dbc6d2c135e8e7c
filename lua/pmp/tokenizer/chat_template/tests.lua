-- The tests (`x is name(args)`): t(value, args, kwargs, ctx), a truth value.
local V = require 'pmp.tokenizer.chat_template.values'
local S = require 'pmp.tokenizer.chat_template.strings'
local O = require 'pmp.tokenizer.chat_template.operators'

local NONE, FloatMT, throw, kind, is_undef, isfloat, tonum = V.NONE, V.FloatMT, V.throw, V.kind, V.is_undef,
  V.isfloat, V.tonum
local ascii_upper, ascii_lower, py_str = S.ascii_upper, S.ascii_lower, S.py_str
local py_eq, py_lt, compare, contains = O.py_eq, O.py_lt, O.compare, O.contains

local TESTS = {}


TESTS.defined = function(v) return not is_undef(v) end
TESTS.undefined = function(v) return is_undef(v) end
TESTS.none = function(v) return v == NONE end
TESTS.boolean = function(v) return type(v) == 'boolean' end
TESTS['true'] = function(v) return v == true end
TESTS['false'] = function(v) return v == false end
TESTS.integer = function(v) return type(v) == 'number' and not isfloat(v) end
TESTS.float = function(v) return isfloat(v) end
TESTS.number = function(v) return tonum(v) ~= nil end
TESTS.string = function(v) return type(v) == 'string' end
TESTS.mapping = function(v) return kind(v) == 'dict' end
TESTS.sequence = function(v) local k = kind(v) return k == 'string' or k == 'list' or k == 'dict' end
TESTS.iterable = function(v) local k = kind(v) return k == 'string' or k == 'list' or k == 'dict' or k == 'undefined' end
TESTS.callable = function(v) return kind(v) == 'callable' end
TESTS.sameas = function(v, args)
  local o = args[1]
  if type(v) == 'table' and getmetatable(v) == FloatMT then return false end
  return v == o
end
TESTS.eq = function(v, args) return py_eq(v, args[1]) end
TESTS.equalto = TESTS.eq
TESTS['=='] = TESTS.eq
TESTS.ne = function(v, args) return not py_eq(v, args[1]) end
TESTS['!='] = TESTS.ne
TESTS.lt = function(v, args) return py_lt(v, args[1]) end
TESTS.lessthan = TESTS.lt
TESTS.le = function(v, args) return compare('<=', v, args[1]) end
TESTS.gt = function(v, args) return py_lt(args[1], v) end
TESTS.greaterthan = TESTS.gt
TESTS.ge = function(v, args) return compare('>=', v, args[1]) end
TESTS['in'] = function(v, args) return contains(args[1], v) end
TESTS.odd = function(v) return (tonum(v) or throw('odd: a number is required')) % 2 == 1 end
TESTS.even = function(v) return (tonum(v) or throw('even: a number is required')) % 2 == 0 end
TESTS.divisibleby = function(v, args) return tonum(v) % tonum(args[1]) == 0 end
TESTS.lower = function(v) local s = py_str(v) return ascii_lower(s) == s end
TESTS.upper = function(v) local s = py_str(v) return ascii_upper(s) == s end

return TESTS
