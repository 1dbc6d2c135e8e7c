-- The evaluator: runs a parsed template. eval(node, frame, ctx) gives an expression's value;
-- exec_body(body, frame, ctx) runs statements, appending output to ctx.out. A frame holds the
-- variables of one scope ({vars =, parent =}); ctx holds the template variables, the output buffer,
-- the {% generation %} spans and the line being run (for error messages).
local json = require 'pmp.json'
local V = require 'pmp.tokenizer.chat_template.values'
local S = require 'pmp.tokenizer.chat_template.strings'
local O = require 'pmp.tokenizer.chat_template.operators'
local methods = require 'pmp.tokenizer.chat_template.methods'
local access = require 'pmp.tokenizer.chat_template.access'
local FILTERS = require 'pmp.tokenizer.chat_template.filters'
local TESTS = require 'pmp.tokenizer.chat_template.tests'
local GLOBALS = require 'pmp.tokenizer.chat_template.globals'
local namespace = require 'pmp.tokenizer.chat_template.namespace'

local format, concat = string.format, table.concat
local NONE, CallableMT, LoopMT = V.NONE, V.CallableMT, V.LoopMT
local throw, undefined_error, undef, mkfloat, new_list, new_tuple, new_dict, kind, is_undef, isfloat, tonum, py_type =
  V.throw, V.undefined_error, V.undef, V.mkfloat, V.new_list, V.new_tuple, V.new_dict, V.kind, V.is_undef,
  V.isfloat, V.tonum, V.py_type
local py_str = S.py_str
local truthy, compare, contains, iterate, binop, do_slice =
  O.truthy, O.compare, O.contains, O.iterate, O.binop, O.do_slice
local opt = methods.opt
local get_attr, get_item, call_value = access.get_attr, access.get_item, access.call_value

local function lookup(frame, name, ctx)
  local f = frame
  while f do
    local v = f.vars[name]
    if v ~= nil then return v end
    f = f.parent
  end
  local v = ctx.vars[name]
  if v ~= nil then return v end
  v = GLOBALS[name]
  if v ~= nil then return v end
  return undef("'" .. name .. "' is undefined")
end

local eval

local function eval_args(node, frame, ctx)
  local args = {}
  for i, a in ipairs(node.args) do args[i] = eval(a, frame, ctx) end
  local kwargs
  if node.kwargs then
    kwargs = json.ordered({}, node.korder or {})
    for k, a in pairs(node.kwargs) do kwargs[k] = eval(a, frame, ctx) end
  end
  return args, kwargs
end

local EVAL = {}

eval = function(node, frame, ctx)
  ctx.line = node.line or ctx.line
  return EVAL[node.t](node, frame, ctx)
end

EVAL.const = function(node) return node.v end
EVAL.name = function(node, frame, ctx) return lookup(frame, node.n, ctx) end
EVAL.blockval = function(_, _, ctx) return ctx.blockval end
EVAL.list = function(node, frame, ctx)
  local out = new_list()
  for i, e in ipairs(node.items) do out[i] = eval(e, frame, ctx) end
  return out
end
EVAL.tuple = function(node, frame, ctx)
  local out = new_tuple()
  for i, e in ipairs(node.items) do out[i] = eval(e, frame, ctx) end
  return out
