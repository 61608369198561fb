//! The aggregator against librdkafka's mock cluster and a real Postgres (a fresh database per
//! test, on the server DATABASE_URL names; scripts/test.sh provides one).

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rust_decimal::Decimal;
use sqlx::PgPool;
use tally_aggregator::{
    Aggregator, AggregatorConfig, AggregatorError, Hooks, RunMode, RunSummary, Step,
};
use tally_core::config::KafkaConfig;
use tally_core::window::minute_start;
use tally_core::{wire, MeterDefinition, UsageEvent};
use tally_db::testing::{fresh_database, TestDatabase};
use tokio_util::sync::CancellationToken;

const PARTITIONS: i32 = 6;

fn meters() -> Vec<MeterDefinition> {
    let text = r#"
        [[meters]]
        name = "api_calls"
        aggregation = "count"
        [[meters]]
        name = "tokens"
        aggregation = "sum"
        group_by = ["model"]
        [[meters]]
        name = "storage_gb"
        aggregation = "max"
        [[meters]]
        name = "seats"
        aggregation = "latest"
        [[meters]]
        name = "active_users"
        aggregation = "unique_count"
        unique_dimension = "user"
    "#;
    tally_core::meter::meters_from_toml(text).unwrap()
}

use tally_db::testing::runtime;

/// A mock cluster with a fresh topic (and its DLQ), plus a fresh database.
struct Harness {
    cluster: MockCluster<'static, DefaultProducerContext>,
    kafka: KafkaConfig,
    db: TestDatabase,
    runtime: tokio::runtime::Runtime,
    producer: ThreadedProducer<DefaultProducerContext>,
}

impl Harness {
    fn new() -> Self {
        let cluster = MockCluster::new(1).unwrap();
        let suffix = uuid::Uuid::now_v7().simple().to_string();
        let kafka = KafkaConfig {
            brokers: cluster.bootstrap_servers(),
            topic: format!("usage-events-{suffix}"),
            dlq_topic: format!("usage-events-dlq-{suffix}"),
            options: [
                // Quick group membership changes, so rebalance tests do not wait for timeouts.
                // The mock broker's minimum; a killed member is noticed after this long.
                ("session.timeout.ms", "6000"),
                ("heartbeat.interval.ms", "500"),
            ]
            .into_iter()
            .collect(),
        };
        cluster.create_topic(&kafka.topic, PARTITIONS, 1).unwrap();
        cluster.create_topic(&kafka.dlq_topic, 1, 1).unwrap();
        let runtime = runtime();
        let db = runtime.block_on(fresh_database());
        let producer = ClientConfig::new()
            .set("bootstrap.servers", &kafka.brokers)
            .set("enable.idempotence", "true")
            .set("linger.ms", "2")
            .create()
            .unwrap();
        Harness {
            cluster,
            kafka,
            db,
            runtime,
            producer,
        }
    }

