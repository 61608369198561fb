//! The archive read as a data team reads it: DuckDB (PyPI `duckdb`, which scripts/test.sh
//! fetches) over the published files, with the query docs/archive.md shows. Its totals per
//! customer and meter are the records' own, exactly, and it never sees a staged file.

use std::collections::BTreeMap;
use std::process::Command;

use chrono::{DateTime, TimeDelta, Utc};
use rust_decimal::Decimal;
use tally_archive::layout::{published_path, staging_path};
use tally_archive::{file, ArchiveStore, ArchivedRecord};

fn duckdb(query: &str) -> String {
    let path = std::env::var("TALLY_DUCKDB_PYTHONPATH").expect(
        "TALLY_DUCKDB_PYTHONPATH is not set: run the tests with scripts/test.sh, which fetches duckdb from PyPI",
    );
    let script = format!(
        "import duckdb\nfor row in duckdb.sql({query:?}).fetchall():\n    print('|'.join(str(v) for v in row))\n"
    );
    let output = Command::new("python3")
        .env("PYTHONPATH", path)
        .args(["-c", &script])
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn duckdb_reads_the_published_files_and_sums_every_quantity_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("archive");
    let store = ArchiveStore::open(&format!("file://{}", root.display())).unwrap();
    let start: DateTime<Utc> = "2026-12-07T09:00:00Z".parse().unwrap();
    let customers = ["acme", "globex", "initech"];
    let mut expected: BTreeMap<(String, String), Decimal> = BTreeMap::new();
    let mut by_hour: BTreeMap<DateTime<Utc>, Vec<ArchivedRecord>> = BTreeMap::new();
    for offset in 0..3000i64 {
        let customer = customers[offset as usize % 3];
        let meter = if offset % 2 == 0 {
            "api_calls"
        } else {
            "tokens"
        };
        // Quantities with nine fraction digits, the contract's most: a float would lose them.
        let quantity = Decimal::new(offset * 1_000_000_007 % 9_999_999_999_999, 9);
        let at = start + TimeDelta::seconds(offset * 7);
        let event = format!(
            r#"{{"id":"e{offset}","customer":"{customer}","meter":"{meter}","quantity":"{quantity}","timestamp":"{}","dimensions":{{"model":"m{}"}}}}"#,
            at.to_rfc3339(),
            offset % 4
        );
        let record = ArchivedRecord::decode(event.as_bytes(), (offset % 2) as i32, offset, at);
        assert!(record.event().is_some(), "{event}");
        *expected
            .entry((customer.to_owned(), meter.to_owned()))
            .or_default() += quantity;
        by_hour
            .entry(record.hour(TimeDelta::days(35)))
            .or_default()
            .push(record);
    }
    let flush = uuid::Uuid::now_v7();
    for (n, (hour, records)) in by_hour.iter().enumerate() {
        let staged = store
            .stage(
                staging_path(flush, n),
                published_path(*hour, flush, n),
                file::encode(records).unwrap(),
            )
            .await
            .unwrap();
        store.publish(&staged).await.unwrap();
    }
    // A flush that never committed: staged only; readers must not count it.
    let orphan = by_hour.values().next().unwrap().clone();
    store
        .stage(
            staging_path(uuid::Uuid::now_v7(), 0),
            published_path(start, uuid::Uuid::now_v7(), 0),
            file::encode(&orphan).unwrap(),
        )
        .await
        .unwrap();

    let files = format!("{}/events/*/*/*.parquet", root.display());
    let rows = duckdb(&format!(
        "SELECT customer, meter, sum(quantity), typeof(sum(quantity)), count(*) \
         FROM read_parquet('{files}', hive_partitioning = true, \
                           hive_types = {{'date': DATE, 'hour': INTEGER}}) \
         WHERE status = 'accepted' GROUP BY ALL ORDER BY ALL"
    ));
    let got: Vec<(String, String, Decimal)> = rows
        .lines()
        .map(|line| {
            let parts: Vec<&str> = line.split('|').collect();
            (
                parts[0].to_owned(),
                parts[1].to_owned(),
                parts[2].parse().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, String, Decimal)> =
        expected.into_iter().map(|((c, m), q)| (c, m, q)).collect();
    assert_eq!(got, want, "{rows}");
    assert!(
        rows.contains("DECIMAL(38,9)"),
        "an exact decimal sum: {rows}"
    );

    // The Hive columns and the dimensions map are there for a data team's queries.
    let hours = duckdb(&format!(
        "SELECT date, hour, count(*), count(DISTINCT dimensions['model']) \
         FROM read_parquet('{files}', hive_partitioning = true, \
                           hive_types = {{'date': DATE, 'hour': INTEGER}}) \
         GROUP BY ALL ORDER BY ALL"
    ));
    let first = hours.lines().next().unwrap();
    assert!(first.starts_with("2026-12-07|9|"), "{hours}");
    assert_eq!(hours.lines().count(), by_hour.len(), "{hours}");
}
