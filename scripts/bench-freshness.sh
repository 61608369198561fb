#!/usr/bin/env bash
# Freshness: emit → aggregator commit → quota check sees it, p50/p99 (TALLY_BENCH_REFRESH_MS,
# TALLY_BENCH_RATE). Kafka is librdkafka's mock cluster in process.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/postgres.sh
ensure_postgres
cargo bench -p tally-api --bench freshness "$@"