    fn send_raw(&self, key: &str, payload: &[u8]) {
        let mut record = BaseRecord::to(&self.kafka.topic).key(key).payload(payload);
        loop {
            match self.producer.send(record) {
                Ok(()) => return,
                Err((_, back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }

    fn send(&self, event: &UsageEvent) {
        self.send_raw(&event.customer, &wire::encode(event));
    }

    fn flush(&self) {
        self.producer.flush(Duration::from_secs(30)).unwrap();
    }

    fn aggregator(&self, config: AggregatorConfig) -> Aggregator {
        Aggregator::new(
            config,
            self.kafka.clone(),
            meters(),
            self.db.pool.clone(),
            self.runtime.handle().clone(),
        )
        .unwrap()
    }

    fn run_once(&self) -> RunSummary {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("tally_aggregator=debug,tally_runtime=debug")
            .try_init();
        self.aggregator(fast())
            .run(RunMode::Once, &CancellationToken::new())
            .unwrap()
    }

    fn pool(&self) -> &PgPool {
        &self.db.pool
    }

    /// A transaction holding `usage_minute` locked: every commit waits for it.
    fn lock_windows(&self) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let mut locker = self.runtime.block_on(self.pool().begin()).unwrap();
        self.runtime
            .block_on(
                sqlx::query("LOCK TABLE usage_minute IN ACCESS EXCLUSIVE MODE")
                    .execute(&mut *locker),
            )
            .unwrap();
        locker
    }

    fn query<T>(&self, sql: &str) -> Vec<T>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
    {
        self.runtime
            .block_on(sqlx::query_as(sql).fetch_all(self.pool()))
            .unwrap()
    }
}

/// Small batches; each aggregator its own static-membership name, as on separate hosts (the
/// mock cluster does not implement static membership: the name changes nothing there).
fn fast() -> AggregatorConfig {
    AggregatorConfig {
        batch_max_events: 500,
        batch_max_wait: Duration::from_millis(50),
        static_membership: true,
        instance_id: Some(format!("test-{}", uuid::Uuid::now_v7().simple())),
        ..AggregatorConfig::default()
    }
}

fn event(id: &str, customer: &str, meter: &str, quantity: &str, at: DateTime<Utc>) -> UsageEvent {
    UsageEvent::new(customer, meter, Decimal::from_str(quantity).unwrap())
        .with_id(id)
        .at(at)
}

/// A window's key (customer, meter, minute, group key) and its (value, event count).
type WindowKey = (String, String, DateTime<Utc>, String);
type Windows = BTreeMap<WindowKey, (Decimal, i64)>;

/// What the windows must hold: per (customer, meter, minute, group key), the sum of quantities
/// and the event count, computed from the events alone.
#[derive(Default)]
struct Expected {
    windows: Windows,
}

impl Expected {
    fn add(&mut self, event: &UsageEvent) {
        let group = match event.dimensions.get("model") {
            Some(model) if event.meter == "tokens" => format!("{{\"model\":\"{model}\"}}"),
            None if event.meter == "tokens" => "{}".into(),
            _ => String::new(),
        };
        let key = (
            event.customer.clone(),
            event.meter.clone(),
            minute_start(event.timestamp),
            group,
        );
        let entry = self.windows.entry(key).or_default();
        entry.0 += event.quantity;
        entry.1 += 1;
    }
}

type WindowRow = (String, String, DateTime<Utc>, String, Decimal, i64);

fn windows(h: &Harness, meter_filter: &str) -> Windows {
    let rows: Vec<WindowRow> = h.query(&format!(
        "SELECT customer_id, meter, window_start, group_key, value, event_count FROM usage_minute
         WHERE meter IN ({meter_filter})"
    ));
    rows.into_iter()
        .map(|(c, m, t, g, v, n)| ((c, m, t, g), (v.normalize(), n)))
        .collect()
}

fn normalized(expected: &Expected) -> Windows {
    expected
        .windows
        .iter()
        .map(|(k, (v, n))| (k.clone(), (v.normalize(), *n)))
        .collect()
}

fn reasons(h: &Harness) -> BTreeMap<String, i64> {
    let rows: Vec<(String, i64)> =
        h.query("SELECT reason, count(*) FROM rejected_events GROUP BY reason");
    rows.into_iter().collect()
}

#[test]
fn counts_every_aggregation_exactly_and_refuses_each_reason_once() {
    let h = Harness::new();
    let now = Utc::now();
    let minute = minute_start(now) - TimeDelta::minutes(3);
    let mut expected = Expected::default();
    let mut n = 0;
    let mut next_id = || {
        n += 1;
        format!("evt-{n:06}")
    };
    let mut sent = Vec::new();
    for i in 0..300 {
        let customer = format!("cust-{}", i % 7);
        let t = minute + TimeDelta::seconds(i % 170);
        let e = event(
            &next_id(),
            &customer,
            "tokens",
            &format!("{}.{}", i, i % 10),
            t,
        )
        .with_dimension("model", if i % 3 == 0 { "large" } else { "small" });
        expected.add(&e);
        h.send(&e);
        sent.push(e.clone());
        let calls = event(&next_id(), &customer, "api_calls", "999", t);
        h.send(&calls);
        sent.push(calls);
    }
    // 10% re-sent ids with the same payload: counted once.
    for e in sent.iter().step_by(10) {
        h.send(e);
    }
    // max, latest (by event time, not arrival), unique_count.
    for (id, q, s) in [("m1", "5", 0), ("m2", "9", 1), ("m3", "7", 2)] {
        h.send(&event(
            id,
            "acme",
            "storage_gb",
            q,
            minute + TimeDelta::seconds(s),
        ));
    }
    h.send(&event(
        "s2",
        "acme",
        "seats",
        "12",
        minute + TimeDelta::seconds(30),
    ));
    h.send(&event(
        "s1",
        "acme",
        "seats",
        "10",
        minute + TimeDelta::seconds(10),
    ));
    for (id, user) in [("u1", "ann"), ("u2", "bob"), ("u3", "ann")] {
        h.send(&event(id, "acme", "active_users", "1", minute).with_dimension("user", user));
    }
    // One of each reason the aggregator decides, plus decode failures.
    h.send_raw("x", b"{not json");
    h.send(&event("bad-meter", "acme", "nope", "1", minute));
    h.send(&event(
        "too-late",
        "acme",
        "tokens",
        "1",
        now - TimeDelta::days(36),
    ));
    h.send(&event(
        "future",
        "acme",
        "tokens",
        "1",
        now + TimeDelta::minutes(30),
    ));
    h.send_raw(
        "acme",
        format!(
            r#"{{"id":"neg","customer":"acme","meter":"tokens","quantity":"-1","timestamp":"{}"}}"#,
            minute.to_rfc3339()
        )
        .as_bytes(),
    );
    h.send(&event("users-no-dim", "acme", "active_users", "1", minute));
    // The contract's own reasons, decided while decoding.
    let t = minute.to_rfc3339();
    for raw in [
        format!(r#"{{"id":"mf","customer":"acme","meter":"tokens","timestamp":"{t}"}}"#),
        format!(
            r#"{{"id":"","customer":"acme","meter":"tokens","quantity":"1","timestamp":"{t}"}}"#
        ),
        format!(r#"{{"id":"ic","customer":"","meter":"tokens","quantity":"1","timestamp":"{t}"}}"#),
        format!(
            r#"{{"id":"im","customer":"acme","meter":"API","quantity":"1","timestamp":"{t}"}}"#
        ),
        r#"{"id":"it","customer":"acme","meter":"tokens","quantity":"1","timestamp":"yesterday"}"#
            .to_string(),
        format!(
            r#"{{"id":"os","customer":"{}","meter":"tokens","quantity":"1","timestamp":"{t}"}}"#,
            "x".repeat(70_000)
        ),
        format!(
            r#"{{"id":"qr","customer":"acme","meter":"tokens","quantity":1e16,"timestamp":"{t}"}}"#
        ),
        format!(
            r#"{{"id":"is","customer":"acme","meter":"tokens","quantity":"1","timestamp":"{t}","source":"a\u0000b"}}"#
        ),
    ] {
        h.send_raw("acme", raw.as_bytes());
    }
    // Valid by the contract, but refused by Postgres (a constraint planted for the test): the
    // batch is split until this event is found; everything else commits.
    h.runtime.block_on(async {
        sqlx::query(
            "ALTER TABLE usage_minute ADD CONSTRAINT planted CHECK (customer_id <> 'poison')",
        )
        .execute(h.pool())
        .await
        .unwrap();
    });
    h.send(&event("poison-1", "poison", "tokens", "1", minute));
    h.flush();
    let first = h.run_once();
    assert_eq!(first.counted, 600 + 3 + 2 + 3);

    // A conflicting re-send in a later batch: flagged, not counted.
    let mut conflicting = sent[0].clone();
    conflicting.quantity += Decimal::ONE;
    h.send(&conflicting);
    h.send(&sent[1]); // and a plain duplicate in a later batch
    h.flush();
    let second = h.run_once();
    assert_eq!(
        (second.counted, second.duplicates, second.rejected),
        (0, 1, 1)
    );

    assert_eq!(
        windows(&h, "'tokens'"),
        normalized(&Expected {
            windows: expected
                .windows
                .iter()
                .filter(|(k, _)| k.1 == "tokens")
                .map(|(k, v)| (k.clone(), *v))
                .collect()
        })
    );
    // count ignores quantities: value = events.
    let calls: Vec<(Decimal, i64)> = h.query(
        "SELECT sum(value), sum(event_count)::bigint FROM usage_minute WHERE meter = 'api_calls'",
    );
    assert_eq!(calls[0], (Decimal::from(300), 300));
    let single = |meter: &str| -> Decimal {
        h.query::<(Decimal,)>(&format!(
            "SELECT value FROM usage_minute WHERE meter = '{meter}' AND customer_id = 'acme'"
        ))[0]
            .0
    };
    assert_eq!(single("storage_gb"), Decimal::from(9));
    assert_eq!(single("seats"), Decimal::from(12));
    assert_eq!(single("active_users"), Decimal::from(2));

    assert_eq!(
        reasons(&h),
        BTreeMap::from([
            ("conflicting_duplicate".into(), 1),
            ("future_timestamp".into(), 1),
            ("invalid_customer".into(), 1),
            ("invalid_dimensions".into(), 1),
            ("invalid_id".into(), 1),
            ("invalid_meter".into(), 1),
            ("invalid_quantity".into(), 1),
            ("invalid_source".into(), 1),
            ("invalid_timestamp".into(), 1),
            ("malformed".into(), 1),
            ("missing_field".into(), 1),
            ("oversize".into(), 1),
            ("quantity_out_of_range".into(), 1),
            ("too_late".into(), 1),
            ("unknown_meter".into(), 1),
            ("unprocessable".into(), 1),
        ])
    );
    let unprocessable: Vec<(String, Vec<u8>)> =
        h.query("SELECT detail, raw FROM rejected_events WHERE reason = 'unprocessable'");
    assert!(unprocessable[0].0.contains("planted"), "{unprocessable:?}");
    assert!(String::from_utf8_lossy(&unprocessable[0].1).contains("poison-1"));
    let raw: Vec<(Vec<u8>, bool)> = h.query(
        "SELECT raw, dlq_published_at IS NOT NULL FROM rejected_events WHERE reason = 'malformed'",
    );
    assert_eq!(raw[0], (b"{not json".to_vec(), true));

    // Every reject was copied to the DLQ topic, with its reason in a header.
    // Every reason the contract defines was exercised.
    assert_eq!(reasons(&h).len(), tally_core::RejectReason::ALL.len());
    let dlq = consume_all(&h.kafka, &h.kafka.dlq_topic, 16);
    assert_eq!(dlq.len(), 16);
    assert!(dlq
        .iter()
        .any(|(reason, payload)| reason == "malformed" && payload == b"{not json"));

    // The daily rollup and the finance views agree with the minutes.
    let daily: Vec<(Decimal,)> =
        h.query("SELECT sum(value) FROM finance_usage_daily WHERE meter = 'tokens'");
    let monthly: Vec<(Decimal, i64)> = h.query(
        "SELECT sum(value), sum(events)::bigint FROM finance_usage_monthly WHERE meter = 'tokens'",
    );
    let total: Decimal = expected
        .windows
        .iter()
        .filter(|(k, _)| k.1 == "tokens")
        .map(|(_, v)| v.0)
        .sum();
    assert_eq!(daily[0].0, total);
    assert_eq!(monthly[0], (total, 300));
    let unique: Vec<(Decimal,)> =
        h.query("SELECT value FROM finance_usage_monthly WHERE meter = 'active_users'");
    assert_eq!(unique[0].0, Decimal::from(2));
}

/// Consumes `want` messages of `topic` from the beginning: (reason header, payload).
fn consume_all(kafka: &KafkaConfig, topic: &str, want: usize) -> Vec<(String, Vec<u8>)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", format!("reader-{}", uuid::Uuid::now_v7()))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = Vec::new();
    while out.len() < want && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            use rdkafka::message::Headers;
            let reason = m
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == "tally-reason"))
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            out.push((reason, m.payload().unwrap_or_default().to_vec()));
        }
    }
    out
}

