#!/usr/bin/env bash
# Runs one benchmark by name; each prints one figure a line (name value), compared against a
# baseline measured in the same run. Extra arguments go to the benchmark.
#
#   scripts/bench.sh emitter     emit() latency and publish throughput into the mock Kafka cluster
#   scripts/bench.sh aggregate   sustained events/s into Postgres (exact dedup), append-to-commit
#                                latency (TALLY_BENCH_EVENTS, TALLY_BENCH_LIVE_RATE)
#   scripts/bench.sh sink        submissions/s against the emulator's live limits, time to bill
#                                TALLY_BENCH_PAIRS customer-meter pairs
#   scripts/bench.sh quota       in-process checks/s and latency, cache hit and miss
#   scripts/bench.sh layer       QuotaLayer's cost per request (allow and deny) against the same
#                                axum route without it (TALLY_BENCH_REQUESTS)
#   scripts/bench.sh scheduler   one run_due renewing TALLY_BENCH_SUBSCRIPTIONS subscriptions, 1 and
#                                2 replicas, against a set-based baseline
#   scripts/bench.sh http        POST /v1/quota/check latency at TALLY_BENCH_RATE checks/s offered
#   scripts/bench.sh portal      the customer portal's pages: time to first byte, 10,000 customers,
#                                30 days of minute windows for the customer shown
#   scripts/bench.sh freshness   emit → aggregator commit → quota check sees it, p50/p99
#   scripts/bench.sh alerts      aggregator commit → alert delivered to a receiver, p50/p99
#                                (TALLY_BENCH_EVALUATE_MS, TALLY_BENCH_RATE)
#   scripts/bench.sh archive     records decoded and written as Parquet, and read back, on one core
#                                (TALLY_BENCH_EVENTS), against the contract's decode alone
#   scripts/bench.sh archive-drain  `tally archive --once` over a backlog in the mock cluster:
#                                records/s (wall and the archiver's CPU), file sizes, against
#                                Kafka alone (TALLY_BENCH_EVENTS)
#   scripts/bench.sh backfill    `tally backfill` of a JSON-lines and a CSV file into the mock
#                                cluster, acknowledged and checkpointed (TALLY_BENCH_EVENTS)
#   scripts/bench.sh rebuild     `tally rebuild` of 10M archived events (dry run, then swapped
#                                in): seconds and events/s (TALLY_BENCH_EVENTS)
#
# Postgres comes from DATABASE_URL, else 127.0.0.1:5432, else a throwaway local cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
name="${1:-}"
case "$name" in
  emitter)   target=(-p tally-emitter --bench emit) ;;
  aggregate) target=(-p tally-aggregator --bench aggregate) ;;
  sink)      target=(-p tally-sink --bench sink) ;;
  quota)     target=(-p tally-quota --bench check) ;;
  layer)     target=(-p tally-quota --features layer --bench layer) ;;
  scheduler) target=(-p tally-billing --bench scheduler) ;;
  http)      target=(-p tally-api --bench http) ;;
  portal)    target=(-p tally-api --bench portal) ;;
  freshness) target=(-p tally-tests --bench freshness) ;;
  alerts)    target=(-p tally-tests --bench alert_latency) ;;
  archive)   target=(-p tally-archive --bench encode) ;;
  archive-drain) target=(-p tally-archive --bench drain) ;;
  backfill)  target=(-p tally-archive --bench backfill) ;;
  rebuild)   target=(-p tally-aggregator --bench rebuild) ;;
  *)
    echo "usage: scripts/bench.sh emitter|aggregate|sink|quota|layer|scheduler|http|portal|freshness|alerts|archive|archive-drain|backfill|rebuild [ARGS...]" >&2
    exit 2
    ;;
esac
shift
source scripts/lib/postgres.sh
ensure_postgres
cargo bench "${target[@]}" -- "$@"
