#!/usr/bin/env bash
# Coverage-guided fuzzing of the wire parsers (net/fuzz) with libFuzzer on
# the stable toolchain. Usage: tools/fuzz.sh [SECONDS_PER_TARGET] [TARGET..]
# (default 60 s each, every target). New inputs that add coverage land in
# net/fuzz/corpus/<target> (to commit), or with RINGKV_FUZZ_SCRATCH=1 in a
# temporary directory, so a CI run leaves the checkout clean; a crash leaves
# net/fuzz/crash-* and fails.
set -euo pipefail
cd "$(dirname "$0")/../net/fuzz"
secs="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(frames session versions)
triple="$(rustc -vV | sed -n 's/^host: //p')"
# What cargo-fuzz passes, minus the sanitizer (which needs nightly); the
# explicit --target keeps these flags off build scripts.
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares"
cargo build --release --quiet --target "$triple"
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  # libFuzzer writes new inputs to the first directory it is given.
  dirs=("corpus/$t")
  if [ "${RINGKV_FUZZ_SCRATCH:-0}" = 1 ]; then
    scratch="$(mktemp -d)"
    dirs=("$scratch" "corpus/$t")
  fi
  echo "== fuzz $t for ${secs}s"
  rc=0
  "target/$triple/release/$t" "${dirs[@]}" -max_total_time="$secs" -max_len=4096 -print_final_stats=1 \
    >"target/$t.log" 2>&1 || rc=$?
  grep -E '^(#[0-9]+.*DONE|stat::number_of_executed_units|stat::average_exec_per_sec|SUMMARY)' "target/$t.log" || true
  if [ "$rc" -ne 0 ]; then
    tail -40 "target/$t.log"
    echo "fuzz target $t failed (see net/fuzz/crash-* and net/fuzz/target/$t.log)" >&2
    exit 1
  fi
done
