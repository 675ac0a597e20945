#!/usr/bin/env bash
# Memory per session (issue 11, item 14): starts a node, then in steps creates
# sessions with one small event each (starcite-bench: setup creates the sessions, the
# load appends one event to each), and prints the node's RSS after every step and the
# marginal bytes per session between steps. The node keeps 1 MiB of hot events per shard
# (`--hot-bytes-per-shard`), so the figure is what a session costs beyond its hot window;
# costs bounded per group (Raft's in-memory log: 1,024 entries per group) stop growing
# after the first step, so the slope of the later steps is what one more session costs.
#
#   scripts/session_memory.sh [--step N] [--steps K] [--shards S] [--rate R]
#
# Needs release builds of `starcite` and `starcite-bench` in ${CARGO_TARGET_DIR:-target}.
# Defaults: 4 steps of 250,000 sessions (1,000,000 in all), 2 shards, 10,000 appends/s.
set -euo pipefail
cd "$(dirname "$0")/.."

step=250000 steps=4 shards=2 rate=10000 port=4790
while [ $# -gt 0 ]; do
  case "$1" in
    --step) step="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --shards) shards="$2"; shift 2 ;;
    --rate) rate="$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "session_memory: unknown option $1" >&2; exit 2 ;;
  esac
done
bin="${CARGO_TARGET_DIR:-target}/release"
for b in starcite starcite-bench; do
  [ -x "$bin/$b" ] || { echo "session_memory: build $bin/$b first (cargo build --release -p starcite -p starcite-bench)" >&2; exit 2; }
done

data=$(mktemp -d /tmp/starcite-session-memory.XXXXXX)
"$bin/starcite" serve --data-dir "$data" --http-addr "127.0.0.1:$port" --shards "$shards" \
  --hot-bytes-per-shard 1048576 \
  >"$data/node.log" 2>&1 &
pid=$!
cleanup() { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$data"; }
trap cleanup EXIT
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$port/health/ready" >/dev/null && break
  sleep 0.1
done

rss() { awk '/^VmRSS/ {print $2 * 1024}' "/proc/$pid/status"; }
before=$(rss)
echo "sessions 0: rss $before B"
prev=$before
for k in $(seq 1 "$steps"); do
  # At least one append per session: append i goes to session i % step, and the
  # schedule holds 1.25 x step appends, so a load generator that falls behind still
  # reaches every session (unsent requests are the last ones).
  secs=$(( (step * 5 / 4 + rate - 1) / rate ))
  "$bin/starcite-bench" --url "http://127.0.0.1:$port" --sessions "$step" --rate "$rate" \
    --duration "${secs}s" --warmup 0s --payload-bytes 64 --session-prefix "m$k" \
    --connections 32 >"$data/bench-$k.log" 2>&1 || { cat "$data/bench-$k.log"; exit 1; }
  grep -E "^ok|achieved|errors" "$data/bench-$k.log" | tr '\n' ' '; echo
  now=$(rss)
  echo "sessions $(( k * step )): rss $now B, +$(( (now - prev) / step )) B per session in this step, $(( (now - before) / (k * step) )) B per session overall"
  prev=$now
done
