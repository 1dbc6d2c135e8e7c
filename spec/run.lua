-- The test runner: `./pmp spec/run.lua [files or dirs...] [busted options]`.
-- Runs busted in this process (so specs see the engine and the preloaded `pmp`) with the summary
-- output handler. Without arguments it runs every spec/**/*_spec.lua. Exits 0 only if nothing failed.
local root = assert(package.loaded['pmp.root'], 'spec/run.lua runs under pmp, which sets pmp.root')

local busted_args = { '--output=' .. root .. '/spec/support/summary.lua' }
for _, given in ipairs(arg) do busted_args[#busted_args + 1] = given end
if #arg == 0 then busted_args[#busted_args + 1] = root .. '/spec' end
for i = 1, #arg do arg[i] = nil end
for i, value in ipairs(busted_args) do arg[i] = value end

-- Not standalone: busted loads the files named in `arg`. When something failed it signals that with
-- error() and no value, which is how it asks its interpreter for a failing exit status.
local ran, err = pcall(require('busted.runner'), { standalone = false })
if not ran then
  if err ~= nil then error(err, 0) end
  os.exit(1)
end
