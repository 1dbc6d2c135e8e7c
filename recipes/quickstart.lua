--- A first look at pmp: a character-level language model with one hidden layer, trained from scratch
--- with autograd and plain SGD on a built-in text. No downloads, a few seconds on a laptop CPU.
---   pmp recipes/quickstart.lua [--steps N] [--lr X] [--hidden H] [--context C] [--seed S] [--batch B]
local F = pmp.nn.functional

local flags = pmp.args.parse(arg, {
  { '--steps', 300, 'SGD steps', integer = true, min = 1 },
  { '--lr', 0.5, 'starting learning rate (decays linearly to a tenth)', above = 0 },
  { '--hidden', 128, 'hidden layer width', integer = true, min = 1 },
  { '--context', 4, 'characters that predict the next one', integer = true, min = 1 },
  { '--seed', 1, 'random seed', integer = true, min = 0 },
  { '--batch', 256, 'windows per step', integer = true, min = 1 },
}, { usage = 'pmp recipes/quickstart.lua [--steps N] [--lr X] [--hidden H] [--context C] [--seed S] [--batch B]' })

local text = [[
Shall I compare thee to a summer's day? Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May, And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines, And often is his gold complexion dimm'd;
And every fair from fair sometime declines, By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade, Nor lose possession of that fair thou ow'st;
Nor shall death brag thou wander'st in his shade, When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see, So long lives this, and this gives life to thee.
]]

-- Vocabulary: the distinct characters, each a 0-based id.
local chars, id_of = {}, {}
for c in text:gmatch('.') do
  if not id_of[c] then
    chars[#chars + 1] = c
    id_of[c] = #chars - 1
  end
end
local ids = {}
for c in text:gmatch('.') do ids[#ids + 1] = id_of[c] end
local vocab, context = #chars, flags.context
if context >= #ids then error(string.format("--context %d leaves no window in the text's %d characters", context, #ids), 0) end

-- Every window of `context` characters predicts the next one.
local windows, targets = {}, {}
for k = 1, #ids - context do
  local w = {}
  for j = 0, context - 1 do w[j + 1] = ids[k + j] end
  windows[#windows + 1] = w
  targets[#targets + 1] = ids[k + context]
end
local all_inputs = pmp.tensor(windows, { dtype = 'i64' })
local all_targets = pmp.tensor(targets, { dtype = 'i64' })

pmp.manual_seed(flags.seed)
local embed_dim = 16
local params = {
  embedding = (pmp.randn(vocab, embed_dim) * 0.5):requires_grad_(),
  w1 = (pmp.randn(flags.hidden, embed_dim * context) * (1 / math.sqrt(embed_dim * context))):requires_grad_(),
  b1 = pmp.zeros(flags.hidden):requires_grad_(),
  w2 = (pmp.randn(vocab, flags.hidden) * (1 / math.sqrt(flags.hidden))):requires_grad_(),
  b2 = pmp.zeros(vocab):requires_grad_(),
}

local function logits_of(inputs)
  local x = F.embedding(inputs, params.embedding):reshape(inputs:size(1), embed_dim * context)
  local h = F.linear(x, params.w1, params.b1):tanh()
  return F.linear(h, params.w2, params.b2)
end

local count = all_inputs:size(1)
print(string.format('quickstart: %d characters, vocabulary %d, %d windows, context %d, pmp %s, %d threads',
  #ids, vocab, count, context, pmp.version, pmp.num_threads()))
local first_loss
for step = 1, flags.steps do
  local rows = pmp.randint(0, count, { flags.batch })
  local loss = F.cross_entropy(logits_of(all_inputs:index_select(1, rows)), all_targets:index_select(1, rows))
  loss:backward()
  local lr = flags.lr * (0.1 + 0.9 * (1 - (step - 1) / flags.steps))
  for name, p in pairs(params) do
    params[name] = (p:detach() - p.grad * lr):requires_grad_()
  end
  first_loss = first_loss or loss:item()
  if step % 50 == 0 or step == 1 then
    print(string.format(' step %4d/%d | lm loss: %.4f | lr: %.3f', step, flags.steps, loss:item(), lr))
  end
end

local final_loss = pmp.no_grad(function() return F.cross_entropy(logits_of(all_inputs), all_targets):item() end)
print(string.format('quickstart: loss over the whole text %.4f (uniform guess would be %.4f)', final_loss, math.log(vocab)))

-- Greedy continuation from the text's first characters.
local out = {}
for k = 1, context do out[k] = ids[k] end
for _ = 1, 80 do
  local window = {}
  for j = #out - context + 1, #out do window[#window + 1] = out[j] end
  local next_id = pmp.no_grad(function()
    return logits_of(pmp.tensor({ window }, { dtype = 'i64' })):argmax():item()
  end)
  out[#out + 1] = next_id
end
local sample = {}
for k, id in ipairs(out) do sample[k] = chars[id + 1] end
print('sample: ' .. table.concat(sample):gsub('\n', ' '))
if final_loss >= math.log(vocab) then error('the model did not learn', 0) end
