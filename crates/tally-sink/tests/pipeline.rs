//! The whole pipeline: emitter → Kafka (mock cluster) → aggregator → sink → Stripe emulator,
//! with Stripe injecting 5% 500s, 2% committed-then-dropped responses and 429s (an account
//! limit below the sink's rate), and the sink killed at random moments. Stripe's totals must
//! equal the windows exactly, and the windows what was emitted.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use common::*;
use rand::{Rng, SeedableRng};
use rdkafka::mocking::MockCluster;
use rust_decimal::Decimal;
use stripe_emulator::{EmulatorConfig, Faults};
use tally_aggregator::{Aggregator, AggregatorConfig, Mode as AggregatorMode};
use tally_core::config::KafkaConfig;
use tally_core::{MeterDefinition, UsageEvent};
use tally_emitter::{EmitError, Emitter, EmitterConfig};
use tally_sink::Mode;
use tokio_util::sync::CancellationToken;

fn meters() -> Vec<MeterDefinition> {
    tally_core::meter::meters_from_toml(
        r#"
        [[meters]]
        name = "api_calls"
        aggregation = "sum"
        [[meters]]
        name = "storage_gb"
        aggregation = "max"
        "#,
    )
    .unwrap()
}

#[test]
fn stripe_holds_exactly_the_windows_through_faults_and_sink_kills() {
    let runtime = tally_db::testing::runtime();
    let faults = Faults {
        error_500: 0.05,
        drop_after_commit: 0.02,
        ..Faults::default()
    };
    let setup = runtime.block_on(setup(EmulatorConfig {
        live_rate_per_second: 400,
        faults,
        ..EmulatorConfig::default()
    }));
    let pool = setup.db.pool.clone();
    let customers: Vec<String> = (0..50).map(|i| format!("p{i:02}")).collect();
    runtime.block_on(map_all(&pool, &customers));

    let cluster = MockCluster::new(1).unwrap();
    let topic = format!("usage-{}", uuid_like());
    cluster.create_topic(&topic, 4, 1).unwrap();
    cluster.create_topic(&format!("{topic}-dlq"), 1, 1).unwrap();
    let kafka = KafkaConfig {
        brokers: cluster.bootstrap_servers(),
        topic: topic.clone(),
        dlq_topic: format!("{topic}-dlq"),
        options: BTreeMap::from([
            ("session.timeout.ms".into(), "6000".into()),
            ("heartbeat.interval.ms".into(), "500".into()),
        ]),
    };

    // The aggregator runs throughout, on a thread of its own.
    let stop = CancellationToken::new();
    let aggregator = Aggregator::new(
        AggregatorConfig {
            group_id: format!("agg-{topic}"),
            batch_max_wait: Duration::from_millis(50),
            ..AggregatorConfig::default()
        },
        kafka.clone(),
        meters(),
        pool.clone(),
        runtime.handle().clone(),
    )
    .unwrap();
    let aggregator_thread = {
        let stop = stop.clone();
        std::thread::spawn(move || aggregator.run(AggregatorMode::Daemon, &stop))
    };

    // Events dated over the last hour (slots closed), emitted in three waves; between waves
    // the sink runs and is killed at random moments.
    let spool = tempfile::tempdir().unwrap();
    let emitter = Emitter::start(
        &kafka,
        &EmitterConfig {
            spool: tally_emitter::SpoolConfig {
                dir: spool.path().to_owned(),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .unwrap();
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
            let sink = sink(&setup, sink_config());
            let task = runtime
                .spawn(async move { sink.run(Mode::Daemon, &CancellationToken::new()).await });
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
        let sink = sink(&setup, sink_config());
        loop {
            tokio::time::sleep(Duration::from_millis(1100)).await; // leases of killed sinks expire
            sink.run(Mode::Once, &CancellationToken::new())
                .await
                .unwrap();
            let (pending, _, failed) = outbox_counts(&pool).await;
            assert_eq!(failed, 0);
            if pending == 0 && changes_left(&pool).await == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{pending} submissions still pending"
            );
        }
    });
    stop.cancel();
    aggregator_thread.join().unwrap().unwrap();

    // Windows = emitted, Stripe = windows (whole units; the fraction is carried forward).
    let windows: Vec<(String, Decimal)> = runtime.block_on(
        sqlx::query_as("SELECT customer_id, sum(value) FROM usage_minute WHERE meter = 'api_calls' GROUP BY customer_id")
            .fetch_all(&pool),
    )
    .unwrap();
    assert_eq!(windows.len(), sums.len());
    for (customer, window_sum) in &windows {
        assert_eq!(*window_sum, sums[customer], "windows of {customer}");
        let stripe = stripe_sum(&setup.emulator, &format!("cus_{customer}"), "api_calls");
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
        let stripe = stripe_last(&setup.emulator, &format!("cus_{customer}"), "storage_gb");
        assert_eq!(
            stripe.map(Decimal::from),
            Some(*value),
            "storage_gb of {customer}"
        );
    }
    let stats = setup.emulator.stats();
    eprintln!("emulator: {stats:?}");
    assert!(
        stats.injected_500 > 0 && stats.dropped_after_commit > 0 && stats.rate_limited > 0,
        "{stats:?}"
    );
    emitter.shutdown(Duration::from_secs(5));
}

fn uuid_like() -> String {
    format!(
        "{:x}{:x}",
        std::process::id(),
        Utc::now().timestamp_micros()
    )
}
