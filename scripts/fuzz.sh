#!/usr/bin/env bash
# Fuzzes every decoder of outside input (fuzz/: the ring's stream framing, the credentials in
# headers, the coordinator's decisions, the config loader, the IDX/NPY/CSV converters, the
# Parquet reader) for SECONDS each, starting from the checked-in corpora, and reports
# executions and findings per target. A crash, a leak of memory over 2 GiB or an input slower
# than 10 s fails the script; the input is left in fuzz/artifacts/<target>/ and
# `cargo fuzz fmt <target> <file>` shows it.
#
#   scripts/fuzz.sh [SECONDS] [TARGET…]        # default: 60 s, every target
#
# Runs on stable Rust (no sanitizer: the code under test is safe Rust, so what the fuzzer
# looks for is panics, unbounded allocations and hangs). Installs cargo-fuzz if missing. Each
# target starts from its seeds (fuzz/corpus/<target>/) and the inputs earlier runs found
# (fuzz/corpus/found.tar.gz), in a scratch folder (ELBO_FUZZ_KEEP=DIR names it and keeps it).
# ELBO_FUZZ_SAVE=1: after a run without findings, minimize each corpus (`cargo fuzz cmin`) and
# write the archive anew.
set -euo pipefail
# cargo-fuzz asks for one codegen unit; the later flag wins. With opt-level 1 (fuzz/Cargo.toml)
# the build from scratch took 9.0 min on 2 cores, against 9.5 with cargo-fuzz's defaults.
export RUSTFLAGS="${RUSTFLAGS:-} -Ccodegen-units=16"
cd "$(dirname "$0")/.."

seconds=${1:-60}
shift || true
case $seconds in '' | *[!0-9]*)
  echo "error: SECONDS must be a whole number, got '$seconds'" >&2
  exit 2
  ;;
esac

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --version 0.13.2 --locked --quiet
fi

all=$(cargo fuzz list --fuzz-dir fuzz)
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets <<<"$all"
fi
for t in "${targets[@]}"; do
  grep -qx "$t" <<<"$all" || {
    echo "error: no fuzz target '$t'; the targets are: $(echo $all)" >&2
    exit 2
  }
done

scratch=${ELBO_FUZZ_KEEP:-$(mktemp -d)}
mkdir -p "$scratch"
echo "== building the fuzz targets"
cargo fuzz build --fuzz-dir fuzz --sanitizer none >"$scratch/build.log" 2>&1 || {
  tail -40 "$scratch/build.log" >&2
  exit 1
}
failed=()
printf '%-20s %12s %10s %8s %8s  %s\n' target executions 'exec/s' corpus new finding
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t" "fuzz/artifacts/$t"
  cp -n fuzz/corpus/"$t"/* "$scratch/$t/" 2>/dev/null || true
  if [ -f fuzz/corpus/found.tar.gz ] && tar -tzf fuzz/corpus/found.tar.gz "$t/" >/dev/null 2>&1; then
    tar -xzf fuzz/corpus/found.tar.gz -C "$scratch" --skip-old-files "$t/"
  fi
  before=$(ls "$scratch/$t" | wc -l)
  log="$scratch/$t.log"
  status=0
  cargo fuzz run --fuzz-dir fuzz --sanitizer none "$t" "$scratch/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    -artifact_prefix="fuzz/artifacts/$t/" >"$log" 2>&1 || status=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  after=$(ls "$scratch/$t" | wc -l)
  finding=none
  if [ "$status" != 0 ]; then
    finding=$(grep -m1 -oE 'Test unit written to .*' "$log" | sed 's/Test unit written to //')
    finding=${finding:-"exit $status (see $log)"}
    failed+=("$t")
  fi
  printf '%-20s %12s %10s %8s %8s  %s\n' "$t" "${execs:-?}" "${rate:-?}" "$after" \
    "$((after - before))" "$finding"
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "error: findings in: ${failed[*]}" >&2
  for t in "${failed[@]}"; do
    echo "--- $t" >&2
    grep -E -m5 "panicked at|ERROR: libFuzzer|out-of-memory|timeout" "$scratch/$t.log" >&2 || true
  done
  exit 1
fi
if [ "${ELBO_FUZZ_SAVE:-}" = 1 ]; then
  echo "== minimizing the corpora into fuzz/corpus/found.tar.gz"
  for t in "${targets[@]}"; do
    cargo fuzz cmin --fuzz-dir fuzz --sanitizer none "$t" "$scratch/$t" -- -rss_limit_mb=2048 \
      -timeout=10 >"$scratch/$t.cmin.log" 2>&1
  done
  # Targets not run this time keep what the archive held.
  [ -f fuzz/corpus/found.tar.gz ] && tar -xzf fuzz/corpus/found.tar.gz -C "$scratch" --skip-old-files
  mapfile -t kept < <(cd "$scratch" && for t in $all; do [ -d "$t" ] && echo "$t"; done)
  tar --sort=name --mtime=2026-01-01 --owner=0 --group=0 --numeric-owner \
    -czf fuzz/corpus/found.tar.gz -C "$scratch" "${kept[@]}"
  ls -l fuzz/corpus/found.tar.gz
fi
