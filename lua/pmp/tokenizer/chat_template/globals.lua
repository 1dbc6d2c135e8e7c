-- The global functions templates can call: range, namespace, dict, and transformers' raise_exception
-- and strftime_now.
local V = require 'pmp.tokenizer.chat_template.values'
local S = require 'pmp.tokenizer.chat_template.strings'
local O = require 'pmp.tokenizer.chat_template.operators'
local methods = require 'pmp.tokenizer.chat_template.methods'
local namespace = require 'pmp.tokenizer.chat_template.namespace'

local CallableMT, throw, new_list, new_dict, kind, isfloat, tonum, py_type, dict_keys =
  V.CallableMT, V.throw, V.new_list, V.new_dict, V.kind, V.isfloat, V.tonum, V.py_type, V.dict_keys
local py_str = S.py_str
local iterate = O.iterate
local need_str = methods.need_str

local GLOBALS = {}

local function fn(name, f) return setmetatable({ name = name, fn = f }, CallableMT) end

GLOBALS.range = fn('range', function(args)
  local a, b, s = 0, nil, 1
  for i = 1, #args do
    if not tonum(args[i]) or isfloat(args[i]) then throw("'" .. py_type(args[i]) .. "' object cannot be interpreted as an integer") end
  end
  if #args == 1 then b = tonum(args[1])
  elseif #args >= 2 then a, b, s = tonum(args[1]), tonum(args[2]), args[3] and tonum(args[3]) or 1
  else throw('range expected at least 1 argument, got 0') end
  if s == 0 then throw('range() arg 3 must not be zero') end
  local out = new_list()
  local i = a
  if s > 0 then while i < b do out[#out + 1] = i; i = i + s end
  else while i > b do out[#out + 1] = i; i = i + s end end
  return out
end)

GLOBALS.namespace = fn('namespace', function(args, kwargs)
  local vals, order = new_dict()
  local function add(k, v)
    namespace.check_name(k)
    if vals[k] == nil then order[#order + 1] = k end
    vals[k] = v
  end
  for _, a in ipairs(args) do
    if kind(a) ~= 'dict' then throw('namespace() positional argument must be a mapping') end
    for _, k in ipairs(dict_keys(a)) do add(k, a[k]) end
  end
  if kwargs then
    for _, k in ipairs(dict_keys(kwargs)) do add(k, kwargs[k]) end
  end
  return namespace.new(vals)
end)

GLOBALS.dict = fn('dict', function(args, kwargs)
  local d, order = new_dict()
  for _, a in ipairs(args) do
    if kind(a) == 'dict' then
      for _, k in ipairs(dict_keys(a)) do if d[k] == nil then order[#order + 1] = k end d[k] = a[k] end
    else
      for _, pair in ipairs(iterate(a)) do
        if d[pair[1]] == nil then order[#order + 1] = pair[1] end
        d[pair[1]] = pair[2]
      end
    end
  end
  if kwargs then
    for _, k in ipairs(dict_keys(kwargs)) do if d[k] == nil then order[#order + 1] = k end d[k] = kwargs[k] end
  end
  return d
end)

GLOBALS.raise_exception = fn('raise_exception', function(args)
  throw(py_str(args[1] == nil and '' or args[1]), true)
end)

GLOBALS.strftime_now = fn('strftime_now', function(args)
  return os.date(need_str(args[1], 'strftime_now() argument'))
end)

return GLOBALS
