#!/usr/bin/env python3
"""Check pmp's indexed datasets and GPT sample construction against megatron-core.

    pip install megatron-core numpy          # torch must already be installed
    python3 tools/check_indexed_megatron.py  # run from the pmp checkout (uses ./pmp)
    python3 tools/check_indexed_megatron.py --write-fixtures spec/fixtures/indexed

Checks, each printed as "ok ..." (the script exits 1 on the first mismatch):
  1. pmp -> Megatron: datasets written by pmp's builder (uint16 and int32, multi-sequence documents,
     empty documents, a merge with add_index) and by tools/preprocess_data.lua (char tokenizer, 1 and 3
     workers) are read with megatron.core.datasets.indexed_dataset.IndexedDataset: dtype, sequence
     lengths, pointers, document indices and every sequence (also through get(i, offset, length)).
  2. Megatron -> pmp: datasets written with megatron-core's IndexedDatasetBuilder are read by pmp's
     reader, which compares them with the values Python wrote.
  3. GPT samples: pmp's cached sample index equals helpers_cpp.build_sample_idx run on pmp's own
     document index, and pmp's samples equal the tokens Megatron's GPTDataset would read for those
     indices (_query_document_sample_shuffle_indices' logic); pmp's blend order equals
     helpers_cpp.build_blending_indices.
--write-fixtures DIR writes the Megatron-built datasets and expected.json for spec/indexed_spec.lua.
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("PYTHONWARNINGS", "ignore")

import numpy  # noqa: E402
import torch  # noqa: E402

try:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder
except ImportError as e:  # pragma: no cover
    sys.exit(f"megatron-core is not installed ({e}); pip install megatron-core numpy")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fail(msg):
    print("FAIL " + msg)
    sys.exit(1)


def ok(msg):
    print("ok   " + msg)


def run_pmp(pmp, code, *args):
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(code)
    try:
        r = subprocess.run([pmp, f.name, *args], cwd=ROOT, capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if r.returncode != 0:
        fail(f"pmp failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout


def check_megatron_reads(prefix, expected, what):
    ds = IndexedDataset(prefix)
    if ds.index.dtype.__name__ != expected["dtype"]:
        fail(f"{what}: dtype {ds.index.dtype.__name__} != {expected['dtype']}")
    if list(ds.document_indices) != expected["document_indices"]:
        fail(f"{what}: document indices {list(ds.document_indices)} != {expected['document_indices']}")
    seqs = expected["sequences"]
    if len(ds) != len(seqs):
        fail(f"{what}: {len(ds)} sequences, expected {len(seqs)}")
    if list(ds.sequence_lengths) != [len(s) for s in seqs]:
        fail(f"{what}: sequence lengths differ")
    itemsize = DType.size(ds.index.dtype)
    pointers = numpy.cumsum([0] + [len(s) * itemsize for s in seqs[:-1]]) if seqs else []
    if list(ds.index.sequence_pointers) != list(pointers):
        fail(f"{what}: sequence pointers differ")
    for i, s in enumerate(seqs):
        if ds[i].tolist() != s:
            fail(f"{what}: sequence {i} is {ds[i].tolist()}, expected {s}")
        if len(s) >= 3 and ds.get(i, offset=1, length=len(s) - 2).tolist() != s[1:-1]:
            fail(f"{what}: get({i}, 1, {len(s) - 2}) differs")
    ok(f"megatron-core reads {what}: {len(seqs)} sequences, {len(expected['document_indices']) - 1} documents, {expected['dtype']}")


PMP_WRITE = r"""
local dir = arg[1]
local indexed = pmp.data.indexed
local out = {}
local function dump(name, docs, dtype)
  local seqs, doc_idx = {}, {0}
  for _, d in ipairs(docs) do
    for _, s in ipairs(d) do seqs[#seqs + 1] = pmp.json.array(s) end
    doc_idx[#doc_idx + 1] = #seqs
  end
  out[name] = { dtype = dtype, sequences = seqs, document_indices = doc_idx }
end
local a = { {{1, 2, 3}, {4, 5}}, {}, {{65535, 0}}, {{7}} }
indexed.write(dir .. '/pmp_u16', a, { vocab_size = 60000 })
dump('pmp_u16', a, 'uint16')
local b = { {{100000, 2}}, {{3, 4, 5, 6}, {}, {2147483647}}, {} }
indexed.write(dir .. '/pmp_i32', b, { vocab_size = 100000 })
dump('pmp_i32', b, 'int32')
local m = indexed.builder(dir .. '/pmp_merged', { dtype = 'int32' })
m:add_index(dir .. '/pmp_i32')
m:add_document({ 9, 8, 7 }, { 1, 2 })
m:add_index(dir .. '/pmp_i32')
m:finalize()
local merged = {}
for _, d in ipairs(b) do merged[#merged + 1] = d end
merged[#merged + 1] = { {9}, {8, 7} }
for _, d in ipairs(b) do merged[#merged + 1] = d end
dump('pmp_merged', merged, 'int32')
io.write(pmp.json.encode(out))
"""

PMP_READ = r"""
local dir, expected = arg[1], pmp.json.decode(pmp.io.read_file(arg[2]))
local indexed = pmp.data.indexed
local names = {}
for name in pairs(expected) do if type(expected[name]) == 'table' and expected[name].sequences then names[#names + 1] = name end end
table.sort(names)
for _, name in ipairs(names) do
  local e = expected[name]
  local ds = indexed.open(dir .. '/' .. name)
  assert(ds.dtype == e.dtype, name .. ': dtype ' .. ds.dtype)
  assert(#ds == #e.sequences, name .. ': sequence count')
  local di = ds.document_indices:totable()
  assert(#di == #e.document_indices, name .. ': document count')
  for k, v in ipairs(e.document_indices) do assert(di[k] == v, name .. ': document index ' .. k) end
  for i, s in ipairs(e.sequences) do
    local got = ds:get(i - 1):totable()
    assert(#got == #s, name .. ': length of sequence ' .. (i - 1))
    for k, v in ipairs(s) do assert(got[k] == v, name .. ': sequence ' .. (i - 1) .. ' token ' .. k) end
  end
  print('ok   pmp reads ' .. name .. ': ' .. #ds .. ' sequences, ' .. ds:num_documents() .. ' documents, ' .. ds.dtype)
end
"""

PMP_GPT = r"""
local dir = arg[1]
local G = pmp.data.gpt_dataset
local docs, v = {}, 0
for d = 1, 40 do
  local s = {}
  for k = 1, (d * 7) % 19 do v = v + 1; s[k] = v % 50000 end
  docs[d] = {s}
end
pmp.data.indexed.write(dir .. '/gpt_a', docs, { vocab_size = 50000 })
local docs2 = {}
for d = 1, 25 do
  local s = {}
  for k = 1, (d * 5) % 11 + 1 do s[k] = 60000 + d * 100 + k end
  docs2[d] = {s}
end
pmp.data.indexed.write(dir .. '/gpt_b', docs2, { vocab_size = 100000 })
local sets = G.build({ '0.3', dir .. '/gpt_a', '0.7', dir .. '/gpt_b' }, { seq_length = 8, seed = 5, split = '80,20,0',
  sizes = { train = 120, valid = 10 } })
local out = { train = {}, blend = {}, raw = {} }
local a = sets.train.datasets[1]
for j = 0, a.count - 1 do out.raw[j + 1] = a:raw_sample(j):totable() end
for i = 0, 119 do
  local d, k = sets.train:source(i)
  out.blend[i + 1] = { d - 1, k }
end
out.weights = sets.train.weights
io.write(pmp.json.encode(out))
"""


def check_gpt(pmp, tmp):
    from megatron.core.datasets import helpers_cpp

    out = json.loads(run_pmp(pmp, PMP_GPT, tmp))
    ds = IndexedDataset(os.path.join(tmp, "gpt_a"))
    descs = glob.glob(os.path.join(tmp, "cache", "GPTDataset_indices", "*-pmpGPTDataset-train-description.json"))
    desc = [json.load(open(p)) for p in descs if json.load(open(p))["path_prefix"].endswith("gpt_a")]
    if len(desc) != 1:
        fail(f"expected one cached train index for gpt_a, found {len(desc)}")
    desc = desc[0]
    base = [p for p in descs if json.load(open(p))["path_prefix"].endswith("gpt_a")][0][: -len("description.json")]
    doc_index = numpy.load(base + "document_index.npy")
    sample_index = numpy.load(base + "sample_index.npy")
    n = sample_index.shape[0]
    build = helpers_cpp.build_sample_idx_int32 if hasattr(helpers_cpp, "build_sample_idx_int32") else helpers_cpp.build_sample_idx
    ref = build(ds.sequence_lengths.copy(), doc_index.astype(numpy.int32), desc["seq_length"], desc["num_epochs"],
                desc["tokens_per_epoch"], True, 1)
    if not (ref[:n] == sample_index).all():
        fail("pmp's sample index differs from helpers_cpp.build_sample_idx on the same document index")
    ok(f"sample index equals megatron build_sample_idx ({n - 1} samples, {desc['num_epochs']} epochs, seq_length {desc['seq_length']})")
    # The tokens of each sample, read the way GPTDataset._query_document_sample_shuffle_indices reads them.
    for j, got in enumerate(out["raw"]):
        b, bo = sample_index[j]
        e, eo = sample_index[j + 1]
        if b == e:
            parts = [ds.get(int(doc_index[b]), offset=int(bo), length=int(eo - bo + 1))]
        else:
            parts = []
            for i in range(b, e + 1):
                off = 0 if i > b else int(bo)
                length = None if i < e else int(eo + 1)
                parts.append(ds.get(int(doc_index[i]), offset=off, length=length))
        want = numpy.concatenate(parts).astype(numpy.int64).tolist()
        if want != got:
            fail(f"sample {j}: pmp {got} != megatron {want}")
    ok(f"pmp's samples equal megatron GPTDataset's reads for {len(out['raw'])} samples (seq_length + 1 tokens, 1-token overlap)")
    size = len(out["blend"])
    di = numpy.zeros(size, dtype=numpy.int16)
    dsi = numpy.zeros(size, dtype=numpy.int64)
    helpers_cpp.build_blending_indices(di, dsi, numpy.array(out["weights"], dtype=numpy.float64), len(out["weights"]), size, False)
    want = [[int(a), int(b)] for a, b in zip(di, dsi)]
    if want != out["blend"]:
        fail("blend order differs from build_blending_indices")
    ok(f"blend order equals megatron build_blending_indices ({size} samples, weights {out['weights']})")


def write_megatron(dir_):
    """Datasets written by megatron-core's builder; returns their expected contents."""
    expected = {}

    def record(name, seqs, doc_idx, dtype):
        expected[name] = {"dtype": dtype, "sequences": seqs, "document_indices": doc_idx}

    # uint16, as preprocess_data picks for a vocabulary under 65500; documents of several sequences
    dtype = DType.optimal_dtype(32000)
    b = IndexedDatasetBuilder(os.path.join(dir_, "megatron_uint16.bin"), dtype=dtype)
    b.add_document(torch.tensor([5, 6, 7, 8, 65535]), [2, 3])
    b.add_document(torch.tensor([], dtype=torch.int64), [])
    b.add_item(torch.tensor([1, 2, 3]))
    b.add_item(torch.tensor([0]))
    b.end_document()
    b.add_document(torch.tensor([31999]), [1])
    b.finalize(os.path.join(dir_, "megatron_uint16.idx"))
    record("megatron_uint16", [[5, 6], [7, 8, 65535], [1, 2, 3], [0], [31999]], [0, 2, 2, 4, 5], "uint16")

    # int32 (vocabulary >= 65500), then a merge of it twice with add_index
    dtype = DType.optimal_dtype(150000)
    b = IndexedDatasetBuilder(os.path.join(dir_, "megatron_int32.bin"), dtype=dtype)
    b.add_document(torch.tensor([149999, 70000, 1]), [3])
    b.add_document(torch.tensor([42, 43]), [1, 1])
    b.finalize(os.path.join(dir_, "megatron_int32.idx"))
    record("megatron_int32", [[149999, 70000, 1], [42], [43]], [0, 1, 3], "int32")

    b = IndexedDatasetBuilder(os.path.join(dir_, "megatron_merged.bin"), dtype=numpy.int32)
    b.add_index(os.path.join(dir_, "megatron_int32"))
    b.add_document(torch.tensor([7]), [1])
    b.add_index(os.path.join(dir_, "megatron_int32"))
    b.finalize(os.path.join(dir_, "megatron_merged.idx"))
    seqs = [[149999, 70000, 1], [42], [43]]
    record("megatron_merged", seqs + [[7]] + seqs, [0, 1, 3, 4, 5, 7], "int32")
    return expected


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pmp", default=os.path.join(ROOT, "pmp"))
    ap.add_argument("--write-fixtures", metavar="DIR")
    args = ap.parse_args()

    import megatron.core
    print(f"megatron-core {getattr(megatron.core, '__version__', '?')}, numpy {numpy.__version__}, torch {torch.__version__}")

    if args.write_fixtures:
        os.makedirs(args.write_fixtures, exist_ok=True)
        expected = write_megatron(args.write_fixtures)
        expected["_written_by"] = "tools/check_indexed_megatron.py with megatron-core " + getattr(megatron.core, "__version__", "?")
        with open(os.path.join(args.write_fixtures, "expected.json"), "w") as f:
            json.dump(expected, f, indent=1, sort_keys=True)
            f.write("\n")
        for name in list(expected):
            if not name.startswith("_"):
                check_megatron_reads(os.path.join(args.write_fixtures, name), expected[name], name)
        ok(f"wrote fixtures to {args.write_fixtures}")
        return

    tmp = tempfile.mkdtemp(prefix="pmp-indexed-check.")
    try:
        # 1. pmp -> Megatron
        expected = json.loads(run_pmp(args.pmp, PMP_WRITE, tmp))
        for name, e in expected.items():
            check_megatron_reads(os.path.join(tmp, name), e, name)
        jsonl = os.path.join(tmp, "corpus.jsonl")
        texts = ["hello world", "", "pmp writes Megatron data", "naïve café ☕", "a"]
        with open(jsonl, "w") as f:
            for k in range(60):
                f.write(json.dumps({"text": texts[k % len(texts)] * (k % 3 + 1)}) + "\n")
        for workers in (1, 3):
            prefix = os.path.join(tmp, f"pre{workers}")
            r = subprocess.run([args.pmp, "tools/preprocess_data.lua", "--input", jsonl, "--output-prefix", prefix,
                                "--tokenizer-type", "char", "--append-eod", "--workers", str(workers)],
                               cwd=ROOT, capture_output=True, text=True)
            if r.returncode != 0:
                fail(f"preprocess_data failed:\n{r.stderr}")
            tok = json.load(open(prefix + "_text_document.tokenizer.json"))
            ids = {c: i for i, c in enumerate(tok["chars"])}
            seqs, docs = [], [0]
            with open(jsonl) as f:
                for line in f:
                    text = json.loads(line)["text"]
                    if text:
                        seqs.append([ids[c] for c in text] + [tok["eod"]])
                    docs.append(len(seqs))
            check_megatron_reads(prefix + "_text_document", {"dtype": "uint16", "sequences": seqs, "document_indices": docs},
                                 f"preprocess_data output ({workers} worker{'s' if workers > 1 else ''})")
        # 2. Megatron -> pmp
        mdir = os.path.join(tmp, "megatron")
        os.makedirs(mdir)
        mexpected = write_megatron(mdir)
        with open(os.path.join(mdir, "expected.json"), "w") as f:
            json.dump(mexpected, f)
        sys.stdout.write(run_pmp(args.pmp, PMP_READ, mdir, os.path.join(mdir, "expected.json")))
        # 3. GPT samples and blending
        gdir = os.path.join(tmp, "gpt")
        os.makedirs(gdir)
        check_gpt(args.pmp, gdir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("all checks passed")


if __name__ == "__main__":
    main()
