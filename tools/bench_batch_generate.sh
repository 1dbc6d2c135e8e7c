#!/usr/bin/env bash
# Offline batch generation throughput: pmp's continuous-batching engine (pmp.serve.engine) against
# transformers' batched generate in padded static batches, same model, same requests, same threads,
# in one invocation.
#
#   tools/bench_batch_generate.sh [--requests 256] [--threads 2] [--pmp-batch 32] [--hf-batch 16]
#                                 [--prompt-max 400] [--output-max 256] [--keep DIR]
#
# The model is tools/bench_generate.py's (random-weight float32 Llama, hidden 512, 8 layers, 8 heads,
# 4 KV heads, vocab 32000). The workload: REQUESTS seeded prompts of 10..PROMPT_MAX random tokens, each
# asking for 16..OUTPUT_MAX new tokens (uniform), greedy, no eos. transformers runs them in input order,
# HF_BATCH at a time, each batch until its longest request is done; pmp keeps up to PMP_BATCH sequences
# running, admitting the next request as one finishes. Throughput counts the tokens the requests asked
# for (tokens/s = sum of max_tokens / seconds of the whole workload, prefill included); ratio = pmp/hf.
# Also prints how many requests got identical greedy tokens from both.
# Needs: a built ./pmp, python3 with torch and transformers.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REQUESTS=256
THREADS=2
PMP_BATCH=32
HF_BATCH=16
PROMPT_MAX=400
OUTPUT_MAX=256
KEEP=

while [ $# -gt 0 ]; do
  case $1 in
    --requests) REQUESTS=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --pmp-batch) PMP_BATCH=$2; shift 2 ;;
    --hf-batch) HF_BATCH=$2; shift 2 ;;
    --prompt-max) PROMPT_MAX=$2; shift 2 ;;
    --output-max) OUTPUT_MAX=$2; shift 2 ;;
    --keep) KEEP=$2; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "bench_batch_generate: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -x "$ROOT/pmp" ] || { echo "bench_batch_generate: build pmp first (make)" >&2; exit 1; }
python3 -c 'import torch, transformers' 2>/dev/null || { echo "bench_batch_generate: pip install torch transformers" >&2; exit 1; }

WORK=${KEEP:-$(mktemp -d "${TMPDIR:-/tmp}/bench_batch_generate.XXXXXX")}
mkdir -p "$WORK"
[ -n "$KEEP" ] || trap 'rm -rf "$WORK"' EXIT
MODEL=$WORK/model
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
export TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 TQDM_DISABLE=1

[ -f "$MODEL/config.json" ] || python3 "$ROOT/tools/bench_generate.py" make "$MODEL" >&2
python3 "$ROOT/tools/bench_batch_generate.py" workload "$WORK/workload.json" --requests "$REQUESTS" \
  --prompt-max "$PROMPT_MAX" --output-max "$OUTPUT_MAX"
python3 "$ROOT/tools/bench_batch_generate.py" run "$MODEL" "$WORK/workload.json" --batch "$HF_BATCH" \
  --threads "$THREADS" --out "$WORK/hf.json"
(cd "$ROOT" && ./pmp tools/bench_batch_generate.lua "$MODEL" "$WORK/workload.json" "$PMP_BATCH" "$WORK/pmp.json")

CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
python3 - "$WORK/workload.json" "$WORK/hf.json" "$WORK/pmp.json" "$THREADS" "$CPU" "$HF_BATCH" "$PMP_BATCH" <<'PY'
import json, sys
workload, hf, pmp = (json.load(open(p)) for p in sys.argv[1:4])
threads, cpu, hf_batch, pmp_batch = sys.argv[4:8]
asked = sum(r['max_tokens'] for r in workload)
prompt = sum(len(r['prompt']) for r in workload)
same = sum(a == b for a, b in zip(hf['tokens'], pmp['tokens']))
print(f"batch generate: {len(workload)} requests, {prompt} prompt tokens, {asked} new tokens asked; greedy, f32,"
      f" {threads} threads; {cpu}")
print(f"{'run':<44} {'seconds':>9} {'tok/s':>9} {'ratio':>7}")
h = asked / hf['seconds']
print(f"{'transformers, static batches of ' + hf_batch:<44} {hf['seconds']:9.1f} {h:9.1f} {1:7.2f}")
p = asked / pmp['seconds']
print(f"{'pmp engine, up to ' + pmp_batch + ' running':<44} {pmp['seconds']:9.1f} {p:9.1f} {p / h:7.2f}")
print(f"pmp: {pmp['steps']} steps, peak {pmp['peak_blocks']} of {pmp['num_blocks']} KV-cache blocks;"
      f" greedy tokens identical to transformers for {same} of {len(workload)} requests")
PY
[ -z "$KEEP" ] || echo "kept: $WORK" >&2
