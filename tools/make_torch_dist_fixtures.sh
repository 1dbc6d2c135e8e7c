#!/bin/sh
# Writes spec/fixtures/megatron_torch_dist/: Megatron-Core's torch_dist checkpoints (--ckpt-format
# torch_dist) of the small GPT model of tools/megatron_reference.py in two layouts with the layers
# stacked under one key per weight, and one (per_layer_tp1_pp2) with each layer under its own keys, each
# with its logits of a fixed batch (reference.json). Needs torch and megatron-core (pip install megatron-core); runs on
# the CPU with gloo. tp1_pp1 regenerates byte for byte; the .metadata of a layout of several ranks lists
# storage_data in the order their writer threads finish (equal contents, another order at times).
set -eu
cd "$(dirname "$0")/.."
out=spec/fixtures/megatron_torch_dist
rm -rf "$out"
for layout in "1 1" "2 2"; do
  set -- $layout
  dir="$out/tp$1_pp$2"
  torchrun --nproc-per-node $(($1 * $2)) tools/megatron_reference.py write "$dir" --tp "$1" --pp "$2" --format torch_dist
done
torchrun --nproc-per-node 2 tools/megatron_reference.py write "$out/per_layer_tp1_pp2" --tp 1 --pp 2 \
  --format torch_dist --non-homogeneous-layers
du -sh "$out"
