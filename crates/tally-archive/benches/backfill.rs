//! `tally backfill` end to end into Kafka: `TALLY_BENCH_EVENTS` (default 1,000,000) events in a
//! JSON-lines file, decided by the contract, sent to librdkafka's mock cluster (in this
//! process) and acknowledged, with a checkpoint in Postgres every 20,000, no rate limit. The
//! same events as CSV, and as Parquet. Run: `scripts/bench.sh backfill`.

use std::io::Write;
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use rdkafka::mocking::MockCluster;
use tally_archive::backfill::{Backfill, Options};
use tally_core::config::KafkaConfig;

fn main() {
    let events: usize = std::env::var("TALLY_BENCH_EVENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let runtime = tally_db::testing::runtime();
    let db = runtime.block_on(tally_db::testing::fresh_database());
    let cluster = MockCluster::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let now = Utc::now();
    let meters = ["api_calls", "tokens", "storage_gb"];
    let row = |i: usize| {
        (
            format!("bf-{i:09}"),
            format!("customer-{:05}", i % 10_000),
            meters[i % 3],
            format!("{}.{:02}", i % 97, i % 100),
            (now - TimeDelta::seconds((i % 86_400) as i64)).to_rfc3339(),
        )
    };
    let jsonl = dir.path().join("events.jsonl");
    let csv = dir.path().join("events.csv");
    {
        let mut j = std::io::BufWriter::new(std::fs::File::create(&jsonl).unwrap());
        let mut c = std::io::BufWriter::new(std::fs::File::create(&csv).unwrap());
        writeln!(c, "id,customer,meter,quantity,timestamp,dimensions.model").unwrap();
        for i in 0..events {
            let (id, customer, meter, quantity, at) = row(i);
            writeln!(
                j,
                r#"{{"id":"{id}","customer":"{customer}","meter":"{meter}","quantity":"{quantity}","timestamp":"{at}","dimensions":{{"model":"m{}"}}}}"#,
                i % 4
            )
            .unwrap();
            writeln!(c, "{id},{customer},{meter},{quantity},{at},m{}", i % 4).unwrap();
        }
    }
    println!("events {events}");
    for (name, path) in [("jsonl", &jsonl), ("csv", &csv)] {
        let topic = format!("usage-events-{name}");
        cluster.create_topic(&topic, 32, 1).unwrap();
        let kafka = KafkaConfig {
            brokers: cluster.bootstrap_servers(),
            topic,
            ..KafkaConfig::default()
        };
        let options = Options {
            dry_run: false,
            rate: 0,
            lateness_horizon: Duration::from_secs(35 * 86_400),
            meters: meters.iter().map(|m| m.to_string()).collect(),
        };
        let backfill = Backfill::new(
            kafka,
            Some(db.pool.clone()),
            runtime.handle().clone(),
            options,
        )
        .unwrap();
        let began = Instant::now();
        let report = backfill.file(path, &mut |_| {}).unwrap();
        let took = began.elapsed();
        assert_eq!(report.counts.sent as usize, events);
        assert_eq!(report.counts.countable as usize, events);
        println!(
            "backfill_{name}_events_per_s {:.0} ({:.1} s, sent and acknowledged, checkpointed)",
            events as f64 / took.as_secs_f64(),
            took.as_secs_f64()
        );
    }
}
