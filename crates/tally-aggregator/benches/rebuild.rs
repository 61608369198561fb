//! `tally rebuild` over a large archive: `TALLY_BENCH_EVENTS` (default 10,000,000) archived
//! events of one meter, 200 customers and 2 models over 24 hours, recounted, compared with the
//! live windows and swapped in. Run with `scripts/bench.sh rebuild` (it provides Postgres).
//! Prints one figure a line.
//!
//! Set-up (not timed): the events are written as the archiver writes them (a flush per million
//! records, files per hour, recorded in Postgres), the aggregator's offsets put at the end,
//! and the live windows the aggregator would have written (folded here).

use std::collections::HashMap;
use std::time::Instant;

use chrono::{DateTime, TimeDelta, Utc};
use rust_decimal::Decimal;
use tally_aggregator::rebuild::{rebuild, RebuildRequest, RebuildSettings};
use tally_archive::flush::{flush, take_partitions, Buffer};
use tally_archive::{ArchiveStore, ArchivedRecord};
use tally_core::config::KafkaConfig;
use tally_core::{wire, MeterDefinition, UsageEvent};

const PARTITIONS: i32 = 16;
const CUSTOMERS: usize = 200;
const FLUSH_EVERY: usize = 1_000_000;

fn main() {
    let events: usize = std::env::var("TALLY_BENCH_EVENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(events));
}

async fn run(events: usize) {
    let db = tally_db::testing::fresh_database().await;
    let meter: MeterDefinition = tally_core::meter::meters_from_toml(
        "[[meters]]\nname = \"tokens\"\naggregation = \"sum\"\ngroup_by = [\"model\"]\n",
    )
    .unwrap()
    .remove(0);
    tally_db::meters::record(&db.pool, std::slice::from_ref(&meter))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = ArchiveStore::open(&format!("file://{}", dir.path().display())).unwrap();
    let topic = "usage-events";
    let partitions: Vec<i32> = (0..PARTITIONS).collect();
    take_partitions(&db.pool, topic, &partitions, "bench")
        .await
        .unwrap();

    // Yesterday's 24 hours.
    let start = (Utc::now() - TimeDelta::days(1))
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    let began = Instant::now();
    let mut buffer = Buffer::new(TimeDelta::days(35));
    let mut offsets = vec![0i64; PARTITIONS as usize];
    // (customer, minute, model) → (events, sum), and per day.
    let mut minutes: HashMap<(usize, i64, usize), (i64, Decimal)> = HashMap::new();
    let mut days: HashMap<(usize, usize), (i64, Decimal)> = HashMap::new();
    for i in 0..events {
        let customer = i % CUSTOMERS;
        let model = (i / CUSTOMERS) % 2;
        let at = start + TimeDelta::milliseconds((i as i64 * 86_400_000) / events as i64);
        let quantity = Decimal::new((i % 997) as i64 + 1, 1);
        let event = UsageEvent::new(format!("customer-{customer:04}"), "tokens", quantity)
            .with_id(format!("0193a0a0-0000-7000-8000-{i:012}"))
            .with_dimension("model", ["small", "large"][model])
            .at(at);
        let partition = (i % PARTITIONS as usize) as i32;
        let offset = offsets[partition as usize];
        offsets[partition as usize] += 1;
        buffer
            .push(ArchivedRecord::decode(
                &wire::encode(&event),
                partition,
                offset,
                at,
            ))
            .unwrap();
        let minute = at.timestamp().div_euclid(60) * 60;
        let m = minutes.entry((customer, minute, model)).or_default();
        m.0 += 1;
        m.1 += quantity;
        let d = days.entry((customer, model)).or_default();
        d.0 += 1;
        d.1 += quantity;
        if buffer.records() >= FLUSH_EVERY {
            let full = std::mem::replace(&mut buffer, Buffer::new(TimeDelta::days(35)));
            flush(&db.pool, &store, topic, "bench", full).await.unwrap();
        }
    }
    if !buffer.is_empty() {
        flush(&db.pool, &store, topic, "bench", buffer)
            .await
            .unwrap();
    }
    for (partition, next) in offsets.iter().enumerate() {
        sqlx::query(
            "INSERT INTO kafka_offsets (consumer_group, topic, partition, next_offset)
             VALUES ('tally-aggregator', $1, $2, $3)",
        )
        .bind(topic)
        .bind(partition as i32)
        .bind(next)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    live_windows(&db.pool, start, &minutes, &days).await;
    let files: i64 = sqlx::query_scalar("SELECT count(*) FROM archive_files")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let bytes: i64 = sqlx::query_scalar("SELECT sum(bytes)::bigint FROM archive_files")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    println!(
        "set-up: {events} events archived in {files} files ({:.1} MiB), {} live minute windows, in {:.1} s",
        bytes as f64 / 1_048_576.0,
        minutes.len(),
        began.elapsed().as_secs_f64()
    );

    let settings = RebuildSettings {
        kafka: KafkaConfig {
            topic: topic.into(),
            ..KafkaConfig::default()
        },
        aggregator_group: "tally-aggregator".into(),
        lateness_horizon: TimeDelta::days(35),
    };
    for dry_run in [true, false] {
        let request = RebuildRequest {
            meter: meter.clone(),
            customer: None,
            from: start.date_naive(),
            to: start.date_naive() + TimeDelta::days(1),
            dry_run,
        };
        let began = Instant::now();
        let report = rebuild(&db.pool, &store, &settings, &request, &|_| {})
            .await
            .unwrap();
        let took = began.elapsed().as_secs_f64();
        assert_eq!(report.events, events as u64);
        assert!(report.days.is_empty(), "{:?}", &report.days[..3]);
        println!(
            "rebuild{}: {events} events, {} files, {} windows, in {took:.1} s ({:.0} events/s; target: under 120 s)",
            if dry_run { " --dry-run" } else { "" },
            report.files,
            report.windows_after,
            events as f64 / took
        );
    }
}

/// The windows the aggregator would have written for the events (same values, same counts).
async fn live_windows(
    pool: &sqlx::PgPool,
    start: DateTime<Utc>,
    minutes: &HashMap<(usize, i64, usize), (i64, Decimal)>,
    days: &HashMap<(usize, usize), (i64, Decimal)>,
) {
    let group = |model: usize| format!("{{\"model\":\"{}\"}}", ["small", "large"][model]);
    let rows: Vec<_> = minutes.iter().collect();
    for chunk in rows.chunks(50_000) {
        let customers: Vec<String> = chunk
            .iter()
            .map(|((c, _, _), _)| format!("customer-{c:04}"))
            .collect();
        let starts: Vec<DateTime<Utc>> = chunk
            .iter()
            .map(|((_, m, _), _)| DateTime::from_timestamp(*m, 0).unwrap())
            .collect();
        let groups: Vec<String> = chunk.iter().map(|((_, _, g), _)| group(*g)).collect();
        let counts: Vec<i64> = chunk.iter().map(|(_, (n, _))| *n).collect();
        let values: Vec<Decimal> = chunk.iter().map(|(_, (_, v))| *v).collect();
        sqlx::query(
            "INSERT INTO usage_minute (customer_id, meter, window_start, group_key, value,
                                       event_count, first_updated, last_updated)
             SELECT c, 'tokens', t, g, v, n, now(), now()
             FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::numeric[], $5::bigint[])
                  AS u(c, t, g, v, n)",
        )
        .bind(&customers)
        .bind(&starts)
        .bind(&groups)
        .bind(&values)
        .bind(&counts)
        .execute(pool)
        .await
        .unwrap();
    }
    for ((customer, model), (count, value)) in days {
        sqlx::query(
            "INSERT INTO usage_daily (customer_id, meter, day, group_key, value, event_count,
                                      first_updated, last_updated)
             VALUES ($1, 'tokens', $2, $3, $4, $5, now(), now())",
        )
        .bind(format!("customer-{customer:04}"))
        .bind(start.date_naive())
        .bind(group(*model))
        .bind(value)
        .bind(count)
        .execute(pool)
        .await
        .unwrap();
    }
}