#[test]
fn late_events_land_in_their_own_minute_and_bump_last_updated() {
    let h = Harness::new();
    let minute = minute_start(Utc::now()) - TimeDelta::hours(5);
    h.send(&event("a", "acme", "tokens", "5", minute));
    h.flush();
    h.run_once();
    let before: Vec<(Decimal, DateTime<Utc>, DateTime<Utc>)> =
        h.query("SELECT value, first_updated, last_updated FROM usage_minute");
    h.send(&event(
        "b",
        "acme",
        "tokens",
        "7",
        minute + TimeDelta::seconds(59),
    ));
    h.send(&event(
        "c",
        "acme",
        "tokens",
        "1",
        minute + TimeDelta::minutes(1),
    ));
    h.flush();
    h.run_once();
    #[allow(clippy::type_complexity)]
    let after: Vec<(DateTime<Utc>, Decimal, DateTime<Utc>, DateTime<Utc>)> = h.query(
        "SELECT window_start, value, first_updated, last_updated FROM usage_minute ORDER BY window_start",
    );
    assert_eq!(after.len(), 2);
    assert_eq!((after[0].0, after[0].1), (minute, Decimal::from(12)));
    assert_eq!(after[0].2, before[0].1, "first_updated stays");
    assert!(
        after[0].3 > before[0].2,
        "last_updated moves so the sink re-bills the slot"
    );
}

