//! Outages are waited out (issue 11, invariant 8), by the built `tally` binary running as
//! separate processes: `tally aggregate`, `tally sink` and `tally serve` against a real
//! Postgres server that is stopped and started again under them, and brokers that all go
//! down. The daemons stay up, say so in `/readyz` and once in their logs, and resume with
//! nothing lost or doubled; a SIGKILLed aggregator restarted under the same name gets its
//! partitions back.
//!
//! `TALLY_TEST_OUTAGE_SECONDS` sets how long each outage lasts (10 s by default; the soak
//! script runs them for minutes).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use tally_core::UsageEvent;
use tally_db::throwaway::ThrowawayCluster;
use tally_emitter::{Emitter, EmitterConfig};
use tally_tests::*;

const TOKEN: &str = "outage-test-admin-token-0123456789";

fn outage() -> Duration {
    let seconds = std::env::var("TALLY_TEST_OUTAGE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    Duration::from_secs(seconds)
}

struct Wave {
    expected: BTreeMap<String, Decimal>,
    next: usize,
}

impl Wave {
    /// Emits `n` api_calls events spread over the last half hour.
    fn emit(&mut self, emitter: &Emitter, n: usize) {
        let now = chrono::Utc::now();
        for _ in 0..n {
            let i = self.next;
            self.next += 1;
            let customer = format!("c{}", i % 10);
            let quantity = Decimal::new((i % 7 + 1) as i64 * 5, 1); // 0.5 .. 3.5
                                                                    // Older than a slot (5 minutes), so that the sink bills it without waiting for its end.
            let at = now - chrono::TimeDelta::seconds(400 + (i % 1500) as i64);
            let event = UsageEvent::new(customer.clone(), "api_calls", quantity)
                .with_id(format!("outage-{i}"))
                .at(at);
            *self.expected.entry(customer).or_default() += quantity;
            emitter.emit(event).unwrap();
        }
    }
}

#[test]
fn outages_of_postgres_and_kafka_are_waited_out_by_running_processes() {
    let runtime = runtime();
    let broker = Broker::start();
    let postgres = ThrowawayCluster::start().expect("a throwaway Postgres");
    let url = postgres.url();
    let emulator = runtime.block_on(emulator());
    let (aggregate_admin, sink_admin, serve_port) = (free_port(), free_port(), free_port());
    // A request in flight when the mock broker goes down is never answered (a real broker's
    // connection would close): a 10 s socket timeout, not librdkafka's 60 s, bounds that wait.
    let work = Workdir::new(
        &broker.kafka,
        &emulator.url(),
        &format!(
            "[kafka.options]\n\"socket.timeout.ms\" = \"10000\"\n\n\
             [aggregator]\nstatic_membership = true\ninstance_id = \"aggregator-1\"\nsession_timeout = \"6s\"\n\n\
             [sink]\ninterval = \"1s\"\nsettle_delay = \"0s\"\nlease = \"5s\"\n\n\
             [serve]\nlisten = \"127.0.0.1:{serve_port}\"\n\n\
             [[serve.tokens]]\nname = \"admin\"\nscope = \"admin\"\nsha256 = \"{}\"\n",
            tally_api::token_hash(TOKEN)
        ),
    );
    let (ok, output) = work.run(&url, &["migrate"]);
    assert!(ok, "{output}");
    let pool = runtime
        .block_on(tally_db::connect(&url, 2, Duration::from_secs(10)))
        .unwrap();
    let customers: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
    runtime.block_on(map_customers(&pool, &customers));

    let aggregate_args = [
        "aggregate",
        "--metrics-listen",
        &format!("127.0.0.1:{aggregate_admin}"),
    ];
    let mut aggregate = work.spawn("aggregate", &url, &aggregate_args);
    let mut sink = work.spawn(
        "sink",
        &url,
        &[
            "sink",
            "--create-stripe-meters",
            "--metrics-listen",
            &format!("127.0.0.1:{sink_admin}"),
        ],
    );
    let mut serve = work.spawn("serve", &url, &["serve"]);
    // tally serve's public /readyz wants an admin token; the daemons' admin listeners do not.
    let bearer = format!("Bearer {TOKEN}");
    let ready = |port: u16| {
        let headers = [("authorization", bearer.as_str())];
        http(&format!("127.0.0.1:{port}"), "GET", "/readyz", &headers, "")
            .map(|(status, _)| status)
            .unwrap_or(0)
    };
    wait_until("every daemon ready", Duration::from_secs(60), || {
        ready(aggregate_admin) == 200 && ready(sink_admin) == 200 && ready(serve_port) == 200
    });

    let spool = tempfile::tempdir().unwrap();
    let mut config = EmitterConfig::default();
    config.spool.dir = spool.path().to_owned();
    config.delivery_timeout = Duration::from_secs(2);
    let emitter = Emitter::start(&broker.kafka, &config).unwrap();
    let mut wave = Wave {
        expected: BTreeMap::new(),
        next: 0,
    };
    let mapping: BTreeMap<String, String> = customers
        .iter()
        .enumerate()
        .map(|(i, c)| (c.clone(), format!("cus_t{i:05}")))
        .collect();
    let settled = |wave: &Wave| -> bool {
        let counted: BTreeMap<String, Decimal> = runtime
            .block_on(
                sqlx::query_as::<_, (String, Decimal)>(
                    "SELECT customer_id, sum(value) FROM usage_minute GROUP BY 1",
                )
                .fetch_all(&pool),
            )
            .map(|rows| rows.into_iter().collect())
            .unwrap_or_default();
        let billed = |customer: &str| -> i64 {
            emulator
                .totals()
                .iter()
                .filter(|t| t.customer == mapping[customer] && t.event_name == "api_calls")
                .map(|t| t.sum)
                .sum()
        };
        counted == wave.expected
            && wave
                .expected
                .iter()
                .all(|(c, exact)| Decimal::from(billed(c)) == exact.floor())
    };
    wave.emit(&emitter, 2_000);
    wait_until(
        "the first wave counted and billed",
        Duration::from_secs(60),
        || settled(&wave),
    );

    // Postgres goes away under the running processes; events keep arriving in Kafka.
    postgres.stop().unwrap();
    let down = Instant::now();
    wave.emit(&emitter, 3_000);
    wait_until(
        "every daemon says it is not ready",
        Duration::from_secs(30),
        || ready(aggregate_admin) == 503 && ready(sink_admin) == 503 && ready(serve_port) == 503,
    );
    std::thread::sleep(outage().saturating_sub(down.elapsed()));
    for (name, child) in [
        ("aggregate", &mut aggregate),
        ("sink", &mut sink),
        ("serve", &mut serve),
    ] {
        assert!(
            alive(child),
            "{name} exited during the Postgres outage:\n{}",
            work.log(name)
        );
    }
    postgres.resume().unwrap();
    wait_until(
        "the outage's events counted and billed",
        Duration::from_secs(90),
        || settled(&wave),
    );
    wait_until("ready again", Duration::from_secs(30), || {
        ready(aggregate_admin) == 200 && ready(sink_admin) == 200 && ready(serve_port) == 200
    });
    for name in ["aggregate", "sink"] {
        let log = work.log(name);
        let said = log.matches("postgres is unreachable").count();
        assert!(
            (1..=2).contains(&said),
            "{name} said the outage {said} times:\n{log}"
        );
    }

    // Every broker goes away: the emitter spools, the aggregator keeps polling.
    broker.all_down(true);
    wave.emit(&emitter, 2_000);
    std::thread::sleep(outage());
    assert!(
        alive(&mut aggregate),
        "aggregate exited during the Kafka outage:\n{}",
        work.log("aggregate")
    );
    broker.all_down(false);
    wait_until(
        "the Kafka outage's events counted and billed",
        Duration::from_secs(120),
        || settled(&wave),
    );

    // kill -9, and a restart under the same name, as systemd does.
    let epoch = |pool: &sqlx::PgPool| -> i64 {
        runtime
            .block_on(
                sqlx::query_scalar::<_, Option<i64>>("SELECT max(owner_epoch) FROM kafka_offsets")
                    .fetch_one(pool),
            )
            .unwrap()
            .unwrap_or(0)
    };
    let before = epoch(&pool);
    kill(&mut aggregate);
    let restarted = Instant::now();
    aggregate = work.spawn("aggregate-2", &url, &aggregate_args);
    wait_until(
        "the restarted aggregator takes its partitions",
        Duration::from_secs(30),
        || epoch(&pool) > before,
    );
    let took = restarted.elapsed();
    eprintln!("restarted aggregator took its partitions after {took:?}");
    wave.emit(&emitter, 1_000);
    wait_until(
        "events after the restart counted and billed",
        Duration::from_secs(60),
        || settled(&wave),
    );

    let (from, to) = reconcile_range();
    let (ok, output) = work.run(&url, &["reconcile", "--from", &from, "--to", &to]);
    assert!(ok, "tally reconcile found drift:\n{output}");
    // The same verdicts for Prometheus (node_exporter's textfile collector), as the
    // deploy/systemd and deploy/cron jobs write them: the last two hours, whole minutes.
    let metrics = work.dir.path().join("tally_reconcile.prom");
    let (ok, output) = work.run(
        &url,
        &[
            "reconcile",
            "--last",
            "2h",
            "--metrics-file",
            metrics.to_str().unwrap(),
        ],
    );
    assert!(ok, "tally reconcile --last:\n{output}");
    let written = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        written.contains("tally_reconcile_pairs{verdict=\"drift\"} 0\n"),
        "{written}"
    );
    assert!(
        !written.contains("tally_reconcile_pairs{verdict=\"ok\"} 0\n"),
        "{written}"
    );
    assert!(
        written.contains("tally_reconcile_last_run_timestamp_seconds "),
        "{written}"
    );
    let duplicates: i64 = runtime
        .block_on(
            sqlx::query_scalar("SELECT count(*) - count(DISTINCT id) FROM event_ids")
                .fetch_one(&pool),
        )
        .unwrap();
    assert_eq!(duplicates, 0);
    for (name, child) in [
        ("aggregate-2", &mut aggregate),
        ("sink", &mut sink),
        ("serve", &mut serve),
    ] {
        assert!(alive(child), "{name} exited:\n{}", work.log(name));
        kill(child);
    }
    emitter.shutdown(Duration::from_secs(5));
}
