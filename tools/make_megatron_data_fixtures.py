#!/usr/bin/env python3
"""Write the fixtures that pin pmp's data pipeline to Megatron-LM's (spec/megatron_data_spec.lua).

    python3 tools/make_megatron_data_fixtures.py          # writes spec/fixtures/megatron_data/

Needs megatron-core (pip install megatron-core; torch, numpy, transformers). Run from the pmp checkout,
with the tokenizers of ../shared/tokenizers (llama3, qwen3).

Preprocessing. Megatron-LM's tools/preprocess_data.py is not in the megatron-core wheel; `preprocess`
below does what it does (read from Megatron-LM at HEAD, 2026-08) with megatron-core's own pieces, so
the bytes are megatron-core's:
  * the tokenizer is megatron-core's build_tokenizer(args) (HuggingFaceTokenizer: its HF wrapper, with
    include_special_tokens = not --tokenizer-hf-no-include-special-tokens, i.e. tokenizer(text).input_ids
    by default; GPT2BPETokenizer: GPT-2 byte-level BPE from --vocab-file/--merge-file);
  * each JSON line's key is one text, or a list of sentences with --split-sentences; every sentence is
    tokenized, empty ones are dropped, --append-eod adds tokenizer.eod to a non-empty document's last
    sentence, and IndexedDatasetBuilder(dtype=DType.optimal_dtype(vocab_size)).add_document(ids, lengths)
    writes it to {prefix}_{key}_{document|sentence}.bin/.idx;
  * --partitions N deals the input lines out to N partition files, round robin or, with
    --keep-sequential-samples, in runs of ceil(lines / N); each partition is written to
    {prefix}_{i}_{key}_{level} and the partitions are joined in order with add_index.
Sentence splitting: NLTK's punkt model is not available offline, so both sides use the simple rule that
tools/preprocess_data.lua documents (written independently here): a sentence ends after a run of
. ! ? (and closing quotes or brackets) followed by whitespace and more text; the whitespace between
two sentences is dropped, or kept at the end of the first with --keep-newlines; the text's trailing
whitespace is dropped, and a blank text has no sentence.

The llama3 tokenizer in ../shared/tokenizers adds no BOS (its post_processor is ByteLevel only), so a
third tokenizer, "llama3_bos", is llama3 with Meta's later post-processor (ByteLevel then a template
that puts <|begin_of_text|> first); expected.json holds that post-processor, for the spec to make the
same directory.
"""
import argparse
import glob
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")

import numpy  # noqa: E402

try:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder
    from megatron.core.tokenizers.text.utils.build_tokenizer import build_tokenizer
except ImportError as e:  # pragma: no cover
    sys.exit(f"megatron-core is not installed ({e}); pip install megatron-core")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "spec", "fixtures", "megatron_data")
SHARED_TOKENIZERS = os.path.join(ROOT, "..", "shared", "tokenizers")

BOS_POST_PROCESSOR = {
    "type": "Sequence",
    "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                  {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000],
                                                  "tokens": ["<|begin_of_text|>"]}}},
    ],
}

CORPUS = [
    {"text": "Hello world. This is pmp! Is it Megatron?  Yes.", "title": "Greeting"},
    {"text": "", "title": "Empty text"},
    {"text": "naïve café, 日本語のテキスト。 Emoji 😀 and tabs\tand\nnewlines.\n\nA second paragraph.\n", "title": "Unicode"},
    {"text": "Special tokens stay text: <|endoftext|> <|begin_of_text|> <|im_end|>.", "title": "Specials"},
    {"text": "   leading spaces. \"Quoted end.\" Next (bracketed!) then more...   ", "title": ""},
    {"text": "Numbers 3.14 and 1,000,000; e.g. abbreviations. Mr. Smith went home.", "title": "Numbers"},
    {"text": "x", "title": "One"},
    {"text": "Line one.\nLine two!\nLine three?", "title": "Lines"},
    {"text": "The end.", "title": "End"},
]


def sentences_of(text, keep_newlines):
    """The simple sentence rule described in the module docstring."""
    out, start = [], 0
    for m in re.finditer(r"[.!?]+[\"')\]}\u201d\u2019\u00bb]*(\s+)(?=\S)", text):
        end = m.end() if keep_newlines else m.start(1)
        out.append(text[start:end])
        start = m.end()
    last = text[start:].rstrip()
    if last.strip():
        out.append(last)
    return out


def tokenizer_args(kind, model=None, vocab_file=None, merge_file=None, include_special_tokens=True):
    return argparse.Namespace(
        tokenizer_type=kind, tokenizer_model=model, vocab_file=vocab_file, merge_file=merge_file,
        tokenizer_special_tokens=None, tokenizer_hf_use_fast=True, trust_remote_code=False,
        tokenizer_hf_include_special_tokens=include_special_tokens, tokenizer_metadata=None)


def encode_lines(tokenizer, lines, keys, append_eod, split, keep_newlines, prefix, level):
    builders = {}
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    for key in keys:
        builders[key] = IndexedDatasetBuilder(f"{prefix}_{key}_{level}.bin", dtype=dtype)
    for line in lines:
        data = json.loads(line)
        for key in keys:
            text = data[key]
            sentences = sentences_of(text, keep_newlines) if split else [text]
            ids, lens = [], []
            for s in sentences:
                s_ids = tokenizer.tokenize(s)
                if len(s_ids) > 0:
                    ids.extend(s_ids)
                    lens.append(len(s_ids))
            if len(ids) > 0 and append_eod:
                ids.append(tokenizer.eod)
                lens[-1] += 1
            builders[key].add_document(ids, lens)
    for key in keys:
        builders[key].finalize(f"{prefix}_{key}_{level}.idx")
    return dtype


