//! Flushes against Postgres and a store: files published once, recorded with the offsets they
//! advance; a fenced archiver records nothing; a flush that crashed after its commit is
//! published on the next start.

use chrono::{DateTime, Utc};
use tally_archive::flush::{self, Buffer, FlushError};
use tally_archive::layout::{published_path, staging_path};
use tally_archive::{file, ArchiveStore, ArchivedRecord};

const TOPIC: &str = "usage-events";

fn at(text: &str) -> DateTime<Utc> {
    text.parse().unwrap()
}

fn record(partition: i32, offset: i64, timestamp: &str) -> ArchivedRecord {
    let event = format!(
        r#"{{"id":"e-{partition}-{offset}","customer":"acme","meter":"api_calls","quantity":"1.5","timestamp":"{timestamp}"}}"#
    );
    ArchivedRecord::decode(
        event.as_bytes(),
        partition,
        offset,
        at("2026-12-07T12:00:00Z"),
    )
}

async fn published_files(pool: &sqlx::PgPool) -> Vec<(String, String, i64, i64)> {
    sqlx::query_as("SELECT path, state, records, accepted FROM archive_files ORDER BY path")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_flush_publishes_one_file_an_hour_recorded_with_the_offsets_it_advances() {
    let db = tally_db::testing::fresh_database().await;
    let store = ArchiveStore::in_memory();
    let resume = flush::take_partitions(&db.pool, TOPIC, &[0, 1], "archiver-a")
        .await
        .unwrap();
    assert_eq!(resume.into_iter().collect::<Vec<_>>(), [(0, 0), (1, 0)]);

    let mut buffer = Buffer::new(chrono::TimeDelta::days(35));
    // A late event of 10:59 among 11:00's, and a record the contract refuses.
    let records = vec![
        record(0, 0, "2026-12-07T11:00:05Z"),
        record(1, 0, "2026-12-07T10:59:59Z"),
        record(0, 1, "2026-12-07T11:30:00Z"),
        ArchivedRecord::decode(b"not json", 1, 1, at("2026-12-07T11:45:00Z")),
    ];
    for r in &records {
        buffer.push(r.clone()).unwrap();
    }
    let flushed = flush::flush(&db.pool, &store, TOPIC, "archiver-a", buffer)
        .await
        .unwrap();
    assert_eq!(flushed.records, 4);
    let files = published_files(&db.pool).await;
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(files.iter().all(|(_, state, _, _)| state == "published"));
    assert_eq!(
        files.iter().map(|f| (f.2, f.3)).collect::<Vec<_>>(),
        [(1, 1), (3, 2)],
        "10:00 holds the late event; 11:00 two events and the refused record"
    );
    // Readers see exactly the records, each once, under their hours.
    let published = store.published().await.unwrap();
    assert_eq!(published.len(), 2);
    let mut back = Vec::new();
    for file in &published {
        let bytes = store.read(&file.location).await.unwrap();
        back.extend(file::decode(file.location.as_ref(), bytes).unwrap());
    }
    back.sort_by_key(|r| (r.partition, r.offset));
    let mut expected = records.clone();
    expected.sort_by_key(|r| (r.partition, r.offset));
    assert_eq!(back, expected);
    assert!(published[0].location.as_ref().contains("hour=10"));

    let offsets: Vec<(i32, i64)> =
        sqlx::query_as("SELECT partition, next_offset FROM archive_offsets ORDER BY partition")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(offsets, [(0, 2), (1, 2)]);
    let ranges: Vec<(i32, i64, i64, i64)> = sqlx::query_as(
        "SELECT r.partition, r.first_offset, r.last_offset, r.records FROM archive_file_ranges r
         JOIN archive_files f USING (file_id) WHERE f.hour = '2026-12-07T11:00:00Z'
         ORDER BY partition",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(ranges, [(0, 0, 1, 2), (1, 1, 1, 1)]);
}

#[tokio::test]
async fn an_archiver_whose_partition_was_taken_records_nothing_and_leaves_only_staging() {
    let db = tally_db::testing::fresh_database().await;
    let store = ArchiveStore::in_memory();
    flush::take_partitions(&db.pool, TOPIC, &[0], "archiver-a")
        .await
        .unwrap();
    // A rebalance gave partition 0 to another archiver while this one buffered.
    flush::take_partitions(&db.pool, TOPIC, &[0], "archiver-b")
        .await
        .unwrap();
    let mut buffer = Buffer::new(chrono::TimeDelta::days(35));
    buffer.push(record(0, 0, "2026-12-07T11:00:05Z")).unwrap();
    let error = flush::flush(&db.pool, &store, TOPIC, "archiver-a", buffer)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, FlushError::Fenced { partition: 0, owner: Some(owner), .. } if owner == "archiver-b"),
        "{error}"
    );
    assert!(published_files(&db.pool).await.is_empty());
    assert!(store.published().await.unwrap().is_empty());
    let next: i64 = sqlx::query_scalar("SELECT next_offset FROM archive_offsets")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(next, 0, "archiver-b resumes at the first record");
    let removed = store
        .remove_staging_before(
            Utc::now() + chrono::TimeDelta::minutes(1),
            &Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(removed, 1, "the orphan is cleaned up");
}

#[tokio::test]
async fn a_flush_that_crashed_after_its_commit_is_published_on_the_next_start() {
    let db = tally_db::testing::fresh_database().await;
    let store = ArchiveStore::in_memory();
    // What a flush leaves when killed between its commit and the move: a recorded row in
    // state staged and the file under _staging.
    let flush_id = uuid::Uuid::now_v7();
    let hour = at("2026-12-07T11:00:00Z");
    let bytes = file::encode(&[record(0, 0, "2026-12-07T11:00:05Z")]).unwrap();
    let staged = store
        .stage(
            staging_path(flush_id, 0),
            published_path(hour, flush_id, 0),
            bytes,
        )
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO archive_files (path, staging_path, flush_id, hour, bytes, sha256, records,
                accepted, schema_version)
         VALUES ($1, $2, $3::uuid, $4, $5, $6, 1, 1, 1)",
    )
    .bind(staged.published.as_ref())
    .bind(staged.staging.as_ref())
    .bind(flush_id.to_string())
    .bind(hour)
    .bind(staged.bytes as i64)
    .bind(&staged.sha256)
    .execute(&db.pool)
    .await
    .unwrap();
    assert!(store.published().await.unwrap().is_empty());
    // Cleanup, however late, never deletes a file Postgres names: it waits to be published.
    let recorded: std::collections::HashSet<object_store::path::Path> =
        [staged.staging.clone()].into();
    let removed = store
        .remove_staging_before(Utc::now() + chrono::TimeDelta::days(30), &recorded)
        .await
        .unwrap();
    assert_eq!(removed, 0);
    assert_eq!(flush::remove_orphans(&db.pool, &store).await.unwrap(), 0);
    assert_eq!(flush::publish_staged(&db.pool, &store).await.unwrap(), 1);
    assert_eq!(store.published().await.unwrap().len(), 1);
    assert_eq!(published_files(&db.pool).await[0].1, "published");
    // Twice is harmless.
    assert_eq!(flush::publish_staged(&db.pool, &store).await.unwrap(), 0);
}

