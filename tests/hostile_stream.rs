//! The pipeline against a hostile stream (issue 11): contract-valid events at every edge of the
//! contract (4-byte characters, maximal lengths, extreme decimals, duplicates, conflicting
//! copies across midnight) through the emitter, and near-valid ones (control characters, out
//! of range decimals, oversize keys, broken JSON) straight onto the topic, as a producer in
//! another language would send them. emitter → Kafka → aggregator → Postgres → sink → Stripe
//! (the emulator). The pipeline never stops; every good event is counted and billed exactly;
//! every bad one is in `rejected_events` with its reason.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use rust_decimal::Decimal;
use tally_aggregator::AggregatorConfig;
use tally_core::UsageEvent;
use tally_sink::{Sink, SinkConfig};
use tally_tests::*;
use tokio_util::sync::CancellationToken;

fn d(text: &str) -> Decimal {
    Decimal::from_str(text).unwrap()
}

/// Customers at the edges of the contract: multi-byte, 4-byte, separators Stripe identifiers
/// use, quotes and backslashes, the longest allowed.
fn customers() -> Vec<String> {
    vec![
        "acme".into(),
        "𝄞-music-co".into(),
        "a:b:c".into(),
        "quote\"back\\slash".into(),
        "ü".repeat(256),
        "😀".repeat(256), // 1,024 bytes: the longest customer
        "x".repeat(256),
        "日本語の顧客".into(),
    ]
}

const QUANTITIES: [&str; 8] = [
    "1",
    "0",
    "0.000000001",
    "1000000000000000",
    "123456789.123456789",
    "999999999999999.999999999",
    "2.5",
    "7",
];
const MODELS: [&str; 4] = ["large", "模型-大", "emoji😀", "q\"uote\\d"];

/// What the pipeline must end with.
#[derive(Default)]
struct Expected {
    /// Per (customer, meter): the exact sum of the counted events (sum meters).
    sums: BTreeMap<(String, String), Decimal>,
    /// Per (customer, minute): the largest storage_gb.
    peaks: BTreeMap<(String, DateTime<Utc>), Decimal>,
    /// Per reason: how many events are refused.
    rejected: BTreeMap<&'static str, i64>,
}

impl Expected {
    fn count(&mut self, event: &UsageEvent) {
        match event.meter.as_str() {
            "storage_gb" => {
                let minute = tally_core::window::minute_start(event.timestamp);
                let peak = self
                    .peaks
                    .entry((event.customer.clone(), minute))
                    .or_insert(event.quantity);
                *peak = (*peak).max(event.quantity);
            }
            meter => {
                *self
                    .sums
                    .entry((event.customer.clone(), meter.to_owned()))
                    .or_default() += event.quantity;
            }
        }
    }

    fn refuse(&mut self, reason: &'static str) {
        *self.rejected.entry(reason).or_default() += 1;
    }
}

fn good_event(rng: &mut StdRng, customers: &[String], n: usize, now: DateTime<Utc>) -> UsageEvent {
    let customer = &customers[rng.random_range(0..customers.len())];
    let meter = ["api_calls", "tokens", "storage_gb"][rng.random_range(0..3)];
    let quantity = d(QUANTITIES[rng.random_range(0..QUANTITIES.len())]);
    // Older than a slot (5 minutes): billed without waiting for its slot to end.
    let at = now - TimeDelta::seconds(rng.random_range(360..1800));
    let id = match n % 4 {
        0 => format!("𝄞-{n}-{}", "é".repeat(40)),
        1 => format!("{n:0>128}"), // the longest id
        _ => format!("evt-{n}"),
    };
    let mut event = UsageEvent::new(customer.clone(), meter, quantity)
        .with_id(id)
        .at(at);
    if rng.random_bool(0.5) {
        event = event.with_source("s".repeat(rng.random_range(1..=256)));
    }
    if meter == "tokens" {
        event = event.with_dimension("model", MODELS[rng.random_range(0..MODELS.len())]);
    }
    event
}

