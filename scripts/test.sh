#!/usr/bin/env bash
# Runs every test of the workspace. Brings up what the tests need:
#   PostgreSQL: DATABASE_URL, else 127.0.0.1:5432, else a throwaway local cluster (scripts/lib/postgres.sh);
#   Kafka: nothing to start, tests run librdkafka's in-process mock cluster;
#   promtool and systemd-analyze for tests/deploy.rs (scripts/lib/tools.sh installs them).
# Each test makes a database of its own (tally_test_<time>_<pid>_<n>); the ones this run made are
# dropped when it ends, passed or failed. Extra arguments go to `cargo test` (e.g.
# scripts/test.sh -p tally-emitter).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/postgres.sh
source scripts/lib/tools.sh
ensure_postgres
ensure_tools
started=$(date +%s)
trap 'drop_test_databases "$started"' EXIT
cargo test --workspace "$@"
