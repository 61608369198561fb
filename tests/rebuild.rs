//! `tally rebuild` as operators run it: a meter's definition changes in tally.toml (a sum
//! becomes a count, and a group-by is added), `--dry-run` shows the differences, rebuilds are
//! killed with SIGKILL midway, and one runs to the end while events keep flowing through the
//! live aggregator (and `tally archive`, and `tally sink` billing Stripe). At the end every
//! event ever sent counts once under the new definition, in the right group, the aggregator
//! took the new definition on without a restart, and Stripe holds the corrected usage.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use tally_core::config::KafkaConfig;
use tally_core::UsageEvent;
use tally_tests::*;

/// Per (customer, model, region): the events sent (each id once) and their quantities.
type Sent = BTreeMap<(String, String, String), (i64, Decimal)>;

fn send(emitter: &TestEmitter, rng: &mut rand::rngs::StdRng, first: usize, sent: &Mutex<Sent>) {
    let mut sent = sent.lock().unwrap();
    for i in first..first + 100 {
        let customer = format!("r{:02}", i % 12);
        let model = ["small", "large"][rng.random_range(0..2)];
        let region = ["eu", "us"][rng.random_range(0..2)];
        let quantity = Decimal::new(rng.random_range(1..1_000), 1);
        // Older than a slot, so the sink bills it without waiting for its slot to end.
        let at = chrono::Utc::now() - chrono::TimeDelta::seconds(400 + rng.random_range(0..3_000));
        let event = UsageEvent::new(customer.clone(), "tokens", quantity)
            .with_id(format!("rb-{i}"))
            .with_dimension("model", model)
            .with_dimension("region", region)
            .at(at);
        if rng.random_bool(0.05) {
            emitter.emit(event.clone()).unwrap();
        }
        if i % 50 == 7 {
            // The same id with another quantity: refused as a conflict, never counted.
            let mut conflicting = event.clone();
            conflicting.quantity += Decimal::ONE;
            emitter.emit(event.clone()).unwrap();
            emitter.emit(conflicting).unwrap();
        } else {
            emitter.emit(event).unwrap();
        }
        let entry = sent
            .entry((customer, model.into(), region.into()))
            .or_default();
        entry.0 += 1;
        entry.1 += quantity;
    }
}