/// Near-valid events a hostile or buggy producer writes straight to the topic, each with the
/// reason it must be refused for.
fn hostile_events(now: DateTime<Utc>) -> Vec<(Vec<u8>, &'static str)> {
    let t = (now - TimeDelta::minutes(5)).to_rfc3339();
    let native = |id: &str, customer: &str, meter: &str, quantity: &str, extra: &str| {
        format!(
            r#"{{"id":{id},"customer":{customer},"meter":"{meter}","quantity":{quantity},"timestamp":"{t}"{extra}}}"#
        )
    };
    let long_customer = serde_json::to_string(&"😀".repeat(250)).unwrap();
    let mut events: Vec<(String, &'static str)> = vec![
        (native(r#""nul\u0000id""#, r#""acme""#, "api_calls", "1", ""), "invalid_id"),
        (native(r#""ctl-1""#, r#""ac\u001bme""#, "api_calls", "1", ""), "invalid_customer"),
        (native(r#""ctl-2""#, r#""acme""#, "api_calls", "1", r#","source":"s\u0000""#), "invalid_source"),
        (native(r#""ctl-3""#, r#""acme""#, "tokens", "1", r#","dimensions":{"model":"a\u007fb"}"#), "invalid_dimensions"),
        (native(r#""q-1""#, r#""acme""#, "api_calls", "1000000000000000.5", ""), "quantity_out_of_range"),
        (native(r#""q-2""#, r#""acme""#, "api_calls", r#""0.0000000001""#, ""), "quantity_out_of_range"),
        (native(r#""q-3""#, r#""acme""#, "api_calls", "1e400", ""), "invalid_quantity"),
        (native(r#""q-4""#, r#""acme""#, "api_calls", "-1", ""), "invalid_quantity"),
        (native(r#""c-1""#, &serde_json::to_string(&"x".repeat(257)).unwrap(), "api_calls", "1", ""), "invalid_customer"),
        (native(r#""k-1""#, &long_customer, "tokens", "1", &format!(r#","dimensions":{{"model":"{}"}}"#, "m".repeat(250))), "invalid_dimensions"),
        (native(r#""m-1""#, r#""acme""#, "no_such_meter", "1", ""), "unknown_meter"),
        (native(r#""dup""#, r#""acme""#, "api_calls", "1", r#","id":"again""#), "malformed"),
        (r#"{"id":"sur","customer":"\ud800","meter":"api_calls","quantity":1,"timestamp":"2026-01-01T00:00:00Z"}"#.into(), "malformed"),
        (format!(r#"{{"id":"fut","customer":"acme","meter":"api_calls","quantity":1,"timestamp":"{}"}}"#, (now + TimeDelta::hours(1)).to_rfc3339()), "future_timestamp"),
        (format!(r#"{{"id":"late","customer":"acme","meter":"api_calls","quantity":1,"timestamp":"{}"}}"#, (now - TimeDelta::days(40)).to_rfc3339()), "too_late"),
        (format!(r#"{{"id":"big","customer":"acme","meter":"api_calls","quantity":1,"timestamp":"{t}","source":"{}"}}"#, "s".repeat(70_000)), "oversize"),
        ("[1,2,3]".into(), "malformed"),
        (String::new(), "malformed"),
    ];
    let mut raw: Vec<(Vec<u8>, &'static str)> = events
        .drain(..)
        .map(|(text, reason)| (text.into_bytes(), reason))
        .collect();
    raw.push((vec![0xff, 0xfe, 0x00, b'{'], "malformed")); // not UTF-8
    raw
}

#[test]
fn a_hostile_stream_never_stops_the_pipeline_and_good_events_are_billed_exactly() {
    let runtime = runtime();
    let broker = Broker::start();
    let db = runtime.block_on(tally_db::testing::fresh_database());
    let pool = db.pool.clone();
    let emulator = runtime.block_on(emulator());
    let meters = meters();
    let stripe = stripe_config(&emulator);
    let customers = customers();
    runtime.block_on(async {
        record_meters(&pool, &meters, &stripe).await;
        map_customers(&pool, &customers).await;
    });

    // The pipeline's daemons, as `tally aggregate` and `tally sink` run them.
    let stop = CancellationToken::new();
    let aggregator = AggregatorThread::start(
        AggregatorConfig {
            batch_max_events: 500,
            batch_max_wait: Duration::from_millis(100),
            ..AggregatorConfig::default()
        },
        &broker.kafka,
        &meters,
        &pool,
        runtime.handle().clone(),
    );
    let sink = {
        let config = SinkConfig {
            interval: Duration::from_millis(500),
            settle_delay: Duration::ZERO,
            ..SinkConfig::default()
        };
        let sink = Sink::new(config, &stripe, pool.clone()).unwrap();
        let stop = stop.clone();
        runtime.spawn(async move { sink.run(tally_sink::RunMode::Daemon, &stop).await })
    };

    // Good events through the emitter, with same-payload re-sends and conflicting copies.
    let emitter = TestEmitter::start(&broker.kafka);
    let now = Utc::now();
    let mut rng = StdRng::seed_from_u64(11);
    let mut expected = Expected::default();
    let mut sent = Vec::new();
    for n in 0..2_000 {
        let event = good_event(&mut rng, &customers, n, now);
        expected.count(&event);
        emitter.emit(event.clone()).unwrap();
        sent.push(event);
    }
    for event in sent.iter().step_by(9) {
        emitter.emit(event.clone()).unwrap(); // a retry: counted once
    }
    // The same id again on the other side of midnight (as HTTP ingest's filled-in "now" makes
    // it): a conflicting duplicate, not a second count.
    let midnight = now.date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc();
    for i in 0..5 {
        let first = UsageEvent::new("acme", "api_calls", d("3"))
            .with_id(format!("across-midnight-{i}"))
            .at(midnight - TimeDelta::seconds(30));
        let copy = first.clone().at(midnight + (now - midnight) / 2);
        expected.count(&first);
        expected.refuse("conflicting_duplicate");
        emitter.emit(first).unwrap();
        emitter.emit(copy).unwrap();
    }
    emitter.flush(Duration::from_secs(60)).unwrap();

    // Near-valid events straight onto the topic.
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.kafka.brokers)
        .set("message.max.bytes", "1000000")
        .create()
        .unwrap();
    for (payload, reason) in hostile_events(now) {
        expected.refuse(reason);
        producer
            .send(
                BaseRecord::<[u8], [u8]>::to(&broker.kafka.topic)
                    .key(b"hostile".as_slice())
                    .payload(&payload),
            )
            .map_err(|(e, _)| e)
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();

    // Everything counted, refused and billed, to the unit.
    let counted = || -> BTreeMap<(String, String), Decimal> {
        runtime.block_on(async {
            sqlx::query_as::<_, (String, String, Decimal)>(
                "SELECT customer_id, meter, sum(value) FROM usage_minute
                 WHERE meter <> 'storage_gb' GROUP BY 1, 2",
            )
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .map(|(c, m, v)| ((c, m), v))
            .collect()
        })
    };
    let rejected = || -> BTreeMap<String, i64> {
        runtime.block_on(async {
            sqlx::query_as::<_, (String, i64)>(
                "SELECT reason, count(*) FROM rejected_events GROUP BY 1",
            )
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect()
        })
    };
    let expected_rejected: BTreeMap<String, i64> = expected
        .rejected
        .iter()
        .map(|(r, n)| ((*r).to_owned(), *n))
        .collect();
    wait_until(
        "every good event counted and every bad one refused",
        Duration::from_secs(120),
        || counted() == expected.sums && rejected() == expected_rejected,
    );
    let peaks: BTreeMap<(String, DateTime<Utc>), Decimal> = runtime.block_on(async {
        sqlx::query_as::<_, (String, DateTime<Utc>, Decimal)>(
            "SELECT customer_id, window_start, value FROM usage_minute WHERE meter = 'storage_gb'",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .map(|(c, t, v)| ((c, t), v))
        .collect()
    });
    assert_eq!(peaks, expected.peaks);

    let mapping: BTreeMap<String, String> = customers
        .iter()
        .enumerate()
        .map(|(i, c)| (c.clone(), format!("cus_t{i:05}")))
        .collect();
    let billed = |customer: &str, event_name: &str| -> i64 {
        emulator
            .totals()
            .iter()
            .filter(|t| t.customer == mapping[customer] && t.event_name == event_name)
            .map(|t| t.sum)
            .sum()
    };
    wait_until(
        "Stripe holds the floor of every sum",
        Duration::from_secs(120),
        || {
            expected.sums.iter().all(|((customer, meter), exact)| {
                let event_name = if meter == "tokens" {
                    "llm_tokens"
                } else {
                    meter.as_str()
                };
                Decimal::from(billed(customer, event_name)) == exact.floor()
            })
        },
    );

    // Still running: nothing the stream held stopped a stage.
    assert!(aggregator.running(), "the aggregator stopped");
    assert!(!sink.is_finished(), "the sink stopped");
    let (quarantined, failed): (i64, i64) = runtime.block_on(async {
        sqlx::query_as(
            "SELECT (SELECT count(*) FROM billing_quarantine),
                    (SELECT count(*) FROM stripe_submissions WHERE status <> 'sent')",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    });
    assert_eq!((quarantined, failed), (0, 0));
    stop.cancel();
    aggregator.stop();
    runtime.block_on(sink).unwrap().unwrap();
    emitter.shutdown(Duration::from_secs(5));
}
