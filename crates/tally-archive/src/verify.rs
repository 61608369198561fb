//! `tally archive verify`: the archive's events counted as the aggregator counts them, hour by
//! hour, per customer and meter, against the windows' `event_count`.
//!
//! The archive holds every record; the windows count an event once, and not at all when the
//! aggregator refused it. So the archive's side counts the accepted records whose Kafka
//! position is not in `rejected_events` (the aggregator's own verdicts: unknown meter, too
//! late, in the future, a conflicting re-send), each event id once. No rule is decided twice.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasher;

use chrono::{DateTime, TimeDelta, Utc};
use object_store::path::Path;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tally_core::window::hour_start;

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
    /// Files that could not be read whole (missing, cut short, altered, not Parquet): their
    /// hours are not compared, and verify fails.
    pub unreadable: Vec<Unreadable>,
    /// Files Postgres recorded that the store lost: their hours differ, and this says why.
    pub lost: Vec<String>,
    pub positions: Vec<Position>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Unreadable {
    pub path: String,
    pub hour: DateTime<Utc>,
    pub why: String,
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
    let files: Vec<(String, String, String, DateTime<Utc>, i64, String)> = sqlx::query_as(
        "SELECT path, staging_path, state, hour, bytes, sha256 FROM archive_files
         WHERE hour >= $1 AND hour < $2 ORDER BY hour, file_id",
    )
    .bind(first_hour)
    .bind(end)
    .fetch_all(pool)
    .await?;
    let refused = refused_positions(pool, topic, first_hour, end, None).await?;

    // (hour, customer, meter) → [archived, windows]
    let mut counts: BTreeMap<(DateTime<Utc>, String, String), [i64; 2]> = BTreeMap::new();
    let mut skipped: HashSet<DateTime<Utc>> = HashSet::new();
    let mut expired: HashSet<DateTime<Utc>> = HashSet::new();
    // Event ids seen in the hour being read (a re-sent event has the same timestamp, so the
    // same hour; files come in hour order), hashed with a key of this run's own, so that ids
    // chosen to collide cannot hide an event.
    let keyed = std::collections::hash_map::RandomState::new();
    let mut seen: (Option<DateTime<Utc>>, HashSet<u64>) = (None, HashSet::new());
    for (path, staging_path, state, hour, bytes, sha256) in files {
        match state.as_str() {
            "deleted" => {
                expired.insert(hour);
                continue;
            }
            "lost" => {
                verification.lost.push(path);
                continue;
            }
            _ => {}
        }
        if seen.0 != Some(hour) {
            seen = (Some(hour), HashSet::new());
        }
        let read = read_whole(store, &path, &staging_path, &state, bytes, &sha256).await;
        let (location, contents) = match read {
            Ok(found) => found,
            Err(why) => {
                // Deleted by retention while verify ran: an expired hour, not a bad file.
                let now: Option<String> =
                    sqlx::query_scalar("SELECT state FROM archive_files WHERE path = $1")
                        .bind(&path)
                        .fetch_optional(pool)
                        .await?;
                if now.as_deref() == Some("deleted") {
                    expired.insert(hour);
                    continue;
                }
                verification.unreadable.push(Unreadable { path, hour, why });
                skipped.insert(hour);
                continue;
            }
        };
        let mut records = 0;
        // Counted under the event's own hour, as the windows are (an event the aggregator
        // could not count may be filed under the hour it came).
        let mut counted: Vec<(DateTime<Utc>, String, String)> = Vec::new();
        let decoded = read_each(&location, contents, |record| {
            records += 1;
            let Some(event) = record.event() else {
                return;
            };
            if refused.contains(&(record.partition, record.offset))
                || !seen.1.insert(keyed.hash_one(&event.id))
            {
                return;
            }
            counted.push((
                hour_start(event.timestamp),
                event.customer.clone(),
                event.meter.clone(),
            ));
        });
        if let Err(error) = decoded {
            verification.unreadable.push(Unreadable {
                path,
                hour,
                why: error.to_string(),
            });
            skipped.insert(hour);
            continue;
        }
        verification.files += 1;
        verification.records += records;
        for key in counted {
            counts.entry(key).or_default()[0] += 1;
        }
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
        if expired.contains(&hour) || skipped.contains(&hour) {
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

/// The aggregator's refusals (`rejected_events`, by Kafka position) among the offsets the
/// files of the hours from `first_hour` to `end` hold, and only those: a flood of refused
/// records elsewhere costs nothing here. With `meter`, only the refusals of that meter's
/// events and of records that named none.
pub async fn refused_positions<'c>(
    db: impl sqlx::PgExecutor<'c>,
    topic: &str,
    first_hour: DateTime<Utc>,
    end: DateTime<Utc>,
    meter: Option<&str>,
) -> Result<HashSet<(i32, i64)>, sqlx::Error> {
    Ok(sqlx::query_as::<_, (i32, i64)>(
        "SELECT r.partition, r.\"offset\" FROM rejected_events r
         WHERE r.received_via = 'kafka' AND r.topic = $1
           AND ($4::text IS NULL OR r.meter = $4 OR r.meter IS NULL)
           AND EXISTS (SELECT 1 FROM archive_files f JOIN archive_file_ranges fr USING (file_id)
                       WHERE f.hour >= $2 AND f.hour < $3 AND fr.topic = r.topic
                         AND fr.partition = r.partition
                         AND r.\"offset\" BETWEEN fr.first_offset AND fr.last_offset)",
    )
    .bind(topic)
    .bind(first_hour)
    .bind(end)
    .bind(meter)
    .fetch_all(db)
    .await?
    .into_iter()
    .collect())
}

/// A recorded file's bytes, checked against its recorded size and SHA-256: where it is
/// published, or (still `staged`) where it was staged, or published meanwhile. The error says
/// why it cannot be read whole.
pub async fn read_whole(
    store: &ArchiveStore,
    path: &str,
    staging_path: &str,
    state: &str,
    bytes: i64,
    sha256: &str,
) -> Result<(String, bytes::Bytes), String> {
    let mut places = vec![path];
    if state == "staged" {
        places.insert(0, staging_path);
    }
    let mut last_error = String::new();
    for place in places {
        // The size first: a file of another size is not read at all.
        match store.size(&Path::from(place)).await {
            Ok(size) if size as i64 != bytes => {
                return Err(format!("{size} bytes, {bytes} recorded"));
            }
            Ok(_) => {}
            Err(error) => {
                last_error = error.to_string();
                continue;
            }
        }
        match store.read(&Path::from(place)).await {
            Ok(contents) => {
                if contents.len() as i64 != bytes {
                    return Err(format!("{} bytes, {bytes} recorded", contents.len()));
                }
                if hex::encode(Sha256::digest(&contents)) != sha256 {
                    return Err("its SHA-256 is not the one recorded".into());
                }
                return Ok((place.to_owned(), contents));
            }
            Err(error) => last_error = error.to_string(),
        }
    }
    Err(last_error)
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
