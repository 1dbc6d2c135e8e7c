--- The fuzz targets of tools/fuzz/fuzz_lua.c: each takes the fuzzer's bytes as a Lua string and feeds
--- them to one parser of outside bytes the way a user's file would reach it. A target may fail with a
--- Lua error (that is the parser refusing bad input); it must not crash or hit an unchecked path.
local targets = {}

local pio = require 'pmp.io'
-- the files targets hand to parsers live in memory where there is a /dev/shm
local scratch = string.format('%s/pmp-fuzz.%d', pio.is_dir('/dev/shm') and '/dev/shm' or '/tmp', pio.getpid())
pio.mkdir_p(scratch)
targets.scratch = scratch

-- Messages of the Lua VM itself, never of pmp's checks; they follow the "chunk:line: " position the VM
-- puts first (user data quoted later in one of pmp's messages must not count).
local VM_ERRORS = { 'attempt to ', 'bad argument #', 'table index is nil', 'table index is NaN', 'stack overflow',
  "invalid key to 'next'", 'invalid value (at index', 'string length overflow',
  'number has no integer representation', 'wrong number of arguments', 'invalid option', 'C stack overflow' }

--- Whether an error a target raised is the VM's own (a parser followed bad input somewhere it did not
--- check) rather than a message written for the user.
function targets.is_internal_error(message)
  local after = tostring(message):match('^[^:\n]+:%d+: (.*)$')
  if not after then return false end
  for _, start in ipairs(VM_ERRORS) do
    if after:sub(1, #start) == start then return true end
  end
  return false
end

local function write(name, data)
  local path = scratch .. '/' .. name
  local file = assert(io.open(path, 'wb'))
  file:write(data)
  file:close()
  return path
end

local shared = require('pmp.root') .. '/../shared/tokenizers/'

function targets.json(data)
  pmp.json.decode(data)
end

--- A safetensors file: header, offsets and dtypes checked, then every tensor read.
function targets.safetensors(data)
  local tensors = pmp.safetensors.load(write('x.safetensors', data), { copy = true })
  for _, t in pairs(tensors) do t:sum() end
end

--- An indexed dataset's .idx beside a .bin of 4 KiB; the first documents' sequences read whole.
function targets.indexed(data)
  write('d.idx', data)
  write('d.bin', string.rep('\1', 4096))
  local dataset = pmp.data.indexed.open(scratch .. '/d')
  for d = 0, math.min(dataset:num_documents(), 16) - 1 do
    local first, last = dataset:document(d)
    for i = first, math.min(last, first + 16) - 1 do dataset:get(i) end
  end
  dataset:close()
end

local messages = {
  { role = 'system', content = 'Be brief.' }, { role = 'user', content = 'Hi <b>&</b>' },
  { role = 'assistant', content = 'Hello.' }, { role = 'user', content = '2+2?' },
}

--- A chat template: compiled, then rendered with a conversation.
function targets.chat_template(data)
  local template = require('pmp.chat_template').compile(data)
  template:render({ messages = messages, add_generation_prompt = true, bos_token = '<s>', eos_token = '</s>' })
end

local sample_text = 'Hello world! 123 ünïcödé — 漢字\n\t  tabs'

--- A tokenizer.json, built and used on a text.
function targets.tokenizer_json(data)
  local tokenizer = require('pmp.tokenizer').from_json(pmp.json.decode(data))
  tokenizer:decode(tokenizer:encode(sample_text))
end

--- A pre-tokenizer Split regex (translated to PCRE2) in an otherwise valid byte-level BPE tokenizer.
function targets.split_regex(data)
  local spec = { model = { type = 'BPE', vocab = { a = 0, b = 1 }, merges = {} },
    pre_tokenizer = { type = 'Sequence', pretokenizers = {
      { type = 'Split', pattern = { Regex = data }, behavior = 'Isolated', invert = false },
      { type = 'ByteLevel', add_prefix_space = false, trim_offsets = true, use_regex = false } } } }
  require('pmp.tokenizer').from_json(spec):encode(sample_text)
end

--- A SentencePiece tokenizer.model (protobuf: pieces, scores, normalizer, charsmap), used on a text.
function targets.sentencepiece(data)
  pio.mkdir_p(scratch .. '/spm')
  write('spm/tokenizer.model', data)
  local tokenizer = require('pmp.tokenizer').from_pretrained(scratch .. '/spm')
  tokenizer:decode(tokenizer:encode(sample_text))
end

--- A tiktoken ranks file (base64 token and rank per line), used on a text.
function targets.tiktoken(data)
  pio.mkdir_p(scratch .. '/tiktoken')
  write('tiktoken/qwen.tiktoken', data)
  local tokenizer = require('pmp.tokenizer').from_pretrained(scratch .. '/tiktoken')
  tokenizer:decode(tokenizer:encode(sample_text))
end

--- A torch.save pickle (Megatron's args, optimizer and RNG states): only allow-listed globals rebuilt.
function targets.pickle(data)
  require('pmp.checkpoint.torch_pickle').load(data, { source = 'fuzz.pkl',
    persistent_load = function(pid) return pid end })
end

-- loaded before fuzzing starts (with the JIT on): four real tokenizers take seconds to build
local tokenizers = {}
if os.getenv('PMP_FUZZ_TARGET') == 'encode' then
  for _, name in ipairs({ 'qwen3', 'llama3', 'deepseek_v3', 'sp32k' }) do
    tokenizers[#tokenizers + 1] = require('pmp.tokenizer').from_pretrained(shared .. name)
  end
end

--- Any bytes (invalid UTF-8 included) through real tokenizers: normalisation, pre-tokenisation, BPE,
--- byte fallback; the first byte picks the tokenizer.
function targets.encode(data)
  local tokenizer = tokenizers[(data:byte(1) or 0) % #tokenizers + 1]
  tokenizer:decode(tokenizer:encode(data:sub(2)))
end

return targets