end
EVAL.dict = function(node, frame, ctx)
  local d, order = new_dict()
  for _, kv in ipairs(node.pairs) do
    local k = eval(kv[1], frame, ctx)
    if type(k) == 'table' then throw("unhashable type: '" .. py_type(k) .. "'") end
    if d[k] == nil then order[#order + 1] = k end
    d[k] = eval(kv[2], frame, ctx)
  end
  return d
end
EVAL.getattr = function(node, frame, ctx) return get_attr(eval(node.o, frame, ctx), node.name) end
EVAL.getitem = function(node, frame, ctx)
  local o = eval(node.o, frame, ctx)
  return get_item(o, eval(node.key, frame, ctx))
end
EVAL.slice = function(node, frame, ctx)
  local o = eval(node.o, frame, ctx)
  local a = node.a and opt(eval(node.a, frame, ctx))
  local b = node.b and opt(eval(node.b, frame, ctx))
  local c = node.c and opt(eval(node.c, frame, ctx))
  return do_slice(o, a, b, c)
end
EVAL.call = function(node, frame, ctx)
  local f = eval(node.f, frame, ctx)
  local args, kwargs = eval_args(node, frame, ctx)
  local line = node.line
  local r = call_value(f, args, kwargs)
  ctx.line = line
  if r == nil then return NONE end
  return r
end
EVAL.filter = function(node, frame, ctx)
  local v = eval(node.o, frame, ctx)
  local args, kwargs = eval_args(node, frame, ctx)
  ctx.line = node.line
  return FILTERS[node.name](v, args, kwargs, ctx)
end
EVAL.test = function(node, frame, ctx)
  local v = eval(node.o, frame, ctx)
  local args, kwargs = eval_args(node, frame, ctx)
  ctx.line = node.line
  local r = truthy(TESTS[node.name](v, args, kwargs, ctx))
  if node.neg then return not r end
  return r
end
EVAL['not'] = function(node, frame, ctx) return not truthy(eval(node.e, frame, ctx)) end
EVAL['and'] = function(node, frame, ctx)
  local l = eval(node.l, frame, ctx)
  if not truthy(l) then return l end
  return eval(node.r, frame, ctx)
end
EVAL['or'] = function(node, frame, ctx)
  local l = eval(node.l, frame, ctx)
  if truthy(l) then return l end
  return eval(node.r, frame, ctx)
end
EVAL.neg = function(node, frame, ctx)
  local v = eval(node.e, frame, ctx)
  local x = tonum(v)
  if not x then
    if is_undef(v) then undefined_error(v) end
    throw("bad operand type for unary -: '" .. py_type(v) .. "'")
  end
  if isfloat(v) then return mkfloat(-x) end
  return -x
end
EVAL.bin = function(node, frame, ctx)
  local a = eval(node.l, frame, ctx)
  local b = eval(node.r, frame, ctx)
  ctx.line = node.line
  return binop(node.op, a, b)
end
EVAL.concat = function(node, frame, ctx)
  local parts = {}
  for i, e in ipairs(node.items) do parts[i] = py_str(eval(e, frame, ctx)) end
  return concat(parts)
end
EVAL.cmp = function(node, frame, ctx)
  local a = eval(node.first, frame, ctx)
  for _, o in ipairs(node.ops) do
    local b = eval(o.e, frame, ctx)
    local r
    if o.op == 'in' then r = contains(b, a)
    elseif o.op == 'notin' then r = not contains(b, a)
    else r = compare(o.op, a, b) end
    if not r then return false end
    a = b
  end
  return true
end
EVAL.cond = function(node, frame, ctx)
  if truthy(eval(node.test, frame, ctx)) then return eval(node.yes, frame, ctx) end
  if node.no then return eval(node.no, frame, ctx) end
  return undef('the inline if-expression on line ' .. tostring(node.line) .. ' evaluated to false and no else section was defined.')
end

local exec_body

local function emit(ctx, s)
  if s == '' then return end
  local n = ctx.n + 1
  ctx.n = n
  ctx.out[n] = s
  ctx.len = ctx.len + #s
end

-- Renders body into a string (own output buffer).
local function capture(body, frame, ctx)
  local out, n, len = ctx.out, ctx.n, ctx.len
  ctx.out, ctx.n, ctx.len = {}, 0, 0
  local ok, err = pcall(exec_body, body, frame, ctx)
  local s = concat(ctx.out, '', 1, ctx.n)
  ctx.out, ctx.n, ctx.len = out, n, len
  if not ok then error(err, 0) end
  return s
end

local function assign(target, value, frame)
  if target.t == 'name' then
    frame.vars[target.n] = value
  else
    local items = iterate(value)
    if #items ~= #target.names then
      throw(format('not enough values to unpack (expected %d, got %d)', #target.names, #items))
    end
    for i, n in ipairs(target.names) do frame.vars[n] = items[i] end
  end
end

-- {% set %}'s targets: those of assign, or a namespace's attribute (ns.attr).
local function set_target(target, value, frame, ctx)
  if target.t == 'nsattr' then
    local ns = lookup(frame, target.ns, ctx)
    if kind(ns) ~= 'namespace' then throw('cannot assign attribute on non-namespace object') end
    namespace.store(ns, target.attr, value)
  else
    assign(target, value, frame)
  end
end

local EXEC = {}

EXEC.data = function(node, _, ctx) emit(ctx, node.v) end
EXEC.output = function(node, frame, ctx) emit(ctx, py_str(eval(node.e, frame, ctx))) end
EXEC['if'] = function(node, frame, ctx)
  for _, cb in ipairs(node.conds) do
    if truthy(eval(cb[1], frame, ctx)) then return exec_body(cb[2], frame, ctx) end
  end
  if node.else_body then return exec_body(node.else_body, frame, ctx) end
end
EXEC['for'] = function(node, frame, ctx)
  local items = iterate(eval(node.iter, frame, ctx))
  if node.cond then
    local kept = {}
    for _, item in ipairs(items) do
      local f = { vars = {}, parent = frame }
      assign(node.target, item, f)
      if truthy(eval(node.cond, f, ctx)) then kept[#kept + 1] = item end
    end
    items = kept
  end
  local n = #items
  if n == 0 then
    if node.else_body then return exec_body(node.else_body, frame, ctx) end
    return
  end
  local loop = setmetatable({ i = 0, n = n, items = items }, LoopMT)
  for i = 1, n do
    loop.i = i
    local f = { vars = { loop = loop }, parent = frame }
    assign(node.target, items[i], f)
    local sig = exec_body(node.body, f, ctx)
    if sig == 'break' then break end
  end
end
EXEC.set = function(node, frame, ctx)
  local v = eval(node.e, frame, ctx)
  set_target(node.target, v, frame, ctx)
end
EXEC.setblock = function(node, frame, ctx)
  local s = capture(node.body, frame, ctx)
  ctx.blockval = s
  local v = eval(node.filter, frame, ctx)
  set_target(node.target, v, frame, ctx)
end
EXEC.filterblock = function(node, frame, ctx)
  ctx.blockval = capture(node.body, frame, ctx)
  emit(ctx, py_str(eval(node.filter, frame, ctx)))
end
EXEC.generation = function(node, frame, ctx)
  local s = capture(node.body, frame, ctx)
  local start = ctx.len
  emit(ctx, s)
  ctx.spans[#ctx.spans + 1] = { start + 1, start + #s }
end
EXEC['break'] = function() return 'break' end
EXEC['continue'] = function() return 'continue' end
EXEC.macro = function(node, frame, ctx)
  local def_frame = frame
  local m = setmetatable({ name = node.name }, CallableMT)
  m.fn = function(args, kwargs)
    if #args > #node.params then
      throw(format("macro '%s' takes not more than %d argument(s)", node.name, #node.params))
    end
    local f = { vars = {}, parent = def_frame }
    for i, pdef in ipairs(node.params) do
      local v = args[i]
      if v == nil and kwargs then v = kwargs[pdef[1]] end
      if v == nil then
        if pdef[2] then v = eval(pdef[2], f, ctx) else v = undef("parameter '" .. pdef[1] .. "' was not provided") end
      end
      f.vars[pdef[1]] = v
    end
    if kwargs then
      for k in pairs(kwargs) do
        local ok = false
        for _, pdef in ipairs(node.params) do if pdef[1] == k then ok = true end end
        if not ok then throw(format("macro '%s' takes no keyword argument '%s'", node.name, k)) end
      end
    end
    local line = ctx.line
    local s = capture(node.body, f, ctx)
    ctx.line = line
    return s
  end
  frame.vars[node.name] = m
end

exec_body = function(body, frame, ctx)
  for i = 1, #body do
    local node = body[i]
    if node.line then ctx.line = node.line end
    local sig = EXEC[node.t](node, frame, ctx)
    if sig then return sig end
  end
end

return { exec_body = exec_body }
