#!/usr/bin/env bash
# A local 3-node Starcite cluster on 127.0.0.1 (docs/local-testing.md).
#
#   scripts/cluster.sh start [serve flags...]  start every node that is not running (so it
#                                             also brings back a killed node), wait until
#                                             all answer 200 on /health/ready
#   scripts/cluster.sh stop                    SIGTERM every node, SIGKILL after a while
#   scripts/cluster.sh status                  pid, up and ready per node; leader of group 0
#
# Node n: HTTP 127.0.0.1:400n, peer port 127.0.0.1:4n01, one shard, data dir
# $STARCITE_CLUSTER_DIR/noden, log noden.log and pid file noden.pid next to it.
# STARCITE_CLUSTER_DIR defaults to cluster-data/ at the repository root. The flags given
# after `start` go to every node started by that call; other STARCITE_* variables of the
# environment (e.g. STARCITE_TEST_FSYNC_DELAY_MS) reach every node too.
set -euo pipefail

readonly NODES=3
readonly CLUSTER_ID="starcite-local"
readonly PEERS="1=127.0.0.1:4101,2=127.0.0.1:4201,3=127.0.0.1:4301"
readonly READY_TIMEOUT_S="${STARCITE_CLUSTER_READY_TIMEOUT_S:-30}"
# Graceful shutdown hands leadership over and waits for in-flight writes (--shutdown-timeout
# is 10 s by default), so give SIGTERM a little longer than that.
readonly STOP_TIMEOUT_S="${STARCITE_CLUSTER_STOP_TIMEOUT_S:-15}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
CLUSTER_DIR="$(realpath -m "${STARCITE_CLUSTER_DIR:-$ROOT/cluster-data}")"
readonly CLUSTER_DIR
readonly BIN="${STARCITE_BIN:-$ROOT/target/release/starcite}"
# Three nodes share this machine's cores: spinning before parking (the single-node
# default of 50 us) steals CPU from the other nodes. Measured on 2 cores at 4,000
# appends/s: p99 22-29 ms without spinning vs 61-1,208 ms with it (docs/benchmarks.md).
export STARCITE_SPIN_BEFORE_PARK_US="${STARCITE_SPIN_BEFORE_PARK_US:-0}"

http_port() { echo "400$1"; }
peer_addr() { echo "127.0.0.1:4${1}01"; }
url() { echo "http://127.0.0.1:$(http_port "$1")"; }
pid_file() { echo "$CLUSTER_DIR/node$1.pid"; }

# The pid of node $1 when its process runs (and is a starcite process), else nothing.
running_pid() {
  local file pid
  file="$(pid_file "$1")"
  [[ -f "$file" ]] || return 0
  pid="$(<"$file")"
  if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null \
    && grep -qa starcite "/proc/$pid/cmdline" 2>/dev/null; then
    echo "$pid"
  fi
}

# HTTP status of GET $1 (000 when the node does not answer).
http_code() {
  curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1" || true
}

start_node() {
  local n="$1"
  shift
  mkdir -p "$CLUSTER_DIR/node$n"
  echo "=== $(date -u +%FT%TZ) start node $n $*" >>"$CLUSTER_DIR/node$n.log"
  nohup "$BIN" serve \
    --http-addr "127.0.0.1:$(http_port "$n")" \
    --data-dir "$CLUSTER_DIR/node$n" \
    --shards 1 \
    --node-id "$n" \
    --cluster-id "$CLUSTER_ID" \
    --peer-addr "$(peer_addr "$n")" \
    --peers "$PEERS" \
    "$@" >>"$CLUSTER_DIR/node$n.log" 2>&1 </dev/null &
  echo "$!" >"$(pid_file "$n")"
}

