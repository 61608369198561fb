#!/usr/bin/env bash
# POST /v1/quota/check over HTTP through every edge layer of `tally serve` (connection limit,
# request id, load shedding, deadline, token gate, rate limit): latency at TALLY_BENCH_RATE
# checks/s offered (default 10,000) for TALLY_BENCH_SECONDS (default 5). Target: p99 <= 2 ms.
exec "$(dirname "$0")/bench.sh" http "$@"
