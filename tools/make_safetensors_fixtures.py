#!/usr/bin/env python3
"""Reference safetensors files for pmp's specs, and a check that files pmp writes read back in Python.

Needs the `safetensors` and `numpy` PyPI packages (pip install safetensors numpy). Run by hand from
the repository root:

  python3 tools/make_safetensors_fixtures.py            # (re)write spec/fixtures/safetensors/
  python3 tools/make_safetensors_fixtures.py --verify   # pmp writes files, the reference library reads them

The fixtures are written by the reference implementation (safetensors' Rust writer, through its
Python binding), with values chosen to be exact in every dtype. expected.json lists, per file, the
metadata and each tensor's dtype, shape and row-major values, for spec/safetensors_spec.lua.

--verify runs `./pmp tools/safetensors_interop.lua DIR`, which writes files with pmp and an
expected.json of what it meant to write, then checks here that the reference library accepts each file
(its reader validates the header and layout), that the values are identical, and that pmp's bytes are
identical to what the reference writer produces for the same tensors and metadata.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import safetensors
from safetensors import deserialize, serialize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "spec", "fixtures", "safetensors")

# safetensors dtype -> numpy dtype used to hold the raw little-endian data (BF16 as its bit pattern)
NP_OF = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
# names the Python binding's serializer takes
SPEC_NAME = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
             "I32": "int32", "U8": "uint8", "BOOL": "bool"}


def bf16_bits(values):
    """float values exactly representable in bf16 -> uint16 bit patterns"""
    f = np.asarray(values, dtype=np.float32)
    bits = f.view(np.uint32)
    assert np.all(bits & 0xFFFF == 0), "value not exact in bf16"
    return (bits >> 16).astype(np.uint16)


def bf16_values(bits):
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32)


def to_bytes_dict(tensors):
    """name -> (safetensors dtype, shape, raw little-endian bytes)"""
    return {name: (dt, list(arr.shape), np.ascontiguousarray(arr, dtype=NP_OF[dt]).tobytes())
            for name, (dt, arr) in tensors.items()}


def reference_serialize(raw, metadata):
    """The reference writer's bytes for name -> (dtype, shape, bytes)."""
    keep = []
    specs = {}
    for name, (dt, shape, data) in raw.items():
        buf = np.frombuffer(bytearray(data), dtype=np.uint8) if data else np.zeros(1, np.uint8)
        keep.append(buf)
        if hasattr(safetensors, "TensorSpec"):
            specs[name] = safetensors.TensorSpec(dtype=SPEC_NAME[dt], shape=list(shape), data_ptr=buf.ctypes.data,
                                                 data_len=len(data))
        else:  # older bindings take plain dicts
            specs[name] = {"dtype": SPEC_NAME[dt], "shape": list(shape), "data": bytes(data)}
    return bytes(serialize(specs, metadata=metadata))


def decoded_values(dt, shape, data):
    """row-major values as JSON-friendly Python numbers/bools"""
    arr = np.frombuffer(bytes(data), dtype=NP_OF[dt])
    if dt == "BF16":
        arr = bf16_values(arr)
    if dt == "BOOL":
        return [bool(x) for x in arr]
    if dt in ("I64", "I32", "U8"):
        return [int(x) for x in arr]
    return [float(x) for x in arr]


