#!/usr/bin/env bash
# Loading and saving a real-sized model: pmp.models.from_pretrained / save_pretrained against
# transformers' from_pretrained and a dd-like sequential write, in one invocation.
#
#   tools/bench_load.sh [--size 1b|3b] [--rounds 2] [--threads 2] [--no-save] [--keep DIR]
#                       [-- make options of tools/bench_load.py]
#
# Builds (with transformers, in a temp dir) a random-weight bfloat16 Llama checkpoint in 500MB shards:
# --size 1b (default) about 1.1B parameters (hidden 2048, 16 layers, 32 heads, 8 KV heads, ffn 8192,
# vocab 32000, untied; 2.2 GB), --size 3b about 3.0B (hidden 3072, 28 layers, 24 heads, 8 KV heads, ffn
# 8192, vocab 32000, untied; 6.0 GB). Reads its files once so all runs find them in the page cache, then
# for each round loads it in fresh processes, alternating: transformers (dtype=bfloat16), pmp copying
# ({dtype = 'bf16'}), pmp zero-copy ({dtype = 'bf16', mmap = true}). Each prints the load time, the peak
# resident memory after loading (VmHWM: it counts the pages of mapped files the process touched, so a
# zero-copy model's weights show up there once they are read), the time of the first token greedy
# generation makes from an 8-token prompt right after the load, the time to first token (load + that),
# the time of one 8-token forward after it and the peak resident memory then, as ratios to the model's
# bytes. With mpirun on the PATH, also the load of each rank's part under TP=2 and under PP=2 (two
# processes; from_pretrained with split): time, peak resident memory and bytes read per rank, as ratios
# to the model's bytes. Then (unless --no-save) pmp's save_pretrained of the loaded model against `dd bs=8M conv=fsync`
# of the same bytes, alternating in each round (this disk's speed varies several-fold from minute to minute).
# Needs: a built ./pmp, python3 with torch and transformers, about 3x the model's bytes of disk under
# TMPDIR (7 GB for 1b, 19 GB for 3b) and memory for two copies of the model (transformers' generation).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROUNDS=2
THREADS=2
KEEP=
SAVE=1
SIZE=1b
MAKE_ARGS=()

while [ $# -gt 0 ]; do
  case $1 in
    --rounds) ROUNDS=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --keep) KEEP=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --no-save) SAVE=; shift ;;
    --) shift; MAKE_ARGS=("$@"); break ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "bench_load: unknown argument $1" >&2; exit 2 ;;
  esac
done
case $SIZE in
  1b) SIZE_ARGS=() ;;
  3b) SIZE_ARGS=(--hidden 3072 --layers 28 --heads 24 --kv-heads 8 --ffn 8192 --vocab 32000) ;;
  *) echo "bench_load: --size is 1b or 3b, not $SIZE" >&2; exit 2 ;;
esac
[ -x "$ROOT/pmp" ] || { echo "bench_load: build pmp first (make)" >&2; exit 1; }
python3 -c 'import torch, transformers' 2>/dev/null || { echo "bench_load: pip install torch transformers" >&2; exit 1; }

WORK=${KEEP:-$(mktemp -d "${TMPDIR:-/tmp}/bench_load.XXXXXX")}
mkdir -p "$WORK"
[ -n "$KEEP" ] || trap 'rm -rf "$WORK"' EXIT
MODEL=$WORK/model
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
export TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 TQDM_DISABLE=1