# Waits until every node answers 200 on /health/ready; fails when a node dies or the
# time is up.
wait_ready() {
  local deadline=$((SECONDS + READY_TIMEOUT_S)) n pending
  while :; do
    pending=""
    for n in $(seq 1 "$NODES"); do
      if [[ -z "$(running_pid "$n")" ]]; then
        echo "node $n exited; the end of $CLUSTER_DIR/node$n.log:" >&2
        tail -n 20 "$CLUSTER_DIR/node$n.log" >&2
        return 1
      fi
      if [[ "$(http_code "$(url "$n")/health/ready")" != 200 ]]; then
        pending+=" $n"
      fi
    done
    [[ -z "$pending" ]] && return 0
    if ((SECONDS >= deadline)); then
      echo "not ready after ${READY_TIMEOUT_S}s: node(s)$pending" >&2
      for n in $pending; do
        echo "node $n /health/ready: $(curl -s --max-time 2 "$(url "$n")/health/ready" || true)" >&2
      done
      echo "logs: $CLUSTER_DIR/node*.log; stop with: $0 stop" >&2
      return 1
    fi
    sleep 0.2
  done
}

cmd_start() {
  command -v curl >/dev/null || { echo "cluster.sh needs curl" >&2; exit 1; }
  if [[ ! -x "$BIN" ]]; then
    (cd "$ROOT" && cargo build --release --bin starcite)
  fi
  mkdir -p "$CLUSTER_DIR"
  local n pid
  for n in $(seq 1 "$NODES"); do
    pid="$(running_pid "$n")"
    if [[ -n "$pid" ]]; then
      echo "node $n already runs (pid $pid)"
    else
      start_node "$n" "$@"
      echo "node $n started (pid $(<"$(pid_file "$n")"))"
    fi
  done
  wait_ready
  echo "cluster ready (data and logs in $CLUSTER_DIR):"
  for n in $(seq 1 "$NODES"); do
    echo "  node $n  $(url "$n")  peer $(peer_addr "$n")"
  done
}

cmd_stop() {
  local n pid pids=()
  for n in $(seq 1 "$NODES"); do
    pid="$(running_pid "$n")"
    if [[ -n "$pid" ]]; then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  local deadline=$((SECONDS + STOP_TIMEOUT_S)) alive
  while :; do
    alive=()
    for pid in ${pids[@]+"${pids[@]}"}; do
      if kill -0 "$pid" 2>/dev/null; then alive+=("$pid"); fi
    done
    ((${#alive[@]} == 0)) && break
    if ((SECONDS >= deadline)); then
      echo "still running after ${STOP_TIMEOUT_S}s, SIGKILL: ${alive[*]}" >&2
      kill -KILL "${alive[@]}" 2>/dev/null || true
      break
    fi
    sleep 0.1
  done
  for n in $(seq 1 "$NODES"); do
    rm -f "$(pid_file "$n")"
  done
  echo "cluster stopped (${#pids[@]} node(s) were running)"
}

# Prints each node's state; exits 1 unless every node is up and ready.
cmd_status() {
  local n pid code all_ready=1
  printf '%-5s %-8s %-4s %-8s %s\n' node pid up ready url
  for n in $(seq 1 "$NODES"); do
    pid="$(running_pid "$n")"
    code="$(http_code "$(url "$n")/health/ready")"
    [[ -n "$pid" && "$code" == 200 ]] || all_ready=0
    printf '%-5s %-8s %-4s %-8s %s\n' "$n" "${pid:--}" "$([[ -n "$pid" ]] && echo yes || echo no)" \
      "$([[ "$code" == 200 ]] && echo yes || echo "no($code)")" "$(url "$n")"
  done
  local view=""
  for n in $(seq 1 "$NODES"); do
    view="$(curl -sf --max-time 2 "$(url "$n")/debug/groups/0" || true)"
    if [[ -n "$view" ]]; then
      echo "group 0 as node $n sees it: $(leader_summary "$view")"
      break
    fi
  done
  [[ -n "$view" ]] || echo "group 0: no node answers"
  ((all_ready == 1))
}

# The first `"name":value` member of JSON text $2 (the scalars come before "sessions").
json_field() {
  grep -o "\"$1\":[^,}]*" <<<"$2" | head -n 1 | cut -d: -f2- | tr -d ' ' || true
}

# "leader <id> term <t> commit_index <c>" from a /debug/groups/:g reply.
leader_summary() {
  echo "leader $(json_field leader "$1") term $(json_field term "$1")" \
    "commit_index $(json_field commit_index "$1")"
}

case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *)
    echo "usage: $0 start [serve flags...] | stop | status" >&2
    exit 2
    ;;
esac
