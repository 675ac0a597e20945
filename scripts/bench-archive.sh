#!/usr/bin/env bash
# Appends' latency on the local 3-node cluster with the Postgres archive off and on,
# alternating runs on fresh clusters, plus the archive's lag per event (Postgres commit
# minus inserted_at, from the nodes' starcite_archive_lag_seconds histograms) and how
# long the archive takes to confirm everything after the load stops.
#
#   scripts/bench-archive.sh [RATE] [RUNS] [DURATION]      (defaults: 3000 3 20s)
#
# Needs a release build (cargo build --release --workspace) and a throw-away Postgres
# (`source scripts/test-postgres.sh start` exports STARCITE_TEST_POSTGRES_URL). Prints
# one line per run and the median p99 of each mode (docs/benchmarks.md).
set -euo pipefail
RATE="${1:-3000}"
RUNS="${2:-3}"
DURATION="${3:-20s}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${STARCITE_TEST_POSTGRES_URL:?source scripts/test-postgres.sh start first}"
ADMIN_URL="$STARCITE_TEST_POSTGRES_URL"
BASE_URL="${ADMIN_URL%/*}"
export STARCITE_CLUSTER_DIR="${STARCITE_CLUSTER_DIR:-/var/tmp/starcite-bench-archive}"
URLS="http://127.0.0.1:4001,http://127.0.0.1:4002,http://127.0.0.1:4003"

psql_admin() { runuser -u postgres -- psql -q -X "$ADMIN_URL" -c "$1" >/dev/null; }

# Sum of one metric over the three nodes.
metric_sum() {
  local name="$1" n total=0 v
  for n in 1 2 3; do
    v=$(curl -s "http://127.0.0.1:400$n/metrics" | awk -v m="$name" '$1 == m { print $2 }')
    total=$(python3 -c "print(${total} + ${v:-0})")
  done
  echo "$total"
}

# The archive lag histogram of the three nodes merged: p50/p99 as bucket upper bounds.
lag_quantiles() {
  python3 - <<'EOF'
import urllib.request, re
buckets = {}
for n in (1, 2, 3):
    text = urllib.request.urlopen(f"http://127.0.0.1:400{n}/metrics").read().decode()
    for m in re.finditer(r'starcite_archive_lag_seconds_bucket\{le="([^"]+)"\} (\d+)', text):
        buckets[m.group(1)] = buckets.get(m.group(1), 0) + int(m.group(2))
total = buckets.get("+Inf", 0)
def q(p):
    for le, c in sorted(((float(k) if k != "+Inf" else float("inf")), v) for k, v in buckets.items()):
        if c >= p * total:
            return "≤%gms" % (le * 1000) if le != float("inf") else ">5s"
    return "-"
print(f"lag p50 {q(0.5)} p99 {q(0.99)} p99.9 {q(0.999)} events {total}")
EOF
}

declare -A P99S
for run in $(seq 1 "$RUNS"); do
  for mode in off on; do
    "$ROOT/scripts/cluster.sh" stop >/dev/null 2>&1 || true
    rm -rf "$STARCITE_CLUSTER_DIR"
    if [[ "$mode" == on ]]; then
      psql_admin "DROP DATABASE IF EXISTS bench_archive"
      psql_admin "CREATE DATABASE bench_archive"
      export STARCITE_POSTGRES_URL="$BASE_URL/bench_archive"
    else
      unset STARCITE_POSTGRES_URL
    fi
    "$ROOT/scripts/cluster.sh" start >/dev/null
    out=$("$ROOT/target/release/starcite-bench" --url "$URLS" --rate "$RATE" \
      --duration "$DURATION" --warmup 5s --sessions 1024 --connections 66 \
      --payload-bytes 1024 --json | tail -n 1)
    p99=$(python3 -c "import json,sys; j=json.loads(sys.argv[1]); print(j['latency_ms']['p99'])" "$out")
    line=$(python3 -c "import json,sys; j=json.loads(sys.argv[1]); l=j['latency_ms']; print('rate %.0f/s p50 %s p90 %s p99 %s p99.9 %s errors %s' % (j['achieved_rate'], l['p50'], l['p90'], l['p99'], l['p99_9'], j['errors']))" "$out")
    P99S[$mode]="${P99S[$mode]:-} $p99"
    extra=""
    if [[ "$mode" == on ]]; then
      start=$(date +%s.%N)
      while :; do
        behind=$(metric_sum starcite_archive_events_behind)
        [[ "${behind%.*}" == 0 ]] && break
        if python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) - float(sys.argv[2]) > 120 else 1)" "$(date +%s.%N)" "$start"; then
          extra="NOT CAUGHT UP after 120 s ($behind behind)"
          break
        fi
        sleep 0.2
      done
      caught=$(python3 -c "import sys; print('%.1f' % (float(sys.argv[1]) - float(sys.argv[2])))" "$(date +%s.%N)" "$start")
      rows=$(runuser -u postgres -- psql -tA -X "$BASE_URL/bench_archive" -c "select count(*) from events")
      extra="$extra $(lag_quantiles) | caught up ${caught}s after the load | rows $rows"
    fi
    echo "run $run archive $mode: $line $extra"
  done
done
"$ROOT/scripts/cluster.sh" stop >/dev/null 2>&1 || true
for mode in off on; do
  echo "archive $mode: p99 ms per run:${P99S[$mode]} median $(python3 -c "import statistics,sys; print(statistics.median(map(float, sys.argv[1:])))" ${P99S[$mode]})"
done
