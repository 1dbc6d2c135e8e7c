#!/usr/bin/env bash
# Generation throughput: pmp.generate against transformers' model.generate on CPU, same model, same
# prompts, same batch, same thread count, in one invocation.
#
#   tools/bench_generate.sh [--new 64] [--reps 5] [--threads 2] [--batches "1 4"]
#                           [--keep DIR]
#
# Builds (with transformers, in a temp dir) a random-weight float32 Llama model: hidden 512, 8 layers,
# 8 heads, 4 KV heads, ffn 1408, vocab 32000, saved with save_pretrained, and 4 seeded prompts of lengths
# 37, 12, 58, 25. For each batch size B (the first B prompts, left-padded with an attention mask):
# transformers greedy generate (use_cache=True) with torch.set_num_threads(T), then pmp.generate (greedy)
# each does one warm-up run and REPS timed runs of NEW tokens per row
# (prefill included). Prints tokens/s (B*NEW / seconds; median and best of the runs), the ratio
# pmp/transformers, and whether the greedy tokens are identical.
# Needs: a built ./pmp, python3 with torch and transformers.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NEW=64
REPS=5
THREADS=2
BATCHES="1 4"
KEEP=

while [ $# -gt 0 ]; do
  case $1 in
    --new) NEW=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --batches) BATCHES=${2//,/ }; shift 2 ;;
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

# stats FILE B: "median_tok/s best_tok/s" from a result file's seconds.
stats() {
  python3 - "$1" "$2" "$NEW" <<'EOF'
import json, statistics, sys
r = json.load(open(sys.argv[1])); n = int(sys.argv[2]) * int(sys.argv[3])
print(f"{n / statistics.median(r['seconds']):.1f} {n / min(r['seconds']):.1f}")
EOF
}
# compare A B: how the greedy tokens of two result files agree.
compare() {
  python3 - "$1" "$2" <<'EOF'
import json, sys
a, b = (json.load(open(p))['tokens'] for p in sys.argv[1:3])
bad = [f"row {i + 1} from token {next(k for k in range(len(x)) if x[k] != y[k]) + 1}"
       for i, (x, y) in enumerate(zip(a, b)) if x != y]
print('identical' if not bad else 'MISMATCH: ' + ', '.join(bad))
EOF
}

CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
TV=$(python3 -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")')
echo "generate: Llama 512x8 (8 heads, 4 KV), ffn 1408, vocab 32000, f32; $NEW new tokens, greedy, KV cache;"
echo "  $THREADS threads; $CPU; $TV; tokens/s = batch*$NEW / seconds of a whole generate call (prefill included),"
echo "  median and best of $REPS runs after a warm-up; pmp/hf = ratio of tokens/s (above 1: pmp faster)"
printf '%-6s %-26s %10s %10s %18s  %s\n' batch run 'tok/s med' 'tok/s best' 'pmp/hf med best' 'greedy tokens vs hf'
for B in $BATCHES; do
  hf=$WORK/hf-b$B.json
  python3 "$ROOT/tools/bench_generate.py" run "$MODEL" --batch "$B" --new "$NEW" --threads "$THREADS" \
    --reps "$REPS" --out "$hf"
  read -r hmed hbest < <(stats "$hf" "$B")
  gap=$(python3 -c "import json; print('%.3g' % json.load(open('$hf'))['min_gap'])")
  printf '%-6s %-26s %10s %10s %18s  %s\n' "$B" "transformers" "$hmed" "$hbest" "1 1" "(smallest top-2 logit gap $gap)"
  out=$WORK/pmp-b$B.json
  (cd "$ROOT" && ./pmp tools/bench_generate.lua "$MODEL" "$B" "$NEW" "$REPS" "$out")
  read -r pmed pbest < <(stats "$out" "$B")
  ratio=$(awk -v a="$pmed" -v b="$hmed" -v c="$pbest" -v d="$hbest" 'BEGIN { printf "%.2f %.2f", a / b, c / d }')
  printf '%-6s %-26s %10s %10s %18s  %s\n' "$B" "pmp" "$pmed" "$pbest" "$ratio" "$(compare "$out" "$hf")"
done
[ -z "$KEEP" ] || echo "kept: $WORK" >&2
