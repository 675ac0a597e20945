#!/usr/bin/env bash
# Runs the coverage-guided fuzz targets of shards/fuzz (issue 10) with cargo-fuzz and
# libFuzzer, on the stable toolchain: RUSTC_BOOTSTRAP=1 lets it pass the -Z flags
# (sanitizer, coverage instrumentation) it needs. Installs cargo-fuzz when missing.
#
#   scripts/fuzz.sh [--seconds N | --runs N] [--jobs N] [TARGET...]
#
#   --seconds N   each target for N seconds (default: 30, what CI runs)
#   --runs N      each target on N inputs (the documented run: --runs 1000000)
#   --jobs N      run N targets at once, one libFuzzer process each (default: 1)
#   TARGET...     only these targets (default: all, listed below)
#
# Each target starts from its committed seeds (shards/fuzz/corpus/<target>/) and a
# working corpus it grows in $FUZZ_TARGET_DIR/corpus/<target>/, never committed. A
# crash stops the script with a non-zero exit; its input is saved under
# shards/fuzz/artifacts/<target>/ and replays with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir shards/fuzz TARGET ARTIFACT
# Full libFuzzer output: $FUZZ_TARGET_DIR/logs/<target>.log.
set -euo pipefail
cd "$(dirname "$0")/.."

limit=(-max_total_time=30)
jobs=1
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) limit=(-max_total_time="$2"); shift 2 ;;
    --runs) limit=(-runs="$2"); shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    -*) echo "fuzz: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
if [ ${#targets[@]} -eq 0 ]; then
  targets=(http_request query_string json_body tail_frames log_segment snapshot_file peer_frame
    forward_codec)
fi

export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  started=$(date +%s)
  cargo install --locked cargo-fuzz
  echo "fuzz: installed cargo-fuzz in $(( $(date +%s) - started )) s"
fi

target_dir="${FUZZ_TARGET_DIR:-$PWD/shards/fuzz/target}"
mkdir -p "$target_dir/logs"
build=(--fuzz-dir shards/fuzz --target-dir "$target_dir")
started=$(date +%s)
cargo fuzz build "${build[@]}"
echo "fuzz: built the targets in $(( $(date +%s) - started )) s"

# One target: its result line, or the end of its log and a failure.
run_target() {
  local target="$1" work="$target_dir/corpus/$1" log="$target_dir/logs/$1.log" started
  mkdir -p "$work"
  started=$(date +%s)
  # -timeout: an input that takes 10 s is a hang, reported like a crash.
  if ! cargo fuzz run "${build[@]}" "$target" "$work" "$PWD/shards/fuzz/corpus/$target" -- \
      "${limit[@]}" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "fuzz: $target FAILED (full output: $log)"
    return 1
  fi
  # The last status line: inputs run, coverage (cov: edges, ft: features), speed.
  local done_line
  done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true)
  echo "fuzz: $target ok in $(( $(date +%s) - started )) s: ${done_line:-no DONE line}"
}

started_all=$(date +%s)
pids=()
for target in "${targets[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do
    sleep 1
  done
  run_target "$target" &
  pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do
  wait "$pid" || failed=1
done
echo "fuzz: ran ${#targets[@]} targets in $(( $(date +%s) - started_all )) s"
exit "$failed"
