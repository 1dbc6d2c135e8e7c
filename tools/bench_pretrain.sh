#!/usr/bin/env bash
# pmp's pretraining recipe against an equivalent PyTorch script (tools/pytorch_pretrain.py), same
# config, same machine, same thread count, in one invocation; prints time per iteration, peak
# resident memory and final validation loss of each.
#
#   tools/bench_pretrain.sh                 # both configs, full length
#   tools/bench_pretrain.sh --iters 200     # config (a) shortened, for a quick check
#   tools/bench_pretrain.sh --configs a
#   tools/bench_pretrain.sh --rounds 3      # PyTorch and pmp alternate, 3 times each (default 2)
#
# The machine's speed drifts (other tenants, clock changes): a run of one program and then the other can
# land in different phases. So the two alternate over rounds, each round's pair gives a ratio, and the
# summary divides the rounds' mean times.
#
# Configs:
#   a  nanoGPT's CPU "baby" Shakespeare run: char-level, 4 layers, 4 heads, 128 wide, seq 64,
#      batch 12, 2000 iters, lr 1e-3 -> 1e-4 cosine, warmup 100, wd 0.1, betas (0.9, 0.99), clip 1
#      (nanoGPT, with its GPT-2 style model, reaches val loss ~1.88 there). f32.
#   b  Llama-style, bf16: hidden 512, 8 layers, 8 heads, seq 512, micro = global batch 4; a few
#      iterations, timed after a warm-up interval.
# Needs: a built ./pmp, python3 with torch (pip install torch), ../shared/data/tinyshakespeare.txt.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA=${BENCH_DATA:-$ROOT/../shared/data/tinyshakespeare.txt}
THREADS=2
ITERS_A=2000
ITERS_B=10        # timed iterations of (b); one warm-up interval of 2 more runs before them
CONFIGS="a b"
ROUNDS=2

