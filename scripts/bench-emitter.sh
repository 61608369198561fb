#!/usr/bin/env bash
# Benchmarks emit() latency and publish throughput into the embedded mock Kafka cluster.
# Prints criterion's report, then one figure a line (name value).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench -p tally-emitter --bench emit -- "$@"
