//! A flush: the buffered records of each hour written as one file and staged, the files
//! recorded with the offsets they advance in one Postgres transaction, then published.
//!
//! A crash before the transaction commits leaves staged files no row names (cleaned later;
//! their records are read again from Kafka). A crash after it leaves rows in state `staged`:
//! [`publish_staged`] finishes them before the archiver reads anything.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::file::{self, SCHEMA_VERSION};
use crate::layout::{published_path, staging_path};
use crate::record::ArchivedRecord;
use crate::store::{ArchiveStore, Staged};
use crate::ArchiveError;

/// Records read since the last flush, by the hour they are filed under, and where each
/// partition resumes once they are archived.
#[derive(Debug, Default)]
pub struct Buffer {
    by_hour: BTreeMap<DateTime<Utc>, Vec<ArchivedRecord>>,
    next_offsets: BTreeMap<i32, i64>,
    records: usize,
    bytes: usize,
}

impl Buffer {
    /// Adds a record read from Kafka; `size` is its payload's length (the flush trigger).
    pub fn push(&mut self, record: ArchivedRecord, size: usize) {
        let next = self.next_offsets.entry(record.partition).or_insert(0);
        *next = (*next).max(record.offset + 1);
        self.records += 1;
        self.bytes += size;
        self.by_hour.entry(record.hour()).or_default().push(record);
    }

    pub fn records(&self) -> usize {
        self.records
    }

    /// The payload bytes buffered: about what the files will hold before compression.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }
}

/// Why a flush did not happen; the buffer's records are read again from Kafka.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("Postgres: {0}")]
    Store(#[from] sqlx::Error),
    #[error("partition {partition} of {topic} is held by another archiver ({owner:?}); this one stops writing it")]
    Fenced {
        topic: String,
        partition: i32,
        owner: Option<String>,
    },
}

/// What a flush archived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flushed {
    pub flush_id: Uuid,
    pub files: Vec<Staged>,
    pub records: usize,
}

/// Archives `buffer`: one file per hour, staged, recorded with the partitions' next offsets
/// (only while `owner` holds them), then published.
pub async fn flush(
    pool: &PgPool,
    store: &ArchiveStore,
    topic: &str,
    owner: &str,
    buffer: Buffer,
) -> Result<Flushed, FlushError> {
    let flush_id = Uuid::now_v7();
    let mut files = Vec::new();
    for (n, (hour, records)) in buffer.by_hour.iter().enumerate() {
        let bytes = file::encode(records)?;
        let staged = store
            .stage(
                staging_path(flush_id, n),
                published_path(*hour, flush_id, n),
                bytes,
            )
            .await?;
        files.push((staged, *hour, records));
    }

    let mut tx = pool.begin().await?;
    for (&partition, &next) in &buffer.next_offsets {
        let held: Option<Option<String>> = sqlx::query_scalar(
            "UPDATE archive_offsets SET next_offset = greatest(next_offset, $4), updated_at = now()
             WHERE topic = $1 AND partition = $2 AND owner = $3
             RETURNING owner",
        )
        .bind(topic)
        .bind(partition)
        .bind(owner)
        .bind(next)
        .fetch_optional(&mut *tx)
        .await?;
        if held.is_none() {
            let owner: Option<Option<String>> = sqlx::query_scalar(
                "SELECT owner FROM archive_offsets WHERE topic = $1 AND partition = $2",
            )
            .bind(topic)
            .bind(partition)
            .fetch_optional(&mut *tx)
            .await?;
            return Err(FlushError::Fenced {
                topic: topic.to_owned(),
                partition,
                owner: owner.flatten(),
            });
        }
    }
    for (staged, hour, records) in &files {
        let accepted = records.iter().filter(|r| r.event().is_some()).count();
        let file_id: i64 = sqlx::query_scalar(
            "INSERT INTO archive_files (path, staging_path, flush_id, hour, bytes, sha256, records,
                    accepted, schema_version)
             VALUES ($1, $2, $3::uuid, $4, $5, $6, $7, $8, $9)
             RETURNING file_id",
        )
        .bind(staged.published.as_ref())
        .bind(staged.staging.as_ref())
        .bind(flush_id.to_string())
        .bind(hour)
        .bind(staged.bytes as i64)
        .bind(&staged.sha256)
        .bind(records.len() as i64)
        .bind(accepted as i64)
        .bind(SCHEMA_VERSION.parse::<i32>().unwrap_or(1))
        .fetch_one(&mut *tx)
        .await?;
        let mut ranges: BTreeMap<i32, (i64, i64, i64)> = BTreeMap::new();
        for record in records.iter() {
            let range = ranges
                .entry(record.partition)
                .or_insert((record.offset, record.offset, 0));
            range.0 = range.0.min(record.offset);
            range.1 = range.1.max(record.offset);
            range.2 += 1;
        }
        for (partition, (first, last, count)) in ranges {
            sqlx::query(
                "INSERT INTO archive_file_ranges (file_id, topic, partition, first_offset,
                        last_offset, records)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(file_id)
            .bind(topic)
            .bind(partition)
            .bind(first)
            .bind(last)
            .bind(count)
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;

    let files: Vec<Staged> = files.into_iter().map(|(staged, _, _)| staged).collect();
    for staged in &files {
        publish_one(pool, store, staged).await?;
    }
    Ok(Flushed {
        flush_id,
        files,
        records: buffer.records,
    })
}

async fn publish_one(
    pool: &PgPool,
    store: &ArchiveStore,
    staged: &Staged,
) -> Result<(), FlushError> {
    store.publish(staged).await?;
    sqlx::query(
        "UPDATE archive_files SET state = 'published', published_at = now()
         WHERE path = $1 AND state = 'staged'",
    )
    .bind(staged.published.as_ref())
    .execute(pool)
    .await?;
    Ok(())
}

/// Publishes every file recorded but not yet moved (a flush that crashed after its commit).
/// The archiver's first step, before it reads anything.
pub async fn publish_staged(pool: &PgPool, store: &ArchiveStore) -> Result<usize, FlushError> {
    let rows: Vec<(String, String, i64, String)> = sqlx::query_as(
        "SELECT staging_path, path, bytes, sha256 FROM archive_files
         WHERE state = 'staged' ORDER BY file_id",
    )
    .fetch_all(pool)
    .await?;
    for (staging, published, bytes, sha256) in &rows {
        let staged = Staged {
            staging: staging.as_str().into(),
            published: published.as_str().into(),
            bytes: *bytes as u64,
            sha256: sha256.clone(),
        };
        publish_one(pool, store, &staged).await?;
    }
    Ok(rows.len())
}

/// Takes `partitions` of `topic` for `owner` (fencing any archiver that held them) and
/// answers where each resumes: the next offset recorded, 0 for a partition never archived
/// (its first record, or the earliest Kafka still has).
pub async fn take_partitions(
    pool: &PgPool,
    topic: &str,
    partitions: &[i32],
    owner: &str,
) -> Result<BTreeMap<i32, i64>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut resume = BTreeMap::new();
    for &partition in partitions {
        let next: i64 = sqlx::query_scalar(
            "INSERT INTO archive_offsets (topic, partition, next_offset, owner)
             VALUES ($1, $2, 0, $3)
             ON CONFLICT (topic, partition) DO UPDATE SET owner = EXCLUDED.owner, updated_at = now()
             RETURNING next_offset",
        )
        .bind(topic)
        .bind(partition)
        .bind(owner)
        .fetch_one(&mut *tx)
        .await?;
        resume.insert(partition, next);
    }
    tx.commit().await?;
    Ok(resume)
}
