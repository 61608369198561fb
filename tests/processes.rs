//! The pipeline as users run it: every part a separate `tally` process. `tally kafka` (the
//! broker), `tally stripe-emulator`, `tally aggregate`, `tally sink` and `tally serve`, against
//! a Postgres server. Events flow in through the emitter and through `POST /v1/events`; the
//! aggregator, the sink and the API are killed with SIGKILL at random moments and restarted
//! the way systemd's `Restart=always` would (an HTTP client retries an unanswered batch with
//! the same ids). At the end emitted = windows = Stripe for every customer and meter, and
//! `tally reconcile` exits 0.
//!
//! `TALLY_SOAK_SECONDS` makes it a soak (`scripts/soak.sh --duration …`): it then runs that
//! long, at a steady 2,000 events/s, and prints events/s, kills survived and the drift.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use tally_core::config::KafkaConfig;
use tally_core::UsageEvent;
use tally_tests::*;

/// A daemon that systemd would restart: killed, it comes back after `RESTART_DELAY`.
struct Supervised {
    name: &'static str,
    args: Vec<String>,
    /// Killed when the test ends, also when it fails.
    child: KillOnDrop,
    starts: u32,
}

const RESTART_DELAY: Duration = Duration::from_millis(300);

impl Supervised {
    fn start(work: &Workdir, url: &str, name: &'static str, args: &[&str]) -> Supervised {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let child = work.spawn(&format!("{name}-1"), url, &refs(&args));
        Supervised {
            name,
            args,
            child,
            starts: 1,
        }
    }

    fn kill_and_restart(&mut self, work: &Workdir, url: &str) {
        kill(&mut self.child);
        std::thread::sleep(RESTART_DELAY);
        self.starts += 1;
        self.child = work.spawn(
            &format!("{}-{}", self.name, self.starts),
            url,
            &refs(&self.args),
        );
    }
}

const API_TOKEN: &str = "ingest-token-0123456789abcdef";

