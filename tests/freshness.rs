//! Freshness under load (issue 26): how long from an event appended to Kafka until
//! `Quota::peek` sees it, while the pipeline carries a steady load, every part in a process of
//! its own as in production: the broker (`tally kafka`), the aggregator (`tally aggregate`),
//! the load generator (this benchmark run again as a child, a librdkafka producer), and this
//! process (probes and the quota cache, following the change feed unless
//! `TALLY_BENCH_FEED=0`). Everything shares the machine's cores with Postgres.
//!
//! Load: `TALLY_BENCH_RATE` events/s (default 50,000) over 10,000 customers × 3 meters, for
//! `TALLY_BENCH_SECONDS` (default 300) after a 10 s warm-up. Probes: 20 a second, each one
//! event for one of 100 subscribed customers, timed from the broker's acknowledgement
//! ("appended") until a peek answers usage that includes it. Prints one figure a line.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use hdrhistogram::Histogram;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, FutureProducer, FutureRecord, Producer, ThreadedProducer};
use rust_decimal::Decimal;
use tally_core::{wire, UsageEvent};
use tally_quota::{Quota, QuotaOptions};
use tally_tests::broker_process;

const LOAD_CUSTOMERS: usize = 10_000;
const PROBE_CUSTOMERS: usize = 100;
const PROBES_PER_SECOND: u64 = 20;
const WARM_UP: Duration = Duration::from_secs(10);

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if std::env::var("TALLY_BENCH_ROLE").as_deref() == Ok("load") {
        return generate_load();
    }
    let rate = env("TALLY_BENCH_RATE", 50_000);
    let seconds = env("TALLY_BENCH_SECONDS", 300);
    let feed = env("TALLY_BENCH_FEED", 1) == 1;
    let runtime = tally_db::testing::runtime();
    runtime.block_on(async {
        let db = tally_db::testing::fresh_database().await;
        let (work, kafka, _broker) = broker_process(&db.url, 16, "");
        let mut aggregator = work.spawn("aggregate", &db.url, &["aggregate"]);
        let probes = tally_billing::testing::unlimited_customers(&db.pool, PROBE_CUSTOMERS).await;

        // The load, from a process of its own, for the warm-up and the measured time.
        let mut load = std::process::Command::new(std::env::current_exe().unwrap())
            .env("TALLY_BENCH_ROLE", "load")
            .env("TALLY_BENCH_BROKERS", &kafka.brokers)
            .env("TALLY_BENCH_TOPIC", &kafka.topic)
            .env("TALLY_BENCH_RATE", rate.to_string())
            .env(
                "TALLY_BENCH_SECONDS",
                (seconds + WARM_UP.as_secs() + 5).to_string(),
            )
            .spawn()
            .expect("the load generator starts");

        let quota = Arc::new(
            Quota::with_options(
                db.pool.clone(),
                QuotaOptions {
                    change_feed: feed,
                    ..QuotaOptions::new(Duration::from_millis(250))
                },
            )
            .await
            .unwrap(),
        );
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &kafka.brokers)
            .set("linger.ms", "0")
            .create()
            .unwrap();
        // Each probe customer's usage so far, as peeked before the run.
        let mut expected = Vec::new();
        for customer in &probes {
            expected.push(used(&quota, customer).await);
        }
        tokio::time::sleep(WARM_UP).await;

        // The aggregator's share: one task polls `usage_daily` every 5 ms for the probes in
        // flight and records when each was committed.
        let in_flight: Arc<Mutex<Vec<(String, Decimal, Instant)>>> = Arc::default();
        let committed = Arc::new(Mutex::new(Histogram::<u64>::new(3).unwrap()));
        let watcher = {
            let (pool, in_flight, committed) =
                (db.pool.clone(), in_flight.clone(), committed.clone());
            let probes = probes.clone();
            tokio::spawn(async move {
                loop {
                    let values: Vec<(String, Decimal)> = sqlx::query_as(
                        "SELECT customer_id, value FROM usage_daily
                         WHERE customer_id = ANY($1) AND meter = 'api_calls'
                           AND day = (now() AT TIME ZONE 'UTC')::date",
                    )
                    .bind(&probes)
                    .fetch_all(&pool)
                    .await
                    .unwrap();
                    let now = Instant::now();
                    in_flight.lock().unwrap().retain(|(customer, want, acked)| {
                        let done = values.iter().any(|(c, v)| c == customer && v >= want);
                        if done {
                            let micros = now.duration_since(*acked).as_micros() as u64;
                            committed.lock().unwrap().record(micros).unwrap();
                        }
                        !done
                    });
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        let appended = Arc::new(Mutex::new(Histogram::<u64>::new(3).unwrap()));
        let sent = Arc::new(Mutex::new(Histogram::<u64>::new(3).unwrap()));
        let lost = Arc::new(AtomicBool::new(false));
        // (time since the start, latency in µs) of every probe, for TALLY_BENCH_TRACE.
        let trace = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        let started = Instant::now();
        let interval = Duration::from_micros(1_000_000 / PROBES_PER_SECOND);
        let mut i = 0usize;
        while started.elapsed() < Duration::from_secs(seconds) {
            let slot = i % PROBE_CUSTOMERS;
            expected[slot] += Decimal::ONE;
            let (customer, want) = (probes[slot].clone(), expected[slot]);
            let event = UsageEvent::new(customer.as_str(), "api_calls", Decimal::ONE)
                .with_id(uuid::Uuid::now_v7().to_string())
                .at(Utc::now());
            let payload = wire::encode(&event);
            let send_started = Instant::now();
            producer
                .send(
                    FutureRecord::to(&kafka.topic)
                        .key(&customer)
                        .payload(&payload),
                    Duration::from_secs(10),
                )
                .await
                .expect("the probe is appended");
            let acked = Instant::now();
            in_flight
                .lock()
                .unwrap()
                .push((customer.clone(), want, acked));
            let (quota, appended, sent, lost, trace) = (
                quota.clone(),
                appended.clone(),
                sent.clone(),
                lost.clone(),
                trace.clone(),
            );
            tasks.push(tokio::spawn(async move {
                loop {
                    if used(&quota, &customer).await >= want {
                        let seen = Instant::now();
                        let micros = |from: Instant| seen.duration_since(from).as_micros() as u64;
                        appended.lock().unwrap().record(micros(acked)).unwrap();
                        trace
                            .lock()
                            .unwrap()
                            .push((acked.duration_since(started), micros(acked)));
                        sent.lock().unwrap().record(micros(send_started)).unwrap();
                        return;
                    }
                    if acked.elapsed() > Duration::from_secs(60) {
                        lost.store(true, Ordering::Relaxed);
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }));
            i += 1;
            let next = started + interval * i as u32;
            tokio::time::sleep_until(next.into()).await;
        }
        for task in tasks {
            task.await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        watcher.abort();
        let _ = load.wait();
        assert!(
            !lost.load(Ordering::Relaxed),
            "a probe was not seen within 60 s"
        );
        assert!(
            tally_tests::alive(&mut aggregator.0),
            "the aggregator died:\n{}",
            work.log("aggregate")
        );

        if let Ok(path) = std::env::var("TALLY_BENCH_TRACE") {
            let mut trace = trace.lock().unwrap().clone();
            trace.sort();
            let lines: Vec<String> = trace
                .iter()
                .map(|(at, micros)| {
                    format!("{:.3} {:.1}", at.as_secs_f64(), *micros as f64 / 1000.0)
                })
                .collect();
            std::fs::write(&path, lines.join("\n")).unwrap();
            std::fs::write(format!("{path}.aggregate.log"), work.log("aggregate")).unwrap();
        }
        let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        let appended = appended.lock().unwrap().clone();
        let sent = sent.lock().unwrap().clone();
        let feed = if feed {
            "change feed"
        } else {
            "timer (refresh 250 ms)"
        };
        println!("freshness load_events_per_s {rate}");
        println!("freshness seconds {seconds}");
        println!("freshness quota_cache {feed}");
        println!("freshness probes {}", appended.len());
        let committed = committed.lock().unwrap().clone();
        for (name, h) in [
            ("appended_to_committed", &committed),
            ("appended_to_visible", &appended),
            ("sent_to_visible", &sent),
        ] {
            println!(
                "freshness {name}_ms p50 {:.0} p99 {:.0} p99.9 {:.0} max {:.0}",
                ms(h, 0.5),
                ms(h, 0.99),
                ms(h, 0.999),
                h.max() as f64 / 1000.0
            );
        }
        let counted: i64 =
            sqlx::query_scalar("SELECT coalesce(sum(event_count), 0)::bigint FROM usage_daily")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        println!("freshness events_counted {counted}");
    });
}

/// A probe customer's usage of `api_calls` in its period, as a check would see it.
async fn used(quota: &Quota, customer: &str) -> Decimal {
    quota
        .peek(customer, "api_calls", Decimal::ZERO)
        .await
        .unwrap()
        .used()
}

/// The load generator's process: `TALLY_BENCH_RATE` events/s for `TALLY_BENCH_SECONDS`, in
/// bursts every millisecond, over 10,000 customers × 3 meters.
fn generate_load() {
    let rate = env("TALLY_BENCH_RATE", 50_000);
    let seconds = env("TALLY_BENCH_SECONDS", 300);
    let topic = std::env::var("TALLY_BENCH_TOPIC").unwrap();
    let producer: ThreadedProducer<_> = ClientConfig::new()
        .set(
            "bootstrap.servers",
            std::env::var("TALLY_BENCH_BROKERS").unwrap(),
        )
        // Batches of 50 ms: a producer's usual trade at this rate, and one that keeps the mock
        // broker's logs short (it finds a fetch's offset by walking every message set of the
        // partition, so small sets make it slower the longer it runs).
        .set("linger.ms", "50")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap();
    let started = Instant::now();
    let mut sent = 0u64;
    let mut payload = Vec::new();
    while started.elapsed() < Duration::from_secs(seconds) {
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            let i = sent as usize;
            let customer = format!("load-{:05}", (i / 3) % LOAD_CUSTOMERS);
            let event = match i % 3 {
                0 => UsageEvent::new(customer.as_str(), "api_calls", Decimal::ONE),
                1 => UsageEvent::new(
                    customer.as_str(),
                    "tokens",
                    Decimal::new(i as i64 % 5000, 0),
                )
                .with_dimension("model", ["small", "large"][i % 2]),
                _ => UsageEvent::new(
                    customer.as_str(),
                    "storage_gb",
                    Decimal::new(i as i64 % 100, 1),
                ),
            }
            .with_id(uuid::Uuid::now_v7().to_string())
            .at(Utc::now());
            payload.clear();
            wire::encode_into(&event, &mut payload);
            let mut record = BaseRecord::to(&topic).key(&customer).payload(&payload);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        record = back;
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
            }
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    eprintln!(
        "load generator: {sent} events in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
