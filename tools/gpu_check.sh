#!/bin/sh
# The GPU check for a lent GPU machine (one short run): runs the GPU specs and prints a table.
#
#   tools/gpu_check.sh           # build here (needs the Debian dev packages), then check
#   tools/gpu_check.sh --bundle  # on the build machine: build, and copy ./pmp's non-system shared
#                                # libraries into .gpu/lib, so a bare GPU machine (no LuaJIT, BLIS or
#                                # MPI packages, no network) can run the prebuilt ./pmp
#   tools/gpu_check.sh --prebuilt  # on the GPU machine: use ./pmp, build/libpmp_cuda.so and .gpu/lib
#
# NCCL and the CUDA runtime always come from the GPU machine (its CUDA toolkit or its Python wheels).
set -u
cd "$(dirname "$0")/.."
mode=${1:-build}

if [ "$mode" = --bundle ]; then
  make -s pmp cuda || exit 1
  rm -rf .gpu && mkdir -p .gpu/lib
  # glibc, the GCC runtime and the CUDA libraries belong to the target machine.
  ldd ./pmp build/libpmp_cuda.so | awk '$3 ~ /^\// { print $3 }' | sort -u |
    grep -Ev '/(libc|libm|libdl|libpthread|librt|libmvec|libgcc_s|libstdc\+\+|ld-linux[^/]*|libcuda[^/]*|libnccl[^/]*)\.so' |
    while read -r lib; do cp -L "$lib" .gpu/lib/; done
  du -sh .gpu/lib
  exit 0
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
if [ "$mode" = --prebuilt ]; then
  [ -x ./pmp ] && [ -f build/libpmp_cuda.so ] && [ -d .gpu/lib ] || { echo "run tools/gpu_check.sh --bundle first"; exit 1; }
  nccl_dir=$(dirname "$(find /usr /opt -name 'libnccl.so.2' 2>/dev/null | head -1)")
  cudart_dir=$(dirname "$(find /usr /opt -name 'libcudart.so.1[0-9]*' 2>/dev/null | head -1)")
  export LD_LIBRARY_PATH="$PWD/.gpu/lib:$nccl_dir:$cudart_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "nccl from $nccl_dir, cudart from $cudart_dir"
  ./pmp -e 'print("pmp runs")' || exit 1
else
  make -s pmp cuda >/tmp/pmp_gpu_build.log 2>&1 || { echo "BUILD FAILED"; tail -30 /tmp/pmp_gpu_build.log; exit 1; }
fi
printf '%-40s %s\n' "check" "result"
./pmp spec/gpu/nccl_check.lua 2>&1 | sed 's/^CHECK //'
