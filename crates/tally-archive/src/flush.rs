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

use crate::file::{FileWriter, SCHEMA_VERSION};
use crate::layout::{published_path, staging_path};
use crate::record::ArchivedRecord;
use crate::store::{ArchiveStore, Staged};
use crate::ArchiveError;

/// Records read since the last flush, being written as one file per hour they are filed
/// under, and where each partition resumes once they are archived.
#[derive(Default)]
pub struct Buffer {
    by_hour: BTreeMap<DateTime<Utc>, FileWriter>,
    next_offsets: BTreeMap<i32, i64>,
    records: usize,
}

impl Buffer {
    /// Adds a record read from Kafka.
    pub fn push(&mut self, record: ArchivedRecord) -> Result<(), ArchiveError> {
        let next = self.next_offsets.entry(record.partition).or_insert(0);
        *next = (*next).max(record.offset + 1);
        self.records += 1;
        let writer = match self.by_hour.entry(record.hour()) {
            std::collections::btree_map::Entry::Occupied(writer) => writer.into_mut(),
            std::collections::btree_map::Entry::Vacant(slot) => slot.insert(FileWriter::new()?),
        };
        writer.push(record)
    }

    pub fn records(&self) -> usize {
        self.records
    }

    /// About the bytes the files being written hold in memory (the flush's size trigger).
    pub fn memory_bytes(&self) -> usize {
        self.by_hour.values().map(FileWriter::memory_bytes).sum()
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
    let records = buffer.records;
    let mut files = Vec::new();
    for (n, (hour, writer)) in buffer.by_hour.into_iter().enumerate() {
        let written = writer.finish()?;
        let staged = store
            .stage(
                staging_path(flush_id, n),
                published_path(hour, flush_id, n),
                written.bytes,
            )
            .await?;
        files.push((
            staged,
            hour,
            written.records,
            written.accepted,
            written.ranges,
        ));
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
    for (staged, hour, records, accepted, ranges) in &files {
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
        .bind(*records as i64)
        .bind(*accepted as i64)
        .bind(SCHEMA_VERSION.parse::<i32>().unwrap_or(1))
        .fetch_one(&mut *tx)
        .await?;
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

    let files: Vec<Staged> = files.into_iter().map(|(staged, ..)| staged).collect();
    for staged in &files {
        publish_one(pool, store, staged).await?;
    }
    Ok(Flushed {
        flush_id,
        files,
        records,
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
