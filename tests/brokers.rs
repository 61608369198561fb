//! `tally aggregate` against a second Kafka-protocol broker: tansu (crates.io, in-memory
//! storage), which implements group membership differently from librdkafka's mock cluster
//! (static membership above all). Each test starts its own tansu (group state lives in the
//! broker's memory), runs `tally aggregate` as separate processes, and checks every window
//! against the events produced, to the unit.
//!
//! Ignored in CI (building tansu takes about eight minutes): `scripts/brokers.sh` builds it
//! and runs these with `TALLY_TEST_TANSU` set to its binary, printing one figure a line.

use std::process::Command;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tally_core::config::KafkaConfig;
use tally_tests::*;

const PARTITIONS: u32 = 8;

/// A tansu broker on a free port, killed when dropped.
struct Tansu {
    _broker: KillOnDrop,
    kafka: KafkaConfig,
    _logs: tempfile::TempDir,
}

impl Tansu {
    fn start() -> Tansu {
        let binary = std::env::var("TALLY_TEST_TANSU").expect(
            "TALLY_TEST_TANSU names the tansu binary: run scripts/brokers.sh, which builds it",
        );
        let port = free_port();
        let logs = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(logs.path().join("tansu.log")).unwrap();
        let broker = KillOnDrop(
            Command::new(&binary)
                .args([
                    "broker",
                    "--listener-url",
                    &format!("tcp://127.0.0.1:{port}"),
                    "--advertised-listener-url",
                    &format!("tcp://127.0.0.1:{port}"),
                    "--storage-engine",
                    "memory://tansu/",
                ])
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("tansu starts"),
        );
        wait_until("tansu listens", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        let suffix = uuid::Uuid::now_v7().simple().to_string();
        let kafka = KafkaConfig {
            brokers: format!("127.0.0.1:{port}"),
            topic: format!("usage-events-{suffix}"),
            dlq_topic: format!("usage-events-dlq-{suffix}"),
            ..KafkaConfig::default()
        };
        for (topic, partitions) in [(&kafka.topic, PARTITIONS), (&kafka.dlq_topic, 1)] {
            let status = Command::new(&binary)
                .args([
                    "topic",
                    "create",
                    topic,
                    "--partitions",
                    &partitions.to_string(),
                    "--broker",
                    &format!("tcp://127.0.0.1:{port}"),
                ])
                .status()
                .expect("tansu topic create runs");
            assert!(status.success(), "tansu topic create {topic}");
        }
        Tansu {
            _broker: broker,
            kafka,
            _logs: logs,
        }
    }
}

fn workdir(tansu: &Tansu, aggregator: &str, options: &str) -> Workdir {
    Workdir::new(
        &tansu.kafka,
        "http://127.0.0.1:9/",
        &format!("[kafka.options]\n{options}\n\n[aggregator]\nbatch_max_wait = \"100ms\"\n{aggregator}\n"),
    )
}

/// The review's first case: a static member with a 6 s session timeout, which tansu 0.6 drops
/// at every rebalance (its JoinGroup and SyncGroup wait 3 s each and do not count as contact).
/// The watchdog finds it assigned but not consuming and has it join again as a dynamic member.
#[test]
#[ignore = "needs tansu: scripts/brokers.sh"]
fn a_static_member_the_broker_keeps_dropping_heals_and_counts_exactly() {
    let runtime = runtime();
    let db = runtime.block_on(tally_db::testing::fresh_database());
    let tansu = Tansu::start();
    let work = workdir(
        &tansu,
        "static_membership = true\ninstance_id = \"tally-aggregator-brokers\"\nstall_timeout = \"15s\"",
        "\"session.timeout.ms\" = \"6000\"",
    );
    let (ok, output) = work.run(&db.url, &["migrate"]);
    assert!(ok, "{output}");
    let emitter = TestEmitter::start(&tansu.kafka);
    let mut expected = Sums::new();
    emit_events(&emitter, "brokers", 0, 2_001, &mut expected);
    emitter.flush(Duration::from_secs(30)).unwrap();
    let metrics = free_port();
    let _aggregate = work.spawn(
        "aggregate",
        &db.url,
        &[
            "aggregate",
            "--metrics-listen",
            &format!("127.0.0.1:{metrics}"),
        ],
    );
    let took = drained(&runtime, &db.pool, &expected, Duration::from_secs(180));
    println!(
        "static member, 6 s session: drained 2001 events in {:.1} s",
        took.as_secs_f64()
    );
    let log = work.log("aggregate");
    println!(
        "static member, 6 s session: rejoins {}",
        log.matches("joining again as a dynamic member").count()
    );
    // Ready again once it consumes (the stall is over at the next look).
    let admin = format!("127.0.0.1:{metrics}");
    wait_until(
        "/readyz says ready once it consumes",
        Duration::from_secs(30),
        || matches!(http(&admin, "GET", "/readyz", &[], ""), Ok((200, _))),
    );
}

/// `--once` right after a static member stopped (it does not leave the group): it does not
/// join the group, so it drains at once.
#[test]
#[ignore = "needs tansu: scripts/brokers.sh"]
fn once_after_a_static_member_stopped_drains_at_once() {
    let runtime = runtime();
    let db = runtime.block_on(tally_db::testing::fresh_database());
    let tansu = Tansu::start();
    let work = workdir(
        &tansu,
        "static_membership = true\ninstance_id = \"tally-aggregator-brokers\"",
        "",
    );
    let (ok, output) = work.run(&db.url, &["migrate"]);
    assert!(ok, "{output}");
    let emitter = TestEmitter::start(&tansu.kafka);
    let mut expected = Sums::new();
    emit_events(&emitter, "brokers", 0, 1_000, &mut expected);
    emitter.flush(Duration::from_secs(30)).unwrap();
    let mut daemon = work.spawn("aggregate", &db.url, &["aggregate"]);
    drained(&runtime, &db.pool, &expected, Duration::from_secs(120));
    // SIGTERM: the static member stops without leaving the group.
    let _ = Command::new("kill").arg(daemon.id().to_string()).status();
    let _ = daemon.wait();
    emit_events(&emitter, "brokers", 1_000, 1_000, &mut expected);
    emitter.flush(Duration::from_secs(30)).unwrap();
    let ends_before = tally_aggregator::end_offsets(&tansu.kafka, Duration::from_secs(10));
    let started = Instant::now();
    let (ok, output) = work.run(&db.url, &["aggregate", "--once"]);
    assert!(ok, "tally aggregate --once: {output}");
    let took = started.elapsed();
    let stored: Vec<(i32, Option<i64>)> = runtime
        .block_on(
            sqlx::query_as("SELECT partition, next_offset FROM kafka_offsets ORDER BY 1")
                .fetch_all(&db.pool),
        )
        .unwrap();
    let ends_after = tally_aggregator::end_offsets(&tansu.kafka, Duration::from_secs(10));
    assert_eq!(
        counted(&runtime, &db.pool),
        expected,
        "{output}\nends before {ends_before:?}\nstored {stored:?}\nends after {ends_after:?}"
    );
    println!(
        "--once after a stopped static member: {:.1} s",
        took.as_secs_f64()
    );
    assert!(took < Duration::from_secs(30), "{took:?}");
}

/// The review's third case: killed (SIGKILL) and restarted every 5 to 10 s while 40,000
/// events flow, kills landing in rebalances; the daemon started after the last kill drains
/// everything, each window exact. Run as a dynamic member (the default) and as a static one.
fn killed_through_rebalances(static_membership: bool) {
    let runtime = runtime();
    let db = runtime.block_on(tally_db::testing::fresh_database());
    let tansu = Tansu::start();
    let aggregator = if static_membership {
        "static_membership = true\ninstance_id = \"tally-aggregator-brokers\"\nstall_timeout = \"20s\""
    } else {
        "stall_timeout = \"20s\""
    };
    let work = workdir(&tansu, aggregator, "");
    let (ok, output) = work.run(&db.url, &["migrate"]);
    assert!(ok, "{output}");
    let emitter = TestEmitter::start(&tansu.kafka);
    let mut expected = Sums::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut daemon = work.spawn("aggregate-0", &db.url, &["aggregate"]);
    let mut starts = 1;
    let mut next_kill = Instant::now() + Duration::from_millis(rng.random_range(5_000..10_000));
    let mut sent = 0;
    // 40,000 events over about a minute.
    while sent < 40_000 {
        emit_events(&emitter, "brokers", sent, 500, &mut expected);
        sent += 500;
        std::thread::sleep(Duration::from_millis(700));
        if Instant::now() >= next_kill {
            kill(&mut daemon);
            std::thread::sleep(Duration::from_millis(300)); // systemd's RestartSec
            daemon = work.spawn(&format!("aggregate-{starts}"), &db.url, &["aggregate"]);
            starts += 1;
            next_kill = Instant::now() + Duration::from_millis(rng.random_range(5_000..10_000));
        }
    }
    emitter.flush(Duration::from_secs(60)).unwrap();
    // One more kill, right after a restart: in the middle of the join.
    kill(&mut daemon);
    std::thread::sleep(Duration::from_millis(300));
    let mut last = work.spawn(&format!("aggregate-{starts}"), &db.url, &["aggregate"]);
    std::thread::sleep(Duration::from_millis(1_500));
    kill(&mut last);
    std::thread::sleep(Duration::from_millis(300));
    let _final = work.spawn("aggregate-final", &db.url, &["aggregate"]);
    let took = drained(&runtime, &db.pool, &expected, Duration::from_secs(300));
    let kind = if static_membership {
        "static"
    } else {
        "dynamic"
    };
    let logs: String = (0..=starts)
        .map(|n| work.log(&format!("aggregate-{n}")))
        .chain([work.log("aggregate-final")])
        .collect();
    println!(
        "{kind} member, killed {} times during 40000 events: drained {:.1} s after the last start ({} stall(s) healed by rejoining)",
        starts + 1,
        took.as_secs_f64(),
        logs.matches("the aggregator is stalled").count()
    );
    emitter.shutdown(Duration::from_secs(5));
}

#[test]
#[ignore = "needs tansu: scripts/brokers.sh"]
fn a_dynamic_member_killed_through_rebalances_counts_exactly() {
    killed_through_rebalances(false);
}

#[test]
#[ignore = "needs tansu: scripts/brokers.sh"]
fn a_static_member_killed_through_rebalances_counts_exactly() {
    killed_through_rebalances(true);
}