#[tokio::test]
async fn a_flush_that_starts_before_where_the_archive_ends_records_nothing() {
    let db = tally_db::testing::fresh_database().await;
    let store = ArchiveStore::in_memory();
    flush::take_partitions(&db.pool, TOPIC, &[0], "archiver-a")
        .await
        .unwrap();
    let mut buffer = Buffer::new(chrono::TimeDelta::days(35));
    for offset in 0..10 {
        buffer
            .push(record(0, offset, "2026-12-07T11:00:05Z"))
            .unwrap();
    }
    flush::flush(&db.pool, &store, TOPIC, "archiver-a", buffer)
        .await
        .unwrap();
    // Offsets 5-12 again (a position from before a rebalance moved it): 5-9 are archived.
    let mut again = Buffer::new(chrono::TimeDelta::days(35));
    for offset in 5..13 {
        again
            .push(record(0, offset, "2026-12-07T11:00:05Z"))
            .unwrap();
    }
    let error = flush::flush(&db.pool, &store, TOPIC, "archiver-a", again)
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            FlushError::Overlap {
                partition: 0,
                archived: 10,
                first: 5,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(published_files(&db.pool).await.len(), 1);
    assert_eq!(store.published().await.unwrap().len(), 1);
    // From where it ends, and past a gap (records Kafka no longer has): recorded.
    let mut next = Buffer::new(chrono::TimeDelta::days(35));
    for offset in [10, 11, 15] {
        next.push(record(0, offset, "2026-12-07T11:00:05Z"))
            .unwrap();
    }
    flush::flush(&db.pool, &store, TOPIC, "archiver-a", next)
        .await
        .unwrap();
    let next_offset: i64 = sqlx::query_scalar("SELECT next_offset FROM archive_offsets")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(next_offset, 16);
}

#[tokio::test]
async fn retention_deletes_old_hours_whole_and_verify_says_they_are_no_longer_compared() {
    let db = tally_db::testing::fresh_database().await;
    let store = ArchiveStore::in_memory();
    flush::take_partitions(&db.pool, TOPIC, &[0], "archiver-a")
        .await
        .unwrap();
    // A horizon of ten years: the 2025 event is filed under its own hour.
    let mut buffer = Buffer::new(chrono::TimeDelta::days(3650));
    let old = "2025-01-10T08:15:00Z";
    let recent = "2026-12-07T11:05:00Z";
    for (offset, timestamp) in [(0, old), (1, old), (2, recent)] {
        buffer.push(record(0, offset, timestamp)).unwrap();
    }
    flush::flush(&db.pool, &store, TOPIC, "archiver-a", buffer)
        .await
        .unwrap();
    assert_eq!(store.published().await.unwrap().len(), 2);

    // Keep what ended after 2026-01-01: the 2025 hour goes, its row stays as `deleted`.
    let expired = tally_archive::retention::expire(&db.pool, &store, at("2026-01-01T00:00:00Z"))
        .await
        .unwrap();
    assert_eq!(expired, 1);
    let published = store.published().await.unwrap();
    assert_eq!(published.len(), 1);
    assert!(published[0].location.as_ref().contains("date=2026-12-07"));
    let states: Vec<(String, String)> = published_files(&db.pool)
        .await
        .into_iter()
        .map(|(path, state, ..)| (path[..25].to_owned(), state))
        .collect();
    assert_eq!(
        states,
        [
            ("events/date=2025-01-10/ho".to_owned(), "deleted".to_owned()),
            (
                "events/date=2026-12-07/ho".to_owned(),
                "published".to_owned()
            )
        ]
    );
    // A second pass finds nothing more; an hour that ends exactly at the cutoff is kept.
    let expired = tally_archive::retention::expire(&db.pool, &store, at("2026-12-07T12:00:00Z"))
        .await
        .unwrap();
    assert_eq!(expired, 1, "11:00-12:00 ended at the cutoff");

    // Verify compares no deleted hour: the windows' count for it is not a difference.
    sqlx::query(
        "INSERT INTO usage_minute (customer_id, meter, window_start, group_key, value, event_count,
                first_updated, last_updated)
         VALUES ('acme', 'api_calls', '2025-01-10T08:15:00Z', '', 3, 2, now(), now())",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let verification = tally_archive::verify::verify(
        &db.pool,
        &store,
        TOPIC,
        "tally-aggregator",
        at("2025-01-10T00:00:00Z"),
        at("2025-01-11T00:00:00Z"),
    )
    .await
    .unwrap();
    assert!(verification.differences.is_empty(), "{verification:?}");
    assert_eq!(verification.expired_hours, [at("2025-01-10T08:00:00Z")]);
}

