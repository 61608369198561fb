//! Aggregator throughput and freshness, with the naive baseline measured in the same run.
//! Run with `scripts/bench.sh aggregate` (it provides Postgres). Prints one figure per line.
//!
//! 1. Pre-produce N events (10k customers, 3 meters, 10% re-sent ids) into the mock cluster,
//!    then drain them with `--once` semantics: sustained events/s into Postgres, exact dedup.
//! 2. Kafka alone (consume + decode, no Postgres) and the Postgres share of the wall time, so a
//!    missed target says what bounds it.
//! 3. Naive baseline: one INSERT per event into a raw table (with its id as primary key, for
//!    dedup) plus a GROUP BY per minute, on a sample of the same events.
//! 4. Freshness: events produced at a steady 50k/s while a daemon aggregator runs; p50/p99 of
//!    commit time minus the message's Kafka timestamp.
//! 5. Credits: the same backlog again on a topic of its own, every customer holding a grant and
//!    the two meters that add up priced, drained while the credit burner follows the commits:
//!    events/s against step 1's, and how long committed usage waited to be burned.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use hdrhistogram::Histogram;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use rust_decimal::Decimal;
use tally_aggregator::{Aggregator, AggregatorConfig, Hooks, RunMode};
use tally_core::config::KafkaConfig;
use tally_core::{wire, MeterDefinition, UsageEvent};
use tokio_util::sync::CancellationToken;

// librdkafka's mock broker keeps at most 100k messages or 5 MB per partition; 32 partitions
// hold a backlog of a few million events.
const PARTITIONS: i32 = 32;
const CUSTOMERS: usize = 10_000;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The aggregator settings under test: defaults, with TALLY_BENCH_LANES and
/// TALLY_BENCH_WAIT_MS to compare tunings.
fn config() -> AggregatorConfig {
    let defaults = AggregatorConfig::default();
    AggregatorConfig {
        parallel_commits: env("TALLY_BENCH_LANES", defaults.parallel_commits),
        batch_max_wait: Duration::from_millis(env(
            "TALLY_BENCH_WAIT_MS",
            defaults.batch_max_wait.as_millis() as usize,
        ) as u64),
        ..defaults
    }
}

fn meters() -> Vec<MeterDefinition> {
    tally_core::meter::meters_from_toml(
        r#"
        [[meters]]
        name = "api_calls"
        aggregation = "count"
        [[meters]]
        name = "tokens"
        aggregation = "sum"
        [[meters]]
        name = "storage_gb"
        aggregation = "max"
        "#,
    )
    .unwrap()
}

/// Event `i`: customer, meter and quantity spread evenly; timestamps 10 µs apart, as if the
/// events had been reported at a steady 100k/s.
fn event(i: usize, base: chrono::DateTime<Utc>) -> UsageEvent {
    let meter = ["api_calls", "tokens", "storage_gb"][i % 3];
    UsageEvent::new(
        format!("customer-{:05}", (i / 3) % CUSTOMERS),
        meter,
        Decimal::new((i % 5000) as i64 + 1, 2),
    )
    .with_id(uuid::Uuid::now_v7().to_string())
    .at(base + TimeDelta::microseconds(i as i64 * 10))
}

fn producer(brokers: &str) -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap()
}