#[test]
fn once_reports_an_unreachable_kafka_clearly() {
    let h = Harness::new();
    let kafka = KafkaConfig {
        brokers: "127.0.0.1:1".into(),
        ..h.kafka.clone()
    };
    let aggregator = Aggregator::new(
        fast(),
        kafka,
        meters(),
        h.db.pool.clone(),
        h.runtime.handle().clone(),
    )
    .unwrap();
    let error = aggregator
        .run(RunMode::Once, &CancellationToken::new())
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("cannot reach Kafka at 127.0.0.1:1"),
        "{error}"
    );
}

/// Produces `count` events (10% of them re-sent) spread over customers and minutes, recording
/// what the windows must hold.
fn produce_stream(h: &Harness, range: std::ops::Range<usize>, expected: &mut Expected) {
    let base = minute_start(Utc::now()) - TimeDelta::minutes(30);
    for i in range {
        let customer = format!("cust-{}", i % 50);
        let t = base + TimeDelta::seconds((i % 1800) as i64);
        let e = event(
            &format!("id-{i:08}"),
            &customer,
            "tokens",
            &format!("{}.{:02}", i % 97, i % 100),
            t,
        )
        .with_dimension("model", ["s", "m", "l"][i % 3]);
        expected.add(&e);
        h.send(&e);
        if i % 10 == 0 {
            h.send(&e);
        }
    }
}

