-- Run by spec/dist_checkpoint_spec.lua, under mpirun or as one process: saves and loads checkpoints of
-- tiny GPTModels in parallel layouts (lua/pmp/checkpoint) and compares what was loaded with
-- the expected part of the reference, cut in the same script.
--
-- The reference is one process's GPTModel and its AdamW state after one step. A rank's part of it for
-- a layout is what the parallel model holds (Megatron's parameter names, layers renumbered per stage,
-- the last stage's copy of tied embeddings): its stage's tensors cut by pmp.dist.sharding.shard. Parts
-- are built here from the reference rather than by the parallel layers, so they do not depend on them.
--
--   save_load A G        np 4: TP=2 PP=2 saves A (AdamW) and loads it back; DP=4 with the distributed
--                        optimizer loads A, saves G and loads G back
--   single A G ONE OLD   one process: loads A and G into a GPTModel; saves ONE (TP=PP=1) and OLD (the
--                        format of earlier single-process saves, written here), and loads OLD back (also
--                        through load_model)
--   reshard A G ONE OLD  np 2: TP=2, then PP=2, load A, G, ONE (and OLD, whose optimizer state, stored
--                        by position, is reported not restored)
--   kill DIR             np 4: saves iteration 1, then rank 3 is killed midway through saving iteration 2
--   fail_save DIR        np 2 (TP=2): saves iteration 1, then rank 1 fails to write iteration 2
--   load_error DIR TP PP [optimizer|wide]  prints ERROR <message> (wide: a GPTModel with another
--                        ffn_hidden_size, TP = PP = 1)
-- Prints:
--   CHECK case rank tensors mismatches     every tensor of the rank's part (and optimizer state) compared
--   MISMATCH case rank what max_abs_diff   a tensor that is not bit-identical to the expected one
--   INFO case rank iteration consumed_samples resharded lr
--   RNG case rank saved|loaded words...    the generator state at save time / right after loading
--   NOT_RESTORED case rank what|what...    what a load reported it could not restore
local checkpoint = require 'pmp.checkpoint'
local sharding = require 'pmp.dist.sharding'

local mode = arg[1]

local CONFIG = { num_layers = 4, hidden_size = 32, num_attention_heads = 4, num_query_groups = 2, ffn_hidden_size = 64,
  vocab_size = 60, padded_vocab_size = 64, add_qkv_bias = true, add_bias_linear = true, dtype = 'f32' }
local LR, CONSUMED = 0.0123, 4242

-- The reference GPTModel and, per parameter name, its AdamW state after one step on a fixed batch.
local function reference()
  pmp.manual_seed(7)
  local model = pmp.nn.GPTModel(CONFIG)
  local opt = pmp.optim.AdamW(model:parameters(), { lr = LR, weight_decay = 0.1 })
  pmp.manual_seed(8)
  model(pmp.randint(0, 60, { 2, 16 }), pmp.randint(0, 60, { 2, 16 })):backward()
  opt:step()
  local state = {}
  for k, pair in ipairs(model:named_parameters()) do
    local s = opt.state[k]
    state[pair[1]] = { step = s.step, exp_avg = s.exp_avg, exp_avg_sq = s.exp_avg_sq }
  end
  local whole = {}
  for _, pair in ipairs(model:named_parameters()) do whole[pair[1]] = pair[2]:detach() end
  return { model = model, tensors = whole, state = state, names = model:named_parameters() }
end

-- The parameters of the part (tp_rank of tp, stage pp_rank of pp): a list of {name (the stage's
-- numbering), global (the reference's name it is cut from)}, and the stage.
local function part_names(ref, pp, pp_rank)
  local stage = sharding.stage_layers(CONFIG.num_layers, pp)[pp_rank + 1]
  local is_first, is_last = pp_rank == 0, pp_rank == pp - 1
  local out = {}
  for _, pair in ipairs(ref.names) do
    local global = pair[1]
    local layer = tonumber(global:match('^decoder%.layers%.(%d+)%.'))
    local keep
    if layer then
      keep = layer >= stage.first and layer < stage.first + stage.count
    elseif global:match('^embedding%.') then
      keep = is_first
    else
      keep = is_last   -- final_layernorm, output_layer
    end
    if keep then out[#out + 1] = { name = sharding.shift_layer(global, -stage.first), global = global } end
  end
  if pp > 1 and is_last and ref.model.config.tie_embeddings then
    out[#out + 1] = { name = 'output_layer.weight', global = 'embedding.word_embeddings.weight' }
  end
  return out, stage
end

local function cut(ref, global, t, tp, tp_rank) return sharding.shard(global, t, ref.model.config, tp, tp_rank) end

-- A stand-in for the parallel model of one rank: what the checkpoint reads of it (config, pipeline,
-- tensor_parallel, state_dict, named_parameters, load_state_dict). filled: the expected values, else
-- zeros of their shapes.
local function part_model(ref, layout, filled)
  local names, stage = part_names(ref, layout.pp, layout.pp_rank)
  local named, sd = {}, {}
  for k, e in ipairs(names) do
    local expected = cut(ref, e.global, ref.tensors[e.global], layout.tp, layout.tp_rank)
    local p = filled and expected:clone() or pmp.zeros(expected.shape)
    named[k] = { e.name, p }
    sd[e.name] = p
  end
  local m = { config = ref.model.config, parts = names }
  if layout.pp > 1 then
    m.pipeline = { stage = layout.pp_rank, stages = layout.pp, layer_offset = stage.first, num_layers = stage.count }
  end
  if layout.tp > 1 then m.tensor_parallel = { group = pmp.dist.group('tp') } end
  function m.state_dict()
    local out = {}
    for name, t in pairs(sd) do out[name] = t end
    return out
  end
  function m.named_parameters() return named end
  function m.load_state_dict(_, values)
    for name, t in pairs(sd) do t:copy_(assert(values[name], name)) end
    for name in pairs(values) do assert(sd[name], name) end
  end
  return m
end

-- AdamW over the part's parameters; filled: with the reference state cut like the parameters.
local function part_adamw(ref, m, layout, filled)
  local params = {}
  for k, pair in ipairs(m.named_parameters()) do params[k] = pair[2] end
  local opt = pmp.optim.AdamW(params, { lr = filled and LR or 1e-3, weight_decay = 0.1 })
  if filled then
    local sd = { lr = LR, betas = { 0.9, 0.999 }, eps = 1e-8, weight_decay = 0.1, state = {} }
    for k, e in ipairs(m.parts) do
      local s = ref.state[e.global]
      sd.state[k] = { step = s.step, exp_avg = cut(ref, e.global, s.exp_avg, layout.tp, layout.tp_rank),
        exp_avg_sq = cut(ref, e.global, s.exp_avg_sq, layout.tp, layout.tp_rank) }
    end
    opt:load_state_dict(sd)
  end
  return opt
end

---------------------------------------------------------------------------------------------------
-- Checks

local function shape_string(t) return '[' .. table.concat(t.shape, ',') .. ']' end

local Check = {}
Check.__index = Check

local function check(case) return setmetatable({ case = case, count = 0, bad = 0 }, Check) end

function Check:same(what, got, want)
  self.count = self.count + 1
  local diff
  if got == nil or shape_string(got) ~= shape_string(want) or got.dtype ~= want.dtype then
    diff = 'shape ' .. (got and shape_string(got) or 'nil') .. ' vs ' .. shape_string(want)
  else
    local d = (got:double() - want:double()):abs():max():item()
    if d ~= 0 then diff = string.format('%.3g', d) end
  end
  if diff then
    self.bad = self.bad + 1
    print(string.format('MISMATCH %s %d %s %s', self.case, pmp.dist.rank(), what, diff))
  end
end

function Check:number(what, got, want)
  self.count = self.count + 1
  if got ~= want then
    self.bad = self.bad + 1
    print(string.format('MISMATCH %s %d %s %s vs %s', self.case, pmp.dist.rank(), what, tostring(got), tostring(want)))
  end
end

function Check:report() print(string.format('CHECK %s %d %d %d', self.case, pmp.dist.rank(), self.count, self.bad)) end

local function info_line(case, info)
  print(string.format('INFO %s %d %d %d %s', case, pmp.dist.rank(), info.iteration, info.state.consumed_samples,
    tostring(info.resharded)))
end

local function rng_line(case, when)
  print(string.format('RNG %s %d %s %s', case, pmp.dist.rank(), when, table.concat(pmp.checkpoint.rng_state(), ' ')))
end

-- The part's parameters and (AdamW) optimizer state against the reference's cut.
local function check_part(case, ref, m, opt, layout)
  local c = check(case)
  local sd = m.state_dict()
  for k, e in ipairs(m.parts) do
    c:same(e.name, sd[e.name], cut(ref, e.global, ref.tensors[e.global], layout.tp, layout.tp_rank))
    if opt then
      local s, want = opt.state[k], ref.state[e.global]
      c:same(e.name .. '.exp_avg', s.exp_avg, cut(ref, e.global, want.exp_avg, layout.tp, layout.tp_rank))
      c:same(e.name .. '.exp_avg_sq', s.exp_avg_sq, cut(ref, e.global, want.exp_avg_sq, layout.tp, layout.tp_rank))
      c:number(e.name .. '.step', s.step, want.step)
    end
  end
  if opt then c:number('lr', opt.lr, LR) end
  c:report()
end

-- A whole GPTModel (TP = PP = 1) and its AdamW or distributed optimizer against the reference.
local function check_whole(case, ref, model, opt)
  local c = check(case)
  local full = opt and (opt.full_state and opt:full_state() or nil)
  for k, pair in ipairs(model:named_parameters()) do
    local name = pair[1]
    c:same(name, pair[2], ref.tensors[name])
    if opt then
      local s = full and full.params[name] or opt.state[k]
      c:same(name .. '.exp_avg', s.exp_avg, ref.state[name].exp_avg)
      c:same(name .. '.exp_avg_sq', s.exp_avg_sq, ref.state[name].exp_avg_sq)
      c:number(name .. '.step', full and full.step or s.step, ref.state[name].step)
    end
  end
  if opt then c:number('lr', opt.lr, LR) end
  c:report()
end

-- A checkpoint in the format single-process saves had before the layout description: the optimizer
-- state by position in the optimizer (optimizer.<k>.<slot>), one RNG state, no layout.
local function save_legacy(dir, iteration, model, opt, state)
  local tensors = {}
  for name, t in pairs(model:state_dict()) do tensors['model.' .. name] = t end
  local sd = opt:state_dict()
  local info = { iteration = iteration, rng = checkpoint.rng_state(), state = state,
    optimizer = { lr = sd.lr, betas = sd.betas, eps = sd.eps, weight_decay = sd.weight_decay, steps = {} } }
  for k, s in ipairs(sd.state) do
    info.optimizer.steps[k] = s.step
    tensors[string.format('optimizer.%d.exp_avg', k)] = s.exp_avg
    tensors[string.format('optimizer.%d.exp_avg_sq', k)] = s.exp_avg_sq
  end
  local rank_dir = string.format('%s/iter_%07d/mp_rank_00', dir, iteration)
  pmp.io.mkdir_p(rank_dir)
  pmp.safetensors.save(rank_dir .. '/model_optim_rng.safetensors', tensors, { format = 'pt' })
  pmp.io.write_atomic(rank_dir .. '/model_optim_rng.json', pmp.json.encode(info))
  pmp.io.write_atomic(dir .. '/latest_checkpointed_iteration.txt', iteration .. '\n')
end

local function fresh_whole()
  pmp.manual_seed(99)
  return pmp.nn.GPTModel(CONFIG)
end

local function distributed(model)
  local ddp = pmp.dist.ddp.DistributedDataParallel(model, { distributed_optimizer = true })
  return pmp.optim.DistributedOptimizer(model:parameters(), { ddp = ddp, lr = 1e-3, weight_decay = 0.1 })
end

-- Loads dir into a zeroed part (with AdamW unless model_only) of the current layout and checks it.
local function load_part(case, ref, dir, model_only)
  local layout = pmp.dist.layout()
  local m = part_model(ref, layout, false)
  local opt = not model_only and part_adamw(ref, m, layout, false) or nil
  local info = checkpoint.load(dir, m, opt)
  info_line(case, info)
  check_part(case, ref, m, opt, layout)
end

---------------------------------------------------------------------------------------------------

local ref = reference()

if mode == 'save_load' then
  local dir_a, dir_g = arg[2], arg[3]
  local layout = pmp.dist.init { tp = 2, pp = 2 }
  local m = part_model(ref, layout, true)
  local opt = part_adamw(ref, m, layout, true)
  pmp.manual_seed(100 + layout.rank)   -- every rank its own stream
  rng_line('A', 'saved')
  checkpoint.save(dir_a, 5, m, opt, { consumed_samples = CONSUMED })
  pmp.manual_seed(1)
  load_part('A', ref, dir_a)
  rng_line('A', 'loaded')

  pmp.dist.init { dp = 4 }
  local model = fresh_whole()
  local dopt = distributed(model)
  info_line('A-dp4', checkpoint.load(dir_a, model, dopt))
  check_whole('A-dp4', ref, model, dopt)
  checkpoint.save(dir_g, 6, model, dopt, { consumed_samples = CONSUMED })
  model = fresh_whole()
  dopt = distributed(model)
  info_line('G-dp4', checkpoint.load(dir_g, model, dopt))
  check_whole('G-dp4', ref, model, dopt)

elseif mode == 'single' then
  local dir_a, dir_g, dir_one, dir_old = arg[2], arg[3], arg[4], arg[5]
  local model, opt
  for _, case in ipairs({ { 'A-single', dir_a }, { 'G-single', dir_g } }) do
    model = fresh_whole()
    opt = pmp.optim.AdamW(model:parameters())
    info_line(case[1], checkpoint.load(case[2], model, opt))
    check_whole(case[1], ref, model, opt)
  end
  checkpoint.save(dir_one, 7, model, opt, { consumed_samples = CONSUMED })
  save_legacy(dir_old, 8, model, opt, { consumed_samples = CONSUMED, model_config = model.config })
  model = fresh_whole()
  opt = pmp.optim.AdamW(model:parameters())
  info_line('OLD-single', checkpoint.load(dir_old, model, opt))
  check_whole('OLD-single', ref, model, opt)
  local rebuilt, info = checkpoint.load_model(dir_old)
  info_line('OLD-load_model', info)
  check_whole('OLD-load_model', ref, rebuilt)

elseif mode == 'reshard' then
  local dirs = { A = arg[2], G = arg[3], ONE = arg[4], OLD = arg[5] }
  for _, shape in ipairs({ { tp = 2, pp = 1 }, { tp = 1, pp = 2 } }) do
    pmp.dist.init(shape)
    local suffix = string.format('-tp%dpp%d', shape.tp, shape.pp)
    for _, name in ipairs({ 'A', 'G', 'ONE' }) do load_part(name .. suffix, ref, dirs[name]) end
    load_part('OLD' .. suffix, ref, dirs.OLD, true)
    local layout = pmp.dist.layout()
    local m = part_model(ref, layout, false)
    local info = checkpoint.load(dirs.OLD, m, part_adamw(ref, m, layout, false))
    print(string.format('NOT_RESTORED OLD%s %d %s', suffix, layout.rank, table.concat(info.not_restored, '|')))
  end

elseif mode == 'kill' then
  local dir = arg[2]
  local layout = pmp.dist.init { tp = 2, pp = 2 }
  local m = part_model(ref, layout, true)
  checkpoint.save(dir, 1, m, nil, { consumed_samples = 1 })
  if layout.rank == 3 then
    -- killed right after writing its shard of iteration 2, while the others wait for it
    local save = require('pmp.safetensors').save
    require('pmp.safetensors').save = function(...)
      local result = save(...)
      os.execute('kill -9 ' .. pmp.io.getpid())
      return result
    end
  end
  checkpoint.save(dir, 2, m, nil, { consumed_samples = 2 })
  print('SAVED 2')   -- never reached: the job dies with rank 3

elseif mode == 'fail_save' then
  local dir = arg[2]
  local layout = pmp.dist.init { tp = 2 }
  local m = part_model(ref, layout, true)
  checkpoint.save(dir, 1, m, nil, { consumed_samples = 1 })
  if layout.rank == 1 then
    require('pmp.safetensors').save = function() error('no space left on device', 0) end
  end
  local ok, err = pcall(checkpoint.save, dir, 2, m, nil, { consumed_samples = 2 })
  print('ERROR ' .. (ok and 'none' or tostring(err)))

elseif mode == 'load_error' then
  local dir, tp, pp, what = arg[2], tonumber(arg[3]), tonumber(arg[4]), arg[5]
  local layout = pmp.dist.init { tp = tp, pp = pp }
  local m
  if what == 'wide' then
    local wide = {}
    for k, v in pairs(CONFIG) do wide[k] = v end
    wide.ffn_hidden_size = 96
    m = pmp.nn.GPTModel(wide)
  else
    m = part_model(ref, layout, false)
  end
  local opt = what == 'optimizer' and part_adamw(ref, m, layout, false) or nil
  local ok, err = pcall(checkpoint.load, dir, m, opt)
  print('ERROR ' .. (ok and 'none' or tostring(err)))

else
  error('checkpoint_worker: unknown mode ' .. tostring(mode))
end
