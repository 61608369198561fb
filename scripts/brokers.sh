#!/usr/bin/env bash
# `tally aggregate` against a second Kafka-protocol broker, tansu 0.6 (in-memory storage), built
# from crates.io into target/tools the first time (about eight minutes on 2 cores): a static
# member the broker keeps dropping, `--once` after a stopped static member, and kills through
# rebalances with a dynamic and a static member. Prints one figure a line.
# Usage: scripts/brokers.sh [TEST-NAME-FILTER]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/postgres.sh
ensure_postgres
tansu=target/tools/tansu/bin/tansu
if [ ! -x "$tansu" ]; then
  echo "building tansu 0.6.0 (crates.io, feature dynostore for memory:// storage) into target/tools" >&2
  cargo install tansu --version 0.6.0 --features dynostore --locked --root target/tools/tansu
fi
cargo build -p tally
log=$(mktemp /tmp/tally-brokers.XXXXXX.log)
status=0
TALLY_TEST_TANSU="$PWD/$tansu" cargo test -p tally-tests --test brokers -- --ignored --nocapture \
  --test-threads 1 "$@" >"$log" 2>&1 || status=$?
grep -E '^(static|dynamic|--once|test |test result)' "$log" || true
[ "$status" = 0 ] || { echo "failed; the whole output is in $log" >&2; exit "$status"; }
