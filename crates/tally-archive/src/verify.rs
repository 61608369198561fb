//! `tally archive verify`: the archive's events counted as the aggregator counts them, hour by
//! hour, per customer and meter, against the windows' `event_count`.
//!
//! The archive holds every record; the windows count an event once, and not at all when the
//! aggregator refused it. So the archive's side counts the accepted records whose Kafka
//! position is not in `rejected_events` (the aggregator's own verdicts: unknown meter, too
//! late, in the future, a conflicting re-send), each event id once. No rule is decided twice.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, TimeDelta, Utc};
use object_store::path::Path;
use sqlx::PgPool;
use tally_core::window::hour_start;
use xxhash_rust::xxh3::xxh3_64;

use crate::file::read_each;
use crate::{ArchiveError, ArchiveStore};

/// One hour of one customer and meter on which the archive and the windows disagree.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Difference {
    pub hour: DateTime<Utc>,
    pub customer: String,
    pub meter: String,
    /// Events the archive holds that the aggregator counted.
    pub archived: i64,
    /// The windows' `event_count`.
    pub windows: i64,
}

/// A partition on which the archive and the aggregator are not at the same place: events
/// between the two positions are in one and not yet in the other, so recent hours may differ.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Position {
    pub partition: i32,
    pub archived_to: i64,
    pub aggregated_to: i64,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Verification {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    /// Hours compared (with any event in the archive or the windows).
    pub hours: usize,
    pub files: usize,
    pub records: u64,
    /// Events counted on each side, over the hours compared.
    pub archived: i64,
    pub windows: i64,
    pub differences: Vec<Difference>,
    /// Hours whose files `archive.retention` deleted: not compared.
    pub expired_hours: Vec<DateTime<Utc>>,
    pub positions: Vec<Position>,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("Postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
}

/// Compares the hours from the one holding `from` up to the one holding `to` (exclusive).
pub async fn verify(
    pool: &PgPool,
    store: &ArchiveStore,
    topic: &str,
    aggregator_group: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Verification, VerifyError> {
    let (first_hour, end) = (
        hour_start(from),
        hour_start(to - TimeDelta::nanoseconds(1)) + TimeDelta::hours(1),
    );
    let mut verification = Verification {
        from: Some(first_hour),
        to: Some(end),
        ..Verification::default()
    };
    let files: Vec<(String, String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT path, staging_path, state, hour FROM archive_files
         WHERE hour >= $1 AND hour < $2 ORDER BY hour, file_id",
    )
    .bind(first_hour)
    .bind(end)
    .fetch_all(pool)
    .await?;
    let refused: HashSet<(i32, i64)> = sqlx::query_as::<_, (i32, i64)>(
        "SELECT partition, \"offset\" FROM rejected_events
         WHERE received_via = 'kafka' AND topic = $1",
    )
    .bind(topic)
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();

    // (hour, customer, meter) → [archived, windows]
    let mut counts: BTreeMap<(DateTime<Utc>, String, String), [i64; 2]> = BTreeMap::new();
    let mut expired: HashSet<DateTime<Utc>> = HashSet::new();
    // Event ids seen in the hour being read (a re-sent event has the same timestamp, so
    // the same hour; files come in hour order).
    let mut seen: (Option<DateTime<Utc>>, HashSet<u64>) = (None, HashSet::new());
    for (path, staging_path, state, hour) in files {
        if state == "deleted" {
            expired.insert(hour);
            continue;
        }
        if seen.0 != Some(hour) {
            seen = (Some(hour), HashSet::new());
        }
        // A recorded file not yet published is still where it was staged.
        let location = if state == "staged" {
            staging_path
        } else {
            path
        };
        let bytes = store.read(&Path::from(location.as_str())).await?;
        verification.files += 1;
        let mut records = 0;
        read_each(&location, bytes, |record| {
            records += 1;
            let Some(event) = record.event() else {
                return;
            };
            if refused.contains(&(record.partition, record.offset))
                || !seen.1.insert(xxh3_64(event.id.as_bytes()))
            {
                return;
            }
            counts
                .entry((hour, event.customer.clone(), event.meter.clone()))
                .or_default()[0] += 1;
        })?;
        verification.records += records;
    }

    let windows: Vec<(DateTime<Utc>, String, String, i64)> = sqlx::query_as(
        "SELECT date_trunc('hour', window_start, 'UTC'), customer_id, meter, sum(event_count)::bigint
         FROM usage_minute WHERE window_start >= $1 AND window_start < $2
         GROUP BY 1, 2, 3",
    )
    .bind(first_hour)
    .bind(end)
    .fetch_all(pool)
    .await?;
    for (hour, customer, meter, count) in windows {
        counts.entry((hour, customer, meter)).or_default()[1] += count;
    }

    let mut hours = HashSet::new();
    for ((hour, customer, meter), [archived, windows]) in counts {
        if expired.contains(&hour) {
            continue;
        }
        hours.insert(hour);
        verification.archived += archived;
        verification.windows += windows;
        if archived != windows {
            verification.differences.push(Difference {
                hour,
                customer,
                meter,
                archived,
                windows,
            });
        }
    }
    verification.hours = hours.len();
    verification.expired_hours = expired.into_iter().collect();
    verification.expired_hours.sort();
    verification.positions = positions(pool, topic, aggregator_group).await?;
    Ok(verification)
}

/// The partitions where the archive's next offset and the aggregator's differ.
async fn positions(
    pool: &PgPool,
    topic: &str,
    aggregator_group: &str,
) -> Result<Vec<Position>, sqlx::Error> {
    let rows: Vec<(i32, Option<i64>, Option<i64>)> = sqlx::query_as(
        "SELECT coalesce(a.partition, k.partition), a.next_offset, k.next_offset
         FROM (SELECT partition, next_offset FROM archive_offsets WHERE topic = $1) a
         FULL JOIN (SELECT partition, next_offset FROM kafka_offsets
                    WHERE topic = $1 AND consumer_group = $2) k USING (partition)
         ORDER BY 1",
    )
    .bind(topic)
    .bind(aggregator_group)
    .fetch_all(pool)
    .await?;
    let by_partition: HashMap<i32, (i64, i64)> = rows
        .into_iter()
        .map(|(p, a, k)| (p, (a.unwrap_or(0), k.unwrap_or(0))))
        .collect();
    let mut positions: Vec<Position> = by_partition
        .into_iter()
        .filter(|(_, (a, k))| a != k)
        .map(|(partition, (archived_to, aggregated_to))| Position {
            partition,
            archived_to,
            aggregated_to,
        })
        .collect();
    positions.sort_by_key(|p| p.partition);
    Ok(positions)
}
