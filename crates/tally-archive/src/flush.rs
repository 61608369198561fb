//! A flush: the buffered records of each hour written as one file and staged, the files
//! recorded with the offsets they advance in one Postgres transaction, then published.
//!
//! A crash before the transaction commits leaves staged files no row names (cleaned later;
//! their records are read again from Kafka). A crash after it leaves rows in state `staged`:
//! [`publish_staged`] finishes them before the archiver reads anything.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use object_store::path::Path;
use sqlx::PgPool;
use uuid::Uuid;

use crate::file::{FileWriter, SCHEMA_VERSION};
use crate::layout::{published_path, staging_path};
use crate::record::ArchivedRecord;
use crate::store::{ArchiveStore, Staged};
use crate::ArchiveError;

/// Records read since the last flush, being written as one file per hour they are filed
/// under, and where each partition resumes once they are archived.
pub struct Buffer {
    /// The aggregator's `lateness_horizon`: an event older than it on arrival is filed under
    /// the hour it came ([`ArchivedRecord::hour`]).
    lateness_horizon: chrono::TimeDelta,
    by_hour: BTreeMap<DateTime<Utc>, FileWriter>,
    /// Per partition: the first offset buffered, and the one after the last.
    offsets: BTreeMap<i32, (i64, i64)>,
    records: usize,
    accepted: usize,
}

impl Buffer {
    pub fn new(lateness_horizon: chrono::TimeDelta) -> Buffer {
        Buffer {
            lateness_horizon,
            by_hour: BTreeMap::new(),
            offsets: BTreeMap::new(),
            records: 0,
            accepted: 0,
        }
    }

    /// Adds a record read from Kafka.
    pub fn push(&mut self, record: ArchivedRecord) -> Result<(), ArchiveError> {
        let range = self
            .offsets
            .entry(record.partition)
            .or_insert((record.offset, record.offset + 1));
        range.0 = range.0.min(record.offset);
        range.1 = range.1.max(record.offset + 1);
        self.records += 1;
        self.accepted += usize::from(record.event().is_some());
        let writer = match self.by_hour.entry(record.hour(self.lateness_horizon)) {
            std::collections::btree_map::Entry::Occupied(writer) => writer.into_mut(),
            std::collections::btree_map::Entry::Vacant(slot) => slot.insert(FileWriter::new()?),
        };
        writer.push(record)
    }

    pub fn records(&self) -> usize {
        self.records
    }

    /// Records the contract accepted (the rest are kept as rejected, with their reason).
    pub fn accepted(&self) -> usize {
        self.accepted
    }

    /// About the bytes the files being written hold in memory (the flush's size trigger).
    pub fn memory_bytes(&self) -> usize {
        self.by_hour.values().map(FileWriter::memory_bytes).sum()
    }

    /// Files being written (one an hour of events buffered): late events spread over many
    /// hours make many small files, which the daemon bounds by flushing.
    pub fn open_files(&self) -> usize {
        self.by_hour.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }
}