[ -f "$MODEL/config.json" ] || python3 "$ROOT/tools/bench_load.py" make "$MODEL" "${SIZE_ARGS[@]}" "${MAKE_ARGS[@]}" >&2
BYTES=$(cat "$MODEL"/*.safetensors | wc -c)   # also puts the files in the page cache

# field FILE KEY: one number of a result file.
field() { python3 -c "import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }
row() {   # row NAME FILE
  local f=$2
  awk -v n="$1" -v l="$(field "$f" load_s)" -v r="$(field "$f" rss_load_kib)" -v t="$(field "$f" first_token_s)" \
      -v s="$(field "$f" forward_s)" -v q="$(field "$f" rss_forward_kib)" -v b="$BYTES" \
      'BEGIN { printf "%-22s %8.2f %10.0f %7.2f %8.2f %7.2f %9.2f %10.0f %7.2f\n", n, l, r / 1024, r * 1024 / b, t, l + t, s,
               q / 1024, q * 1024 / b }'
}

echo "load: Llama bf16, $(awk -v b="$BYTES" 'BEGIN { printf "%.2f GB", b / 1e9 }') of safetensors (page cache warm); $THREADS threads;"
echo "  $(python3 -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")')"
echo "  peak RSS = VmHWM (counts touched pages of mapped files); x model = peak RSS / the model's bytes"
printf '%-22s %8s %10s %7s %8s %7s %9s %10s %7s\n' run 'load s' 'peak MiB' 'x model' 'token s' 'TTFT s' 'forward s' \
  'peak MiB' 'x model'
declare -A SUM TTFT
for r in $(seq 1 "$ROUNDS"); do
  python3 "$ROOT/tools/bench_load.py" load "$MODEL" --threads "$THREADS" --out "$WORK/hf-$r.json"
  row "transformers ($r)" "$WORK/hf-$r.json"
  for mode in copy mmap; do
    (cd "$ROOT" && ./pmp tools/bench_load.lua load "$MODEL" "$mode" "$WORK/pmp-$mode-$r.json")
    row "pmp $mode ($r)" "$WORK/pmp-$mode-$r.json"
  done
  for k in hf pmp-copy pmp-mmap; do
    SUM[$k]=$(awk -v a="${SUM[$k]:-0}" -v b="$(field "$WORK/$k-$r.json" load_s)" 'BEGIN { print a + b }')
    TTFT[$k]=$(awk -v a="${TTFT[$k]:-0}" -v b="$(field "$WORK/$k-$r.json" load_s)" \
      -v c="$(field "$WORK/$k-$r.json" first_token_s)" 'BEGIN { print a + b + c }')
  done
done
awk -v h="${SUM[hf]}" -v c="${SUM[pmp-copy]}" -v m="${SUM[pmp-mmap]}" \
  'BEGIN { printf "load time over all rounds, pmp / transformers: copy %.2fx, zero-copy %.2fx\n", c / h, m / h }'
awk -v h="${TTFT[hf]}" -v c="${TTFT[pmp-copy]}" -v m="${TTFT[pmp-mmap]}" \
  'BEGIN { printf "time to first token over all rounds, pmp / transformers: copy %.2fx, zero-copy %.2fx\n", c / h, m / h }'
if command -v mpirun >/dev/null; then
  AS_ROOT=; [ "$(id -u)" != 0 ] || AS_ROOT=--allow-run-as-root
  echo "each rank's part, two processes (from_pretrained with split; the whole model is allocated, never written):"
  printf '%-22s %8s %10s %7s %10s\n' run 'load s' 'peak MiB' 'x model' 'read x'
  for layout in '2 1' '1 2'; do
    set -- $layout
    name=$([ "$1" = 2 ] && echo TP=2 || echo PP=2)
    (cd "$ROOT" && mpirun --oversubscribe --bind-to none $AS_ROOT -np 2 ./pmp tools/bench_load.lua split "$MODEL" "$1" "$2" \
      "$WORK/split-$name-")
    for rank in 0 1; do
      f=$WORK/split-$name-$rank.json
      awk -v n="pmp $name rank $rank" -v l="$(field "$f" load_s)" -v r="$(field "$f" rss_load_kib)" \
          -v d="$(field "$f" bytes_read)" -v b="$BYTES" \
          'BEGIN { printf "%-22s %8.2f %10.0f %7.2f %10.2f\n", n, l, r / 1024, r * 1024 / b, d / b }'
    done
  done
fi
if [ -n "$SAVE" ]; then
(cd "$ROOT" && ./pmp tools/bench_load.lua save "$MODEL" "$WORK/saved" "$ROUNDS" "$WORK/save.json")
python3 - "$WORK/save.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
for k, (s, d) in enumerate(zip(r['save_s'], r['dd_s'])):
    print(f"save round {k + 1}: dd {d:.2f} s, save_pretrained {s:.2f} s: {s / d:.2f}x")
print(f"save_pretrained of {r['bytes'] / 1e9:.2f} GB over all rounds: {sum(r['save_s']) / sum(r['dd_s']):.2f}x the dd time; "
      f"peak RSS {r['rss_before_kib'] / 1024:.0f} MiB after loading, {r['rss_save_kib'] / 1024:.0f} MiB after the saves")
EOF
fi
[ -z "$KEEP" ] || echo "kept: $WORK" >&2
