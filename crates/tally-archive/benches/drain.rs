//! `tally archive` end to end: a backlog of `TALLY_BENCH_EVENTS` (default 1,000,000) events in
//! librdkafka's mock cluster (in this process), archived by `Archiver::run` in `--once` mode
//! with the default settings: consumed, decoded, written as Parquet, staged, recorded in
//! Postgres and published. Baseline in the same run: Kafka alone (consume and decode, nothing
//! written). Prints records/s of wall time, and of the archiver thread's own CPU time (what
//! "on one core" means: the broker and librdkafka's fetch threads run beside it).
//! Run: `scripts/bench.sh archive-drain`.

use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use tally_archive::{ArchiveConfig, ArchivedRecord, Archiver};
use tally_core::config::KafkaConfig;
use tally_runtime::RunMode;
use tokio_util::sync::CancellationToken;

// The mock broker keeps at most 100k messages or 5 MB per partition.
const PARTITIONS: i32 = 32;

/// CPU time this thread has used (user + system), from /proc.
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command name.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10) // USER_HZ is 100 on Linux
}

fn main() {
    let events: usize = std::env::var("TALLY_BENCH_EVENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let runtime = tally_db::testing::runtime();
    let db = runtime.block_on(tally_db::testing::fresh_database());
    let cluster = MockCluster::new(1).unwrap();
    let kafka = KafkaConfig {
        brokers: cluster.bootstrap_servers(),
        topic: "usage-events".into(),
        dlq_topic: "usage-events-dlq".into(),
        ..KafkaConfig::default()
    };
    cluster.create_topic(&kafka.topic, PARTITIONS, 1).unwrap();

    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap();
    let start: DateTime<Utc> = Utc::now() - TimeDelta::minutes(30);
    let meters = ["api_calls", "tokens", "storage_gb"];
    let mut payload_bytes = 0;
    for i in 0..events {
        // A steady 100k events/s, so the backlog spans 10 s of one or two hours.
        let at = start + TimeDelta::microseconds(i as i64 * 10);
        let customer = format!("customer-{:05}", i % 10_000);
        let payload = format!(
            r#"{{"id":"{}","customer":"{customer}","meter":"{}","quantity":"{}.{:02}","timestamp":"{}","dimensions":{{"model":"m{}"}}}}"#,
            uuid::Uuid::now_v7(),
            meters[i % 3],
            i % 97,
            i % 100,
            at.to_rfc3339(),
            i % 4
        );
        payload_bytes += payload.len();
        let mut record = BaseRecord::to(&kafka.topic)
            .key(&customer)
            .payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(120)).unwrap();
    println!("events {events}");
    println!("payload_mib {:.1}", payload_bytes as f64 / 1048576.0);

    // Baseline: Kafka alone, every record consumed and decoded, nothing written.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", "bench-baseline")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        assignment
            .add_partition_offset(&kafka.topic, partition, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let (began, cpu) = (Instant::now(), thread_cpu());
    let mut seen = 0;
    while seen < events {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let received = DateTime::<Utc>::from_timestamp_millis(
                m.timestamp().to_millis().unwrap_or_default(),
            )
            .unwrap();
            let record = ArchivedRecord::decode(
                m.payload().unwrap_or_default(),
                m.partition(),
                m.offset(),
                received,
            );
            assert!(record.event().is_some());
            seen += 1;
        }
    }
    let (wall, used) = (began.elapsed(), thread_cpu() - cpu);
    drop(consumer);
    println!(
        "baseline_kafka_decode_events_per_s {:.0}",
        events as f64 / wall.as_secs_f64()
    );
    println!(
        "baseline_kafka_decode_events_per_cpu_s {:.0}",
        events as f64 / used.as_secs_f64()
    );

    // The archiver, defaults but the directory: 128 MiB files, a flush every 2 minutes.
    let dir = tempfile::tempdir().unwrap();
    let config = ArchiveConfig {
        url: format!("file://{}/archive", dir.path().display()),
        ..ArchiveConfig::default()
    };
    let horizon = Duration::from_secs(35 * 86_400);
    let archiver = Archiver::new(
        config,
        kafka,
        horizon,
        db.pool.clone(),
        runtime.handle().clone(),
    )
    .unwrap();
    let (began, cpu) = (Instant::now(), thread_cpu());
    let summary = archiver
        .run(RunMode::Once, &CancellationToken::new())
        .unwrap();
    let (wall, used) = (began.elapsed(), thread_cpu() - cpu);
    assert_eq!(summary.archived as usize, events);
    let (files, bytes): (i64, i64) = runtime
        .block_on(
            sqlx::query_as("SELECT count(*), sum(bytes)::bigint FROM archive_files")
                .fetch_one(&db.pool),
        )
        .unwrap();
    println!(
        "archive_events_per_s {:.0}",
        events as f64 / wall.as_secs_f64()
    );
    println!(
        "archive_events_per_cpu_s {:.0} (the archiver's thread: consume, decode, encode, stage)",
        events as f64 / used.as_secs_f64()
    );
    println!("archive_wall_s {:.2}", wall.as_secs_f64());
    println!("archive_files {files}");
    println!(
        "archive_file_mib_mean {:.1}",
        bytes as f64 / files.max(1) as f64 / 1048576.0
    );
}