/// Polls `sql` (one boolean) until it is true, for up to 60 s.
/// `fast()` with the shortest `stall_timeout` allowed.
fn stall_in_five_seconds() -> AggregatorConfig {
    AggregatorConfig {
        stall_timeout: Duration::from_secs(5),
        ..fast()
    }
}

fn wait_for(h: &Harness, sql: &str) {
    let started = Instant::now();
    while !h.query::<(bool,)>(sql)[0].0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "timed out waiting for: {sql}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for_events(h: &Harness, events: i64, deadline: Duration) {
    let started = Instant::now();
    loop {
        let counted: Vec<(Option<i64>,)> =
            h.query("SELECT sum(event_count)::bigint FROM usage_minute");
        if counted[0].0 == Some(events) {
            return;
        }
        assert!(
            started.elapsed() < deadline,
            "only {:?} of {events} events counted after {deadline:?}",
            counted[0].0
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn two_aggregators_in_one_group_split_partitions_through_rebalances() {
    let h = Harness::new();
    let mut expected = Expected::default();
    let start = |name: &'static str| {
        let stop = CancellationToken::new();
        let aggregator = h.aggregator(fast());
        let token = stop.clone();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || aggregator.run(RunMode::Daemon, &token).unwrap())
            .unwrap();
        (stop, handle)
    };
    let (stop_a, a) = start("aggregator-a");
    produce_stream(&h, 0..3_000, &mut expected);
    h.flush();
    wait_for(&h, "SELECT count(*) > 0 FROM event_ids");
    // B joins mid-stream: the group rebalances while A is consuming.
    let (stop_b, b) = start("aggregator-b");
    produce_stream(&h, 3_000..6_000, &mut expected);
    h.flush();
    wait_for(&h, "SELECT count(DISTINCT owner) = 2 FROM kafka_offsets");
    // A leaves mid-stream: B takes all partitions, resuming at the offsets in Postgres.
    stop_a.cancel();
    let summary_a = a.join().unwrap();
    produce_stream(&h, 6_000..9_000, &mut expected);
    h.flush();
    wait_for_events(&h, 9_000, Duration::from_secs(60));
    stop_b.cancel();
    let summary_b = b.join().unwrap();
    assert!(
        summary_a.counted > 0 && summary_b.counted > 0,
        "{summary_a:?} {summary_b:?}"
    );
    assert_eq!(windows(&h, "'tokens'"), normalized(&expected));
    let ids: Vec<(i64,)> = h.query("SELECT count(*) FROM event_ids");
    assert_eq!(ids[0].0, 9_000);
}

#[test]
fn a_batch_from_a_fenced_aggregator_is_rolled_back() {
    // A takes the partitions and builds a batch; B takes them over (as in a rebalance) before A
    // commits. A's commit must write nothing; B then counts every event exactly once.
    let h = Harness::new();
    let mut expected = Expected::default();
    produce_stream(&h, 0..1_000, &mut expected);
    h.flush();
    let fenced = Arc::new(AtomicU64::new(0));
    let pool = h.db.pool.clone();
    let topic = h.kafka.topic.clone();
    let steal = {
        let fenced = fenced.clone();
        let runtime = h.runtime.handle().clone();
        move |step: Step| {
            if step == Step::BeforeCommit && fenced.fetch_add(1, Ordering::SeqCst) == 0 {
                // Another owner bumps every partition's epoch, as its rebalance handler does.
                runtime
                    .block_on(
                        sqlx::query(
                            "UPDATE kafka_offsets SET owner_epoch = owner_epoch + 1, owner = 'thief' WHERE topic = $1",
                        )
                        .bind(&topic)
                        .execute(&pool),
                    )
                    .unwrap();
            }
        }
    };
    let aggregator = h.aggregator(fast()).with_hooks(Hooks {
        on_step: Some(Arc::new(steal)),
        on_commit: None,
    });
    // `--once` says the partitions were taken from it (it used to end Ok, as if drained).
    let taken = aggregator.run(RunMode::Once, &CancellationToken::new());
    assert!(
        matches!(taken, Err(AggregatorError::TakenOver { .. })),
        "{taken:?}"
    );
    let ids: Vec<(i64,)> = h.query("SELECT count(*) FROM event_ids");
    assert_eq!(ids[0].0, 0, "nothing from the fenced batch may remain");
    // The rightful owner (a fresh run) counts everything once.
    h.run_once();
    assert_eq!(windows(&h, "'tokens'"), normalized(&expected));
}

const CHILD_ENV: &str = "TALLY_TEST_AGGREGATOR_CHILD";

/// Runs in a child process: aggregates until killed, dying by abort() at random batch steps.
#[test]
#[ignore = "helper process for exactly_once_when_killed_at_random_points"]
fn crash_child() {
    let spec = std::env::var(CHILD_ENV).expect("run by exactly_once_when_killed_at_random_points");
    let parts: Vec<&str> = spec.split('|').collect();
    let (brokers, topic, url, seed) = (
        parts[0],
        parts[1],
        parts[2],
        parts[3].parse::<u64>().unwrap(),
    );
    let runtime = runtime();
    let pool = runtime
        .block_on(tally_db::connect(url, 4, Duration::from_secs(10)))
        .unwrap();
    let kafka = KafkaConfig {
        brokers: brokers.into(),
        topic: topic.into(),
        dlq_topic: format!("{topic}-dlq"),
        options: [
            ("session.timeout.ms", "6000"),
            ("heartbeat.interval.ms", "500"),
        ]
        .into_iter()
        .collect(),
    };
    // A small xorshift: which step of which batch dies depends on the seed.
    let state = AtomicU64::new(seed | 1);
    let crash = move |_: Step| {
        let mut x = state.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.store(x, Ordering::Relaxed);
        if x.is_multiple_of(12) {
            std::process::abort();
        }
    };
    let aggregator = Aggregator::new(fast(), kafka, meters(), pool, runtime.handle().clone())
        .unwrap()
        .with_hooks(Hooks {
            on_step: Some(Arc::new(crash)),
            on_commit: None,
        });
    aggregator
        .run(RunMode::Daemon, &CancellationToken::new())
        .unwrap();
}

/// Waits until some aggregator has taken the partitions more than `round` times (or 20 s).
fn wait_for_owner_change(h: &Harness, round: u64) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        let epoch: Vec<(Option<i64>,)> = h.query("SELECT max(owner_epoch) FROM kafka_offsets");
        if epoch[0].0.unwrap_or(0) > round as i64 {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn exactly_once_when_killed_at_random_points() {
    let h = Harness::new();
    let mut expected = Expected::default();
    let mut produced = 0;
    for round in 0..6u64 {
        produce_stream(&h, produced..produced + 2_000, &mut expected);
        produced += 2_000;
        h.flush();
        let spec = format!(
            "{}|{}|{}|{}",
            h.kafka.brokers,
            h.kafka.topic,
            h.db.url,
            round * 7919 + 17
        );
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["crash_child", "--exact", "--ignored", "--nocapture"])
            .env(CHILD_ENV, spec)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // kill -9 at a random moment after the child took its partitions, unless an abort()
        // at a batch step came first.
        wait_for_owner_change(&h, round);
        let lifetime = Duration::from_millis(100 + (round * 611) % 1_500);
        let died = Instant::now();
        while died.elapsed() < lifetime {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let status = child.wait().unwrap();
        assert!(!status.success(), "the child only ever dies");
    }
    // A clean run drains the rest: every event in exactly one window, to the unit.
    h.run_once();
    assert_eq!(windows(&h, "'tokens'"), normalized(&expected));
    let ids: Vec<(i64,)> = h.query("SELECT count(*) FROM event_ids");
    assert_eq!(ids[0].0, produced as i64);
}

/// `--once` does not depend on the group: a member that holds every partition and never
/// processes them (as a stopped static member does on brokers that keep it) cannot keep it
/// from draining them all.
#[test]
fn once_drains_every_partition_while_another_member_holds_them() {
    let h = Harness::new();
    let mut expected = Expected::default();
    produce_stream(&h, 0..2_000, &mut expected);
    h.flush();
    let squatter: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &h.kafka.brokers)
        .set("group.id", &AggregatorConfig::default().group_id)
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap();
    squatter.subscribe(&[&h.kafka.topic]).unwrap();
    let started = Instant::now();
    while squatter.assignment().unwrap().count() < PARTITIONS as usize {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the squatter got no assignment"
        );
        let _ = squatter.poll(Duration::from_millis(100));
    }
    // It keeps its session (librdkafka heartbeats in the background) but never polls again.
    let started = Instant::now();
    let summary = h.run_once();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(summary.rejoins, 0);
    let ids: Vec<(i64,)> = h.query("SELECT count(*) FROM event_ids");
    assert_eq!(ids[0].0, 2_000);
    assert_eq!(windows(&h, "'tokens'"), normalized(&expected));
    drop(squatter);
}

