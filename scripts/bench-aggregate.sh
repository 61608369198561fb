#!/usr/bin/env bash
# Aggregator benchmark: sustained events/s into Postgres (exact dedup), Kafka alone, the
# Postgres share, the naive INSERT-per-event baseline, and append-to-commit latency at 50k/s.
# Prints one figure per line. TALLY_BENCH_EVENTS (default 1000000) sets the backlog size.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/postgres.sh
ensure_postgres
cargo bench -p tally-aggregator --bench aggregate "$@"
