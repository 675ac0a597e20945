#!/usr/bin/env bash
# Runs every test of the workspace (unit, simulation, black-box against the real binary).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin starcite
cargo test --workspace --release -- --test-threads=2 "$@"
