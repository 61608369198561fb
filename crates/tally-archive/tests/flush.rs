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

    let mut buffer = Buffer::default();
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
    let mut buffer = Buffer::default();
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
    let mut buffer = Buffer::default();
    for offset in 0..10 {
        buffer
            .push(record(0, offset, "2026-12-07T11:00:05Z"))
            .unwrap();
    }
    flush::flush(&db.pool, &store, TOPIC, "archiver-a", buffer)
        .await
        .unwrap();
    // Offsets 5-12 again (a position from before a rebalance moved it): 5-9 are archived.
    let mut again = Buffer::default();
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
    let mut next = Buffer::default();
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
