#!/bin/sh
# Writes spec/fixtures/megatron/: Megatron-Core's own legacy torch checkpoints of one small GPT model
# (tools/megatron_reference.py write) in four layouts, each with its logits of a fixed batch
# (reference.json). Needs torch and megatron-core (pip install megatron-core); runs on the CPU.
set -eu
cd "$(dirname "$0")/.."
out=spec/fixtures/megatron
rm -rf "$out"
for layout in "1 1" "2 1" "1 2" "2 2"; do
  set -- $layout
  dir="$out/tp$1_pp$2"
  torchrun --nproc-per-node $(($1 * $2)) tools/megatron_reference.py write "$dir" --tp "$1" --pp "$2"
done
du -sh "$out"
