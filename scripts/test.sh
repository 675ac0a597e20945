#!/usr/bin/env bash
# Runs every test of the workspace (unit, simulation, black-box against the real binary,
# and the archive tests against a real PostgreSQL).
set -euo pipefail
cd "$(dirname "$0")/.."
# The archive tests need a PostgreSQL: start a throw-away one (installed if missing)
# unless one is given, and remove it afterwards.
if [ -z "${STARCITE_TEST_POSTGRES_URL:-}" ] && [ "$(id -u)" = "0" ]; then
  # shellcheck source=/dev/null
  source scripts/test-postgres.sh start
  trap 'scripts/test-postgres.sh stop' EXIT
fi
cargo build --release --bin starcite
cargo test --workspace --release -- --test-threads=2 "$@"
