//! `tally backfill` as a process: history from JSON lines, CSV and Parquet (written by DuckDB,
//! as a data team exports it) goes through Kafka, the contract, dedup and the late rule exactly
//! as live events; `--dry-run` counts by reason and sends nothing; a run killed midway goes on
//! where it stopped, and a file sent whole is not sent again; events older than the lateness
//! horizon are archived under their own hour, not counted.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rust_decimal::Decimal;
use tally_tests::*;

const PARTITIONS: u32 = 4;

fn topic_end(kafka: &tally_core::config::KafkaConfig) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .create()
        .unwrap();
    (0..PARTITIONS as i32)
        .map(|p| {
            consumer
                .fetch_watermarks(&kafka.topic, p, Duration::from_secs(10))
                .unwrap()
                .1
        })
        .sum()
}

#[test]
fn history_from_files_is_counted_once_through_a_kill_and_what_is_too_old_is_archived() {
    let runtime = runtime();
    let db = runtime.block_on(tally_db::testing::fresh_database());
    let archive = tempfile::tempdir().unwrap();
    let root = archive.path().join("archive");
    let (work, kafka, _broker) = broker_process(
        &db.url,
        PARTITIONS,
        &format!(
            "[aggregator]\nbatch_max_wait = \"100ms\"\n\n[archive]\nurl = \"file://{}\"\nflush_every = \"1s\"\n",
            root.display()
        ),
    );
    let (ok, output) = work.run(&db.url, &["migrate"]);
    assert!(ok, "{output}");
    let input = work.dir.path().join("history");
    std::fs::create_dir(&input).unwrap();
    let mut expected = Sums::new();
    let now = Utc::now();
    let at = |ago_minutes: i64| (now - TimeDelta::minutes(ago_minutes)).to_rfc3339();

    // a.jsonl: 30,000 events over the last 20 days, each sent twice in a row one time in ten
    // (a retry); then what the contract and the aggregator refuse.
    let mut jsonl = String::new();
    for i in 0..30_000i64 {
        let customer = format!("c{:02}", i % 25);
        let quantity = Decimal::new(i % 997 + 1, 2);
        let line = format!(
            r#"{{"id":"hist-{i}","customer":"{customer}","meter":"api_calls","quantity":"{quantity}","timestamp":"{}"}}"#,
            at(i % (20 * 24 * 60))
        );
        writeln!(jsonl, "{line}").unwrap();
        if i % 10 == 0 {
            writeln!(jsonl, "{line}").unwrap();
        }
        *expected.entry((customer, "api_calls".into())).or_default() += quantity;
    }
    writeln!(jsonl).unwrap(); // a blank line is not a record
    writeln!(jsonl, "not json").unwrap();
    writeln!(
        jsonl,
        r#"{{"id":"old-1","customer":"c01","meter":"api_calls","quantity":"5","timestamp":"{}"}}"#,
        (now - TimeDelta::days(90)).to_rfc3339()
    )
    .unwrap();
    writeln!(
        jsonl,
        r#"{{"id":"nobody-1","customer":"c01","meter":"nobody_defined_this","quantity":"5","timestamp":"{}"}}"#,
        at(5)
    )
    .unwrap();
    std::fs::write(input.join("a.jsonl"), jsonl).unwrap();

    // b.csv: dimensions as columns; an empty quantity is a field left out.
    let mut csv = String::from("id,customer,meter,quantity,timestamp,dimensions.model\n");
    for i in 0..500i64 {
        let quantity = Decimal::new(i + 1, 0);
        writeln!(
            csv,
            "csv-{i},c{:02},api_calls,{quantity},{},m{}",
            i % 7,
            at(i),
            i % 3
        )
        .unwrap();
        *expected
            .entry((format!("c{:02}", i % 7), "api_calls".into()))
            .or_default() += quantity;
    }
    writeln!(csv, "csv-bad,c01,api_calls,,{},m1", at(1)).unwrap();
    // A ragged row and a cell past the contract's bound: each one bad record, not a bad file.
    writeln!(csv, "csv-ragged,c01,api_calls").unwrap();
    writeln!(
        csv,
        "csv-big,c01,api_calls,1,{},{}",
        at(1),
        "x".repeat(70_000)
    )
    .unwrap();
    writeln!(csv, "csv-after,c01,api_calls,1,{},m1", at(1)).unwrap();
    *expected
        .entry(("c01".into(), "api_calls".into()))
        .or_default() += Decimal::ONE;
    std::fs::write(input.join("b.csv"), csv).unwrap();

    // c.parquet, written by DuckDB: a decimal quantity, a timestamp with time zone.
    let parquet = input.join("c.parquet");
    duckdb(&format!(
        "COPY (SELECT 'pq-' || i AS id, 'c0' || (i % 5) AS customer, 'api_calls' AS meter,
                      CAST(CAST(i AS DECIMAL(18, 3)) / 8 AS DECIMAL(18, 3)) AS quantity,
                      TIMESTAMPTZ '{}' - INTERVAL (i) MINUTE AS timestamp
               FROM range(1, 801) t(i)) TO '{}' (FORMAT PARQUET)",
        now.format("%Y-%m-%d %H:%M:%S%.6f+00"),
        parquet.display()
    ));
    for i in 1..801i64 {
        *expected
            .entry((format!("c0{}", i % 5), "api_calls".into()))
            .or_default() += Decimal::new(i * 1000, 3) / Decimal::from(8);
    }
    let path = input.to_str().unwrap();

    // A dry run decides every record, counts them by reason, and sends nothing.
    let (ok, output) = work.run(&db.url, &["backfill", "--dry-run", path]);
    assert!(ok, "{output}");
    // 30,000 events, 3,000 of them twice, a blank line, and three refused or too old.
    assert!(
        output.contains("a.jsonl: 33003 records checked"),
        "{output}"
    );
    assert!(output.contains("refused malformed: 1"), "{output}");
    assert!(output.contains("refused unknown_meter: 1"), "{output}");
    assert!(output.contains("3000 events repeat an id"), "{output}");
    assert!(output.contains("b.csv: 504 records checked"), "{output}");
    assert!(output.contains("refused missing_field: 1"), "{output}");
    assert!(output.contains("refused oversize: 1"), "{output}");
    assert!(
        output.contains("1 older than the lateness horizon"),
        "{output}"
    );
    assert!(
        output.contains("c.parquet: 800 records checked"),
        "{output}"
    );
    assert_eq!(topic_end(&kafka), 0, "a dry run sends nothing");

    let _aggregator = work.spawn("aggregate", &db.url, &["aggregate"]);
    let _archiver = work.spawn("archive", &db.url, &["archive"]);
    // Killed midway through the first file (once its first checkpoint is recorded), then run
    // again.
    let mut first = work.spawn("backfill-1", &db.url, &["backfill", "--rate", "8000", path]);
    wait_until("the first checkpoint", Duration::from_secs(60), || {
        let next: Option<i64> = runtime
            .block_on(
                sqlx::query_scalar("SELECT max(next_record) FROM backfill_progress")
                    .fetch_one(&db.pool),
            )
            .unwrap();
        next.unwrap_or(0) > 0
    });
    kill(&mut first.0);
    let (ok, output) = work.run(&db.url, &["backfill", path]);
    assert!(ok, "{output}");
    assert!(output.contains("resumed at record"), "{output}");
    drained(&runtime, &db.pool, &expected, Duration::from_secs(120));

    // Sent whole: a second run sends nothing again.
    let sent = topic_end(&kafka);
    let (ok, output) = work.run(&db.url, &["backfill", path]);
    assert!(ok, "{output}");
    assert_eq!(
        output.matches("backfilled whole by an earlier run").count(),
        3,
        "{output}"
    );
    assert_eq!(topic_end(&kafka), sent);

    // What was refused is in rejected_events with its reason, once per record sent.
    let refused: BTreeMap<String, i64> = runtime
        .block_on(
            sqlx::query_as::<_, (String, i64)>(
                "SELECT reason, count(DISTINCT coalesce(event_id, raw::text)) FROM rejected_events GROUP BY 1",
            )
            .fetch_all(&db.pool),
        )
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(refused.get("too_late"), Some(&1), "{refused:?}");
    assert_eq!(refused.get("unknown_meter"), Some(&1), "{refused:?}");
    // "not json", and the ragged CSV row; the cell past the bound; the empty quantity.
    assert_eq!(refused.get("malformed"), Some(&2), "{refused:?}");
    assert_eq!(refused.get("oversize"), Some(&1), "{refused:?}");
    assert_eq!(refused.get("missing_field"), Some(&1), "{refused:?}");

    // The event 90 days old is archived (under the hour it came, with its own time), once
    // or more: what the killed run sent again is archived again, as Kafka holds it.
    let files = format!("{}/events/*/*/*.parquet", root.display());
    wait_until(
        "the archive holds the old event",
        Duration::from_secs(60),
        || {
            root.join("events").exists()
            && duckdb(&format!(
                "SELECT count(*) > 0 FROM read_parquet('{files}') WHERE id = 'old-1' AND status = 'accepted'"
            ))
            .trim()
                == "True"
        },
    );

    // Two backfills of one file at once: the second one refuses.
    let mut lock = runtime.block_on(db.pool.acquire()).unwrap();
    let sha = std::process::Command::new("sha256sum")
        .arg(input.join("b.csv"))
        .output()
        .unwrap();
    let sha = String::from_utf8(sha.stdout).unwrap()[..64].to_owned();
    let locked: bool = runtime
        .block_on(
            sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 27))")
                .bind(format!("backfill:{}:{sha}", kafka.topic))
                .fetch_one(&mut *lock),
        )
        .unwrap();
    assert!(locked);
    let (ok, output) = work.run(
        &db.url,
        &["backfill", input.join("b.csv").to_str().unwrap()],
    );
    assert!(!ok, "{output}");
    assert!(
        output.contains("another `tally backfill` of this file"),
        "{output}"
    );
    runtime.block_on(async move { drop(lock) });
}
