//! `tally archive` as a process, killed with SIGKILL again and again while events flow (and the
//! aggregator counts them beside it): every Kafka record ends up in exactly one published file,
//! DuckDB's totals per customer and meter equal the windows', and `tally archive verify` agrees,
//! until a window is changed behind its back.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use tally_tests::*;

const PARTITIONS: u32 = 4;

#[test]
fn the_archive_holds_every_record_once_through_sigkills_and_agrees_with_the_windows() {
    let runtime = runtime();
    let db = runtime.block_on(tally_db::testing::fresh_database());
    let store = tempfile::tempdir().unwrap();
    let root = store.path().join("archive");
    let (work, kafka, _broker) = broker_process(
        &db.url,
        PARTITIONS,
        &format!(
            "[kafka.options]\n\"session.timeout.ms\" = \"6000\"\n\n[aggregator]\nbatch_max_wait = \"100ms\"\n\n\
             [archive]\nurl = \"file://{}\"\nflush_every = \"1s\"\nfile_bytes = 1048576\n",
            root.display()
        ),
    );
    let (ok, output) = work.run(&db.url, &["migrate"]);
    assert!(ok, "{output}");
    let _aggregator = work.spawn("aggregate", &db.url, &["aggregate"]);

    // Events flow the whole time: valid ones (5% sent twice), some from hours and a day ago,
    // some of a meter nobody defined (accepted by the contract, refused by the aggregator),
    // and records that are no event at all.
    let emitter = Arc::new(TestEmitter::start(&kafka));
    let garbage: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .create()
        .unwrap();
    let flowing = Arc::new(AtomicBool::new(true));
    let sender = {
        let (emitter, flowing) = (emitter.clone(), flowing.clone());
        std::thread::spawn(move || {
            let mut expected = Sums::new();
            let mut sent = 0;
            let mut rng = rand::rngs::StdRng::seed_from_u64(27);
            while flowing.load(Ordering::Acquire) {
                emit_events(&emitter, "archive", sent, 200, &mut expected);
                sent += 200;
                for ago in [3, 26] {
                    let quantity = rust_decimal::Decimal::new(rng.random_range(1..100), 0);
                    let event = tally_core::UsageEvent::new("late", "api_calls", quantity)
                        .with_id(format!("late-{ago}-{sent}"))
                        .at(chrono::Utc::now() - chrono::TimeDelta::hours(ago));
                    emitter.emit(event).unwrap();
                    *expected
                        .entry(("late".into(), "api_calls".into()))
                        .or_default() += quantity;
                }
                let unknown = tally_core::UsageEvent::new("b01", "nobody_defined_this", 1.into())
                    .with_id(format!("unknown-{sent}"));
                emitter.emit(unknown).unwrap();
                std::thread::sleep(Duration::from_millis(100));
            }
            (expected, sent)
        })
    };
    let mut garbage_sent: i64 = 0;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // Daemons in the group, each killed (or once stopped) a while after it took the
    // partitions; then `--once` runs (as cron's), killed wherever they are.
    for round in 0..8 {
        let daemon = round < 4;
        let name = format!("archive-{round}");
        let args: &[&str] = if daemon {
            &["archive"]
        } else {
            &["archive", "--once"]
        };
        let mut archiver = work.spawn(&name, &db.url, args);
        for _ in 0..3 {
            let payload: &[u8] = if garbage_sent % 2 == 0 {
                b"not an event"
            } else {
                br#"{"id":"x","customer":"","meter":"api_calls","quantity":"1","timestamp":"2026-12-07T00:00:00Z"}"#
            };
            garbage
                .send(BaseRecord::<(), [u8]>::to(&kafka.topic).payload(payload))
                .unwrap();
            garbage_sent += 1;
        }
        garbage.poll(Duration::ZERO);
        if daemon {
            // A member killed holds its partitions until its session times out: the next
            // one is given them after that.
            wait_until(
                &format!("{name} takes the partitions"),
                Duration::from_secs(60),
                || work.log(&name).contains("partitions taken"),
            );
        }
        if round == 2 {
            // While a daemon archives, `--once` leaves it alone (they would fence each other).
            let (ok, output) = work.run(&db.url, &["archive", "--once"]);
            assert!(!ok, "{output}");
            assert!(output.contains("daemon holds"), "{output}");
        }
        let lives = if daemon { 1_500..3_500 } else { 200..1_500 };
        std::thread::sleep(Duration::from_millis(rng.random_range(lives)));
        if round == 3 {
            // The last daemon stops cleanly: SIGTERM flushes what it read and lets go of
            // its partitions, so cron's runs may take them.
            let pid = archiver.0.id().to_string();
            std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap();
            wait_until("the archiver stops", Duration::from_secs(30), || {
                !alive(&mut archiver.0)
            });
            assert!(archiver.0.wait().unwrap().success());
        } else {
            kill(&mut archiver.0);
        }
    }
    flowing.store(false, Ordering::Release);
    let (expected, sent) = sender.join().unwrap();
    emitter.flush(Duration::from_secs(60)).unwrap();
    garbage.flush(Duration::from_secs(30)).unwrap();

    // What the kills left is archived by a run that drains (as cron would).
    let (ok, output) = work.run(&db.url, &["archive", "--once"]);
    assert!(ok, "{output}");
    drained(&runtime, &db.pool, &expected, Duration::from_secs(120));
    let killed_midway = (0..8)
        .filter(|round| work.log(&format!("archive-{round}")).contains("flushed"))
        .count();
    assert!(
        killed_midway >= 2,
        "only {killed_midway} of 8 runs flushed before they were stopped"
    );

    // Every record of every partition, once: offsets 0 to the partition's end, no repeats.
    let ends = end_offsets(&kafka);
    let files = format!("{}/events/*/*/*.parquet", root.display());
    let read = format!(
        "read_parquet('{files}', hive_partitioning = true, hive_types = {{'date': DATE, 'hour': INTEGER}})"
    );
    let per_partition = duckdb(&format!(
        "SELECT partition, count(*), count(DISTINCT \"offset\"), min(\"offset\"), max(\"offset\") FROM {read} GROUP BY 1 ORDER BY 1"
    ));
    let mut records = 0;
    for line in per_partition.lines() {
        let v: Vec<i64> = line.split('|').map(|x| x.parse().unwrap()).collect();
        let end = ends[&(v[0] as i32)];
        assert_eq!(
            v[1..],
            [end, end, 0, end - 1],
            "partition {}: count, distinct, min, max vs end {end}",
            v[0]
        );
        records += v[1];
    }
    assert_eq!(per_partition.lines().count(), PARTITIONS as usize);
    assert_eq!(records, ends.values().sum::<i64>());
    let statuses = duckdb(&format!(
        "SELECT status, reason, count(*) FROM {read} GROUP BY ALL ORDER BY ALL"
    ));
    assert_eq!(
        statuses,
        format!(
            "accepted|None|{}\nrejected|invalid_customer|{}\nrejected|malformed|{}\n",
            records - garbage_sent,
            garbage_sent / 2,
            garbage_sent - garbage_sent / 2
        ),
        "{statuses}"
    );
    // Each event filed under its own date and hour.
    let misfiled = duckdb(&format!(
        "SELECT count(*) FROM {read} WHERE status = 'accepted'
         AND (date <> CAST(timezone('UTC', \"timestamp\") AS DATE) OR hour <> hour(timezone('UTC', \"timestamp\")))"
    ));
    assert_eq!(misfiled.trim(), "0");

    // DuckDB's totals (each id once, defined meters only) are the windows'.
    let totals = duckdb(&format!(
        "SELECT customer, meter, sum(quantity) FROM (
             SELECT * FROM {read} WHERE status = 'accepted' AND meter = 'api_calls'
             QUALIFY row_number() OVER (PARTITION BY id ORDER BY partition, \"offset\") = 1)
         GROUP BY ALL ORDER BY ALL"
    ));
    let from_duckdb: Sums = totals
        .lines()
        .map(|line| {
            let v: Vec<&str> = line.split('|').collect();
            ((v[0].to_owned(), v[1].to_owned()), v[2].parse().unwrap())
        })
        .collect();
    assert_eq!(from_duckdb, counted(&runtime, &db.pool));
    assert_eq!(from_duckdb, expected);

    // Readers see exactly the files Postgres records as published.
    let recorded: Vec<(String, String)> = runtime
        .block_on(
            sqlx::query_as("SELECT path, state FROM archive_files ORDER BY path")
                .fetch_all(&db.pool),
        )
        .unwrap();
    assert!(
        recorded.iter().all(|(_, state)| state == "published"),
        "{recorded:?}"
    );
    let mut on_disk = Vec::new();
    list_files(&root.join("events"), &root, &mut on_disk);
    on_disk.sort();
    let recorded: Vec<String> = recorded.into_iter().map(|(path, _)| path).collect();
    assert_eq!(on_disk, recorded);

    // `tally archive verify` agrees with the windows hour by hour...
    let from = (chrono::Utc::now() - chrono::TimeDelta::hours(30)).to_rfc3339();
    let to = (chrono::Utc::now() + chrono::TimeDelta::hours(1)).to_rfc3339();
    let (ok, output) = work.run(
        &db.url,
        &["archive", "verify", "--from", &from, "--to", &to],
    );
    assert!(ok, "{output}");
    let unique_sent = sent + 2 * (sent / 200);
    assert!(
        output.contains(&format!(
            "{unique_sent} events archived and counted, {unique_sent} in the windows"
        )),
        "{output}"
    );
    // ...until a window no longer matches what happened.
    runtime
        .block_on(
            sqlx::query(
                "UPDATE usage_minute SET event_count = event_count + 1
                 WHERE ctid = (SELECT ctid FROM usage_minute WHERE customer_id = 'late' LIMIT 1)",
            )
            .execute(&db.pool),
        )
        .unwrap();
    let (ok, output) = work.run(
        &db.url,
        &["archive", "verify", "--from", &from, "--to", &to],
    );
    assert!(!ok, "{output}");
    assert!(
        output.contains("customer \"late\" meter \"api_calls\""),
        "{output}"
    );
    assert!(
        output.contains("differ on 1 customer-meter hour(s)"),
        "{output}"
    );
    for round in 0..8 {
        let log = work.log(&format!("archive-{round}"));
        assert!(!log.contains("panicked"), "archive-{round}: {log}");
    }
    println!(
        "{records} records ({sent} events sent, {garbage_sent} not events) archived exactly through 7 SIGKILLs (3 daemons, 4 --once runs) and a SIGTERM; {killed_midway} of the 8 runs had flushed"
    );
}

/// The end offset of each partition of the topic.
fn end_offsets(kafka: &tally_core::config::KafkaConfig) -> BTreeMap<i32, i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .create()
        .unwrap();
    (0..PARTITIONS as i32)
        .map(|p| {
            let (_, high) = consumer
                .fetch_watermarks(&kafka.topic, p, Duration::from_secs(10))
                .unwrap();
            (p, high)
        })
        .collect()
}

/// Every file under `dir`, as a path relative to `root`.
fn list_files(dir: &Path, root: &Path, found: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            list_files(&path, root, found);
        } else {
            found.push(path.strip_prefix(root).unwrap().display().to_string());
        }
    }
}

#[test]
fn a_partition_archived_past_the_end_of_kafkas_log_is_left_unread_and_the_others_archived() {
    let runtime = runtime();
    let db = runtime.block_on(tally_db::testing::fresh_database());
    let store = tempfile::tempdir().unwrap();
    let root = store.path().join("archive");
    let (work, kafka, _broker) = broker_process(
        &db.url,
        PARTITIONS,
        &format!("[archive]\nurl = \"file://{}\"\n", root.display()),
    );
    let (ok, output) = work.run(&db.url, &["migrate"]);
    assert!(ok, "{output}");
    let emitter = TestEmitter::start(&kafka);
    let mut expected = Sums::new();
    emit_events(&emitter, "ahead", 0, 400, &mut expected);
    emitter.flush(Duration::from_secs(30)).unwrap();
    // The topic was recreated under the archive: partition 0 was archived to offset 1,000,000.
    runtime
        .block_on(
            sqlx::query(
                "INSERT INTO archive_offsets (topic, partition, next_offset) VALUES ($1, 0, 1000000)",
            )
            .bind(&kafka.topic)
            .execute(&db.pool),
        )
        .unwrap();
    let (ok, output) = work.run(&db.url, &["archive", "--once"]);
    assert!(ok, "{output}");
    assert!(output.contains("ends past Kafka's log"), "{output}");
    let ends = end_offsets(&kafka);
    let archived: Vec<(i32, i64)> = runtime
        .block_on(
            sqlx::query_as(
                "SELECT partition, next_offset FROM archive_offsets WHERE topic = $1 ORDER BY 1",
            )
            .bind(&kafka.topic)
            .fetch_all(&db.pool),
        )
        .unwrap();
    let expected_positions: Vec<(i32, i64)> = (0..PARTITIONS as i32)
        .map(|p| (p, if p == 0 { 1_000_000 } else { ends[&p] }))
        .collect();
    assert_eq!(archived, expected_positions);
    emitter.shutdown(Duration::from_secs(5));
}
