-- Namespaces (namespace(...) objects) and the sandbox rule on their attributes: as transformers'
-- TemplateNamespace, an underscore-prefixed name is refused however it is stored (keyword, mapping
-- argument or {% set ns.attr = ... %}), so a template cannot reach interpreter internals through one.
local V = require 'pmp.tokenizer.chat_template.values'
local S = require 'pmp.tokenizer.chat_template.strings'

local sub = string.sub
local NamespaceMT, throw = V.NamespaceMT, V.throw
local str_repr = S.str_repr

local M = {}

local function check_name(name)
  if type(name) == 'string' and sub(name, 1, 1) == '_' then
    throw('Chat templates cannot store underscore-prefixed attributes on a namespace, but got ' .. str_repr(name) ..
      '. Please rename the attribute.')
  end
end

-- A namespace holding vals (name -> value).
function M.new(vals) return setmetatable({ vals = vals }, NamespaceMT) end

-- Sets attribute name of namespace ns.
function M.store(ns, name, value)
  check_name(name)
  ns.vals[name] = value
end

M.check_name = check_name

return M