/// A member whose fetches fail (a broker that assigns partitions but does not serve them)
/// is reported stalled in `aggregator_members`, joins again with a fresh consumer, and
/// counts every event exactly once when the broker serves it again.
#[test]
fn a_member_that_consumes_nothing_is_reported_and_joins_again() {
    let h = Harness::new();
    let mut expected = Expected::default();
    produce_stream(&h, 0..1_000, &mut expected);
    h.flush();
    // Every fetch fails for a while (librdkafka backs off and tries again, without an error
    // the application sees), while listing offsets still works.
    h.cluster.request_errors(
        rdkafka::types::RDKafkaApiKey::Fetch,
        &[rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN; 2_000],
    );
    let config = stall_in_five_seconds();
    let stop = CancellationToken::new();
    let aggregator = h.aggregator(config);
    let token = stop.clone();
    let daemon = std::thread::spawn(move || aggregator.run(RunMode::Daemon, &token).unwrap());
    wait_for(
        &h,
        "SELECT count(*) = 1 FROM aggregator_members
         WHERE stall LIKE 'assigned partitions % but consumed nothing from them for % s while they have % messages of lag'
           AND stalled_since IS NOT NULL",
    );
    h.cluster
        .clear_request_errors(rdkafka::types::RDKafkaApiKey::Fetch);
    wait_for_events(&h, 1_000, Duration::from_secs(60));
    wait_for(
        &h,
        "SELECT count(*) = 1 FROM aggregator_members WHERE stall IS NULL",
    );
    stop.cancel();
    let summary = daemon.join().unwrap();
    assert!(summary.rejoins >= 1, "{summary:?}");
    assert_eq!(windows(&h, "'tokens'"), normalized(&expected));
    let members: Vec<(i64,)> = h.query("SELECT count(*) FROM aggregator_members");
    assert_eq!(members[0].0, 0, "a stopped aggregator forgets its row");
}