#[test]
fn a_rebuild_under_a_new_definition_recounts_every_event_once_beside_the_live_pipeline() {
    let runtime = runtime();
    let db = runtime.block_on(tally_db::testing::fresh_database());
    let (kafka_port, stripe_port) = (free_port(), free_port());
    let suffix = uuid::Uuid::now_v7().simple().to_string();
    let kafka = KafkaConfig {
        brokers: format!("127.0.0.1:{kafka_port}"),
        topic: format!("usage-events-{suffix}"),
        dlq_topic: format!("usage-events-dlq-{suffix}"),
        ..KafkaConfig::default()
    };
    let store = tempfile::tempdir().unwrap();
    let settings = format!(
        "[aggregator]\nsession_timeout = \"6s\"\nbatch_max_wait = \"100ms\"\n\n\
         [sink]\ninterval = \"1s\"\nsettle_delay = \"0s\"\nlease = \"5s\"\n\n\
         [archive]\nurl = \"file://{}\"\nflush_every = \"1s\"\n",
        store.path().join("archive").display()
    );
    let work = Workdir::new(
        &kafka,
        &format!("http://127.0.0.1:{stripe_port}/"),
        &settings,
    );
    let _broker = work.spawn(
        "kafka",
        &db.url,
        &[
            "kafka",
            "--port",
            &kafka_port.to_string(),
            "--partitions",
            "4",
        ],
    );
    let _stripe = work.spawn(
        "stripe",
        &db.url,
        &["stripe-emulator", "--port", &stripe_port.to_string()],
    );
    wait_until(
        "the broker and the emulator listen",
        Duration::from_secs(30),
        || {
            std::net::TcpStream::connect(("127.0.0.1", kafka_port)).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", stripe_port)).is_ok()
        },
    );
    let (ok, output) = work.run(&db.url, &["migrate"]);
    assert!(ok, "{output}");
    let customers: Vec<String> = (0..12).map(|i| format!("r{i:02}")).collect();
    let mapping = runtime.block_on(map_customers(&db.pool, &customers));
    let _aggregator = work.spawn("aggregate", &db.url, &["aggregate"]);
    let _archiver = work.spawn("archive", &db.url, &["archive"]);
    let _sink = work.spawn("sink", &db.url, &["sink", "--create-stripe-meters"]);

    let emitter = Arc::new(TestEmitter::start(&kafka));
    let sent = Arc::new(Mutex::new(Sent::new()));
    let mut rng = rand::rngs::StdRng::seed_from_u64(27);
    let mut next = 0;
    for _ in 0..20 {
        send(&emitter, &mut rng, next, &sent);
        next += 100;
    }
    emitter.flush(Duration::from_secs(60)).unwrap();
    let stripe_address = format!("127.0.0.1:{stripe_port}");
    let billed = || -> BTreeMap<String, i64> {
        let Ok((200, body)) = http(&stripe_address, "GET", "/_emulator/state", &[], "") else {
            return BTreeMap::new();
        };
        let state: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let mut sums = BTreeMap::new();
        for total in state["totals"].as_array().into_iter().flatten() {
            if total["event_name"] == "llm_tokens" {
                let customer = total["customer"].as_str().unwrap_or_default().to_owned();
                *sums.entry(customer).or_default() += total["sum"].as_i64().unwrap_or(0);
            }
        }
        sums
    };
    // Stripe holds each customer's usage, floored, before the change.
    let per_customer = |sent: &Sent, usage: fn(&(i64, Decimal)) -> Decimal| {
        let mut sums: BTreeMap<String, i64> = BTreeMap::new();
        for ((customer, _, _), counted) in sent {
            *sums.entry(mapping[customer].clone()).or_default() +=
                usage(counted).floor().try_into().unwrap_or(0i64);
        }
        sums
    };
    let summed = |sent: &Sent| {
        let mut exact: BTreeMap<String, Decimal> = BTreeMap::new();
        for ((customer, _, _), (_, quantity)) in sent {
            *exact.entry(mapping[customer].clone()).or_default() += quantity;
        }
        exact
            .into_iter()
            .map(|(c, q)| (c, q.floor().try_into().unwrap()))
            .collect::<BTreeMap<String, i64>>()
    };
    let before = summed(&sent.lock().unwrap());
    wait_until("Stripe holds the sums", Duration::from_secs(120), || {
        billed() == before
    });

    let config = std::fs::read_to_string(work.config()).unwrap();
    let old = "name = \"tokens\"\naggregation = \"sum\"\ngroup_by = [\"model\"]";
    assert!(config.contains(old), "{config}");
    let today = chrono::Utc::now().date_naive();
    let (from, to) = (
        (today - chrono::TimeDelta::days(35)).to_string(),
        (today + chrono::TimeDelta::days(1)).to_string(),
    );
    let rebuild = ["rebuild", "--meter", "tokens", "--from", &from, "--to", &to];

    // A sum cannot become a max: the slots billed as sums would be billed by another rule.
    std::fs::write(
        work.config(),
        config.replace(
            old,
            "name = \"tokens\"\naggregation = \"max\"\ngroup_by = [\"model\"]",
        ),
    )
    .unwrap();
    let (ok, output) = work.run(&db.url, &rebuild);
    assert!(!ok, "{output}");
    assert!(output.contains("only sum and count"), "{output}");

    // tokens now counts events, per model and region.
    std::fs::write(
        work.config(),
        config.replace(
            old,
            "name = \"tokens\"\naggregation = \"count\"\ngroup_by = [\"model\", \"region\"]",
        ),
    )
    .unwrap();
    // A rebuild of part of the range cannot change the definition.
    let (ok, output) = work.run(
        &db.url,
        &[
            "rebuild",
            "--meter",
            "tokens",
            "--from",
            &today.to_string(),
            "--to",
            &to,
        ],
    );
    assert!(!ok, "{output}");
    assert!(output.contains("must rebuild every window"), "{output}");

    // The dry run shows each customer's day going from the sum to the count, changes nothing.
    let (ok, output) = work.run(&db.url, &[&rebuild[..], &["--dry-run"]].concat());
    assert!(ok, "{output}");
    assert!(output.contains("dry run: nothing was changed"), "{output}");
    eprintln!("the dry run:\n{output}");
    assert!(
        output.contains("definition: aggregation=sum, group_by=[\"model\"] → aggregation=count, group_by=[\"model\", \"region\"]"),
        "{output}"
    );
    assert!(output.contains("r00"), "{output}");
    let region_windows = || -> i64 {
        runtime
            .block_on(
                sqlx::query_scalar(
                    "SELECT count(*) FROM usage_minute WHERE meter = 'tokens' AND group_key LIKE '%region%'",
                )
                .fetch_one(&db.pool),
            )
            .unwrap()
    };
    assert_eq!(region_windows(), 0);

    // Events keep flowing while rebuilds are killed, and while one runs to the end.
    let flowing = Arc::new(AtomicBool::new(true));
    let sender = {
        let (emitter, flowing, sent) = (emitter.clone(), flowing.clone(), sent.clone());
        std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(28);
            while flowing.load(Ordering::Acquire) {
                send(&emitter, &mut rng, next, &sent);
                next += 100;
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    // The first is killed as it starts reading, the others wherever they are.
    for round in 0..3 {
        let name = format!("rebuild-{round}");
        let mut killed = work.spawn(&name, &db.url, &rebuild);
        if round == 0 {
            wait_until("the rebuild reads", Duration::from_secs(30), || {
                work.log(&name).contains("reading the archive")
            });
        } else {
            std::thread::sleep(Duration::from_millis(rng.random_range(100..1_500)));
        }
        kill(&mut killed.0);
    }
    let started = Instant::now();
    let (ok, output) = work.run(&db.url, &rebuild);
    assert!(ok, "{output}");
    assert!(output.contains("the rebuilt windows are live"), "{output}");
    eprintln!("the rebuild took {:?}:\n{output}", started.elapsed());
    std::thread::sleep(Duration::from_secs(2));
    flowing.store(false, Ordering::Release);
    sender.join().unwrap();
    emitter.flush(Duration::from_secs(60)).unwrap();

    // Every event once, counted per model and region: those before the rebuild by it, those
    // after by the aggregator, which took the new definition from the catalog.
    let sent = sent.lock().unwrap().clone();
    let expected: BTreeMap<(String, String), Decimal> = sent
        .iter()
        .map(|((customer, model, region), (events, _))| {
            (
                (
                    customer.clone(),
                    format!("{{\"model\":\"{model}\",\"region\":\"{region}\"}}"),
                ),
                Decimal::from(*events),
            )
        })
        .collect();
    let windows = || -> BTreeMap<(String, String), Decimal> {
        runtime
            .block_on(
                sqlx::query_as::<_, (String, String, Decimal)>(
                    "SELECT customer_id, group_key, sum(value) FROM usage_minute
                     WHERE meter = 'tokens' GROUP BY 1, 2",
                )
                .fetch_all(&db.pool),
            )
            .unwrap()
            .into_iter()
            .map(|(c, g, v)| ((c, g), v))
            .collect()
    };
    wait_until(
        "every event counted once, per model and region",
        Duration::from_secs(120),
        || windows() == expected,
    );
    let daily: Decimal = runtime
        .block_on(
            sqlx::query_scalar("SELECT sum(value) FROM usage_daily WHERE meter = 'tokens'")
                .fetch_one(&db.pool),
        )
        .unwrap();
    assert_eq!(daily, expected.values().copied().sum::<Decimal>());
    assert!(
        work.log("aggregate").contains("meter redefined"),
        "the aggregator should have counted under the new definition without a restart"
    );
    let states: Vec<String> = runtime
        .block_on(
            sqlx::query_scalar("SELECT state FROM rebuilds ORDER BY rebuild_id")
                .fetch_all(&db.pool),
        )
        .unwrap();
    assert_eq!(
        states.first().map(String::as_str),
        Some("dry_run"),
        "{states:?}"
    );
    assert_eq!(
        states.last().map(String::as_str),
        Some("swapped"),
        "{states:?}"
    );
    assert!(!states.iter().any(|s| s == "running"), "{states:?}");
    // The one killed as it read left its shadow tables, dropped by the next rebuild.
    assert_eq!(
        states.get(1).map(String::as_str),
        Some("abandoned"),
        "{states:?}"
    );
    let shadows: i64 = runtime
        .block_on(
            sqlx::query_scalar(
                "SELECT count(*) FROM pg_tables WHERE tablename ~ '^rebuild_[0-9]+_'",
            )
            .fetch_one(&db.pool),
        )
        .unwrap();
    assert_eq!(shadows, 0);

    // Stripe is corrected to the counts: what was billed as sums is withdrawn and the counts
    // sent, as new revisions.
    let after = per_customer(&sent, |(events, _)| Decimal::from(*events));
    wait_until("Stripe holds the counts", Duration::from_secs(120), || {
        billed() == after
    });

    // The archive still agrees with the windows (the same events, counted once).
    let verify_from = (chrono::Utc::now() - chrono::TimeDelta::hours(2)).to_rfc3339();
    let verify_to = (chrono::Utc::now() + chrono::TimeDelta::hours(1)).to_rfc3339();
    wait_until("the archive catches up", Duration::from_secs(60), || {
        work.run(
            &db.url,
            &[
                "archive",
                "verify",
                "--from",
                &verify_from,
                "--to",
                &verify_to,
            ],
        )
        .0
    });
}
