--- Command-line flags for recipes, Megatron-style: `--num-layers 4 --bf16 --data-path a b`.
---   local opts = pmp.args.parse(arg, {
---     { '--num-layers', 4, 'transformer layers' },
---     { '--bf16', false, 'train in bf16' },          -- a boolean default makes a switch
---     { '--data-path', nil, 'text file or prefixes', multiple = true },
---   }, { usage = 'pmp recipes/pretrain.lua [flags]' })
---   opts.num_layers, opts.bf16, opts.data_path
--- Types follow the defaults; --help prints every flag with its default and exits. A spec may bound
--- its value: integer = true, min / max (inclusive), above / below (exclusive), choices = {...}; a value
--- outside is an error naming the flag, as is a switch given a value other than true/false/1/0. A second result
--- holds the keys the command line gave (given.num_layers == true), for defaults a recipe treats apart.
local M = {}

--- The fields of a spec that bound its value.
M.bounds = { 'integer', 'min', 'max', 'above', 'below', 'choices' }

local function key_of(flag) return flag:gsub('^%-%-', ''):gsub('%-', '_') end

function M.help(specs, options)
  local lines = { 'usage: ' .. (options.usage or 'pmp script.lua [flags]') }
  if options.description then lines[#lines + 1] = options.description end
  lines[#lines + 1] = ''
  local width = 0
  for _, s in ipairs(specs) do width = math.max(width, #s[1]) end
  for _, s in ipairs(specs) do
    local default = s[2]
    local shown = default == nil and '' or (type(default) == 'boolean' and (default and '(on)' or '(switch)') or '(default ' .. tostring(default) .. ')')
    lines[#lines + 1] = string.format('  %-' .. width .. 's  %s %s', s[1], s[3] or '', shown)
  end
  return table.concat(lines, '\n')
end

local function bound_error(flag, value, what) error(string.format('%s must be %s, got %s', flag, what, tostring(value)), 0) end

-- The bounds a spec sets on a given value (see the header).
local function check_bounds(spec, value)
  local flag = spec[1]
  if type(value) == 'number' then
    if value ~= value then bound_error(flag, value, 'a number') end
    if spec.integer and value ~= math.floor(value) then bound_error(flag, value, 'a whole number') end
    if spec.min and value < spec.min then bound_error(flag, value, '>= ' .. spec.min) end
    if spec.max and value > spec.max then bound_error(flag, value, '<= ' .. spec.max) end
    if spec.above and value <= spec.above then bound_error(flag, value, '> ' .. spec.above) end
    if spec.below and value >= spec.below then bound_error(flag, value, '< ' .. spec.below) end
  end
  if spec.choices and value ~= nil then
    for _, choice in ipairs(spec.choices) do
      if value == choice then return end
    end
    bound_error(flag, "'" .. tostring(value) .. "'", 'one of ' .. table.concat(spec.choices, ', '))
  end
end

-- Returns the parsed table; raises an error naming the flag on a bad or unknown argument.
function M.parse(argv, specs, options)
  options = options or {}
  local by_flag, out, given = {}, {}, {}
  for _, s in ipairs(specs) do
    by_flag[s[1]] = s
    out[key_of(s[1])] = s[2]
  end
  local k = 1
  while k <= #argv do
    local word = argv[k]
    if word == '--help' or word == '-h' then
      print(M.help(specs, options))
      os.exit(0)
    end
    local flag, inline = word:match('^(%-%-[%w%-_]+)=(.*)$')
    flag = flag or word
    local spec = by_flag[flag]
    if not spec then error(string.format("unknown argument '%s' (see --help)", word), 0) end
    local key, default = key_of(flag), spec[2]
    given[key] = true
    if type(default) == 'boolean' and not inline then
      out[key] = true
      k = k + 1
    elseif spec.multiple then
      local values = {}
      if inline then values[1] = inline end
      k = k + 1
      while not inline and k <= #argv and not argv[k]:match('^%-%-') do
        values[#values + 1] = argv[k]
        k = k + 1
      end
      if #values == 0 then error(string.format('%s needs at least one value', flag), 0) end
      out[key] = values
    else
      local value = inline or argv[k + 1]
      if value == nil then error(string.format('%s needs a value', flag), 0) end
      if type(default) == 'number' then
        local n = tonumber(value)
        if not n then error(string.format("%s expects a number, got '%s'", flag, value), 0) end
        value = n
      elseif type(default) == 'boolean' then
        if value ~= 'true' and value ~= 'false' and value ~= '1' and value ~= '0' then
          error(string.format("%s is a switch: give it alone, or =true / =false, not '%s'", flag, value), 0)
        end
        value = value == 'true' or value == '1'
      end
      check_bounds(spec, value)
      out[key] = value
      k = k + (inline and 1 or 2)
    end
  end
  return out, given
end

return M