fn send(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    key: &str,
    payload: &[u8],
) {
    let mut record = BaseRecord::to(topic).key(key).payload(payload);
    loop {
        match producer.send(record) {
            Ok(()) => return,
            Err((_, back)) => {
                record = back;
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
}

fn main() {
    let events = env("TALLY_BENCH_EVENTS", 1_000_000);
    let naive_sample = env("TALLY_BENCH_NAIVE_EVENTS", 20_000);
    let runtime = tally_db::testing::runtime();
    let db = runtime.block_on(tally_db::testing::fresh_database());
    let cluster = MockCluster::new(1).unwrap();
    let kafka = KafkaConfig {
        brokers: cluster.bootstrap_servers(),
        topic: "usage-events".into(),
        dlq_topic: "usage-events-dlq".into(),
        options: [("session.timeout.ms", "6000")].into_iter().collect(),
    };
    cluster.create_topic(&kafka.topic, PARTITIONS, 1).unwrap();
    cluster.create_topic(&kafka.dlq_topic, 1, 1).unwrap();

    // 0. Dedup history: ids claimed over the retention before this run, so each new id is
    //    looked up in an index of realistic size (TALLY_BENCH_HISTORY, default 5M claims over
    //    35 days; 0 for an empty table).
    let history = env("TALLY_BENCH_HISTORY", 5_000_000);
    if history > 0 {
        let started = Instant::now();
        runtime.block_on(async {
            sqlx::query(
                "INSERT INTO event_ids (id, claimed_on, payload_hash)
                 SELECT gen_random_uuid()::text,
                        (now() AT TIME ZONE 'UTC')::date - (g % 35)::int,
                        g
                 FROM generate_series(1, $1::bigint) AS g",
            )
            .bind(history as i64)
            .execute(&db.pool)
            .await
            .unwrap();
            // Measured on a settled server: the load's dirty pages written out first.
            for statement in ["VACUUM ANALYZE event_ids", "CHECKPOINT"] {
                sqlx::raw_sql(statement).execute(&db.pool).await.unwrap();
            }
        });
        println!(
            "dedup history: {history} claims over 35 days ({:.1} s to load)",
            started.elapsed().as_secs_f64()
        );
    }

    // 1. Pre-produce: N events, 10% of them sent twice.
    let base = Utc::now() - TimeDelta::minutes(30);
    let producer = producer(&kafka.brokers);
    let mut sent = 0usize;
    let mut unique = 0usize;
    let mut samples: Vec<UsageEvent> = Vec::new();
    let mut i = 0;
    while sent < events {
        let e = event(i, base);
        let bytes = wire::encode(&e);
        send(&producer, &kafka.topic, &e.customer, &bytes);
        sent += 1;
        unique += 1;
        if i % 10 == 0 && sent < events {
            send(&producer, &kafka.topic, &e.customer, &bytes);
            sent += 1;
        }
        if samples.len() < naive_sample {
            samples.push(e);
        }
        i += 1;
    }
    producer.flush(Duration::from_secs(120)).unwrap();
    println!("events produced: {sent} ({unique} unique ids, {CUSTOMERS} customers, 3 meters)");

    // 2a. Kafka alone: consume and decode everything, no Postgres.
    let started = Instant::now();
    let consumed = consume_and_decode(&kafka, sent);
    let kafka_rate = consumed as f64 / started.elapsed().as_secs_f64();
    println!("kafka alone (consume + decode): {kafka_rate:.0} events/s");

    // 1. The aggregator drains the backlog.
    let transaction = Arc::new(Mutex::new(Duration::ZERO));
    let tx_total = transaction.clone();
    // Sustained rate: from the first batch (after the group has assigned the partitions).
    let first_batch: Arc<Mutex<Option<Instant>>> = Arc::default();
    let first = first_batch.clone();
    let hooks = Hooks {
        on_step: Some(Arc::new(move |_| {
            first.lock().unwrap().get_or_insert_with(Instant::now);
        })),
        on_commit: Some(Arc::new(move |report, _| {
            *tx_total.lock().unwrap() += report.transaction;
        })),
    };
    let aggregator = Aggregator::new(
        config(),
        kafka.clone(),
        meters(),
        db.pool.clone(),
        runtime.handle().clone(),
    )
    .unwrap()
    .with_hooks(hooks);
    let started = Instant::now();
    let summary = aggregator
        .run(RunMode::Once, &CancellationToken::new())
        .unwrap();
    let wall = started.elapsed();
    let sustained = first_batch.lock().unwrap().map_or(wall, |t| t.elapsed());
    let rate = summary.consumed as f64 / sustained.as_secs_f64();
    let tx = *transaction.lock().unwrap();
    let counted: i64 = runtime
        .block_on(
            sqlx::query_scalar("SELECT sum(event_count)::bigint FROM usage_minute")
                .fetch_one(&db.pool),
        )
        .unwrap();
    assert_eq!(
        counted as usize, unique,
        "every unique event counted exactly once"
    );
    println!(
        "aggregator: {} events in {:.2}s from the first batch ({:.2}s with group join) = {rate:.0} events/s ({} batches, {} counted, {} duplicates)",
        summary.consumed,
        sustained.as_secs_f64(),
        wall.as_secs_f64(),
        summary.batches,
        summary.counted,
        summary.duplicates
    );
    println!(
        "postgres: {:.2}s in batch transactions ({} lanes) = {:.0} events/s per lane if Postgres were the only cost",
        tx.as_secs_f64(),
        config().parallel_commits,
        summary.consumed as f64 / tx.as_secs_f64()
    );

    // 3. Naive baseline on a sample of the same events.
    let naive_rate = runtime.block_on(naive(&db.pool, &samples));
    println!("naive baseline (INSERT per event + GROUP BY per minute): {naive_rate:.0} events/s");
    println!("speedup over naive: {:.1}x", rate / naive_rate);

    // 4. Freshness at a steady 50k events/s.
    let live_rate = env("TALLY_BENCH_LIVE_RATE", 50_000);
    let cores = kafka_side_cpu(&cluster, live_rate, 5);
    println!(
        "kafka side at {live_rate} events/s (load generator + mock broker + consumer + decode, no Postgres): {cores:.2} of 2 cores"
    );
    let (p50, p99, max, offered) = freshness(&kafka, &db.pool, &runtime, live_rate, 10);
    println!("append-to-commit at {offered:.0} events/s offered: p50 {p50} ms, p99 {p99} ms, max {max} ms");

    // 5. The same drain with credits burning.
    if env("TALLY_BENCH_CREDITS", 1) == 1 {
        credits(&cluster, &db.pool, &runtime, events, rate);
    }
}

/// Step 5: drains `events` (10% re-sent) with `api_calls` and `tokens` priced and every customer
/// holding a grant, while a burner (the one `tally aggregate` runs) follows the commits.
fn credits(
    cluster: &MockCluster<'static, DefaultProducerContext>,
    pool: &sqlx::PgPool,
    runtime: &tokio::runtime::Runtime,
    events: usize,
    rate_without: f64,
) {
    let kafka = KafkaConfig {
        brokers: cluster.bootstrap_servers(),
        topic: "usage-events-credits".into(),
        dlq_topic: "usage-events-dlq".into(),
        options: [("session.timeout.ms", "6000")].into_iter().collect(),
    };
    cluster.create_topic(&kafka.topic, PARTITIONS, 1).unwrap();
    let base = Utc::now() - TimeDelta::minutes(30);
    let producer = producer(&kafka.brokers);
    let mut sent = 0;
    let mut i = 40_000_000;
    while sent < events {
        let e = event(i, base);
        let bytes = wire::encode(&e);
        send(&producer, &kafka.topic, &e.customer, &bytes);
        sent += 1;
        if i % 10 == 0 && sent < events {
            send(&producer, &kafka.topic, &e.customer, &bytes);
            sent += 1;
        }
        i += 1;
    }
    producer.flush(Duration::from_secs(120)).unwrap();
    let rates = [("api_calls", "0.5"), ("tokens", "0.001")].map(|(meter, rate)| {
        tally_credits::RateDefinition {
            meter: meter.into(),
            credits_per_unit: rate.parse().unwrap(),
            dimensions: Default::default(),
        }
    });
    runtime.block_on(async {
        tally_credits::rates::record(pool, &rates).await.unwrap();
        // One purchased grant per customer, written in bulk (the API grants one at a time);
        // each starts at 0 and its `grant` entry brings it to its amount, as in the API.
        sqlx::raw_sql(&format!(
            "WITH g AS (
                 INSERT INTO credit_grants (customer_id, kind, amount, remaining, effective_at,
                        idempotency_key, granted_by, reason)
                 SELECT format('customer-%s', lpad(n::text, 5, '0')), 'purchased', 1000000000,
                        0, now() - interval '1 day', 'bench', 'bench', 'bench'
                 FROM generate_series(0, {}) AS n
                 RETURNING grant_id, customer_id, amount)
             INSERT INTO credit_transactions (customer_id, grant_id, kind, amount, actor)
             SELECT customer_id, grant_id, 'grant', amount, 'bench' FROM g",
            CUSTOMERS - 1
        ))
        .execute(pool)
        .await
        .unwrap();
    });
    let card = runtime
        .block_on(tally_credits::RateCard::load(pool))
        .unwrap();
    // The burner, as in `tally aggregate`, recording how long the oldest row of each pass
    // had waited since its batch committed.
    let stop = CancellationToken::new();
    let waits = Arc::new(Mutex::new(Histogram::<u64>::new(3).unwrap()));
    let burner = {
        let (pool, stop, waits) = (pool.clone(), stop.clone(), waits.clone());
        runtime.spawn(async move {
            let mut passes = 0u64;
            loop {
                let (report, more) = tally_credits::burn_once(&pool, &card).await.unwrap();
                if let Some(wait) = report.oldest_wait {
                    waits
                        .lock()
                        .unwrap()
                        .record(wait.as_millis() as u64)
                        .unwrap();
                    passes += 1;
                }
                if !more {
                    if stop.is_cancelled() {
                        return passes;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        })
    };
    let first_batch: Arc<Mutex<Option<Instant>>> = Arc::default();
    let first = first_batch.clone();
    let hooks = Hooks {
        on_step: Some(Arc::new(move |_| {
            first.lock().unwrap().get_or_insert_with(Instant::now);
        })),
        on_commit: None,
    };
    let aggregator = Aggregator::new(
        config(),
        kafka.clone(),
        meters(),
        pool.clone(),
        runtime.handle().clone(),
    )
    .unwrap()
    .with_priced_meters(["api_calls".to_string(), "tokens".to_string()].into())
    .with_hooks(hooks);
    let started = Instant::now();
    let summary = aggregator
        .run(RunMode::Once, &CancellationToken::new())
        .unwrap();
    let drained = Instant::now();
    let sustained = first_batch
        .lock()
        .unwrap()
        .map_or(started.elapsed(), |t| t.elapsed());
    let rate = summary.consumed as f64 / sustained.as_secs_f64();
    stop.cancel();
    let passes = runtime.block_on(burner).unwrap();
    let caught_up = drained.elapsed();
    let (entries, queued): (i64, i64) = runtime
        .block_on(
            sqlx::query_as(
                "SELECT (SELECT count(*) FROM credit_transactions WHERE kind = 'consume'),
                        (SELECT count(*) FROM credit_usage_queue)",
            )
            .fetch_one(pool),
        )
        .unwrap();
    assert_eq!(queued, 0, "everything burned");
    let waits = waits.lock().unwrap();
    println!(
        "aggregator with credits burning: {} events at {rate:.0} events/s ({:.0}% of the {rate_without:.0} without)",
        summary.consumed,
        100.0 * rate / rate_without
    );
    println!(
        "credit burn: {entries} consume entries in {passes} passes; commit-to-burn wait of each pass's oldest row: p50 {} ms, p99 {} ms, max {} ms; burned all {:.2}s after the last commit",
        waits.value_at_quantile(0.5),
        waits.value_at_quantile(0.99),
        waits.max(),
        caught_up.as_secs_f64()
    );
}

fn consume_and_decode(kafka: &KafkaConfig, want: usize) -> usize {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", "bench-kafka-alone")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(&kafka.topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let now = Utc::now();
    let mut n = 0;
    let deadline = Instant::now() + Duration::from_secs(300);
    while n < want && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let _ = wire::decode(m.payload().unwrap_or_default(), now);
            n += 1;
        }
    }
    n
}

/// What seed-style systems do: each event its own INSERT (dedup by primary key), then a
/// GROUP BY per minute into the window table.
async fn naive(pool: &sqlx::PgPool, events: &[UsageEvent]) -> f64 {
    sqlx::query(
        "CREATE TABLE naive_events (id text PRIMARY KEY, customer_id text, meter text,
                                    quantity numeric, ts timestamptz)",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "CREATE TABLE naive_minute (customer_id text, meter text, window_start timestamptz,
                                    value numeric, events bigint,
                                    PRIMARY KEY (customer_id, meter, window_start))",
    )
    .execute(pool)
    .await
    .unwrap();
    let started = Instant::now();
    for e in events {
        sqlx::query(
            "INSERT INTO naive_events VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&e.id)
        .bind(&e.customer)
        .bind(&e.meter)
        .bind(e.quantity)
        .bind(e.timestamp)
        .execute(pool)
        .await
        .unwrap();
    }
    let minutes: Vec<chrono::DateTime<Utc>> =
        sqlx::query_scalar("SELECT DISTINCT date_trunc('minute', ts) FROM naive_events")
            .fetch_all(pool)
            .await
            .unwrap();
    for minute in minutes {
        sqlx::query(
            "INSERT INTO naive_minute
             SELECT customer_id, meter, $1, sum(quantity), count(*) FROM naive_events
             WHERE ts >= $1 AND ts < $1 + interval '1 minute' GROUP BY customer_id, meter
             ON CONFLICT (customer_id, meter, window_start)
             DO UPDATE SET value = excluded.value, events = excluded.events",
        )
        .bind(minute)
        .execute(pool)
        .await
        .unwrap();
    }
    events.len() as f64 / started.elapsed().as_secs_f64()
}

/// CPU seconds this process has used (user + system), from /proc/self/stat.
fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line, 11 and 12 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Cores used by the Kafka side alone at `rate`: a paced producer into the mock broker and a
/// consumer that decodes every event, on a topic of its own, with no Postgres.
fn kafka_side_cpu(
    cluster: &MockCluster<'static, DefaultProducerContext>,
    rate: usize,
    seconds: u64,
) -> f64 {
    let kafka = KafkaConfig {
        brokers: cluster.bootstrap_servers(),
        topic: "kafka-side".into(),
        dlq_topic: String::new(),
        options: Default::default(),
    };
    cluster.create_topic(&kafka.topic, PARTITIONS, 1).unwrap();
    let total = rate * seconds as usize;
    let base = Utc::now();
    let encoded: Vec<(String, Vec<u8>)> = (0..total)
        .map(|i| {
            let e = event(20_000_000 + i, base);
            let bytes = wire::encode(&e);
            (e.customer, bytes)
        })
        .collect();
    let reader = {
        let kafka = kafka.clone();
        std::thread::spawn(move || consume_and_decode(&kafka, total))
    };
    let producer = producer(&kafka.brokers);
    let cpu_before = process_cpu_seconds();
    let started = Instant::now();
    for (slice, chunk) in encoded.chunks(rate / 1000).enumerate() {
        if let Some(ahead) = Duration::from_millis(slice as u64).checked_sub(started.elapsed()) {
            std::thread::sleep(ahead);
        }
        for (customer, bytes) in chunk {
            send(&producer, &kafka.topic, customer, bytes);
        }
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    reader.join().unwrap();
    (process_cpu_seconds() - cpu_before) / started.elapsed().as_secs_f64()
}

/// Produces at `rate` events/s for `seconds` while a daemon aggregator runs; returns p50, p99
/// and max append-to-commit in ms, and the rate actually offered.
fn freshness(
    kafka: &KafkaConfig,
    pool: &sqlx::PgPool,
    runtime: &tokio::runtime::Runtime,
    rate: usize,
    seconds: u64,
) -> (u64, u64, u64, f64) {
    let latencies = Arc::new(Mutex::new(Histogram::<u64>::new(3).unwrap()));
    let recorded = latencies.clone();
    let hooks = Hooks {
        on_step: None,
        on_commit: Some(Arc::new(move |_, timestamps| {
            let now = Utc::now().timestamp_millis();
            let mut h = recorded.lock().unwrap();
            for &t in timestamps {
                let _ = h.record((now - t).max(0) as u64);
            }
        })),
    };
    let aggregator = Aggregator::new(
        config(),
        kafka.clone(),
        meters(),
        pool.clone(),
        runtime.handle().clone(),
    )
    .unwrap()
    .with_hooks(hooks);
    let stop = CancellationToken::new();
    let token = stop.clone();
    let daemon = std::thread::spawn(move || aggregator.run(RunMode::Daemon, &token).unwrap());
    // Let the group assign partitions (and the backlog, if any, drain) before measuring.
    std::thread::sleep(Duration::from_secs(10));
    latencies.lock().unwrap().reset();

    let producer = producer(&kafka.brokers);
    // Encoded up front, so the load generator's own CPU (it shares the 2 cores with Postgres
    // and the aggregator) is only the send; latency is measured from the Kafka timestamp.
    let base = Utc::now();
    let total = rate * seconds as usize;
    let encoded: Vec<(String, Vec<u8>)> = (0..total)
        .map(|i| {
            let e = event(10_000_000 + i, base);
            let bytes = wire::encode(&e);
            (e.customer, bytes)
        })
        .collect();
    let started = Instant::now();
    // Sent in 1 ms slices at the target rate.
    for (slice, chunk) in encoded.chunks(rate / 1000).enumerate() {
        let due = Duration::from_millis(slice as u64);
        if let Some(ahead) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(ahead);
        }
        for (customer, bytes) in chunk {
            send(&producer, &kafka.topic, customer, bytes);
        }
    }
    let offered = total as f64 / started.elapsed().as_secs_f64();
    producer.flush(Duration::from_secs(30)).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    stop.cancel();
    let summary = daemon.join().unwrap();
    println!(
        "freshness run: {} events consumed in {} batches",
        summary.consumed, summary.batches
    );
    let h = latencies.lock().unwrap();
    (
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.max(),
        offered,
    )
}
