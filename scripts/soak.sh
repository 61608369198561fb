#!/usr/bin/env bash
# Soak: the pipeline as separate processes (`tally kafka`, `tally stripe-emulator`,
# `tally aggregate`, `tally sink`, `tally serve`) for --duration, with the aggregator, the sink
# and the API killed by SIGKILL at random moments and restarted as systemd would. Prints
# events/s, the kills survived and the drift (must be 0).
# Usage: scripts/soak.sh [--duration 600|10m|1h]
set -euo pipefail
cd "$(dirname "$0")/.."
duration=600
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) duration="$2"; shift 2 ;;
    *) echo "usage: scripts/soak.sh [--duration SECONDS|Nm|Nh]" >&2; exit 2 ;;
  esac
done
case "$duration" in
  *h) seconds=$(( ${duration%h} * 3600 )) ;;
  *m) seconds=$(( ${duration%m} * 60 )) ;;
  *s) seconds=${duration%s} ;;
  *) seconds=$duration ;;
esac
source scripts/lib/postgres.sh
ensure_postgres
cargo build --release -p tally
TALLY_SOAK_SECONDS=$seconds cargo test --release -p tally-tests --test processes -- --nocapture \
  | grep -E '^(events|kills survived|drift)'
