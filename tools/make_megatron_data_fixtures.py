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
whitespace is dropped, and a blank text has no sentence (whitespace: ASCII's six characters).

GPT2BPETokenizer: gpt2/vocab.json and gpt2/merges.txt are a small GPT-2-format BPE trained here on the
corpus texts; the reference is the GPT-2 fast tokenizer made from them (see Gpt2Reference).

The llama3 tokenizer in ../shared/tokenizers adds no BOS (its post_processor is ByteLevel only), so a
third tokenizer, "llama3_bos", is llama3 with Meta's later post-processor (ByteLevel then a template
that puts <|begin_of_text|> first); expected.json holds that post-processor, for the spec to make the
same directory.

Dataset index caches (cache/ under the fixture directory, a copy of what megatron-core wrote): in a
scratch directory holding data/a and data/b (spec/fixtures/gpt_dataset's datasets) and a link qwen3
to the qwen3 tokenizer, megatron-core's BlendedMegatronDatasetBuilder(GPTDataset, sizes, ...) builds
each case with the HuggingFaceTokenizer "qwen3" (relative paths, so the descriptions do not name the
scratch directory); expected.json lists the files it cached and the first samples of every split in
training order (the first batches). The "refusals" are what megatron-core raises for a zero weight,
weights without sizes, a sample past the end and a blend that oversamples its datasets.
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


ASCII_SPACE = " \t\n\v\f\r"


def sentences_of(text, keep_newlines):
    """The simple sentence rule described in the module docstring (ASCII whitespace)."""
    out, start = [], 0
    for m in re.finditer(r"[.!?]+[\"')\]}\u201d\u2019\u00bb]*([ \t\n\v\f\r]+)(?=[^ \t\n\v\f\r])", text):
        end = m.end() if keep_newlines else m.start(1)
        out.append(text[start:end])
        start = m.end()
    last = text[start:].rstrip(ASCII_SPACE)
    if last.strip(ASCII_SPACE):
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


def preprocess(input_path, prefix, tokenizer, keys=("text",), append_eod=False, partitions=1, keep_sequential=False,
               split=False, keep_newlines=False):
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


class Gpt2Reference:
    """Megatron's GPT2BPETokenizer from --vocab-file/--merge-file: megatron-core builds it as
    AutoTokenizer("gpt2", vocab_file=..., merges_file=...), which needs the hub for gpt2's config;
    offline, the same GPT-2 fast tokenizer is made from the files directly. Megatron's HF wrapper then
    tokenizes with tokenizer(text).input_ids and takes the EOS ('<|endoftext|>') as EOD."""

    def __init__(self, directory):
        from transformers import GPT2TokenizerFast
        self.tokenizer = GPT2TokenizerFast(vocab=os.path.join(directory, "vocab.json"),
                                           merges=os.path.join(directory, "merges.txt"))
        self.eod = self.tokenizer.eos_token_id
        self.vocab_size = len(self.tokenizer)

    def tokenize(self, text):
        return self.tokenizer(text).input_ids


def write_gpt2_files(directory):
    """A small GPT-2-format vocab.json/merges.txt (byte-level BPE trained on the corpus texts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([v for obj in CORPUS for v in obj.values()], trainer)
    os.makedirs(directory, exist_ok=True)
    tok.model.save(directory)


def tokenizer_dirs(work, out):
    dirs = {"llama3": os.path.join(SHARED_TOKENIZERS, "llama3"), "qwen3": os.path.join(SHARED_TOKENIZERS, "qwen3")}
    bos = os.path.join(work, "llama3_bos")
    os.makedirs(bos)
    spec = json.load(open(os.path.join(dirs["llama3"], "tokenizer.json"), encoding="utf-8"))
    spec["post_processor"] = BOS_POST_PROCESSOR
    with open(os.path.join(bos, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)
    shutil.copy(os.path.join(dirs["llama3"], "tokenizer_config.json"), bos)
    dirs["llama3_bos"] = bos
    dirs["gpt2"] = os.path.join(out, "gpt2")
    return dirs


PREPROCESS_CASES = [
    # name, tokenizer, pmp/Megatron flags (besides --input, --output-prefix, --tokenizer-*), keys[, how the
    # tokenizer is given: "megatron" --tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR, "pai"
    # --patch-tokenizer-type Qwen2Tokenizer --load DIR, "gpt2" --tokenizer-type GPT2BPETokenizer with the files]
    ("llama3 default", "llama3", ["--append-eod"], ["text"]),
    ("llama3 with BOS, default (BOS per document)", "llama3_bos", ["--append-eod"], ["text", "title"]),
    ("llama3 with BOS, --tokenizer-hf-no-include-special-tokens", "llama3_bos",
     ["--append-eod", "--tokenizer-hf-no-include-special-tokens"], ["text"]),
    ("qwen3 default", "qwen3", ["--append-eod"], ["text", "title"]),
    ("qwen3 without --append-eod", "qwen3", [], ["text"]),
    ("qwen3 --split-sentences", "qwen3", ["--append-eod", "--split-sentences"], ["text"]),
    ("qwen3 --split-sentences --keep-newlines", "qwen3", ["--append-eod", "--split-sentences", "--keep-newlines"],
     ["text", "title"]),
    ("llama3 with BOS, --split-sentences (BOS per sentence)", "llama3_bos", ["--append-eod", "--split-sentences"],
     ["text"]),
    ("qwen3 --partitions 3 (round robin)", "qwen3", ["--append-eod", "--partitions", "3", "--workers", "3"], ["text"]),
    ("qwen3 --partitions 2 --keep-sequential-samples", "qwen3",
     ["--append-eod", "--partitions", "2", "--keep-sequential-samples", "--workers", "2"], ["text", "title"]),
    ("GPT2BPETokenizer --vocab-file --merge-file", "gpt2", ["--append-eod"], ["text", "title"], "gpt2"),
    ("qwen3 as Pai-Megatron-Patch spells it (--patch-tokenizer-type Qwen2Tokenizer --load DIR)", "qwen3",
     ["--append-eod"], ["text"], "pai"),
]


def run_preprocess_case(work, corpus, dirs, n, case):
    name, tok, flags, keys = case[:4]
    spelling = case[4] if len(case) > 4 else "megatron"
    include = "--tokenizer-hf-no-include-special-tokens" not in flags
    if tok == "gpt2":
        tokenizer = Gpt2Reference(dirs["gpt2"])
    else:
        tokenizer = build_tokenizer(tokenizer_args("HuggingFaceTokenizer", dirs[tok], include_special_tokens=include))
    partitions = int(flags[flags.index("--partitions") + 1]) if "--partitions" in flags else 1
    split = "--split-sentences" in flags
    prefix = os.path.join(work, f"case{n}")
    preprocess(corpus, prefix, tokenizer, keys=keys, append_eod="--append-eod" in flags,
                           partitions=partitions, keep_sequential="--keep-sequential-samples" in flags,
                           split=split, keep_newlines="--keep-newlines" in flags)
    level = "sentence" if split else "document"
    return {"name": name, "tokenizer": tok, "flags": flags, "json_keys": keys, "eod": tokenizer.eod,
            "outputs": {key: describe_output(f"{prefix}_{key}_{level}") for key in keys},
            "suffix": f"_{level}", "spelling": spelling}


GPT_FIXTURES = os.path.join(ROOT, "spec", "fixtures", "gpt_dataset")

CACHE_CASES = [
    # name, --data-path, split, sizes, seed, seq_length, --data-cache-path
    {"name": "one prefix, default cache place", "data_path": ["data/a"], "split": "90, 8, 2", "sizes": [40, 5, 3],
     "seed": 1234, "seq_length": 8, "cache": None},
    {"name": "default --split text", "data_path": ["data/b"], "split": "969, 30, 1", "sizes": [30, None, None],
     "seed": 5, "seq_length": 6, "cache": "cache"},
    {"name": "weighted blend with --data-cache-path", "data_path": ["0.3", "data/a", "0.7", "data/b"], "split": "90, 8, 2",
     "sizes": [100, 10, 4], "seed": 11, "seq_length": 8, "cache": "cache"},
    {"name": "unweighted blend, exhaustive valid split", "data_path": ["data/a", "data/b"], "split": "90, 10",
     "sizes": [60, None, None], "seed": 3, "seq_length": 6, "cache": "cache"},
]


def gpt_config(case, tokenizer, path_to_cache):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.core.datasets.utils import get_blend_from_list
    return GPTDatasetConfig(
        random_seed=case["seed"], sequence_length=case["seq_length"], blend=get_blend_from_list(case["data_path"]),
        split=case["split"], tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, path_to_cache=path_to_cache)


def build_sets(case, tokenizer, path_to_cache=None, sizes=None):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset
    config = gpt_config(case, tokenizer, path_to_cache)
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes or case["sizes"], lambda: True, config).build()


def first_samples(ds, n=4):
    return [ds[i]["tokens"].tolist() + [ds[i]["labels"].tolist()[-1]] for i in range(min(n, len(ds)))]


def cache_cases(work, tokenizer, out_dir):
    """Builds every case in work with megatron-core, copies its cache files to out_dir/cache."""
    from megatron.core.datasets.blended_dataset import BlendedDataset
    results = []
    for case in CACHE_CASES:
        before = set(glob.glob("**/*.npy", recursive=True) + glob.glob("**/*.txt", recursive=True))
        sets = build_sets(case, tokenizer, case["cache"])
        after = set(glob.glob("**/*.npy", recursive=True) + glob.glob("**/*.txt", recursive=True))
        files = sorted(after - before)
        splits = {}
        for name, ds in zip(("train", "valid", "test"), sets):
            if ds is not None:
                splits[name] = {"kind": "blend" if isinstance(ds, BlendedDataset) else "gpt", "count": len(ds),
                                "first_samples": first_samples(ds)}
        results.append(dict(case, files=files, splits=splits))
        print(f"ok   cache {case['name']}: {len(files)} files, " +
              ", ".join(f"{k} {v['count']}" for k, v in splits.items()))
    for f in sorted({f for r in results for f in r["files"]}):
        dst = os.path.join(out_dir, "cache", f)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy(f, dst)
    return results


def refusals(tokenizer):
    """What megatron-core raises (or not) for the cases pmp must refuse as it does."""
    from megatron.core.datasets.blended_dataset import BlendedDataset
    out = []

    def attempt(name, fn):
        try:
            fn()
            out.append({"name": name, "raises": None})
        except Exception as e:  # noqa: BLE001 - recording what megatron-core raises is the point
            out.append({"name": name, "raises": type(e).__name__, "message": str(e)})
        print(f"ok   refusal {name}: {out[-1]['raises']}")

    base = {"split": "90, 8, 2", "seed": 1, "seq_length": 8, "cache": None}
    attempt("zero weight", lambda: build_sets(dict(base, data_path=["0", "data/a", "1", "data/b"]), tokenizer,
                                              sizes=[50, 5, 2]))
    attempt("positive weights (control)", lambda: build_sets(dict(base, data_path=["1", "data/a", "1", "data/b"]),
                                                             tokenizer, sizes=[50, 5, 2]))
    attempt("weights without sizes", lambda: build_sets(dict(base, data_path=["1", "data/a", "1", "data/b"]), tokenizer,
                                                        sizes=[None, None, None]))
    single = build_sets(dict(base, data_path=["data/a"]), tokenizer, sizes=[20, None, None])[0]
    attempt("last sample (control)", lambda: single[len(single) - 1])
    attempt("sample past the end", lambda: single[len(single)])
    a = build_sets(dict(base, data_path=["data/a"]), tokenizer, sizes=[10, None, None])[0]
    b = build_sets(dict(base, data_path=["data/b"]), tokenizer, sizes=[10, None, None])[0]
    fits = min(len(a), len(b))
    attempt("blend within its datasets (control)", lambda: BlendedDataset([a, b], [0.5, 0.5], fits, a.config))
    attempt("blend oversampling a dataset", lambda: BlendedDataset([a, b], [0.5, 0.5], 2 * max(len(a), len(b)) + 2,
                                                                   a.config))
    return {"cases": out, "single_count": len(single), "blend_counts": [len(a), len(b)], "blend_fits": fits}


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
        write_gpt2_files(os.path.join(args.out, "gpt2"))
        dirs = tokenizer_dirs(work, args.out)
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
        shutil.rmtree(os.path.join(args.out, "cache"), ignore_errors=True)
        scratch = os.path.join(work, "scratch")
        os.makedirs(os.path.join(scratch, "data"))
        for name in ("a", "b"):
            for ext in (".bin", ".idx"):
                shutil.copy(os.path.join(GPT_FIXTURES, name + ext), os.path.join(scratch, "data", name + ext))
        os.symlink(dirs["qwen3"], os.path.join(scratch, "qwen3"))
        # megatron-core's BlendedDataset caches only on a torch.distributed rank 0
        import torch.distributed
        torch.distributed.init_process_group("gloo", init_method="file://" + os.path.join(work, "pg"), rank=0,
                                             world_size=1)
        here = os.getcwd()
        os.chdir(scratch)
        try:
            tokenizer = build_tokenizer(tokenizer_args("HuggingFaceTokenizer", "qwen3"))
            expected["cache_tokenizer"] = dict(tokenizer.unique_identifiers)
            expected["cache"] = cache_cases(scratch, tokenizer, args.out)
            expected["refusals"] = refusals(tokenizer)
        finally:
            os.chdir(here)
        with open(os.path.join(args.out, "expected.json"), "w", encoding="utf-8") as f:
            json.dump(expected, f, ensure_ascii=False, separators=(",", ":"))
            f.write("\n")
        print(f"ok   wrote {args.out}/expected.json ({os.path.getsize(os.path.join(args.out, 'expected.json'))} bytes)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