def write_fixtures():
    os.makedirs(os.path.join(OUT, "sharded"), exist_ok=True)
    expected = {}

    tensors = {
        "f64": ("F64", np.array([0.1, -2.5, 1e300, 5e-324], dtype=np.float64)),
        "f32": ("F32", np.arange(6, dtype=np.float32).reshape(2, 3) * np.float32(0.5) - np.float32(1)),
        "f16": ("F16", np.array([[65504.0, -0.5], [6.103515625e-05, 0.0]], dtype=np.float16)),
        "bf16": ("BF16", bf16_bits([1.5, -2.25, 3.3895313892515355e38])),
        "i64": ("I64", np.array([-9007199254740991, 1 << 40, 0, 7], dtype=np.int64)),
        "i32": ("I32", np.array([[-2147483648, 2147483647], [-1, 42]], dtype=np.int32)),
        "u8": ("U8", np.array([0, 1, 127, 128, 255], dtype=np.uint8)),
        "bool": ("BOOL", np.array([True, False, True], dtype=np.bool_)),
        "scalar": ("F32", np.array(3.5, dtype=np.float32)),
        "empty": ("F32", np.zeros((0, 4), dtype=np.float32)),
        "cube": ("I32", np.arange(8, dtype=np.int32).reshape(2, 2, 2) - 3),
        "model.layers.0.weight": ("F32", np.array([[1, 2], [3, 4]], dtype=np.float32)),
    }
    metadata = {"format": "pt", "source": "make_safetensors_fixtures.py"}
    with open(os.path.join(OUT, "reference.safetensors"), "wb") as f:
        f.write(reference_serialize(to_bytes_dict(tensors), metadata))
    entry = {"metadata": metadata, "tensors": {}}
    for name, (dt, arr) in tensors.items():
        if dt == "BF16":
            entry["tensors"][name] = {"dtype": dt, "shape": list(arr.shape),
                                      "values": [float(v) for v in bf16_values(arr.reshape(-1))]}
        else:
            entry["tensors"][name] = {"dtype": dt, "shape": list(arr.shape),
                                      "values": decoded_values(dt, arr.shape, np.ascontiguousarray(arr).tobytes())}
    expected["reference.safetensors"] = entry

    # A valid file (for the reference reader) whose F32 tensor is not 4-byte aligned: readers must cope.
    u8 = np.array([9, 8, 7], dtype=np.uint8)
    f32 = np.array([0.25, -8.0], dtype=np.float32)
    header = json.dumps({"u8": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
                         "f32": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]}},
                        separators=(",", ":")).encode()
    header += b" " * ((8 - len(header) % 8) % 8)
    blob = len(header).to_bytes(8, "little") + header + u8.tobytes() + f32.tobytes()
    deserialize(blob)  # the reference reader accepts it
    with open(os.path.join(OUT, "unaligned.safetensors"), "wb") as f:
        f.write(blob)
    expected["unaligned.safetensors"] = {"metadata": {}, "tensors": {
        "u8": {"dtype": "U8", "shape": [3], "values": [9, 8, 7]},
        "f32": {"dtype": "F32", "shape": [2], "values": [0.25, -8.0]}}}

    # A sharded directory as huggingface_hub lays it out: two shards and the index.
    shards = [
        {"embed.weight": ("F32", np.arange(8, dtype=np.float32).reshape(4, 2)),
         "layers.0.norm": ("BF16", bf16_bits([1.0, 0.5]))},
        {"layers.1.norm": ("BF16", bf16_bits([2.0, -1.0])),
         "lm_head.weight": ("F32", np.arange(8, dtype=np.float32).reshape(4, 2) * np.float32(-1))},
    ]
    weight_map, total, sharded_expected = {}, 0, {}
    for i, shard in enumerate(shards):
        name = "model-%05d-of-%05d.safetensors" % (i + 1, len(shards))
        with open(os.path.join(OUT, "sharded", name), "wb") as f:
            f.write(reference_serialize(to_bytes_dict(shard), {"format": "pt"}))
        for tname, (dt, arr) in shard.items():
            weight_map[tname] = name
            total += arr.nbytes
            values = ([float(v) for v in bf16_values(arr)] if dt == "BF16" else arr.reshape(-1).tolist())
            sharded_expected[tname] = {"dtype": dt, "shape": list(arr.shape), "values": values}
    with open(os.path.join(OUT, "sharded", "model.safetensors.index.json"), "w") as f:
        f.write(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
    expected["sharded"] = {"metadata": {"format": "pt"}, "total_size": total, "tensors": sharded_expected}

    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")
    size = sum(os.path.getsize(os.path.join(dp, fn)) for dp, _, fns in os.walk(OUT) for fn in fns)
    print("wrote %s (%d bytes)" % (OUT, size))


def same_values(a, b):
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, float) or isinstance(y, float):
            if not (x == y or (x != x and y != y)):
                return False
        elif x != y:
            return False
    return True


def same_but_metadata_order(a, b):
    """True when two files differ only in the order of their __metadata__ keys (the reference writer keeps
    metadata in a hash map, so its order is arbitrary)."""
    from collections import OrderedDict
    na, nb = int.from_bytes(a[:8], "little"), int.from_bytes(b[:8], "little")
    if na != nb or a[8 + na:] != b[8 + nb:]:
        return False

    def canon(h):
        d = json.loads(h, object_pairs_hook=OrderedDict)
        if "__metadata__" in d:
            d["__metadata__"] = OrderedDict(sorted(d["__metadata__"].items()))
        return json.dumps(d, separators=(",", ":"))
    return canon(a[8:8 + na]) == canon(b[8:8 + nb])


