#!/usr/bin/env bash
# Communication of the parallel layouts under mpirun on this machine: for each layout, the bytes every
# rank sends per training step (measured by the engine) against the volume the ring algorithms should
# move, their ratio, and for data-parallel layouts the part of the gradient communication hidden
# behind backward by the bucketed overlap (with a no-overlap run for comparison). See
# tools/bench_dist.lua for the model, the step and the expected-volume formulas.
#
#   tools/bench_dist.sh [--np4] [any tools/bench_dist.lua flag, e.g. --steps 6 --bf16 --hidden-size 512]
#
# Runs on 2 processes: DP=2 all-reduce, DP=2 all-reduce without overlap, DP=2 distributed optimizer,
# TP=2, PP=2, EP=2 (MoE layers; the all-to-all volume also against evenly spread routing's; then with
# shared experts, blocking and overlapping the all-to-alls, with the share of all-to-all time hidden); with
# --np4 also on 4: TP=2 x DP=2 distributed optimizer, PP=2 x DP=2 distributed optimizer, TP=2 x PP=2,
# EP=2 x DP=4 distributed optimizer. Not part of `make test`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FOUR=
ARGS=()
while [ $# -gt 0 ]; do
  case $1 in
    --np4) FOUR=1; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
[ -x "$ROOT/pmp" ] || { echo "bench_dist: build pmp first (make)" >&2; exit 1; }
command -v mpirun >/dev/null || { echo "bench_dist: needs mpirun (Open MPI)" >&2; exit 1; }

MPI=(mpirun --oversubscribe --bind-to none --mca btl_vader_single_copy_mechanism none)
[ "$(id -u)" = 0 ] && MPI+=(--allow-run-as-root)
run() {
  local np=$1
  shift
  (cd "$ROOT" && "${MPI[@]}" -np "$np" ./pmp tools/bench_dist.lua "$@" ${ARGS[@]+"${ARGS[@]}"})
}

CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
echo "bench_dist: $(nproc) cores ($CPU); bytes sent per rank per step, measured vs expected;"
echo "  hidden = 1 - (time finish_grad_sync waited) / (time the communication thread spent in the step's collectives)"
run 2
run 2 --no-overlap
run 2 --distributed-optimizer
run 2 --tp 2
run 2 --pp 2
run 2 --ep 2
run 2 --ep 2 --moe-shared-expert-intermediate-size 704
run 2 --ep 2 --moe-shared-expert-intermediate-size 704 --moe-shared-expert-overlap
if [ -n "$FOUR" ]; then
  run 4 --tp 2 --distributed-optimizer
  run 4 --pp 2 --distributed-optimizer
  run 4 --tp 2 --pp 2
  run 4 --ep 2 --distributed-optimizer
fi
