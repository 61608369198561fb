#!/usr/bin/env bash
# Sink benchmark: submissions/s against the Stripe emulator with live limits (1,000/s), limit
# violations, and the time to bill TALLY_BENCH_PAIRS customer-meter pairs (default 100,000).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/postgres.sh
ensure_postgres
cargo bench -p tally-sink --bench sink "$@"
