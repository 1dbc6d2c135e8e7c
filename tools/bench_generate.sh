#!/usr/bin/env bash
# Generation throughput: pmp.generate against transformers' model.generate and llama.cpp on CPU, same
# model, same prompt tokens, same thread count, in one invocation.
#
#   tools/bench_generate.sh [--new 64] [--rounds 3] [--threads 2] [--batches 1,8] [--dtypes f32,bf16]
#                           [--keep DIR]
#
# Builds (with transformers, in a temp dir) a random-weight float32 Llama model: hidden 512, 8 layers,
# 8 heads, 4 KV heads, ffn 1408, vocab 32000, saved with save_pretrained, and 8 seeded prompts of lengths
# 37, 12, 58, 25, 44, 19, 50, 31; with llama-cpp-python and gguf importable, also its GGUF files (f32 and
# bf16, written with the gguf package). For each dtype and batch size B (the first B prompts), the three
# programs generate greedily in alternating rounds: one warm-up, then per round a NEW-token call and a
# 1-token call each. Prints prefill and decode tokens/s, pmp's ratios to each, and whether the greedy
# tokens equal transformers' (tools/bench_generate.py says exactly how each number is measured).
# llama.cpp runs through llama-cpp-python's C API, a batch as parallel sequences; without it (pip install
# llama-cpp-python gguf) its rows are skipped with a message.
# Needs: a built ./pmp, python3 with torch and transformers.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NEW=64
ROUNDS=3
THREADS=2
BATCHES=1,8
DTYPES=f32,bf16
KEEP=

while [ $# -gt 0 ]; do
  case $1 in
    --new) NEW=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --batches) BATCHES=${2// /,}; shift 2 ;;
    --dtypes) DTYPES=${2// /,}; shift 2 ;;
    --keep) KEEP=$2; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "bench_generate: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -x "$ROOT/pmp" ] || { echo "bench_generate: build pmp first (make)" >&2; exit 1; }
python3 -c 'import torch, transformers' 2>/dev/null || { echo "bench_generate: pip install torch transformers" >&2; exit 1; }

WORK=${KEEP:-$(mktemp -d "${TMPDIR:-/tmp}/bench_generate.XXXXXX")}
mkdir -p "$WORK"
[ -n "$KEEP" ] || trap 'rm -rf "$WORK"' EXIT
MODEL=$WORK/model
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
export TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 TQDM_DISABLE=1

[ -f "$MODEL/config.json" ] || python3 "$ROOT/tools/bench_generate.py" make "$MODEL" >&2
if python3 -c 'import llama_cpp, gguf' 2>/dev/null; then
  for D in ${DTYPES//,/ }; do
    [ -f "$MODEL/model-$D.gguf" ] || python3 "$ROOT/tools/bench_generate.py" gguf "$MODEL" "$MODEL/model-$D.gguf" --dtype "$D" >&2
  done
  LV="llama-cpp-python $(python3 -c 'import llama_cpp; print(llama_cpp.__version__)')"
else
  LV="no llama-cpp-python"
fi

CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
TV=$(python3 -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")')
echo "generate: Llama 512x8 (8 heads, 4 KV), ffn 1408, vocab 32000; $NEW new tokens, greedy, KV cache;"
echo "  $CPU; $TV; $LV"
python3 "$ROOT/tools/bench_generate.py" bench "$MODEL" --pmp "$ROOT/pmp" --new "$NEW" --rounds "$ROUNDS" \
  --threads "$THREADS" --batches "$BATCHES" --dtypes "$DTYPES"
[ -z "$KEEP" ] || echo "kept: $WORK" >&2
