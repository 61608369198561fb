//! Freshness: how long from `emit()` until a quota check sees the usage. Each sample emits one
//! event (emitter → Kafka mock cluster → aggregator → `usage_daily`) and polls every 2 ms,
//! both Postgres (aggregator commit) and `Quota::check` (what a service sees), for the
//! aggregator's default `batch_max_wait` (200 ms) and several quota refresh intervals
//! (`TALLY_BENCH_REFRESH_MS`, comma-separated; default 1000,250). Background load:
//! `TALLY_BENCH_RATE` events/s (default 1,000) for other customers. Everything shares 2 cores.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rust_decimal::Decimal;
use tally_billing::testing::unlimited_customers;
use tally_core::UsageEvent;
use tally_quota::{Decision, Quota};
use tally_tests::IngestPipeline;

const SAMPLES: usize = 200;

fn main() {
    let rate: u64 = std::env::var("TALLY_BENCH_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let refreshes: Vec<u64> = std::env::var("TALLY_BENCH_REFRESH_MS")
        .unwrap_or_else(|_| "1000,250".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let runtime = tally_db::testing::runtime();
    runtime.block_on(async {
        let pipeline = IngestPipeline::start(Duration::from_millis(200)).await;
        let customers = unlimited_customers(&pipeline.db.pool, 101).await;
        let (probe, others) = customers.split_first().unwrap();

        // Background load on the other customers, from a thread of its own.
        let emitter = pipeline.emitter.emitter.clone();
        let others = others.to_vec();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let load = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
                let mut next = Instant::now();
                let mut i = 0usize;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let customer = &others[i % others.len()];
                    let _ = emitter.emit(UsageEvent::new(customer.as_str(), "api_calls", Decimal::ONE));
                    i += 1;
                    next += interval;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
            })
        };

        let mut expected = Decimal::ZERO;
        for refresh_ms in refreshes {
            let quota = Quota::new(pipeline.db.pool.clone(), Duration::from_millis(refresh_ms))
                .await
                .unwrap();
            let mut committed = Histogram::<u64>::new(3).unwrap();
            let mut seen = Histogram::<u64>::new(3).unwrap();
            for _ in 0..SAMPLES {
                expected += Decimal::ONE;
                let started = Instant::now();
                pipeline
                    .emitter
                    .emit(UsageEvent::new(probe.as_str(), "api_calls", Decimal::ONE))
                    .unwrap();
                let mut commit_recorded = false;
                loop {
                    if !commit_recorded {
                        let value: Option<Decimal> = sqlx::query_scalar(
                            "SELECT sum(value) FROM usage_daily WHERE customer_id = $1",
                        )
                        .bind(probe)
                        .fetch_one(&pipeline.db.pool)
                        .await
                        .unwrap();
                        if value.unwrap_or_default() >= expected {
                            committed.record(started.elapsed().as_micros() as u64).unwrap();
                            commit_recorded = true;
                        }
                    }
                    let used = match quota.check(probe, "api_calls", Decimal::ZERO).await.unwrap() {
                        Decision::Allow { used, .. } | Decision::Warn { used, .. } | Decision::Deny { used, .. } => used,
                    };
                    if used >= expected {
                        seen.record(started.elapsed().as_micros() as u64).unwrap();
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
            println!(
                "quota refresh {refresh_ms} ms, background {rate} events/s, {SAMPLES} samples: \
                 aggregator commit p50 {:.0} ms p99 {:.0} ms; quota check sees it p50 {:.0} ms p99 {:.0} ms, max {:.0} ms",
                ms(&committed, 0.5),
                ms(&committed, 0.99),
                ms(&seen, 0.5),
                ms(&seen, 0.99),
                seen.max() as f64 / 1000.0,
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        load.join().unwrap();
    });
}
