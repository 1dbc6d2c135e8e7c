#!/bin/sh
# make test-reference: the checks against the Python reference implementations that `make test` does
# not run because they need packages from PyPI (pip install torch transformers safetensors megatron-core
# tensorboard peft). Run it before resolving any change to how pmp reads or writes other tools' formats.
# Stops at the first failure; ends with "all reference checks passed".
set -eu
cd "$(dirname "$0")/.."

need() {
  python3 -c "import $1" 2>/dev/null || { echo "test-reference: python3 cannot import $1 (pip install $2)" >&2; exit 1; }
}
need torch torch
need transformers transformers
need safetensors safetensors
need megatron.core megatron-core
need tensorboard tensorboard
need peft peft

echo '== transformers (or a tools/ reference) loads what pmp save_pretrained wrote (spec/hf_models_spec.lua, spec/hf_score_spec.lua, spec/zoo_rotary_spec.lua, spec/moe_models_spec.lua, PMP_HF_CHECK=1)'
PMP_HF_CHECK=1 ./pmp spec/run.lua spec/hf_models_spec.lua spec/hf_score_spec.lua spec/zoo_rotary_spec.lua spec/moe_models_spec.lua

echo '== transformers loads what pmp wrote for OPT, GPT-BigCode, StarCoder 2 and Falcon (spec/zoo_ln_spec.lua, PMP_HF_CHECK=1)'
PMP_HF_CHECK=1 ./pmp spec/run.lua spec/zoo_ln_spec.lua

echo '== PEFT applies pmp'"'"'s LoRA adapters to pmp'"'"'s logits, transformers reads merged exports (spec/lora_spec.lua, PMP_HF_CHECK=1)'
PMP_HF_CHECK=1 ./pmp spec/run.lua spec/lora_spec.lua

echo '== transformers (BLOOM) and tools/baichuan_reference.py load what pmp save_pretrained wrote (spec/zoo_alibi_spec.lua, PMP_HF_CHECK=1)'
PMP_HF_CHECK=1 ./pmp spec/run.lua spec/zoo_alibi_spec.lua

echo '== Megatron-Core loads the Megatron checkpoints pmp wrote (spec/megatron_checkpoint_spec.lua, PMP_MEGATRON_CHECK=1)'
PMP_MEGATRON_CHECK=1 ./pmp spec/run.lua spec/megatron_checkpoint_spec.lua

echo '== the safetensors library reads files pmp wrote (tools/make_safetensors_fixtures.py --verify)'
python3 tools/make_safetensors_fixtures.py --verify

echo '== megatron-core reads pmp indexed datasets and builds the same GPT samples (tools/check_indexed_megatron.py)'
python3 tools/check_indexed_megatron.py

echo '== TensorBoard reads the scalars pmp.tensorboard wrote (tools/check_tensorboard.py)'
logs=$(mktemp -d /tmp/pmp-reference-tb.XXXXXX)
trap 'rm -rf "$logs"' EXIT
./pmp -e "local tb = pmp.tensorboard.writer('$logs'); tb:add_scalar('lm loss', 0.5, 1); tb:add_scalar('lm loss', 0.25, 2); tb:close()"
read_back=$(python3 tools/check_tensorboard.py "$logs")
expected=$(printf 'lm loss\n  1 0.5\n  2 0.25')
if [ "$read_back" != "$expected" ]; then
  printf 'test-reference: TensorBoard read back\n%s\ninstead of\n%s\n' "$read_back" "$expected" >&2
  exit 1
fi

echo 'all reference checks passed'
