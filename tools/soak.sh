#!/usr/bin/env bash
# Soak test of "a stop never loses more than the user chose to risk": a pretraining run with a
# checkpoint after every iteration is killed with SIGKILL at random moments (during a step, a save,
# startup or the resume), restarted each time with --load on its own --save directory, and the run that
# finally completes must log, for its last iteration, exactly the loss of the same run never interrupted
# (pmp resumes bit-exactly: weights, optimizer, data position, generators).
#
#   tools/soak.sh [--kills 50] [--iters 1000] [--seed 1]      (make soak)
#
# Prints each kill, then "soak: N kills, final loss X (uninterrupted Y): same" and exits 0, or exits 1.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KILLS=50
ITERS=1000
SEED=1
while [ $# -gt 0 ]; do
  case $1 in
    --kills) KILLS=$2; shift 2 ;;
    --iters) ITERS=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    *) echo "soak: unknown argument $1" >&2; exit 2 ;;
  esac
done

WORK=$(mktemp -d /tmp/pmp-soak.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
ARGS=(recipes/pretrain.lua --num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 32
  --micro-batch-size 4 --global-batch-size 8 --train-iters "$ITERS" --log-interval 1 --eval-interval 0
  --sample-length 0 --save-interval 1 --hidden-dropout 0.1)
cd "$ROOT"

last_loss() { grep -o "iteration *$ITERS/ *$ITERS |.*lm loss: [0-9.E+-]*" "$1" | sed 's/.*lm loss: //' | tail -1; }

./pmp "${ARGS[@]}" --save "" >"$WORK/whole.log" 2>&1
WHOLE=$(last_loss "$WORK/whole.log")

RANDOM=$SEED
kills=0
while [ "$kills" -lt "$KILLS" ]; do
  ./pmp "${ARGS[@]}" --save "$WORK/ck" --load "$WORK/ck" >"$WORK/run.log" 2>&1 &
  pid=$!
  # one kill in five during startup or the resume; the others once it trains, 0 .. 1 s into the steps
  if [ $((RANDOM % 5)) -eq 0 ]; then
    sleep "$(printf '0.%02d' $((RANDOM % 100)))"
  else
    for _ in $(seq 1200); do
      grep -q ' iteration ' "$WORK/run.log" 2>/dev/null && break
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.05
    done
    sleep "$(printf '0.%02d' $((RANDOM % 100)))"
  fi
  if kill -9 "$pid" 2>/dev/null; then
    wait "$pid" 2>/dev/null || true
    kills=$((kills + 1))
    at=$(cat "$WORK/ck/latest_checkpointed_iteration.txt" 2>/dev/null || echo none)
    echo "soak: kill $kills, latest checkpoint $at"
    if [ "$at" = "$ITERS" ]; then
      echo "soak: the run completed between kills; rerun with more --iters" >&2
      exit 1
    fi
  else
    wait "$pid" || { echo "soak: the run failed:" >&2; tail -5 "$WORK/run.log" >&2; exit 1; }
    echo "soak: the run completed before kill $((kills + 1)); rerun with more --iters" >&2
    exit 1
  fi
done

./pmp "${ARGS[@]}" --save "$WORK/ck" --load "$WORK/ck" >"$WORK/final.log" 2>&1 ||
  { echo "soak: the final resume failed:" >&2; tail -5 "$WORK/final.log" >&2; exit 1; }
FINAL=$(last_loss "$WORK/final.log")
if [ "$at" = none ]; then
  echo "soak: no checkpoint was ever written between kills: the kills proved nothing" >&2
  exit 1
fi
if [ -n "$FINAL" ] && [ "$FINAL" = "$WHOLE" ]; then
  echo "soak: $kills kills (the last one at checkpoint $at), final loss $FINAL (uninterrupted $WHOLE): same"
else
  echo "soak: $kills kills, final loss ${FINAL:-none} (uninterrupted $WHOLE): DIFFERENT" >&2
  exit 1
fi