/// Posts `events` to `tally serve` until every one is accepted. A killed or restarting server
/// leaves a batch unanswered; the client retries it with the same ids, and each counts once.
fn post_until_accepted(api_port: u16, events: &[UsageEvent]) {
    // The wire format of the topic is the native format POST /v1/events takes.
    let encoded: Vec<String> = events
        .iter()
        .map(|event| String::from_utf8(tally_core::wire::encode(event)).unwrap())
        .collect();
    let body = format!("{{\"events\":[{}]}}", encoded.join(","));
    let address = format!("127.0.0.1:{api_port}");
    let bearer = format!("Bearer {API_TOKEN}");
    let headers = [
        ("Authorization", bearer.as_str()),
        ("Content-Type", "application/json"),
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match http(&address, "POST", "/v1/events", &headers, &body) {
            Ok((200, _)) => return,
            // 207: some events unavailable (overloaded); the rest were accepted and count once.
            Ok((status, answer)) if status != 207 && status != 503 && status != 0 => {
                panic!("POST /v1/events answered {status}: {answer}")
            }
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "tally serve never accepted the batch"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[test]
fn the_pipeline_as_separate_processes_survives_kill_9_and_bills_exactly() {
    let soak = std::env::var("TALLY_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok());
    let duration = Duration::from_secs(soak.unwrap_or(20));
    let runtime = runtime();
    let db = runtime.block_on(tally_db::testing::fresh_database());
    let (kafka_port, stripe_port, api_port) = (free_port(), free_port(), free_port());
    let suffix = uuid::Uuid::now_v7().simple().to_string();
    let kafka = KafkaConfig {
        brokers: format!("127.0.0.1:{kafka_port}"),
        topic: format!("usage-events-{suffix}"),
        dlq_topic: format!("usage-events-dlq-{suffix}"),
        ..KafkaConfig::default()
    };
    let work = Workdir::new(
        &kafka,
        &format!("http://127.0.0.1:{stripe_port}/"),
        &format!(
            "[aggregator]\nsession_timeout = \"6s\"\nbatch_max_wait = \"100ms\"\n\n\
             [sink]\ninterval = \"1s\"\nsettle_delay = \"0s\"\nlease = \"5s\"\n\n\
             [serve]\nlisten = \"127.0.0.1:{api_port}\"\n\n\
             [[serve.tokens]]\nname = \"ingest\"\nscope = \"ingest\"\nsha256 = \"{}\"\n",
            tally_api::token_hash(API_TOKEN)
        ),
    );
    // librdkafka's mock broker keeps at most 100,000 messages a partition and drops the oldest
    // beyond that; a long soak spreads its events so that no partition comes near it.
    let partitions = (duration.as_secs() * 2_000 / 60_000).max(8);
    let _broker = work.spawn(
        "kafka",
        &db.url,
        &[
            "kafka",
            "--port",
            &kafka_port.to_string(),
            "--partitions",
            &partitions.to_string(),
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
    let customers: Vec<String> = (0..50).map(|i| format!("p{i:02}")).collect();
    runtime.block_on(map_customers(&db.pool, &customers));
    let mut aggregate = Supervised::start(&work, &db.url, "aggregate", &["aggregate"]);
    let mut sink = Supervised::start(&work, &db.url, "sink", &["sink", "--create-stripe-meters"]);
    let mut serve = Supervised::start(&work, &db.url, "serve", &["serve"]);

    // Events flow for `duration` while the daemons are killed at random moments.
    let emitter = TestEmitter::start(&kafka);
    let mut rng = rand::rngs::StdRng::seed_from_u64(soak.unwrap_or(12));
    let mut expected: BTreeMap<(String, &str), Decimal> = BTreeMap::new();
    let mut emitted = 0u64;
    let mut posted = 0u64;
    let started = Instant::now();
    // A soak emits at a steady 2,000 events/s and kills every 5 to 20 s, so the backlog stays
    // within what the in-memory broker keeps (about 100k messages a partition: older ones are
    // dropped, which a real broker's retention would not do). The CI run is denser.
    let (pause, kill_every) = if soak.is_some() {
        (Duration::from_millis(100), 5_000..20_000)
    } else {
        (Duration::from_millis(20), 1_000..4_000)
    };
    let mut next_kill = started + Duration::from_millis(rng.random_range(kill_every.clone()));
    let mut kills = 0u32;
    let mut round = 0u64;
    while started.elapsed() < duration {
        round += 1;
        // Every fifth round goes through `tally serve` instead of the emitter.
        let over_http = round.is_multiple_of(5);
        let mut batch = Vec::new();
        for _ in 0..200 {
            let customer = &customers[rng.random_range(0..customers.len())];
            let meter = if rng.random_bool(0.7) {
                "api_calls"
            } else {
                "tokens"
            };
            let quantity = Decimal::new(rng.random_range(1..1_000), 1);
            // Older than a slot, so the sink bills it without waiting for its slot to end.
            let at =
                chrono::Utc::now() - chrono::TimeDelta::seconds(400 + rng.random_range(0..1_200));
            let mut event = UsageEvent::new(customer.clone(), meter, quantity)
                .with_id(format!("proc-{}", emitted + posted))
                .at(at);
            if meter == "tokens" {
                event = event.with_dimension("model", ["small", "large"][rng.random_range(0..2)]);
            }
            *expected.entry((customer.clone(), meter)).or_default() += quantity;
            if over_http {
                posted += 1;
                batch.push(event);
            } else {
                emitted += 1;
                emitter.emit(event).unwrap();
            }
        }
        if over_http {
            post_until_accepted(api_port, &batch);
        }
        std::thread::sleep(pause);
        if Instant::now() >= next_kill {
            match rng.random_range(0..5) {
                0 | 1 => aggregate.kill_and_restart(&work, &db.url),
                2 | 3 => sink.kill_and_restart(&work, &db.url),
                _ => serve.kill_and_restart(&work, &db.url),
            }
            kills += 1;
            next_kill =
                Instant::now() + Duration::from_millis(rng.random_range(kill_every.clone()));
        }
    }
    emitter.flush(Duration::from_secs(60)).unwrap();
    let events_per_second = (emitted + posted) as f64 / started.elapsed().as_secs_f64();

    // Everything counted once and billed once, to the unit.
    let pool = db.pool.clone();
    let counted = || -> BTreeMap<(String, String), Decimal> {
        runtime
            .block_on(
                sqlx::query_as::<_, (String, String, Decimal)>(
                    "SELECT customer_id, meter, sum(value) FROM usage_minute GROUP BY 1, 2",
                )
                .fetch_all(&pool),
            )
            .unwrap()
            .into_iter()
            .map(|(customer, meter, sum)| ((customer, meter), sum))
            .collect()
    };
    let expected_counts: BTreeMap<(String, String), Decimal> = expected
        .iter()
        .map(|((customer, meter), sum)| ((customer.clone(), (*meter).to_owned()), *sum))
        .collect();
    let stripe_address = format!("127.0.0.1:{stripe_port}");
    let billed = || -> BTreeMap<(String, String), i64> {
        let Ok((200, body)) = http(&stripe_address, "GET", "/_emulator/state", &[], "") else {
            return BTreeMap::new();
        };
        let state: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let mut sums = BTreeMap::new();
        for total in state["totals"].as_array().into_iter().flatten() {
            let customer = total["customer"].as_str().unwrap_or_default().to_owned();
            let event_name = total["event_name"].as_str().unwrap_or_default().to_owned();
            *sums.entry((customer, event_name)).or_default() += total["sum"].as_i64().unwrap_or(0);
        }
        sums
    };
    let mapping: BTreeMap<String, String> = customers
        .iter()
        .enumerate()
        .map(|(i, c)| (c.clone(), format!("cus_t{i:05}")))
        .collect();
    let drift = || -> Decimal {
        let billed = billed();
        expected
            .iter()
            .map(|((customer, meter), exact)| {
                // tokens is billed under the Stripe event name llm_tokens (tests/support.rs).
                let event_name = if *meter == "tokens" {
                    "llm_tokens"
                } else {
                    meter
                };
                let key = (mapping[customer].clone(), event_name.to_owned());
                let stripe = Decimal::from(*billed.get(&key).unwrap_or(&0));
                (exact.floor() - stripe).abs()
            })
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let now_counted = counted();
        if now_counted == expected_counts {
            break;
        }
        if Instant::now() > deadline {
            let total = |m: &BTreeMap<(String, String), Decimal>| m.values().sum::<Decimal>();
            let differing: Vec<String> = expected_counts
                .iter()
                .filter(|(key, sum)| now_counted.get(*key) != Some(*sum))
                .take(5)
                .map(|(key, sum)| {
                    format!("{key:?}: emitted {sum}, counted {:?}", now_counted.get(key))
                })
                .collect();
            panic!(
                "not every event counted once after 120 s: emitted {} in total, counted {}; e.g. {differing:#?}",
                total(&expected_counts),
                total(&now_counted)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    wait_until(
        "Stripe holds the floor of every customer's usage",
        Duration::from_secs(120),
        || drift().is_zero(),
    );
    let (from, to) = reconcile_range();
    let (ok, output) = work.run(&db.url, &["reconcile", "--from", &from, "--to", &to]);
    assert!(ok, "tally reconcile:\n{output}");
    println!("events/s emitted: {events_per_second:.0}");
    println!(
        "events: {} ({emitted} through the emitter, {posted} through POST /v1/events)",
        emitted + posted
    );
    println!(
        "kills survived: {kills} (aggregator {}, sink {}, serve {})",
        aggregate.starts - 1,
        sink.starts - 1,
        serve.starts - 1
    );
    println!("drift: {}", drift());
    assert!(
        kills >= 3 || soak.is_some(),
        "the test killed something: {kills}"
    );
    emitter.shutdown(Duration::from_secs(5));
}
