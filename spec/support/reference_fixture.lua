-- The references that tools/make_*_fixtures.py scripts write beside a tiny checkpoint: reference.json
-- (input_ids and whatever else the script records) and reference.safetensors (the logits).
local M = {}

-- The parsed reference.json of dir with .logits (the stored tensor) and .ids (input_ids as i64).
function M.read(dir)
  local ref = pmp.json.read(dir .. '/reference.json')
  ref.logits = pmp.safetensors.load(dir .. '/reference.safetensors', { copy = true }).logits
  ref.ids = pmp.tensor(ref.input_ids, { dtype = 'i64' })
  return ref
end

return M
