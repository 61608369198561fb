//! Partition ownership in `kafka_offsets`: taking partitions (bumping their owner epoch, which
//! fences whoever held them) and advancing the stored offsets only where this aggregator's epoch
//! is still current.

use std::collections::HashMap;

use sqlx::{PgPool, Postgres, Transaction};

use super::AggregatorStoreError;
use crate::batch::Batch;

/// Which partitions this aggregator owns, and the epoch it took each one at.
pub(crate) type Epochs = HashMap<i32, i64>;

/// A partition just taken: where to resume it, and the epoch it is now held at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TakenPartition {
    pub(crate) partition: i32,
    /// The offset stored for the group, `None` for a partition it never consumed.
    pub(crate) next_offset: Option<i64>,
    /// The owner epoch the partition was taken at; batches commit under it.
    pub(crate) epoch: i64,
}

/// Where the group stands on one partition, as `kafka_offsets` holds it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CommittedOffset {
    pub partition: i32,
    /// The next offset to consume; `None` for a partition taken but never committed.
    pub next_offset: Option<i64>,
    pub owner: Option<String>,
    /// When a batch (or a take) last changed the row.
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// Every partition of `topic` the group has taken, for `tally status`.
pub async fn committed_offsets(
    pool: &PgPool,
    group: &str,
    topic: &str,
) -> Result<Vec<CommittedOffset>, AggregatorStoreError> {
    Ok(sqlx::query_as(
        "SELECT partition, next_offset, owner, updated_at FROM kafka_offsets
         WHERE consumer_group = $1 AND topic = $2 ORDER BY partition",
    )
    .bind(group)
    .bind(topic)
    .fetch_all(pool)
    .await?)
}

/// Takes partitions for `owner`: bumps each one's epoch (fencing whoever held it before) and
/// returns where to resume, `None` for a partition never consumed by this group.
pub(crate) async fn take_partitions(
    pool: &PgPool,
    group: &str,
    topic: &str,
    partitions: &[i32],
    owner: &str,
) -> Result<Vec<TakenPartition>, AggregatorStoreError> {
    let mut sorted = partitions.to_vec();
    sorted.sort_unstable();
    let rows: Vec<(i32, Option<i64>, i64)> = sqlx::query_as(
        "INSERT INTO kafka_offsets AS o (consumer_group, topic, partition, owner, owner_epoch)
         SELECT $1, $2, p, $4, 1 FROM unnest($3::int[]) AS p
         ON CONFLICT (consumer_group, topic, partition) DO UPDATE
            SET owner = excluded.owner, owner_epoch = o.owner_epoch + 1, updated_at = now()
         RETURNING partition, next_offset, owner_epoch",
    )
    .bind(group)
    .bind(topic)
    .bind(&sorted)
    .bind(owner)
    .fetch_all(pool)
    .await?;
    let taken = rows
        .into_iter()
        .map(|(partition, next_offset, epoch)| TakenPartition {
            partition,
            next_offset,
            epoch,
        })
        .collect();
    Ok(taken)
}

/// Where a batch came from and who may commit it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ownership<'a> {
    pub(crate) group: &'a str,
    pub(crate) topic: &'a str,
    pub(crate) epochs: &'a Epochs,
}

/// Stores the batch's next offsets, only where this aggregator's epoch is still current.
pub(super) async fn advance_offsets(
    tx: &mut Transaction<'_, Postgres>,
    batch: &Batch,
    ownership: Ownership<'_>,
) -> Result<(), AggregatorStoreError> {
    let mut partitions = Vec::new();
    let mut offsets = Vec::new();
    let mut epochs = Vec::new();
    for (&partition, &next) in &batch.next_offsets {
        let Some(&epoch) = ownership.epochs.get(&partition) else {
            return Err(AggregatorStoreError::Fenced {
                topic: ownership.topic.into(),
                partition,
            });
        };
        partitions.push(partition);
        offsets.push(next);
        epochs.push(epoch);
    }
    let advanced: Vec<i32> = sqlx::query_scalar(
        "UPDATE kafka_offsets o SET next_offset = u.next, updated_at = now()
         FROM unnest($3::int[], $4::bigint[], $5::bigint[]) AS u(partition, next, epoch)
         WHERE o.consumer_group = $1 AND o.topic = $2 AND o.partition = u.partition
           AND o.owner_epoch = u.epoch
         RETURNING o.partition",
    )
    .bind(ownership.group)
    .bind(ownership.topic)
    .bind(&partitions)
    .bind(&offsets)
    .bind(&epochs)
    .fetch_all(&mut **tx)
    .await?;
    if let Some(&lost) = partitions.iter().find(|p| !advanced.contains(p)) {
        return Err(AggregatorStoreError::Fenced {
            topic: ownership.topic.into(),
            partition: lost,
        });
    }
    Ok(())
}
