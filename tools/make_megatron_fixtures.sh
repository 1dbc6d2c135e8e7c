#!/bin/sh
# Writes spec/fixtures/megatron/: Megatron-Core's own legacy torch checkpoints of one small GPT model
# (tools/megatron_reference.py write) in four layouts (and a GELU model with linear biases, and one trained with its Adam state), each with its logits of a fixed batch
# (reference.json), and a state dict of views into one storage (shared_storage.pt). Needs torch and
# megatron-core (pip install megatron-core); runs on the CPU.
set -eu
cd "$(dirname "$0")/.."
out=spec/fixtures/megatron
rm -rf "$out"
for layout in "1 1" "2 1" "1 2" "2 2"; do
  set -- $layout
  dir="$out/tp$1_pp$2"
  torchrun --nproc-per-node $(($1 * $2)) tools/megatron_reference.py write "$dir" --tp "$1" --pp "$2"
done
python3 tools/megatron_reference.py shared-storage "$out/shared_storage.pt"

# Megatron-LM's default MLP (GELU) and linear biases, one layout
torchrun --nproc-per-node 1 tools/megatron_reference.py write "$out/gelu_bias_tp1_pp1" --variant gelu_bias
# Megatron-Core's optimizer after two steps: the checkpoint with its Adam state, the loss after one more
torchrun --nproc-per-node 1 tools/megatron_reference.py write "$out/adam_tp1_pp1" --train
du -sh "$out"