/// How long a flush may take from staging its files to committing: well within
/// [`STAGING_KEPT`], so a staged file is never taken for an orphan while its flush may still
/// commit.
const FLUSH_AT_MOST: Duration = Duration::from_secs(3600);
/// How old a staged file no row names must be before [`remove_orphans`] deletes it.
pub const STAGING_KEPT: chrono::TimeDelta = chrono::TimeDelta::days(1);

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
    /// The buffer starts before where the partition's archive ends: its first records are
    /// archived already (a position read before a rebalance moved it). Nothing is recorded.
    #[error("partition {partition} of {topic} is archived up to offset {archived}, but the flush starts at {first}: nothing recorded, to archive nothing twice")]
    Overlap {
        topic: String,
        partition: i32,
        archived: i64,
        first: i64,
    },
    #[error("the flush took {0:?} from staging to commit; its files are left for cleanup and its records read again")]
    TooSlow(Duration),
    /// Recorded (the offsets advanced), not yet published: [`publish_staged`] finishes it.
    /// The records must not be read again.
    #[error("recorded but not yet published ({0}); it is published on the next start")]
    Unpublished(ArchiveError),
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
    let staged_at = Instant::now();
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
    // Bounded, so that a flush waiting on a lock cannot outlive its staged files.
    sqlx::query("SET LOCAL lock_timeout = '30s'")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SET LOCAL statement_timeout = '120s'")
        .execute(&mut *tx)
        .await?;
    for (&partition, &(first, next)) in &buffer.offsets {
        // Where this owner's archive of the partition ends; the flush must start there or
        // after it (a gap is records Kafka no longer has, or never had: control records).
        let held: Option<i64> = sqlx::query_scalar(
            "SELECT next_offset FROM archive_offsets
             WHERE topic = $1 AND partition = $2 AND owner = $3
             FOR UPDATE",
        )
        .bind(topic)
        .bind(partition)
        .bind(owner)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(archived) = held else {
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
        };
        if first < archived {
            return Err(FlushError::Overlap {
                topic: topic.to_owned(),
                partition,
                archived,
                first,
            });
        }
        sqlx::query(
            "UPDATE archive_offsets SET next_offset = $3, updated_at = now()
             WHERE topic = $1 AND partition = $2",
        )
        .bind(topic)
        .bind(partition)
        .bind(next)
        .execute(&mut *tx)
        .await?;
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
        .bind(SCHEMA_VERSION)
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
    if staged_at.elapsed() > FLUSH_AT_MOST {
        return Err(FlushError::TooSlow(staged_at.elapsed()));
    }
    tx.commit().await?;

    let files: Vec<Staged> = files.into_iter().map(|(staged, ..)| staged).collect();
    for staged in &files {
        publish_one(pool, store, staged)
            .await
            .map_err(FlushError::Unpublished)?;
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
) -> Result<(), ArchiveError> {
    store.publish(staged).await?;
    sqlx::query(
        "UPDATE archive_files SET state = 'published', published_at = now()
         WHERE path = $1 AND state IN ('staged', 'lost')",
    )
    .bind(staged.published.as_ref())
    .execute(pool)
    .await
    .map_err(|e| ArchiveError::File {
        path: staged.published.to_string(),
        why: format!("published, but Postgres did not record it: {e}"),
    })?;
    Ok(())
}

/// Publishes every file recorded but not yet moved (a flush that crashed after its commit).
/// One file that cannot be published does not hold back the others; the first such error is
/// answered after trying them all. A file the store lost (neither staged nor published, or cut
/// short) is marked `lost` and said loudly: its records are not in the archive, and `tally
/// archive verify` names it. A lost file is looked at again by every pass, and published once
/// it is whole again (restored from a backup).
pub async fn publish_staged(pool: &PgPool, store: &ArchiveStore) -> Result<usize, FlushError> {
    // `lost` rows are looked at again: a file restored from a backup is published.
    let rows: Vec<(String, String, i64, String)> = sqlx::query_as(
        "SELECT staging_path, path, bytes, sha256 FROM archive_files
         WHERE state IN ('staged', 'lost') ORDER BY file_id",
    )
    .fetch_all(pool)
    .await?;
    let mut published_now = 0;
    let mut first_error = None;
    for (staging, published, bytes, sha256) in &rows {
        let staged = Staged {
            staging: staging.as_str().into(),
            published: published.as_str().into(),
            bytes: *bytes as u64,
            sha256: sha256.clone(),
        };
        match publish_one(pool, store, &staged).await {
            Ok(()) => published_now += 1,
            Err(ArchiveError::Lost { path, why }) => {
                let marked = sqlx::query(
                    "UPDATE archive_files SET state = 'lost' WHERE path = $1 AND state = 'staged'",
                )
                .bind(published)
                .execute(pool)
                .await?
                .rows_affected();
                if marked == 1 {
                    tracing::error!(%path, %why, "an archive file Postgres recorded is lost: its records are not in the archive (tally archive verify shows the hour)");
                    crate::telemetry::record_lost();
                }
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        None => Ok(published_now),
        Some(e) => Err(FlushError::Unpublished(e)),
    }
}

/// Deletes staged files older than [`STAGING_KEPT`] that no `archive_files` row names: flushes
/// that never committed. A recorded file is kept until it is published.
pub async fn remove_orphans(pool: &PgPool, store: &ArchiveStore) -> Result<usize, FlushError> {
    // A lost file's staging path is kept too: whatever is left of it is evidence, and a
    // restored file is published from there.
    let recorded: Vec<String> = sqlx::query_scalar(
        "SELECT staging_path FROM archive_files WHERE state IN ('staged', 'lost')",
    )
    .fetch_all(pool)
    .await?;
    let recorded: HashSet<Path> = recorded.iter().map(|p| Path::from(p.as_str())).collect();
    Ok(store
        .remove_staging_before(Utc::now() - STAGING_KEPT, &recorded)
        .await?)
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
    // In partition order, as flushes lock them, so that two archivers cannot deadlock.
    let mut partitions = partitions.to_vec();
    partitions.sort_unstable();
    partitions.dedup();
    for partition in partitions {
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

/// The owner name of a `--once` run starts with this: another `--once` run may take its
/// partitions at once (cron's `flock` keeps two from overlapping; one killed left its marks).
pub const ONCE_OWNER: &str = "once:";

/// Partitions of `topic` a daemon (not a `--once` run) other than `owner` marked as held
/// within `within`: a daemon at work.
pub async fn held_by_others(
    pool: &PgPool,
    topic: &str,
    owner: &str,
    within: Duration,
) -> Result<Vec<(i32, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT partition, owner FROM archive_offsets
         WHERE topic = $1 AND owner IS NOT NULL AND owner <> $2 AND NOT starts_with(owner, $4)
           AND updated_at > now() - make_interval(secs => $3)
         ORDER BY partition",
    )
    .bind(topic)
    .bind(owner)
    .bind(within.as_secs_f64())
    .bind(ONCE_OWNER)
    .fetch_all(pool)
    .await
}

/// Marks the partitions `owner` holds as held now (a daemon's heartbeat).
pub async fn mark_held(pool: &PgPool, topic: &str, owner: &str) -> Result<u64, sqlx::Error> {
    Ok(
        sqlx::query(
            "UPDATE archive_offsets SET updated_at = now() WHERE topic = $1 AND owner = $2",
        )
        .bind(topic)
        .bind(owner)
        .execute(pool)
        .await?
        .rows_affected(),
    )
}

/// Gives up the partitions `owner` holds (a `--once` run that ends).
pub async fn release(pool: &PgPool, topic: &str, owner: &str) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE archive_offsets SET owner = NULL, updated_at = now() WHERE topic = $1 AND owner = $2",
    )
    .bind(topic)
    .bind(owner)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Why an archiver may not use the store it was given.
#[derive(Debug, thiserror::Error)]
pub enum StoreIdentityError {
    #[error("archive.url {url} is not the store Postgres records the archive in ({recorded}, first at {first_url}): {why}. Every archiver must write the same store (one bucket, or one shared directory); fix archive.url")]
    Other {
        url: String,
        recorded: String,
        first_url: String,
        why: String,
    },
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("Postgres: {0}")]
    Postgres(#[from] sqlx::Error),
}

/// Checks that `store` is the store Postgres records the archive in (by the id of the marker
/// at its root), marking a new store on first use.
pub async fn same_store(
    pool: &PgPool,
    store: &ArchiveStore,
    url: &str,
) -> Result<(), StoreIdentityError> {
    let found = store.identity().await?;
    let recorded: Option<(String, String)> =
        sqlx::query_as("SELECT store_id::text, url FROM archive_store")
            .fetch_optional(pool)
            .await?;
    let (recorded, first_url) = match recorded {
        Some(row) => row,
        None => {
            // The first archiver: the store's marker (a store moved here keeps its own), else a new one.
            let id = match &found {
                Some(id) => id.clone(),
                None => {
                    let id = Uuid::now_v7().to_string();
                    store.mark_identity(&id).await?;
                    store.identity().await?.unwrap_or(id)
                }
            };
            sqlx::query(
                "INSERT INTO archive_store (store_id, url) VALUES ($1::uuid, $2)
                 ON CONFLICT (singleton) DO NOTHING",
            )
            .bind(&id)
            .bind(url)
            .execute(pool)
            .await
            .map_err(StoreIdentityError::Postgres)?;
            sqlx::query_as("SELECT store_id::text, url FROM archive_store")
                .fetch_one(pool)
                .await?
        }
    };
    let other = |why: &str| StoreIdentityError::Other {
        url: url.to_owned(),
        recorded: recorded.clone(),
        first_url: first_url.clone(),
        why: why.to_owned(),
    };
    match found {
        Some(id) if id == recorded => Ok(()),
        Some(id) => Err(other(&format!("its marker says {id}"))),
        None => {
            let files: i64 = sqlx::query_scalar("SELECT count(*) FROM archive_files")
                .fetch_one(pool)
                .await?;
            if files > 0 {
                return Err(other(
                    "it has no marker, and Postgres records files in the archive",
                ));
            }
            // Nothing archived yet: this store becomes the archive.
            store.mark_identity(&recorded).await?;
            match store.identity().await? {
                Some(id) if id == recorded => Ok(()),
                _ => Err(other("another marker appeared")),
            }
        }
    }
}
