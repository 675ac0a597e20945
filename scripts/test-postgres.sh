#!/usr/bin/env bash
# A throw-away PostgreSQL cluster for tests: `source scripts/test-postgres.sh start`
# exports STARCITE_TEST_POSTGRES_URL; `scripts/test-postgres.sh stop` removes it.
# Installs PostgreSQL from Debian when it is missing. initdb refuses to run as root, so
# the cluster runs as the postgres user in a directory that user can reach.
set -euo pipefail
PG_PORT="${PG_PORT:-54329}"
PG_DIR="${PG_DIR:-/var/tmp/starcite-test-pg}"

pg_bin() {
  local bin
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$bin" ]; then
    apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
    bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  fi
  echo "$bin"
}

case "${1:-start}" in
  start)
    BIN=$(pg_bin)
    if [ -f "$PG_DIR/postmaster.pid" ]; then
      runuser -u postgres -- "$BIN/pg_ctl" -D "$PG_DIR" -m immediate stop >/dev/null 2>&1 || true
    fi
    rm -rf "$PG_DIR"
    mkdir -p "$PG_DIR" && chown postgres:postgres "$PG_DIR"
    runuser -u postgres -- "$BIN/initdb" -D "$PG_DIR" -A trust -U postgres >/dev/null
    runuser -u postgres -- "$BIN/pg_ctl" -D "$PG_DIR" -l "$PG_DIR/log" \
      -o "-p $PG_PORT -k /tmp -c listen_addresses=127.0.0.1 -c fsync=on" -w start >/dev/null
    export STARCITE_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
    echo "postgres ready at $STARCITE_TEST_POSTGRES_URL"
    ;;
  stop)
    BIN=$(pg_bin)
    runuser -u postgres -- "$BIN/pg_ctl" -D "$PG_DIR" -m fast stop >/dev/null 2>&1 || true
    rm -rf "$PG_DIR"
    ;;
esac