#[tokio::test]
async fn verify_counts_each_event_once_and_not_what_the_aggregator_refused() {
    let db = tally_db::testing::fresh_database().await;
    let store = ArchiveStore::in_memory();
    flush::take_partitions(&db.pool, TOPIC, &[0, 1], "archiver-a")
        .await
        .unwrap();
    let hour = "2026-12-07T11:05:00Z";
    let mut buffer = Buffer::new(chrono::TimeDelta::days(35));
    // e-0-0 twice (a producer's retry lands on another partition's offset: same id), an
    // event the aggregator refused (by its Kafka position), and a record that is no event.
    buffer.push(record(0, 0, hour)).unwrap();
    let retry = format!(
        r#"{{"id":"e-0-0","customer":"acme","meter":"api_calls","quantity":"1.5","timestamp":"{hour}"}}"#
    );
    buffer
        .push(ArchivedRecord::decode(retry.as_bytes(), 1, 0, at(hour)))
        .unwrap();
    buffer.push(record(0, 1, hour)).unwrap();
    buffer.push(record(1, 1, hour)).unwrap();
    buffer
        .push(ArchivedRecord::decode(b"{", 1, 2, at(hour)))
        .unwrap();
    flush::flush(&db.pool, &store, TOPIC, "archiver-a", buffer)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO rejected_events (reason, detail, topic, partition, \"offset\", raw)
         VALUES ('unknown_meter', '', $1, 0, 1, '\\x00')",
    )
    .bind(TOPIC)
    .execute(&db.pool)
    .await
    .unwrap();
    let window = |count: i64| {
        sqlx::query(
            "INSERT INTO usage_minute (customer_id, meter, window_start, group_key, value,
                    event_count, first_updated, last_updated)
             VALUES ('acme', 'api_calls', '2026-12-07T11:05:00Z', '', 3, $1, now(), now())
             ON CONFLICT (customer_id, meter, window_start, group_key)
             DO UPDATE SET event_count = EXCLUDED.event_count",
        )
        .bind(count)
    };
    window(2).execute(&db.pool).await.unwrap();
    let check = || {
        tally_archive::verify::verify(
            &db.pool,
            &store,
            TOPIC,
            "tally-aggregator",
            at("2026-12-07T11:30:00Z"),
            at("2026-12-07T11:30:01Z"),
        )
    };
    let verification = check().await.unwrap();
    assert_eq!(verification.files, 1);
    assert_eq!(verification.records, 5);
    assert_eq!((verification.archived, verification.windows), (2, 2));
    assert!(verification.differences.is_empty(), "{verification:?}");

    window(3).execute(&db.pool).await.unwrap();
    let verification = check().await.unwrap();
    assert_eq!(verification.differences.len(), 1);
    assert_eq!(
        (
            verification.differences[0].archived,
            verification.differences[0].windows
        ),
        (2, 3)
    );
}