/// Before: a commit that Postgres held up for longer than `stall_timeout` (a lock, a slow
/// disk) looked to the watchdog like a member consuming nothing; it rejoined, which threw the
/// commit away, and could do so again on every try. Now a commit under way is progress for up
/// to `stall_timeout`; held up longer, the member is reported stalled, waiting for Postgres,
/// and stays: the commit lands when Postgres lets it, every event counted once.
#[test]
fn a_commit_postgres_holds_up_is_reported_and_never_thrown_away() {
    let h = Harness::new();
    let mut expected = Expected::default();
    let locker = h.lock_windows();
    produce_stream(&h, 0..1_000, &mut expected);
    h.flush();
    let config = stall_in_five_seconds();
    let stop = CancellationToken::new();
    let aggregator = h.aggregator(config);
    let token = stop.clone();
    let daemon = std::thread::spawn(move || aggregator.run(RunMode::Daemon, &token).unwrap());
    wait_for(
        &h,
        "SELECT count(*) = 1 FROM aggregator_members
         WHERE stall LIKE 'assigned partitions % with % messages of lag, but a batch of theirs has been committing for % s: Postgres holds it up%'",
    );
    h.runtime.block_on(locker.commit()).unwrap();
    wait_for_events(&h, 1_000, Duration::from_secs(60));
    wait_for(
        &h,
        "SELECT count(*) = 1 FROM aggregator_members WHERE stall IS NULL",
    );
    stop.cancel();
    let summary = daemon.join().unwrap();
    assert_eq!(summary.rejoins, 0, "{summary:?}");
    assert_eq!(windows(&h, "'tokens'"), normalized(&expected));
}

