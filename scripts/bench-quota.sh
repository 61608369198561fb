#!/usr/bin/env bash
# Quota check benchmark: in-process checks/s and latency on a cache hit and a miss.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/postgres.sh
ensure_postgres
cargo bench -p tally-quota --bench check "$@"
