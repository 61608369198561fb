#!/usr/bin/env bash
# HTTP quota check benchmark: latency at a fixed offered rate (TALLY_BENCH_RATE, default 10,000/s).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/postgres.sh
ensure_postgres
cargo bench -p tally-api --bench http "$@"
