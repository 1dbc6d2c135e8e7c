#!/bin/sh
# The GPU check for a lent GPU machine (one short run): builds pmp and the CUDA backend, runs the GPU
# specs and prints a table. Usage: tools/gpu_check.sh   (from the repository root)
set -u
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
make -s pmp cuda >/tmp/pmp_gpu_build.log 2>&1 || { echo "BUILD FAILED"; tail -30 /tmp/pmp_gpu_build.log; exit 1; }
printf '%-40s %s\n' "check" "result"
./pmp spec/gpu/nccl_check.lua 2>&1 | sed -n 's/^CHECK //p; /rror/p'