#[tokio::test]
async fn a_recorded_file_the_store_lost_is_marked_lost_and_holds_back_nothing() {
    let db = tally_db::testing::fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("archive");
    let store = ArchiveStore::open(&format!("file://{}", root.display())).unwrap();
    flush::take_partitions(&db.pool, TOPIC, &[0], "archiver-a")
        .await
        .unwrap();
    // Three files recorded but not published (the archiver died after its commit); then the
    // disk loses one and cuts another short.
    for (n, hour) in ["09", "10", "11"].into_iter().enumerate() {
        let file =
            file::encode(&[record(0, n as i64, &format!("2026-12-07T{hour}:05:00Z"))]).unwrap();
        let flush_id = uuid::Uuid::now_v7();
        let staged = store
            .stage(
                staging_path(flush_id, 0),
                published_path(at(&format!("2026-12-07T{hour}:00:00Z")), flush_id, 0),
                file,
            )
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO archive_files (path, staging_path, flush_id, hour, bytes, sha256, records,
                    accepted, schema_version)
             VALUES ($1, $2, $3::uuid, $4, $5, $6, 1, 1, 1)",
        )
        .bind(staged.published.as_ref())
        .bind(staged.staging.as_ref())
        .bind(flush_id.to_string())
        .bind(at(&format!("2026-12-07T{hour}:00:00Z")))
        .bind(staged.bytes as i64)
        .bind(&staged.sha256)
        .execute(&db.pool)
        .await
        .unwrap();
        let on_disk = root.join(staged.staging.as_ref());
        match hour {
            "09" => std::fs::remove_file(&on_disk).unwrap(),
            "10" => {
                let bytes = std::fs::read(&on_disk).unwrap();
                std::fs::write(&on_disk, &bytes[..bytes.len() / 2]).unwrap();
            }
            _ => {}
        }
    }
    let published = flush::publish_staged(&db.pool, &store).await.unwrap();
    assert_eq!(published, 1, "the whole file is published");
    let states: Vec<String> = published_files(&db.pool)
        .await
        .into_iter()
        .map(|(_, state, ..)| state)
        .collect();
    assert_eq!(states, ["lost", "lost", "published"]);
    // Nothing is left to hold back the next pass.
    assert_eq!(flush::publish_staged(&db.pool, &store).await.unwrap(), 0);
    assert_eq!(store.published().await.unwrap().len(), 1);
    // Cleanup keeps what is left of a lost file, however old.
    let cut_short: String = sqlx::query_scalar(
        "SELECT staging_path FROM archive_files WHERE hour = '2026-12-07T10:00:00Z'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let touched = std::process::Command::new("touch")
        .args(["-d", "3 days ago"])
        .arg(root.join(&cut_short))
        .status()
        .unwrap();
    assert!(touched.success());
    assert_eq!(flush::remove_orphans(&db.pool, &store).await.unwrap(), 0);
    assert!(root.join(&cut_short).exists());

    // Verify names the lost files; their hour's event is missing from the archive.
    let verification = tally_archive::verify::verify(
        &db.pool,
        &store,
        TOPIC,
        "tally-aggregator",
        at("2026-12-07T09:00:00Z"),
        at("2026-12-07T12:00:00Z"),
    )
    .await
    .unwrap();
    assert_eq!(verification.lost.len(), 2, "{verification:?}");
    assert_eq!(verification.archived, 1);

    // The 10:00 file restored from a backup, whole: the next pass publishes it.
    let ten: (String, String) = sqlx::query_as(
        "SELECT staging_path, path FROM archive_files WHERE hour = '2026-12-07T10:00:00Z'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let whole = file::encode(&[record(0, 1, "2026-12-07T10:05:00Z")]).unwrap();
    std::fs::write(root.join(&ten.0), whole).unwrap();
    assert_eq!(flush::publish_staged(&db.pool, &store).await.unwrap(), 1);
    let states: Vec<String> = published_files(&db.pool)
        .await
        .into_iter()
        .map(|(_, state, ..)| state)
        .collect();
    assert_eq!(states, ["lost", "published", "published"]);
}

#[tokio::test]
async fn an_archiver_given_another_store_than_the_archive_refuses_it() {
    let db = tally_db::testing::fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let url = |name: &str| format!("file://{}/{name}", dir.path().display());
    let first = ArchiveStore::open(&url("shared")).unwrap();
    // The first store to be used becomes the archive (its marker and Postgres agree).
    flush::same_store(&db.pool, &first, &url("shared"))
        .await
        .unwrap();
    flush::same_store(&db.pool, &first, &url("shared"))
        .await
        .unwrap();
    // Another, empty, store is still taken while nothing is archived...
    let empty = ArchiveStore::open(&url("host-b")).unwrap();
    flush::same_store(&db.pool, &empty, &url("host-b"))
        .await
        .unwrap();
    // ...but once files are recorded, one without the marker is refused, as is one whose
    // marker names another archive.
    flush::take_partitions(&db.pool, TOPIC, &[0], "archiver-a")
        .await
        .unwrap();
    let mut buffer = Buffer::new(chrono::TimeDelta::days(35));
    buffer.push(record(0, 0, "2026-12-07T11:05:00Z")).unwrap();
    flush::flush(&db.pool, &first, TOPIC, "archiver-a", buffer)
        .await
        .unwrap();
    let third = ArchiveStore::open(&url("host-c")).unwrap();
    let error = flush::same_store(&db.pool, &third, &url("host-c"))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("has no marker"), "{error}");
    let foreign = ArchiveStore::open(&url("foreign")).unwrap();
    foreign
        .mark_identity("0193a0a0-0000-7000-8000-000000000000")
        .await
        .unwrap();
    let error = flush::same_store(&db.pool, &foreign, &url("foreign"))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("its marker says"), "{error}");
    flush::same_store(&db.pool, &first, &url("shared"))
        .await
        .unwrap();
}

