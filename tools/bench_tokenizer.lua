-- Tokenizer throughput: pmp.tokenizer against each kind's Python reference, measured in the same run:
-- tokenizer.json against `tokenizers`, SentencePiece tokenizer.model against `sentencepiece`, tiktoken
-- ranks files against `tiktoken` (Qwen 1's regex and special tokens, after NFC as Qwen does).
--
--   ./pmp tools/bench_tokenizer.lua [--tokenizer PATH[,PATH...]] [--data FILE] [--mode whole|lines] [--repeats N]
--
-- Defaults: the Qwen3 tokenizer.json from ../shared, the BPE and Unigram SentencePiece models and the
-- tiktoken ranks file of spec/fixtures, on tinyshakespeare from ../shared. Both sides encode on one
-- thread (RAYON_NUM_THREADS=1), without special tokens, either the whole file as one text or line by
-- line, and report the best of N runs in MB/s of UTF-8 input. Token counts must agree.
local root = package.loaded['pmp.root'] or '.'
local opts = {
  tokenizer = table.concat({ root .. '/../shared/tokenizers/qwen3', root .. '/spec/fixtures/spm/bpe_nfkc.model',
    root .. '/spec/fixtures/spm/unigram_nfkc_cf.model', root .. '/spec/fixtures/tiktoken/qwen.tiktoken' }, ','),
  data = root .. '/../shared/data/tinyshakespeare.txt', mode = 'whole', repeats = '3',
}
local i = 1
while i <= #arg do
  local key = arg[i]:match('^%-%-(.+)$')
  if not key or opts[key] == nil or arg[i + 1] == nil then
    io.stderr:write('usage: pmp tools/bench_tokenizer.lua [--tokenizer PATH[,PATH...]] [--data FILE] [--mode whole|lines] [--repeats N]\n')
    os.exit(2)
  end
  opts[key] = arg[i + 1]
  i = i + 2
end
local repeats = tonumber(opts.repeats)

local f = assert(io.open(opts.data, 'rb'))
local text = f:read('*a')
f:close()
local pieces = {}
if opts.mode == 'whole' then
  pieces[1] = text
else
  for line in text:gmatch('[^\n]*\n?') do if line ~= '' then pieces[#pieces + 1] = line end end
end
local mb = #text / 1e6
print(string.format('input: %s (%.2f MB, %s, %d piece(s))', opts.data, mb, opts.mode, #pieces))

local clock = require('pmp.clock')
local now = clock.now or os.clock

local function bench_one(path)
  local t0 = now()
  local tok = pmp.tokenizer.from_pretrained(path)
  local load_s = now() - t0
  local best, count = math.huge, 0
  for _ = 1, repeats do
    tok:set_cache(false); tok:set_cache(true)   -- every run starts with an empty cache, as Python's does
    local t = now()
    count = 0
    for k = 1, #pieces do count = count + #tok:encode(pieces[k], { add_special_tokens = false }) end
    best = math.min(best, now() - t)
  end
  local pmp_rate = mb / best
  print(string.format('%s', tostring(tok)))
  print(string.format('  pmp.tokenizer : %9d tokens  %.3f s  %7.2f MB/s  (load %.2f s)', count, best, pmp_rate, load_s))

  local script = root .. '/tools/bench_tokenizer_ref.py'
  local cmd = string.format("RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false python3 '%s' '%s' '%s' %s %d 2>&1",
    script, path, opts.data, opts.mode, repeats)
  local p = io.popen(cmd)
  local out = p:read('*a')
  p:close()
  local ref_name, ref_tokens, ref_s, ref_rate = out:match('reference=(%S+) tokens=(%d+) seconds=([%d.]+) mb_per_s=([%d.]+)')
  if not ref_tokens then
    print('  Python reference: not available (' .. out:gsub('%s+$', ''):sub(-200) .. ')')
    return
  end
  ref_tokens, ref_s, ref_rate = tonumber(ref_tokens), tonumber(ref_s), tonumber(ref_rate)
  print(string.format('  %-14s: %9d tokens  %.3f s  %7.2f MB/s', ref_name, ref_tokens, ref_s, ref_rate))
  print(string.format('  ratio pmp/%s: %.2fx%s', ref_name, pmp_rate / ref_rate,
    ref_tokens == count and '' or string.format('   (TOKEN COUNTS DIFFER: %d vs %d)', count, ref_tokens)))
end

for path in opts.tokenizer:gmatch('[^,]+') do bench_one(path) end