/// `--once` ends while producers keep writing: at most a little past the end offsets it read
/// (it used to wait for 300 ms without a message, which a steady stream never gives).
#[test]
fn once_ends_while_producers_keep_writing() {
    let h = Harness::new();
    let mut expected = Expected::default();
    produce_stream(&h, 0..1_000, &mut expected);
    h.flush();
    let writing = std::sync::atomic::AtomicBool::new(true);
    let (brokers, topic) = (h.kafka.brokers.clone(), h.kafka.topic.clone());
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .create()
                .unwrap();
            let mut i = 0;
            while writing.load(Ordering::Relaxed) {
                let e = event(&format!("steady-{i}"), "steady", "tokens", "1", Utc::now());
                let payload = wire::encode(&e);
                let _ = producer.send(BaseRecord::to(&topic).key("steady").payload(&payload));
                i += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = producer.flush(Duration::from_secs(5));
        });
        let started = Instant::now();
        let summary = h.run_once();
        let took = started.elapsed();
        writing.store(false, Ordering::Relaxed);
        assert!(summary.counted >= 1_000, "{summary:?}");
        assert!(took < Duration::from_secs(20), "--once took {took:?}");
    });
}

/// A commit that never ends (a lock held for ever) ends `--once` with an error after
/// `stall_timeout`, rather than holding cron's lock for ever.
#[test]
fn once_gives_up_on_a_commit_that_never_ends() {
    let h = Harness::new();
    let mut expected = Expected::default();
    let locker = h.lock_windows();
    produce_stream(&h, 0..100, &mut expected);
    h.flush();
    let config = stall_in_five_seconds();
    let started = Instant::now();
    let ended = h
        .aggregator(config)
        .run(RunMode::Once, &CancellationToken::new());
    assert!(
        matches!(ended, Err(AggregatorError::CommitStuck { .. })),
        "{ended:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    h.runtime.block_on(locker.rollback()).unwrap();
}