#[tokio::test]
async fn verify_reads_a_file_published_meanwhile_and_reports_an_altered_one_without_stopping() {
    let db = tally_db::testing::fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("archive");
    let store = ArchiveStore::open(&format!("file://{}", root.display())).unwrap();
    flush::take_partitions(&db.pool, TOPIC, &[0], "archiver-a")
        .await
        .unwrap();
    let mut buffer = Buffer::new(chrono::TimeDelta::days(35));
    buffer.push(record(0, 0, "2026-12-07T10:05:00Z")).unwrap();
    buffer.push(record(0, 1, "2026-12-07T11:05:00Z")).unwrap();
    flush::flush(&db.pool, &store, TOPIC, "archiver-a", buffer)
        .await
        .unwrap();
    // The 10:00 file: published, but Postgres still says staged (the archiver stopped
    // between the two). The 11:00 file: altered on disk.
    sqlx::query("UPDATE archive_files SET state = 'staged' WHERE hour = '2026-12-07T10:00:00Z'")
        .execute(&db.pool)
        .await
        .unwrap();
    let eleven: String =
        sqlx::query_scalar("SELECT path FROM archive_files WHERE hour = '2026-12-07T11:00:00Z'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let mut bytes = std::fs::read(root.join(&eleven)).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(root.join(&eleven), bytes).unwrap();

    let verification = tally_archive::verify::verify(
        &db.pool,
        &store,
        TOPIC,
        "tally-aggregator",
        at("2026-12-07T10:00:00Z"),
        at("2026-12-07T12:00:00Z"),
    )
    .await
    .unwrap();
    assert_eq!(verification.files, 1);
    assert_eq!(
        verification.archived, 1,
        "10:00's event, read where it was published"
    );
    assert_eq!(verification.unreadable.len(), 1, "{verification:?}");
    assert_eq!(verification.unreadable[0].path, eleven);
    assert!(verification.unreadable[0].why.contains("SHA-256"));
    // 10:00 has no window: a difference; 11:00 is not compared.
    assert_eq!(verification.differences.len(), 1);
    assert_eq!(verification.differences[0].hour, at("2026-12-07T10:00:00Z"));
}

#[test]
fn events_timed_across_all_of_history_open_one_file_not_one_an_hour() {
    // A client picks its events' times: ten thousand events, each in an hour of its own,
    // decades before they came. The aggregator counts none of them (too late), and the
    // archive files them all under the hour they came.
    let mut buffer = Buffer::new(chrono::TimeDelta::days(35));
    let came = at("2026-12-07T11:30:00Z");
    for n in 0..10_000i64 {
        let timestamp =
            (came - chrono::TimeDelta::days(36) - chrono::TimeDelta::hours(n)).to_rfc3339();
        let event = format!(
            r#"{{"id":"h{n}","customer":"acme","meter":"api_calls","quantity":"1","timestamp":"{timestamp}"}}"#
        );
        buffer
            .push(ArchivedRecord::decode(event.as_bytes(), 0, n, came))
            .unwrap();
    }
    assert_eq!(buffer.open_files(), 1);
    assert!(
        buffer.memory_bytes() < 16 * 1024 * 1024,
        "{}",
        buffer.memory_bytes()
    );
}

#[tokio::test]
async fn writes_killed_midway_are_swept_from_staging_once_a_day_old() {
    let db = tally_db::testing::fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("archive");
    let store = ArchiveStore::open(&format!("file://{}", root.display())).unwrap();
    let flush_dir = root.join("_staging").join(uuid::Uuid::now_v7().to_string());
    std::fs::create_dir_all(&flush_dir).unwrap();
    let (old, new) = (flush_dir.join("0.parquet#1"), flush_dir.join("1.parquet#2"));
    std::fs::write(&old, b"half").unwrap();
    std::fs::write(&new, b"half").unwrap();
    let touched = std::process::Command::new("touch")
        .args(["-d", "3 days ago"])
        .arg(&old)
        .status()
        .unwrap();
    assert!(touched.success());
    assert_eq!(flush::remove_orphans(&db.pool, &store).await.unwrap(), 1);
    assert!(!old.exists());
    assert!(
        new.exists(),
        "a write that may still be going on is left alone"
    );
}
