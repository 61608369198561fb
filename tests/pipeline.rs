//! The whole pipeline in one process: emitter → Kafka (mock cluster) → aggregator → sink →
//! Stripe emulator, with Stripe injecting 5% 500s, 2% committed-then-dropped responses and
//! 429s (an account limit below the sink's rate), and the sink killed at random moments.
//! Stripe's totals must equal the windows exactly, and the windows what was emitted.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use stripe_emulator::Faults;
use tally_aggregator::AggregatorConfig;
use tally_core::UsageEvent;
use tally_emitter::EmitError;
use tally_sink::{RunMode, Sink, SinkConfig};
use tally_tests::*;
use tokio_util::sync::CancellationToken;

/// Sink settings for this test: bill slots as soon as they end, retry fast, and let a killed
/// sink's leases expire within a second.
fn sink_config() -> SinkConfig {
    SinkConfig {
        interval: Duration::from_millis(200),
        settle_delay: Duration::ZERO,
        lease: Duration::from_secs(1),
        backoff_initial: Duration::from_millis(5),
        backoff_max: Duration::from_millis(200),
        ..SinkConfig::default()
    }
}

#[test]
fn stripe_holds_exactly_the_windows_through_faults_and_sink_kills() {
    let runtime = tally_db::testing::runtime();
    let emulator = runtime.block_on(emulator_with(StripeEmulatorConfig {
        live_rate_per_second: 400,
        // Below the sink's 9,500 events/s: the v2 stream answers 429s.
        stream_events_per_second: 300,
        ..StripeEmulatorConfig::default()
    }));
    let stripe = stripe_config(&emulator);
    let broker = Broker::start();
    let db = runtime.block_on(tally_db::testing::fresh_database());
    let pool = db.pool.clone();
    let customers: Vec<String> = (0..50).map(|i| format!("p{i:02}")).collect();
    let mapping = runtime.block_on(async {
        record_meters(&pool, &meters(), &stripe).await;
        map_customers(&pool, &customers).await
    });
    // Stripe fails from now on. The sink bills through the v2 stream, a few dozen requests of
    // up to 100 events: each fails often, for faults enough.
    emulator
        .set_faults(Faults {
            error_500: 0.2,
            drop_after_commit: 0.1,
            ..Faults::default()
        })
        .unwrap();

    // The aggregator runs throughout, on a thread of its own.
    let aggregator = AggregatorThread::start(
        AggregatorConfig {
            batch_max_wait: Duration::from_millis(50),
            ..AggregatorConfig::default()
        },
        &broker.kafka,
        &meters(),
        &pool,
        runtime.handle().clone(),
    );

    // Events dated over the last hour (slots closed), emitted in three waves; between waves
    // the sink runs and is killed at random moments.
    let emitter = TestEmitter::start(&broker.kafka);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let now = Utc::now();
    let mut sums: HashMap<String, Decimal> = HashMap::new();
    let mut emitted = 0u64;
    for _wave in 0..3 {
        for _ in 0..1500 {
            let customer = &customers[rng.random_range(0..customers.len())];
            let meter = if rng.random_bool(0.8) {
                "api_calls"
            } else {
                "storage_gb"
            };
            let quantity = Decimal::new(rng.random_range(1..5000), 2);
            let mut event = UsageEvent::new(customer.as_str(), meter, quantity);
            event.timestamp = now - TimeDelta::seconds(rng.random_range(400..3600));
            if meter == "api_calls" {
                *sums.entry(customer.clone()).or_default() += quantity;
            }
            while let Err(error) = emitter.emit(event.clone()) {
                assert!(matches!(error, EmitError::Overloaded), "{error}");
                std::thread::sleep(Duration::from_millis(5));
            }
            emitted += 1;
        }
        emitter.flush(Duration::from_secs(60)).unwrap();
        for _ in 0..3 {
            let sink = Sink::new(sink_config(), &stripe, pool.clone()).unwrap();
            let task = runtime
                .spawn(async move { sink.run(RunMode::Daemon, &CancellationToken::new()).await });
            std::thread::sleep(Duration::from_millis(rng.random_range(100..600)));
            task.abort();
            let _ = runtime.block_on(task);
        }
    }

    // Wait for the aggregator to count everything, then let one sink finish.
    let deadline = Instant::now() + Duration::from_secs(120);
    runtime.block_on(async {
        loop {
            let counted: i64 = sqlx::query_scalar("SELECT count(*) FROM event_ids")
                .fetch_one(&pool)
                .await
                .unwrap();
            if counted as u64 == emitted {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "aggregated {counted} of {emitted}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let sink = Sink::new(sink_config(), &stripe, pool.clone()).unwrap();
        loop {
            tokio::time::sleep(Duration::from_millis(1100)).await; // leases of killed sinks expire
            sink.run(RunMode::Once, &CancellationToken::new())
                .await
                .unwrap();
            let (pending, failed, changes): (i64, i64, i64) = sqlx::query_as(
                "SELECT count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'failed'),
                        (SELECT count(*) FROM usage_slot_changes)
                 FROM stripe_submissions",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            assert_eq!(failed, 0);
            if pending == 0 && changes == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{pending} submissions still pending"
            );
        }
    });
    aggregator.stop();

    // Windows = emitted, Stripe = windows (whole units; the fraction is carried forward).
    let windows: Vec<(String, Decimal)> = runtime.block_on(
        sqlx::query_as("SELECT customer_id, sum(value) FROM usage_minute WHERE meter = 'api_calls' GROUP BY customer_id")
            .fetch_all(&pool),
    )
    .unwrap();
    assert_eq!(windows.len(), sums.len());
    for (customer, window_sum) in &windows {
        assert_eq!(*window_sum, sums[customer], "windows of {customer}");
        let stripe = emulator.sum(&mapping[customer], "api_calls");
        assert_eq!(
            Decimal::from(stripe),
            window_sum.floor(),
            "Stripe for {customer}"
        );
    }
    // max meters: Stripe's last value is the last slot's max, rounded up.
    let last_slots: Vec<(String, Decimal)> = runtime.block_on(
        sqlx::query_as(
            "SELECT DISTINCT ON (customer_id) customer_id, ceil(max(value) OVER (PARTITION BY customer_id, date_bin('5 minutes', window_start, timestamptz 'epoch')))
             FROM usage_minute WHERE meter = 'storage_gb'
             ORDER BY customer_id, window_start DESC",
        )
        .fetch_all(&pool),
    )
    .unwrap();
    for (customer, value) in &last_slots {
        let stripe = emulator.last(&mapping[customer], "storage_gb");
        assert_eq!(
            stripe.map(Decimal::from),
            Some(*value),
            "storage_gb of {customer}"
        );
    }
    let stats = emulator.stats();
    eprintln!("emulator: {stats:?}");
    assert!(
        stats.injected_500 > 0 && stats.rate_limited > 0 && stats.stream_requests > 0,
        "{stats:?}"
    );
    emitter.shutdown(Duration::from_secs(5));
}
