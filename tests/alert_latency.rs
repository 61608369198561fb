//! Alert latency: from the aggregator's commit of the usage that crosses a threshold to the
//! delivery's arrival at a receiver (which verifies its signature). Each sample emits one event
//! for a customer whose plan alerts at 100 % of a limit of 1; the commit is observed by polling
//! `usage_daily` every 2 ms, the arrival by the receiver. The evaluator and the sender run as in
//! `tally aggregate` (`alerts.evaluate_every`, default 500 ms; `TALLY_BENCH_EVALUATE_MS`).
//! Background load: `TALLY_BENCH_RATE` events/s (default 1,000) for other customers, whose
//! changes the evaluator takes too. Everything shares 2 cores. Prints one figure a line.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rust_decimal::Decimal;
use tally_alerts::AlertsConfig;
use tally_core::UsageEvent;
use tally_tests::{AlertReceiver, IngestPipeline};
use tokio_util::sync::CancellationToken;

const SAMPLES: usize = 200;

fn main() {
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let rate = env("TALLY_BENCH_RATE", 1000);
    let evaluate_ms = env("TALLY_BENCH_EVALUATE_MS", 500);
    let runtime = tally_db::testing::runtime();
    runtime.block_on(async {
        let pipeline = IngestPipeline::start(Duration::from_millis(200)).await;
        let pool = pipeline.db.pool.clone();
        let plans: Vec<tally_billing::PlanDefinition> = serde_json::from_value(serde_json::json!([
            { "name": "ALERTED", "limits": { "api_calls": { "limit": "1", "period": "month" } },
              "alerts": [ { "meter": "api_calls", "percent": "100" } ] },
            { "name": "QUIET", "limits": { "api_calls": { "limit": "1000000000", "period": "day" } } }
        ]))
        .unwrap();
        tally_billing::apply_plans(&pool, &plans, "bench").await.unwrap();
        let start = chrono::Utc::now() - chrono::TimeDelta::days(1);
        for i in 0..SAMPLES {
            tally_billing::testing::subscribe(&pool, &format!("probe-{i}"), "ALERTED", start).await;
        }
        for i in 0..100 {
            tally_billing::testing::subscribe(&pool, &format!("other-{i}"), "QUIET", start).await;
        }
        let receiver = AlertReceiver::start(0).await;
        let secret = receiver.register(&pool).await;
        receiver.set_secret(&secret);
        let stop = CancellationToken::new();
        let config = AlertsConfig {
            evaluate_every: Duration::from_millis(evaluate_ms),
            // The receiver listens on 127.0.0.1 over plain HTTP.
            allow_http: true,
            allow_private_networks: true,
            ..AlertsConfig::default()
        };
        let tasks = tally_alerts::start_alerts(pool.clone(), config, stop.clone());

        let emitter = pipeline.emitter.emitter.clone();
        let load_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let load = {
            let load_stop = load_stop.clone();
            std::thread::spawn(move || {
                let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
                let mut next = Instant::now();
                let mut i = 0usize;
                while !load_stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let customer = format!("other-{}", i % 100);
                    let _ = emitter.emit(UsageEvent::new(customer, "api_calls", Decimal::ONE));
                    i += 1;
                    next += interval;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
            })
        };

        let mut commit_to_delivery = Histogram::<u64>::new(3).unwrap();
        let mut emit_to_delivery = Histogram::<u64>::new(3).unwrap();
        for i in 0..SAMPLES {
            let probe = format!("probe-{i}");
            let emitted = Instant::now();
            pipeline
                .emitter
                .emit(UsageEvent::new(probe.as_str(), "api_calls", Decimal::ONE))
                .unwrap();
            let mut committed: Option<Instant> = None;
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if committed.is_none() {
                    let value: Option<Decimal> = sqlx::query_scalar(
                        "SELECT sum(value) FROM usage_daily WHERE customer_id = $1",
                    )
                    .bind(&probe)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                    if value.is_some() {
                        committed = Some(Instant::now());
                    }
                }
                let arrived = receiver
                    .received()
                    .into_iter()
                    .find(|r| r.event["customer"] == probe.as_str() && r.signed);
                if let Some(arrived) = arrived {
                    let committed = committed.unwrap_or(arrived.at).min(arrived.at);
                    commit_to_delivery
                        .record(arrived.at.duration_since(committed).as_micros() as u64)
                        .unwrap();
                    emit_to_delivery
                        .record(arrived.at.duration_since(emitted).as_micros() as u64)
                        .unwrap();
                    break;
                }
                assert!(Instant::now() < deadline, "no alert for {probe} within 60 s");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "alerts.evaluate_every {evaluate_ms} ms, background {rate} events/s, {SAMPLES} samples: \
             commit to delivery p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; emit to delivery p50 {:.0} ms, p99 {:.0} ms",
            ms(&commit_to_delivery, 0.5),
            ms(&commit_to_delivery, 0.99),
            commit_to_delivery.max() as f64 / 1000.0,
            ms(&emit_to_delivery, 0.5),
            ms(&emit_to_delivery, 0.99),
        );
        let duplicates = receiver.received().len() - receiver.taken().len();
        println!("deliveries: {} ({duplicates} repeated)", receiver.received().len());
        load_stop.store(true, std::sync::atomic::Ordering::Relaxed);
        load.join().unwrap();
        stop.cancel();
        for task in tasks {
            let _ = task.await;
        }
    });
}
