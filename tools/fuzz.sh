#!/usr/bin/env bash
# Fuzzes pmp's parsers of outside bytes with libFuzzer (clang, libclang-rt-14-dev), the engine built
# with ASan + UBSan: tools/fuzz/fuzz_lua.c drives the targets of tools/fuzz/targets.lua. Seed corpora
# come from the spec fixtures; findings (crash-*, leak-*, timeout-*) land in build/fuzz/findings/.
#
#   tools/fuzz.sh [--seconds 60] [TARGET ...]        (make fuzz; targets: all of targets.lua)
#
# Prints one line per target: executions, coverage, findings.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SECONDS_EACH=60
TARGETS=()
while [ $# -gt 0 ]; do
  case $1 in
    --seconds) SECONDS_EACH=$2; shift 2 ;;
    *) TARGETS+=("$1"); shift ;;
  esac
done
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=(json safetensors indexed chat_template tokenizer_json split_regex encode sentencepiece tiktoken pickle)

cd "$ROOT"
FLAGS="-fsanitize=fuzzer-no-link,address,undefined -fno-omit-frame-pointer -fopenmp=libgomp"
# The numeric kernels (core/cpu/, dtype conversion) use GCC features clang 14 lacks (_Float16 on x86,
# __builtin_shuffle, AMX intrinsics by function attribute) and parse nothing: they are built by gcc
# without instrumentation; everything else by clang with the sanitizers and libFuzzer's coverage.
CFLAGS_GCC=$(make --no-print-directory -s print-cflags)
for src in $(find core/cpu -name '*.c') core/tensor/dtype.c; do
  obj=build/fuzz/${src%.c}.o
  mkdir -p "$(dirname "$obj")"
  extra=
  case $src in core/cpu/cpu_attention.c) extra=-ffp-contract=fast ;; core/cpu/cpu_optim.c) extra=-fno-math-errno ;; esac
  # rebuilt as make would (source or any header newer), so that make never rebuilds it with clang
  if [ ! "$obj" -nt "$src" ] || [ -n "$(find core -name '*.h' -newer "$obj" | head -1)" ]; then
    gcc $CFLAGS_GCC $extra -c -o "$obj" "$src" || exit 1
  fi
done
make --no-print-directory CC=clang BUILD=build/fuzz EXE=build/fuzz/pmp-unused SANITIZE_FLAGS="$FLAGS" -j2 \
  build/fuzz/libpmpcore.a build/fuzz/core/host/runtime.o build/fuzz/core/host/interrupt.o >/dev/null 2>&1 ||
  { echo "fuzz: the instrumented build failed (make CC=clang BUILD=build/fuzz ...)" >&2; exit 1; }
LIBS=$(make --no-print-directory -s print-ldlibs)
clang -O1 -g -fsanitize=fuzzer,address,undefined -fno-omit-frame-pointer -fopenmp=libgomp -rdynamic -Icore \
  $(pkg-config --cflags luajit) -o build/fuzz/fuzz_lua tools/fuzz/fuzz_lua.c \
  build/fuzz/core/host/runtime.o build/fuzz/core/host/interrupt.o \
  -Wl,--whole-archive build/fuzz/libpmpcore.a -Wl,--no-whole-archive $LIBS || exit 1

# Seeds: the fixtures each parser reads in the specs.
seed() {
  local dir=build/fuzz/corpus/$1; shift
  mkdir -p "$dir"
  for f in "$@"; do [ -f "$f" ] && cp "$f" "$dir/seed-$(basename "$f")-$(cksum <"$f" | cut -d' ' -f1)"; done
}
seed json spec/fixtures/*/expected.json spec/fixtures/tokenizer_added_tokens.json spec/fixtures/hf/*/config.json
seed safetensors spec/fixtures/safetensors/*.safetensors spec/fixtures/hf/llama/model.safetensors
seed indexed spec/fixtures/indexed/*.idx spec/fixtures/gpt_dataset/*.idx
seed tokenizer_json spec/fixtures/tokenizer_added_tokens.json
seed sentencepiece $(find spec/fixtures -name '*.model' | head -8)
seed tiktoken $(find spec/fixtures -name '*.tiktoken' | head -4)
mkdir -p build/fuzz/corpus/pickle
for pt in $(find spec/fixtures -name '*.pt' | head -6); do
  unzip -p "$pt" '*/data.pkl' > "build/fuzz/corpus/pickle/seed-$(cksum <"$pt" | cut -d' ' -f1)" 2>/dev/null
done
mkdir -p build/fuzz/corpus/chat_template build/fuzz/corpus/split_regex build/fuzz/corpus/encode
luajit -e '
  local n = 0
  for line in io.lines("spec/fixtures/chat_templates/jinja_cases.jsonl") do
    local template = line:match([["template"%s*:%s*"(.-[^\])"]])
    if template then
      n = n + 1
      local f = io.open("build/fuzz/corpus/chat_template/seed-" .. n, "w")
      f:write((template:gsub("\\n", "\n"):gsub([[\"]], [["]]))); f:close()
    end
  end'
printf '%s' "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+" > build/fuzz/corpus/split_regex/seed-gpt2
printf '%s' '(?i:'"'"'s|'"'"'t)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}' > build/fuzz/corpus/split_regex/seed-llama3
head -c 2000 ../shared/data/tinyshakespeare.txt > build/fuzz/corpus/encode/seed-text 2>/dev/null
printf '\x01Grüße, 世界! ＡＢＣ ﬁ \xff\xfe bad utf8' > build/fuzz/corpus/encode/seed-mixed

mkdir -p build/fuzz/findings
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:symbolize=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
status=0
for target in "${TARGETS[@]}"; do
  log=build/fuzz/$target.log
  PMP_PATH=$ROOT PMP_FUZZ_TARGET=$target build/fuzz/fuzz_lua -max_total_time="$SECONDS_EACH" -timeout=20 -rss_limit_mb=4096 \
    -max_len=65536 -artifact_prefix="build/fuzz/findings/$target-" -print_final_stats=1 \
    "build/fuzz/corpus/$target" >"$log" 2>&1
  code=$?
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$')
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1)
  if [ $code -eq 0 ]; then verdict=clean; else verdict="FINDING (exit $code, see $log)"; status=1; fi
  printf 'fuzz %-15s %10s executions in %ss, %s: %s\n' "$target" "${runs:-?}" "$SECONDS_EACH" "${cov:-cov: ?}" "$verdict"
done
exit $status
