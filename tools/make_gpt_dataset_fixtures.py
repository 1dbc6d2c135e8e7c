#!/usr/bin/env python3
"""Write the fixtures that pin pmp's GPT dataset order to megatron-core's.

    python3 tools/make_gpt_dataset_fixtures.py                 # writes spec/fixtures/gpt_dataset/
    python3 tools/make_gpt_dataset_fixtures.py --check-pmp     # also compares pmp's cached .npy files

Needs megatron-core (pip install megatron-core; torch and numpy). Run from the pmp checkout.

What it writes to spec/fixtures/gpt_dataset/ (read by spec/indexed_spec.lua):
  a.bin/.idx, b.bin/.idx  two small indexed datasets written by megatron-core's IndexedDatasetBuilder
                          (a: int32, one sequence per document, one empty sequence; b: uint16, documents
                          of one or two sequences).
  expected.json           for each case (data path, seed, seq_length, split, sizes): what megatron-core's
                          BlendedMegatronDatasetBuilder(GPTDataset, sizes, ...).build() made for every split:
                          each GPTDataset's document, sample and shuffle indices, its epochs and whether the
                          final epoch was shuffled apart, a few samples' tokens in training order; for a
                          BlendedDataset also its dataset index and dataset sample index.
                          Plus numpy's MT19937 outputs, RandomState shuffles and 64-bit bounded draws.
The cases cover one epoch (no size), several epochs with and without a separate final epoch, seeds 0 and
2^32 - 1, a three-way split, weighted, unweighted, exhaustive and single-weighted blends.

--check-pmp builds every case with ./pmp (pmp.data.gpt_dataset.build, caching into a temporary directory)
and checks that pmp's cached document/sample/shuffle .npy files hold the same arrays, with the same dtypes,
as the .npy files megatron-core cached.
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
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
    from megatron.core.datasets.utils import get_blend_from_list
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer
except ImportError as e:  # pragma: no cover
    sys.exit(f"megatron-core is not installed ({e}); pip install megatron-core")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "spec", "fixtures", "gpt_dataset")


def write_data(dir_):
    """Datasets a and b, written by megatron-core's builder."""
    b = IndexedDatasetBuilder(os.path.join(dir_, "a.bin"), dtype=numpy.int32)
    v = 100000
    for k in range(60):
        n = 0 if k == 17 else (k * 11) % 37 + 1
        if n == 0:
            b.add_item(torch.tensor([], dtype=torch.int64))   # an empty sequence
            b.end_document()
        else:
            b.add_document(torch.arange(v, v + n), [n])
        v += n
    b.finalize(os.path.join(dir_, "a.idx"))
    b = IndexedDatasetBuilder(os.path.join(dir_, "b.bin"), dtype=numpy.uint16)
    v = 30000
    for k in range(40):
        n = (k * 5) % 17 + 3
        lengths = [n] if k % 3 else [n // 2, n - n // 2]
        b.add_document(torch.arange(v, v + n), lengths)
        v += n
    b.finalize(os.path.join(dir_, "b.idx"))


def tokens_per_epoch(prefix, split_index, split):
    """Tokens in one split of a dataset, to pick sizes that land on the wanted epoch counts."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)
    ds = IndexedDataset(prefix)
    n = len(ds.sequence_lengths)
    lo, hi = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))[split_index]
    return int(ds.sequence_lengths[int(round(lo * n)):int(round(hi * n))].sum())


def epochs_case(prefix, seq, separate):
    """A train size needing 3 epochs whose final epoch is (not) shuffled apart."""
    t = tokens_per_epoch(prefix, 0, "1")
    per_epoch = (t - 1) // seq
    sans = (2 * t - 1) // seq
    # the final epoch supplies num_samples - sans samples; separate when that is < int(0.8 * per_epoch)
    want = sans + (3 if separate else int(0.8 * per_epoch) + 1)
    assert want * seq + 1 > 2 * t and want * seq + 1 <= 3 * t
    return want


def describe_gpt(ds, positions):
    """A GPTDataset's indices and the tokens of some samples in training order."""
    t = ds._get_num_tokens_per_epoch()
    epochs = ds._get_num_epochs(t)
    separate = False
    if epochs > 1:
        seq = ds.config.sequence_length
        sans = ((epochs - 1) * t - 1) // seq
        separate = ds.num_samples - sans < int(0.80 * ((t - 1) // seq))
    count = len(ds)
    samples = []
    for i in positions:
        if 0 <= i < count:
            samples.append([i, ds._query_document_sample_shuffle_indices(i)[0].tolist()])
    return {
        "kind": "gpt",
        "prefix": os.path.basename(ds.dataset.path_prefix),
        "range": [int(ds.indices[0]), int(ds.indices[-1]) + 1],
        "num_samples": ds.num_samples,
        "tokens_per_epoch": t,
        "num_epochs": epochs,
        "separate_final_epoch": bool(separate),
        "count": count,
        "document_index": ds.document_index.tolist(),
        "sample_index": ds.sample_index.reshape(-1).tolist(),
        "sample_index_dtype": str(ds.sample_index.dtype),
        "shuffle_index": ds.shuffle_index.tolist(),
        "shuffle_index_dtype": str(ds.shuffle_index.dtype),
        "samples": samples,
    }


def describe(ds):
    if isinstance(ds, BlendedDataset):
        n = len(ds)
        samples = []
        for i in sorted({0, 1, 2, n // 2, n - 1}):
            if 0 <= i < n:
                d, k = int(ds.dataset_index[i]), int(ds.dataset_sample_index[i])
                samples.append([i, ds.datasets[d]._query_document_sample_shuffle_indices(k)[0].tolist()])
        return {
            "kind": "blend",
            "size": ds.size,
            "weights": list(ds.weights),
            "dataset_index": ds.dataset_index.tolist(),
            "dataset_sample_index": ds.dataset_sample_index.tolist(),
            "datasets": [describe_gpt(d, []) for d in ds.datasets],
            "samples": samples,
        }
    n = len(ds)
    return describe_gpt(ds, sorted({0, 1, 2, n // 2, n - 1}))


def build(dir_, case):
    prefixes, weights = get_blend_from_list([p if i % 2 == 0 and len(case["data_path"]) % 2 == 0 and _is_number(p)
                                             else os.path.join(dir_, p) for i, p in enumerate(case["data_path"])])
    config = GPTDatasetConfig(
        random_seed=case["seed"], sequence_length=case["seq_length"], blend=(prefixes, weights),
        split=case["split"], tokenizer=NullTokenizer(200000), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, path_to_cache=None)
    return BlendedMegatronDatasetBuilder(GPTDataset, case["sizes"], lambda: True, config).build()


def _is_number(s):
    try:
        float(s)
        return True
    except ValueError:
        return False


def cases(dir_):
    return [
        {"name": "one epoch, no size", "data_path": ["a"], "seed": 1234, "seq_length": 16, "split": "1",
         "sizes": [None, None, None]},
        {"name": "three splits", "data_path": ["a"], "seed": 5, "seq_length": 8, "split": "80,15,5",
         "sizes": [40, 10, 3]},
        {"name": "3 epochs, separate final epoch", "data_path": ["a"], "seed": 7, "seq_length": 8, "split": "1",
         "sizes": [epochs_case(os.path.join(dir_, "a"), 8, True), None, None]},
        {"name": "3 epochs, final epoch shuffled with the others", "data_path": ["a"], "seed": 7, "seq_length": 8,
         "split": "1", "sizes": [epochs_case(os.path.join(dir_, "a"), 8, False), None, None]},
        {"name": "seed 0, many epochs", "data_path": ["a"], "seed": 0, "seq_length": 32, "split": "1",
         "sizes": [150, None, None]},
        {"name": "seed 2^32 - 1", "data_path": ["b"], "seed": 4294967295, "seq_length": 5, "split": "70,30",
         "sizes": [100, 7, None]},
        {"name": "weighted blend", "data_path": ["0.3", "a", "0.7", "b"], "seed": 11, "seq_length": 8,
         "split": "90,10,0", "sizes": [300, 30, 0]},
        {"name": "unweighted blend with a size", "data_path": ["a", "b"], "seed": 3, "seq_length": 6, "split": "1",
         "sizes": [100, None, None]},
        {"name": "unweighted blend without a size (exhaustive)", "data_path": ["a", "b"], "seed": 3,
         "seq_length": 6, "split": "1", "sizes": [None, None, None]},
        {"name": "one weighted prefix (a blend of one)", "data_path": ["2.5", "b"], "seed": 21, "seq_length": 7,
         "split": "1", "sizes": [120, 0, 0]},
    ]


def numpy_sums():
    """numpy.sum of 1/k for k = 1..n (its pairwise summation), for the blend-weight normalization spec."""
    return {str(n): float(numpy.sum(numpy.array([1.0 / k for k in range(1, n + 1)]))) for n in (3, 8, 100, 128, 129, 300, 1000)}


def numpy_random():
    """numpy's MT19937 outputs and RandomState draws, for the spec of core/tensor/random_numpy.c."""
    out = {}
    raw = {}
    for seed in (5489, 0, 1234, 4294967295):
        bg = numpy.random.MT19937()
        bg._legacy_seeding(seed)
        raw[str(seed)] = [int(x) for x in bg.random_raw(8)]
        # the 625th and 626th outputs cross the second twist
        raw[str(seed)] += [int(x) for x in bg.random_raw(624)[-2:]]
    out["mt19937_outputs"] = raw   # outputs 1..8, 631, 632 of RandomState(seed)
    shuffles = []
    for seed, n in ((1234, 10), (0, 1), (0, 2), (42, 100), (4294967295, 33), (7, 1000)):
        rs = numpy.random.RandomState(seed)
        a = numpy.arange(n, dtype=numpy.int32)
        rs.shuffle(a)
        b = numpy.arange(n, dtype=numpy.int64)
        rs.shuffle(b)   # the same generator, continuing
        shuffles.append({"seed": seed, "n": n, "int32_then_int64": [a.tolist(), b.tolist()]})
    out["shuffles"] = shuffles
    # randint over a range wider than 32 bits masks 64-bit draws made of two outputs (high first),
    # as random_interval does for max > 2^32 - 1
    rs = numpy.random.RandomState(99)
    high = 2 ** 40 + 12345
    out["interval64"] = {"seed": 99, "max": high - 1,
                         "values": [int(x) for x in rs.randint(0, high, size=6, dtype=numpy.int64)]}
    return out


PMP_CACHE = r"""
local cases, data, cache = pmp.json.decode(pmp.io.read_file(arg[1])), arg[2], arg[3]
for n, case in ipairs(cases) do
  local list = {}
  for i, p in ipairs(case.data_path) do
    list[i] = (#case.data_path % 2 == 0 and i % 2 == 1 and tonumber(p)) and p or (data .. '/' .. p)
  end
  local sizes = {}
  for k, name in ipairs({ 'train', 'valid', 'test' }) do
    if case.sizes[k] ~= pmp.json.null then sizes[name] = case.sizes[k] end
  end
  pmp.data.gpt_dataset.build(list, { seq_length = case.seq_length, seed = case.seed, split = case.split,
    sizes = sizes, cache_dir = cache .. '/' .. n })
end
"""


def check_pmp(pmp, data_dir, case_list, megatron_sets):
    tmp = tempfile.mkdtemp(prefix="pmp-gpt-fixtures.")
    try:
        plain = [{k: v for k, v in c.items()} for c in case_list]
        with open(os.path.join(tmp, "cases.json"), "w") as f:
            json.dump(plain, f)
        with open(os.path.join(tmp, "check.lua"), "w") as f:
            f.write(PMP_CACHE)
        r = subprocess.run([pmp, os.path.join(tmp, "check.lua"), os.path.join(tmp, "cases.json"), data_dir,
                            os.path.join(tmp, "cache")], cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"pmp failed:\n{r.stdout}\n{r.stderr}")
        checked = 0
        for n, (case, sets) in enumerate(zip(case_list, megatron_sets), start=1):
            pmp_files = {}
            for desc_path in glob.glob(os.path.join(tmp, "cache", str(n), "*-GPTDataset-*-description.txt")):
                desc = json.load(open(desc_path))
                key = (os.path.basename(desc["dataset_path"]), desc["index_split"], desc["num_samples"])
                pmp_files[key] = desc_path[: -len("description.txt")]
            for ds in sets:
                if ds is None:
                    continue
                for g in (ds.datasets if isinstance(ds, BlendedDataset) else [ds]):
                    d = describe_gpt(g, [])
                    key = (d["prefix"], g.index_split.name, g.num_samples)
                    if key not in pmp_files:
                        sys.exit(f"FAIL {case['name']}: pmp cached no indices for {key}")
                    for what, want in (("document_index", g.document_index), ("sample_index", g.sample_index),
                                       ("shuffle_index", g.shuffle_index)):
                        got = numpy.load(pmp_files[key] + what + ".npy")
                        if got.dtype != want.dtype or got.shape != want.shape or not (got == want).all():
                            sys.exit(f"FAIL {case['name']} {key} {what}: pmp {got.dtype}{got.shape} differs from "
                                     f"megatron {want.dtype}{want.shape}")
                    checked += 1
        print(f"ok   pmp's cached .npy indices equal megatron-core's (dtypes, shapes, values) for {checked} datasets")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--check-pmp", action="store_true", help="compare pmp's cached indices with megatron-core's")
    ap.add_argument("--pmp", default=os.path.join(ROOT, "pmp"))
    args = ap.parse_args()

    import megatron.core
    version = getattr(megatron.core, "__version__", "?")
    os.makedirs(args.out, exist_ok=True)
    for f in glob.glob(os.path.join(args.out, "*.bin")) + glob.glob(os.path.join(args.out, "*.idx")):
        os.remove(f)
    write_data(args.out)
    # Megatron caches its indices next to the data: build on a copy
    work = tempfile.mkdtemp(prefix="megatron-gpt-fixtures.")
    try:
        for name in ("a", "b"):
            for ext in (".bin", ".idx"):
                shutil.copy(os.path.join(args.out, name + ext), os.path.join(work, name + ext))
        case_list = cases(work)
        expected = {
            "_written_by": f"tools/make_gpt_dataset_fixtures.py with megatron-core {version}, numpy {numpy.__version__}",
            "numpy_random": numpy_random(),
            "numpy_sums": numpy_sums(),
            "cases": [],
        }
        built = []
        for case in case_list:
            sets = build(work, case)
            built.append(sets)
            out = dict(case)
            out["splits"] = {}
            for name, ds in zip(("train", "valid", "test"), sets):
                if ds is not None:
                    out["splits"][name] = describe(ds)
            expected["cases"].append(out)
            print(f"ok   {case['name']}: " + ", ".join(
                f"{name} {len(ds)}" for name, ds in zip(("train", "valid", "test"), sets) if ds is not None))
        with open(os.path.join(args.out, "expected.json"), "w") as f:
            json.dump(expected, f, separators=(",", ":"))
            f.write("\n")
        print(f"ok   wrote {args.out}/expected.json ({os.path.getsize(os.path.join(args.out, 'expected.json'))} bytes)")
        if args.check_pmp:
            check_pmp(args.pmp, work, case_list, built)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