def preprocess(input_path, prefix, targs, keys=("text",), append_eod=False, partitions=1, keep_sequential=False,
               split=False, keep_newlines=False):
    tokenizer = build_tokenizer(targs)
    level = "sentence" if split else "document"
    lines = open(input_path, encoding="utf-8").read().splitlines(keepends=True)
    if partitions == 1:
        encode_lines(tokenizer, lines, keys, append_eod, split, keep_newlines, prefix, level)
        return tokenizer
    parts = [[] for _ in range(partitions)]
    if keep_sequential:
        size = math.ceil(len(lines) / partitions)
        for i, line in enumerate(lines):
            parts[i // size].append(line)
    else:
        for i, line in enumerate(lines):
            parts[i % partitions].append(line)
    for i, part in enumerate(parts):
        encode_lines(tokenizer, part, keys, append_eod, split, keep_newlines, f"{prefix}_{i}", level)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    for key in keys:
        b = IndexedDatasetBuilder(f"{prefix}_{key}_{level}.bin", dtype=dtype)
        for i in range(partitions):
            b.add_index(f"{prefix}_{i}_{key}_{level}")
        b.finalize(f"{prefix}_{key}_{level}.idx")
    return tokenizer


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def describe_output(prefix):
    ds = IndexedDataset(prefix)
    docs = []
    di = ds.document_indices
    for d in range(len(di) - 1):
        docs.append([ds[s].tolist() for s in range(di[d], di[d + 1])])
    return {"bin_sha256": sha256(prefix + ".bin"), "idx_sha256": sha256(prefix + ".idx"),
            "bin_bytes": os.path.getsize(prefix + ".bin"), "idx_bytes": os.path.getsize(prefix + ".idx"),
            "dtype": str(ds.index.dtype.__name__), "documents": docs}


def tokenizer_dirs(work):
    dirs = {"llama3": os.path.join(SHARED_TOKENIZERS, "llama3"), "qwen3": os.path.join(SHARED_TOKENIZERS, "qwen3")}
    bos = os.path.join(work, "llama3_bos")
    os.makedirs(bos)
    spec = json.load(open(os.path.join(dirs["llama3"], "tokenizer.json"), encoding="utf-8"))
    spec["post_processor"] = BOS_POST_PROCESSOR
    with open(os.path.join(bos, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)
    shutil.copy(os.path.join(dirs["llama3"], "tokenizer_config.json"), bos)
    dirs["llama3_bos"] = bos
    return dirs


PREPROCESS_CASES = [
    # name, tokenizer, pmp/Megatron flags (besides --input, --output-prefix, --tokenizer-*), keys
    ("llama3 default", "llama3", ["--append-eod"], ["text"]),
    ("llama3 with BOS, default (BOS per document)", "llama3_bos", ["--append-eod"], ["text", "title"]),
    ("llama3 with BOS, --tokenizer-hf-no-include-special-tokens", "llama3_bos",
     ["--append-eod", "--tokenizer-hf-no-include-special-tokens"], ["text"]),
    ("qwen3 default", "qwen3", ["--append-eod"], ["text", "title"]),
    ("qwen3 without --append-eod", "qwen3", [], ["text"]),
]


def run_preprocess_case(work, corpus, dirs, n, case):
    name, tok, flags, keys = case
    include = "--tokenizer-hf-no-include-special-tokens" not in flags
    targs = tokenizer_args("HuggingFaceTokenizer", dirs[tok], include_special_tokens=include)
    partitions = int(flags[flags.index("--partitions") + 1]) if "--partitions" in flags else 1
    split = "--split-sentences" in flags
    prefix = os.path.join(work, f"case{n}")
    tokenizer = preprocess(corpus, prefix, targs, keys=keys, append_eod="--append-eod" in flags,
                           partitions=partitions, keep_sequential="--keep-sequential-samples" in flags,
                           split=split, keep_newlines="--keep-newlines" in flags)
    level = "sentence" if split else "document"
    return {"name": name, "tokenizer": tok, "flags": flags, "json_keys": keys, "eod": tokenizer.eod,
            "outputs": {key: describe_output(f"{prefix}_{key}_{level}") for key in keys},
            "suffix": f"_{level}"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    import megatron.core
    import transformers
    os.makedirs(args.out, exist_ok=True)
    corpus = os.path.join(args.out, "corpus.jsonl")
    with open(corpus, "w", encoding="utf-8") as f:
        for obj in CORPUS:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    work = tempfile.mkdtemp(prefix="megatron-data-fixtures.")
    try:
        dirs = tokenizer_dirs(work)
        expected = {
            "_written_by": f"tools/make_megatron_data_fixtures.py with megatron-core {megatron.core.__version__}, "
                           f"transformers {transformers.__version__}, numpy {numpy.__version__}",
            "bos_post_processor": BOS_POST_PROCESSOR,
            "preprocess": [],
        }
        for n, case in enumerate(PREPROCESS_CASES, start=1):
            out = run_preprocess_case(work, corpus, dirs, n, case)
            expected["preprocess"].append(out)
            print(f"ok   preprocess {case[0]}: " + ", ".join(
                f"{k} {len(v['documents'])} documents, {v['bin_bytes']} bytes" for k, v in out["outputs"].items()))
        with open(os.path.join(args.out, "expected.json"), "w", encoding="utf-8") as f:
            json.dump(expected, f, ensure_ascii=False, separators=(",", ":"))
            f.write("\n")
        print(f"ok   wrote {args.out}/expected.json ({os.path.getsize(os.path.join(args.out, 'expected.json'))} bytes)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
