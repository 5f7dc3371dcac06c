#!/usr/bin/env bash
# Fuzzes the edge's input decoders with libFuzzer (cargo fuzz), each target for a bounded
# time, and prints executions and crashes per target.
#
#   scripts/fuzz.sh [seconds-per-target] [target ...]      (default 60 s, every target)
#
# cargo-fuzz needs nightly-only flags (-Zsanitizer=address); the machine has one stable
# toolchain, so the flags are unlocked with RUSTC_BOOTSTRAP=1 (the stable toolchain ships
# the ASan runtime). Seeds are in fuzz/corpus/<target> (the growing corpus lives in the target dir); crashes
# land in fuzz/artifacts.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-60}"
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${BEACON_FUZZ_TARGET_DIR:-$HOME/.cache/beacon-fuzz-target}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
status=0
shift || true
TARGETS="${*:-rsocket_frames snowplow ga4 plausible plugin_changes packed metrics_request sql_front}"
for target in $TARGETS; do
  # The checked-in seeds stay as they are; libFuzzer grows a working copy.
  corpus="$CARGO_TARGET_DIR/corpus/$target"
  mkdir -p "$corpus" "fuzz/artifacts/$target"
  cp -n fuzz/corpus/"$target"/* "$corpus"/ 2>/dev/null || true
  log="$(mktemp)"
  if cargo fuzz run --fuzz-dir fuzz "$target" "$corpus" -- \
      -max_total_time="$SECS" -max_len=65536 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    result="no crash"
  else
    result="CRASH (see fuzz/artifacts/$target)"; status=1
  fi
  execs="$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' || true)"
  [ -n "$execs" ] || execs="$(grep -Eo '^#[0-9]+' "$log" | tail -1 | tr -d '#')"
  echo "$target: ${execs:-?} executions in ${SECS}s, $result"
  [ "$status" = 0 ] || tail -40 "$log"
  rm -f "$log"
done
exit "$status"
