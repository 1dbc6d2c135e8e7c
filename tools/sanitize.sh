#!/bin/sh
# Runs the spec suite (or the spec files given) on pmp-sanitize, the AddressSanitizer + LeakSanitizer +
# UndefinedBehaviorSanitizer build that `make sanitize` makes, child processes included (the specs'
# pmp and mpirun runs use PMP_SPEC_EXECUTABLE). Every process writes its reports to a file of its own
# (log_path): a report from a child whose failure a spec expects would otherwise go unseen. Exits
# non-zero when the suite fails or any process reported anything; prints the reports.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
reports=$(mktemp -d /tmp/pmp-sanitize.XXXXXX)
# LuaJIT allocates from its own mmap'd arenas, which ASan does not instrument; OpenMP workers and
# Open MPI keep their pools until exit, which LeakSanitizer sees through tools/sanitize.supp. Open MPI's
# plugins stay loaded to the end in pmp-sanitize (core/host/keep_libraries_loaded.c), so those frames have names.
export ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:abort_on_error=0:exitcode=86:log_path=$reports/asan:strict_string_checks=1:detect_stack_use_after_return=0"
export LSAN_OPTIONS="suppressions=$root/tools/sanitize.supp:print_suppressions=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=${PMP_UBSAN_HALT:-1}"
export PMP_SPEC_EXECUTABLE="$root/pmp-sanitize"
"$root/pmp-sanitize" "$root/spec/run.lua" "$@"
status=$?
found=0
for report in "$reports"/*; do
  [ -e "$report" ] || continue
  found=$((found + 1))
  echo "==== $report"
  cat "$report"
done
rm -rf "$reports"
echo "sanitize: spec suite exit status $status, $found sanitizer report(s)"
[ "$status" -eq 0 ] && [ "$found" -eq 0 ]
