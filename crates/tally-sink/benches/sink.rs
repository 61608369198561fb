//! Sink throughput against the Stripe emulator with Stripe's live limits (v2 stream: 10,000
//! events/s per account, 100 a request; v1: 1,000 calls/s, one call at a time per customer and
//! meter):
//! - the time to bill N customer-meter pairs through the v2 stream (default 1,000,000), split
//!   into accounting (Postgres) and sending (Stripe), and the submissions/s sustained;
//! - the same through v1 (TALLY_BENCH_V1_PAIRS, default 20,000): the previous main's way;
//! - limit violations: 429s the emulator answered (target 0);
//! - baseline, same run: v1 without its rate limiter (as fast as it can), to show what the
//!   limiter prevents.
//!
//! Needs DATABASE_URL (scripts/bench.sh sink sets it). Pairs: TALLY_BENCH_PAIRS.

use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use stripe_emulator::{Emulator, EmulatorConfig};
use tally_core::config::Secret;
use tally_core::window::slot_start;
use tally_sink::{MeterEventsApi, RunMode, Sink, SinkConfig, StripeConfig, StripeHttp};
use tokio_util::sync::CancellationToken;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `pairs` customer+meter pairs (two meters), each with usage in one closed slot.
async fn usage(pool: &sqlx::PgPool, pairs: usize) {
    let slot = slot_start(Utc::now() - TimeDelta::hours(1));
    sqlx::query(
        "INSERT INTO meters (name, aggregation, stripe_event_name) VALUES
            ('api_calls', 'sum', 'api_calls'), ('tokens', 'sum', 'tokens')",
    )
    .execute(pool)
    .await
    .unwrap();
    for (meter, offset) in [("api_calls", 0), ("tokens", 1)] {
        let n = (pairs + 1 - offset) / 2;
        sqlx::query(
            "INSERT INTO usage_minute (customer_id, meter, window_start, group_key, value, event_count, first_updated, last_updated)
             SELECT 'bench-' || i, $1, $2, '', (i % 997) + 1, 1, now(), now() FROM generate_series(1, $3) AS i",
        )
        .bind(meter)
        .bind(slot)
        .bind(n as i64)
        .execute(pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO usage_slot_changes (customer_id, meter, slot_start)
             SELECT 'bench-' || i, $1, $2 FROM generate_series(1, $3) AS i",
        )
        .bind(meter)
        .bind(slot)
        .bind(n as i64)
        .execute(pool)
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO stripe_customers (customer_id, stripe_customer_id)
         SELECT 'bench-' || i, 'cus_bench' || i FROM generate_series(1, $1) AS i",
    )
    .bind(pairs.div_ceil(2) as i64)
    .execute(pool)
    .await
    .unwrap();
}

async fn run(
    pairs: usize,
    api: MeterEventsApi,
    requests_per_second: u32,
) -> (tally_sink::SinkSummary, Duration, stripe_emulator::Stats) {
    let db = tally_db::testing::fresh_database().await;
    usage(&db.pool, pairs).await;
    let emulator = Emulator::start("127.0.0.1:0".parse().unwrap(), EmulatorConfig::default())
        .await
        .unwrap();
    let stripe = StripeConfig {
        api_base: emulator.url(),
        secret_key: Secret::new("sk_live_tally_bench"),
        max_requests_per_second: requests_per_second,
        meter_events: Some(api),
        ..StripeConfig::default()
    };
    tally_sink::create_stripe_meters(&db.pool, &StripeHttp::new(&stripe).unwrap())
        .await
        .unwrap();
    let sink = Sink::new(
        SinkConfig {
            settle_delay: Duration::ZERO,
            ..SinkConfig::default()
        },
        &stripe,
        db.pool.clone(),
    )
    .unwrap();
    let started = Instant::now();
    let summary = sink
        .run(RunMode::Once, &CancellationToken::new())
        .await
        .unwrap();
    let elapsed = started.elapsed();
    let stats = emulator.stats();
    emulator.shutdown().await;
    (summary, elapsed, stats)
}

fn main() {
    let runtime = tally_db::testing::runtime();
    let pairs = env_usize("TALLY_BENCH_PAIRS", 1_000_000);
    let v1_pairs = env_usize("TALLY_BENCH_V1_PAIRS", 20_000);
    let baseline_pairs = env_usize("TALLY_BENCH_BASELINE_PAIRS", 2_000);
    runtime.block_on(async {
        let (base, _, base_stats) = run(baseline_pairs, MeterEventsApi::V1, 1_000_000).await;
        println!(
            "baseline without the rate limiter: {} submissions in {:.2}s = {:.0} submissions/s, {} answered 429",
            base.sent,
            base.sending.as_secs_f64(),
            base.sent as f64 / base.sending.as_secs_f64(),
            base_stats.rate_limited + base_stats.concurrency_limited
        );
        for (api, pairs, limit) in [
            (MeterEventsApi::V1, v1_pairs, "v1: limit 1,000 calls/s, sink rate 950/s"),
            (MeterEventsApi::V2, pairs, "v2 stream: limit 10,000 events/s, sink rate 9,500/s"),
        ] {
            let (summary, elapsed, stats) = run(pairs, api, 0).await;
            assert_eq!(summary.sent as usize, pairs, "every pair billed: {summary:?}");
            println!("{api:?} pairs billed: {pairs}");
            println!("{api:?} time to bill: {:.2}s (accounting {:.2}s, sending {:.2}s)", elapsed.as_secs_f64(), summary.accounting.as_secs_f64(), summary.sending.as_secs_f64());
            println!("{api:?} accounting: {:.0} slots/s", summary.accounted.slots as f64 / summary.accounting.as_secs_f64());
            println!("{api:?} sending: {:.0} submissions/s ({limit}), {} requests", summary.sent as f64 / summary.sending.as_secs_f64(), stats.requests);
            println!("{api:?} limit violations (429 from the emulator): {}", stats.rate_limited + stats.concurrency_limited);
        }
    });
}