def check_file(path, want, failures):
    blob = open(path, "rb").read()
    try:
        items = dict(deserialize(blob))
    except Exception as e:  # the reference reader refused the file
        failures.append("%s: rejected by safetensors: %s" % (path, e))
        return {}
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    metadata = header.get("__metadata__")
    if want.get("metadata") is not None and metadata != want["metadata"]:
        failures.append("%s: metadata %r, expected %r" % (path, metadata, want["metadata"]))
    raw = {}
    for name, spec in want["tensors"].items():
        if name not in items:
            failures.append("%s: tensor %s missing" % (path, name))
            continue
        got = items[name]
        dt = got["dtype"]
        if dt != spec["dtype"] or list(got["shape"]) != spec["shape"]:
            failures.append("%s: %s is %s%r, expected %s%r" % (path, name, dt, got["shape"], spec["dtype"], spec["shape"]))
            continue
        values = decoded_values(dt, got["shape"], got["data"])
        if not same_values(values, spec["values"]):
            failures.append("%s: %s values %r, expected %r" % (path, name, values[:8], spec["values"][:8]))
        raw[name] = (dt, got["shape"], bytes(got["data"]))
    extra = set(items) - set(want["tensors"])
    if extra:
        failures.append("%s: unexpected tensors %s" % (path, sorted(extra)))
    # the numpy front end reads what numpy can hold
    with safetensors.safe_open(path, framework="np") as f:
        for name in f.keys():
            if items[name]["dtype"] != "BF16":
                arr = f.get_tensor(name)
                if arr.tobytes() != bytes(items[name]["data"]):
                    failures.append("%s: safe_open(np) gives other bytes for %s" % (path, name))
    # byte identity with the reference writer
    if raw and len(raw) == len(items):
        ref = reference_serialize(raw, metadata)
        if ref != blob and not same_but_metadata_order(ref, blob):
            failures.append("%s: bytes differ from the reference writer's (%d vs %d bytes); headers:\n  pmp %r\n  ref %r"
                            % (path, len(blob), len(ref), blob[8:8 + n], ref[8:8 + int.from_bytes(ref[:8], "little")]))
    return items


def verify():
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([os.path.join(ROOT, "pmp"), os.path.join(ROOT, "tools", "safetensors_interop.lua"), tmp],
                       check=True, cwd=ROOT)
        want = json.load(open(os.path.join(tmp, "expected.json")))
        failures = []
        checked = 0
        for fname, spec in want["files"].items():
            check_file(os.path.join(tmp, fname), spec, failures)
            checked += len(spec["tensors"])
        sharded = want["sharded"]
        d = os.path.join(tmp, sharded["dir"])
        index = json.load(open(os.path.join(d, "model.safetensors.index.json")))
        if index["metadata"]["total_size"] != sharded["total_size"]:
            failures.append("sharded: total_size %r, expected %r" % (index["metadata"]["total_size"], sharded["total_size"]))
        files = sorted(set(index["weight_map"].values()))
        n = len(files)
        if files != ["model-%05d-of-%05d.safetensors" % (i + 1, n) for i in range(n)] or n != sharded["shards"]:
            failures.append("sharded: shard names %r (expected %d)" % (files, sharded["shards"]))
        for fn in files:
            part = {k: v for k, v in sharded["tensors"].items() if index["weight_map"].get(k) == fn}
            check_file(os.path.join(d, fn), {"metadata": sharded.get("metadata"), "tensors": part}, failures)
            checked += len(part)
        if set(index["weight_map"]) != set(sharded["tensors"]):
            failures.append("sharded: weight_map names differ from the tensors written")
        if failures:
            print("FAILED:\n  " + "\n  ".join(failures))
            sys.exit(1)
        print("ok: %d tensors in %d files written by pmp read back identically with safetensors %s; "
              "bytes identical to the reference writer's (up to its arbitrary metadata key order)" % (checked, len(want["files"]) + n, safetensors.__version__))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--verify", action="store_true", help="check files written by pmp instead of writing fixtures")
    args = ap.parse_args()
    if args.verify:
        verify()
    else:
        write_fixtures()
