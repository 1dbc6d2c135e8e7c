require 'busted.runner'()
-- Data pipeline parity with Megatron-LM: tools/preprocess_data.lua's bytes against megatron-core's
-- (spec/fixtures/megatron_data, written by tools/make_megatron_data_fixtures.py).
local shell = require 'spec.support.shell'
local indexed = pmp.data.indexed

local FIXTURES = shell.root .. '/spec/fixtures/megatron_data'
local TOKENIZERS = shell.root .. '/../shared/tokenizers'
local expected = pmp.json.decode(pmp.io.read_file(FIXTURES .. '/expected.json'))

local function sha256_of(path)
  local out = shell.run('sha256sum ' .. shell.quote(path))
  return out:match('^(%x+)')
end

local function preprocess(args)
  local words = { 'cd', shell.quote(shell.root), '&&', shell.quote(shell.pmp), 'tools/preprocess_data.lua' }
  for _, a in ipairs(args) do words[#words + 1] = shell.quote(a) end
  return shell.run(table.concat(words, ' '))
end

-- The documents of an indexed dataset as lists of sequences of token ids, as the fixture lists them.
local function documents_of(prefix)
  local ds = indexed.open(prefix)
  local di, docs = ds.document_indices:totable(), {}
  for d = 1, #di - 1 do
    local doc = {}
    for s = di[d], di[d + 1] - 1 do doc[#doc + 1] = ds:totable(s) end
    docs[d] = doc
  end
  ds:close()
  return docs
end

-- A document (a list of sequences) as text: [[1,2],[3]].
local function show(doc)
  if doc == nil then return 'none' end
  local parts = {}
  for k, s in ipairs(doc) do parts[k] = '[' .. table.concat(s, ',') .. ']' end
  return '[' .. table.concat(parts, ',') .. ']'
end

-- The first document where got and want differ, for a readable failure.
local function first_difference(got, want)
  for d = 1, math.max(#got, #want) do
    if show(got[d]) ~= show(want[d]) then
      return string.format('document %d: pmp %s, Megatron %s', d - 1, show(got[d]), show(want[d]))
    end
  end
end

local function assert_megatron_output(prefix, want)
  local docs = documents_of(prefix)
  assert.is_nil(first_difference(docs, want.documents))
  assert.are.equal(want.bin_sha256, sha256_of(prefix .. '.bin'), prefix .. '.bin')
  assert.are.equal(want.idx_sha256, sha256_of(prefix .. '.idx'), prefix .. '.idx')
end

local hf_ready = pmp.data.dataset_tokenizer.hf_available() and pmp.io.is_file(TOKENIZERS .. '/llama3/tokenizer.json')
  and pmp.io.is_file(TOKENIZERS .. '/qwen3/tokenizer.json')

describe("tools/preprocess_data.lua against Megatron-LM's preprocess_data.py", function()
  local dir
  setup(function()
    dir = shell.temp_dir()
    if not hf_ready then return end
    -- llama3 with Meta's BOS post-processor, as the fixture script makes it
    local spec = pmp.json.decode(pmp.io.read_file(TOKENIZERS .. '/llama3/tokenizer.json'))
    spec.post_processor = expected.bos_post_processor
    pmp.io.mkdir_p(dir .. '/llama3_bos')
    shell.write_file(dir .. '/llama3_bos/tokenizer.json', pmp.json.encode(spec))
    shell.write_file(dir .. '/llama3_bos/tokenizer_config.json', pmp.io.read_file(TOKENIZERS .. '/llama3/tokenizer_config.json'))
  end)
  teardown(function() shell.remove_dir(dir) end)

  local function tokenizer_dir(name)
    return name == 'llama3_bos' and dir .. '/llama3_bos' or TOKENIZERS .. '/' .. name
  end

  for n, case in ipairs(expected.preprocess) do
    local test = hf_ready and it or pending
    test('writes the bytes megatron-core writes: ' .. case.name, function()
      local prefix = dir .. '/case' .. n
      local args = { '--input', FIXTURES .. '/corpus.jsonl', '--output-prefix', prefix,
        '--tokenizer-type', 'HuggingFaceTokenizer', '--tokenizer-model', tokenizer_dir(case.tokenizer), '--json-keys' }
      for _, key in ipairs(case.json_keys) do args[#args + 1] = key end
      for _, flag in ipairs(case.flags) do args[#args + 1] = flag end
      local _, err, status = preprocess(args)
      assert.are.equal(0, status, err)
      for _, key in ipairs(case.json_keys) do
        assert_megatron_output(prefix .. '_' .. key .. case.suffix, case.outputs[key])
      end
    end)
  end
end)