while [ $# -gt 0 ]; do
  case $1 in
    --iters) ITERS_A=$2; shift 2 ;;
    --b-iters) ITERS_B=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --configs) CONFIGS=${2//,/ }; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "bench_pretrain: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -x "$ROOT/pmp" ] || { echo "bench_pretrain: build pmp first (make)" >&2; exit 1; }
[ -f "$DATA" ] || { echo "bench_pretrain: no data at $DATA (set BENCH_DATA)" >&2; exit 1; }
python3 -c 'import torch' 2>/dev/null || { echo "bench_pretrain: pip install torch" >&2; exit 1; }

LOGS=$(mktemp -d "${TMPDIR:-/tmp}/bench_pretrain.XXXXXX")
# Both sides get the same thread budget: pmp through OpenMP (BLIS included), PyTorch through
# torch.set_num_threads (--threads) and its OpenMP/MKL pools.
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS

# The flags both programs take with the same meaning.
flags_a() {
  local iters=$1 log=$(( $1 >= 20 ? $1 / 10 : 1 ))
  echo --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 64 \
    --micro-batch-size 12 --global-batch-size 12 --train-iters "$iters" \
    --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 100 --lr-decay-style cosine \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.99 --clip-grad 1.0 \
    --split 90,10,0 --eval-iters 200 --eval-interval "$iters" --log-interval "$log" --seed 1234
}
flags_b() {
  local iters=$(( $1 + 2 ))
  echo --num-layers 8 --hidden-size 512 --num-attention-heads 8 --seq-length 512 \
    --micro-batch-size 4 --global-batch-size 4 --train-iters "$iters" \
    --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 2 --lr-decay-style cosine \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --bf16 \
    --split 90,10,0 --eval-iters 4 --eval-interval "$iters" --log-interval 2 --seed 1234
}

# From a log in the recipe's format: the mean time per iteration over all log intervals but the
# first (one-time costs), weighted by their lengths; the last validation loss; the peak RSS.
summarize() {
  awk '
    /elapsed time per iteration \(ms\):/ {
      split($0, a, "iteration "); split(a[2], b, "/"); it = b[1] + 0
      match($0, /elapsed time per iteration \(ms\): [0-9.]+/); ms = substr($0, RSTART + 33, RLENGTH - 33) + 0
      n = it - last; last = it; k++
      if (k == 1) { first_ms = ms; first_n = n } else { sum += ms * n; cnt += n; v[++m] = ms }
    }
    # the validation during training, which PyTorch's side also runs (not the end-of-training ones after it)
    /lm loss value:/ && !/ on [a-z]+ set \|/ { match($0, /lm loss value: [-+0-9.eE]+/); val = substr($0, RSTART + 15, RLENGTH - 15) }
    /peak resident memory:/ { match($0, /peak resident memory: [0-9.]+/); rss = substr($0, RSTART + 22, RLENGTH - 22) }
    END {
      if (cnt == 0) { sum = first_ms * first_n; cnt = first_n; v[++m] = first_ms }
      # The median and the fastest interval too: other jobs on a shared machine inflate single
      # intervals (an OpenMP team with a preempted thread waits at every barrier), never shrink them.
      for (i = 2; i <= m; i++) for (j = i; j > 1 && v[j - 1] > v[j]; j--) { t = v[j]; v[j] = v[j - 1]; v[j - 1] = t }
      med = m % 2 ? v[(m + 1) / 2] : (v[m / 2] + v[m / 2 + 1]) / 2
      printf "%.1f %.1f %.1f %s %s %d\n", (cnt ? sum / cnt : 0), med, v[1], (rss == "" ? "?" : rss), (val == "" ? "?" : val), cnt
    }' "$1"
}

for config in $CONFIGS; do
  case $config in
    a) flags=$(flags_a "$ITERS_A"); title="(a) baby Shakespeare, f32, $ITERS_A iters" ;;
    b) flags=$(flags_b "$ITERS_B"); title="(b) Llama-style 512x8, seq 512, bf16, $ITERS_B timed iters" ;;
    *) echo "bench_pretrain: unknown config $config" >&2; exit 2 ;;
  esac
  rows=()
  torch_version=$(python3 -c 'import torch; print(torch.__version__)')
  pmp_version=$(cd "$ROOT" && ./pmp --version | cut -d' ' -f2)
  torch_sum=0 pmp_sum=0
  for round in $(seq "$ROUNDS"); do
    log=$LOGS/$config-pytorch-$round.log
    echo "== $title, round $round/$ROUNDS: pytorch ($log)" >&2
    python3 "$ROOT/tools/pytorch_pretrain.py" $flags --data-path "$DATA" --threads "$THREADS" > "$log" 2>&1 \
      || { echo "bench_pretrain: pytorch failed, see $log" >&2; tail -5 "$log" >&2; exit 1; }
    read -r torch_ms torch_med torch_best torch_rss torch_val torch_n < <(summarize "$log")
    rows+=("$round pytorch $torch_version|$torch_ms|$torch_med|$torch_best|1 1 1|$torch_rss|$torch_val|$torch_n")
    log=$LOGS/$config-pmp-$round.log
    echo "== $title, round $round/$ROUNDS: pmp ($log)" >&2
    # No checkpoints, no sample: only training and the final validation are timed or run.
    (cd "$ROOT" && ./pmp recipes/pretrain.lua $flags --data-path "$DATA" \
      --tokenizer-type char --save '' --sample-length 0) > "$log" 2>&1 \
      || { echo "bench_pretrain: pmp failed, see $log" >&2; tail -5 "$log" >&2; exit 1; }
    read -r ms med best rss val n < <(summarize "$log")
    ratio=$(awk -v a="$ms" -v b="$torch_ms" -v c="$med" -v d="$torch_med" -v e="$best" -v f="$torch_best" \
      'BEGIN { printf "%.2f %.2f %.2f", (b > 0 ? a / b : 0), (d > 0 ? c / d : 0), (f > 0 ? e / f : 0) }')
    rows+=("$round pmp $pmp_version|$ms|$med|$best|$ratio|$rss|$val|$n")
    torch_sum=$(awk -v s="$torch_sum" -v x="$torch_ms" 'BEGIN { print s + x }')
    pmp_sum=$(awk -v s="$pmp_sum" -v x="$ms" 'BEGIN { print s + x }')
  done
  echo
  echo "$title, $THREADS threads, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
  # ms/iter: mean over the timed iterations; median, best: of the log intervals' ms/iter;
  # pmp/pytorch: the ratios of the three to the same round's PyTorch run.
  printf '%-26s %8s %8s %8s %16s %13s %15s %8s\n' 'round run' 'ms/iter' median best 'pmp/pytorch' 'peak RSS MiB' 'final val loss' 'timed it'
  printf '%-26s %8s %8s %8s %16s\n' '' mean '' '' 'mean median best'
  for row in "${rows[@]}"; do
    IFS='|' read -r name ms med best ratio rss val n <<< "$row"
    printf '%-26s %8s %8s %8s %16s %13s %15s %8s\n' "$name" "$ms" "$med" "$best" "$ratio" "$rss" "$val" "$n"
  done
  awk -v t="$torch_sum" -v p="$pmp_sum" -v r="$ROUNDS" 'BEGIN {
    printf "all %d rounds: PyTorch %.1f ms/iteration, pmp %.1f: pmp/pytorch %.2f\n", r, t / r, p / r, (t > 0 ? p / t : 0) }'
  echo
done
echo "logs: $LOGS" >&2
