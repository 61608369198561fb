//! The aggregator's Postgres queries. [`commit_batch`] is the one transaction per batch that
//! invariants 1 and 2 rest on: claim ids, add windows, update the daily rollup, record rejects,
//! advance the stored offsets, all or nothing.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use tally_core::window::slot_start;
use tally_core::{Aggregation, RejectReason, Rejection};

use crate::batch::{conflict, fold, Batch, Candidate, Granularity, Reject, WindowDelta};
use crate::telemetry::BatchReport;
use tally_db::rejects::{Received, Rejected};

/// A store error, tagged with whether running the same batch again can succeed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another aggregator took one of the batch's partitions (a rebalance); nothing was written.
    #[error("partition {partition} of {topic} now belongs to another aggregator; the batch was rolled back")]
    Fenced { topic: String, partition: i32 },
    #[error("Postgres: {0}")]
    Retryable(sqlx::Error),
    /// Postgres refused the data itself (SQLSTATE class 22 data exception, 23 integrity
    /// violation other than the dedup race, 54 program limit such as an index row too large):
    /// some event in the batch is to blame, and `isolate_unprocessable` finds it.
    #[error("Postgres refused the batch's data: {0}")]
    Data(sqlx::Error),
    #[error("Postgres: {0}")]
    Permanent(sqlx::Error),
    #[error("{0}")]
    MeterChanged(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        if tally_db::is_retryable(&error) {
            StoreError::Retryable(error)
        } else if tally_db::is_data_error(&error) {
            StoreError::Data(error)
        } else {
            StoreError::Permanent(error)
        }
    }
}

impl From<tally_db::meters::CatalogError> for StoreError {
    fn from(error: tally_db::meters::CatalogError) -> Self {
        match error {
            tally_db::meters::CatalogError::Postgres(error) => error.into(),
            changed => StoreError::MeterChanged(changed.to_string()),
        }
    }
}

/// Which partitions this aggregator owns, and the epoch it took each one at.
pub(crate) type Epochs = HashMap<i32, i64>;

/// Takes partitions for `owner`: bumps each one's epoch (fencing whoever held it before) and
/// returns where to resume, `None` for a partition never consumed by this group.
pub(crate) async fn take_partitions(
    pool: &PgPool,
    group: &str,
    topic: &str,
    partitions: &[i32],
    owner: &str,
) -> Result<Vec<(i32, Option<i64>, i64)>, StoreError> {
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
    Ok(rows)
}

/// Where a batch came from and who may commit it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ownership<'a> {
    pub(crate) group: &'a str,
    pub(crate) topic: &'a str,
    pub(crate) epochs: &'a Epochs,
}

/// The batch's one transaction. Returns what it did; on any error nothing is written.
pub(crate) async fn commit_batch(
    pool: &PgPool,
    batch: &Batch,
    ownership: Ownership<'_>,
) -> Result<BatchReport, StoreError> {
    let started = Instant::now();
    let mut tx = pool.begin().await?;
    let candidates: Vec<&Candidate> = batch.candidates.iter().collect();
    let rejects: Vec<&Reject> = batch.rejects.iter().collect();
    let applied = apply(&mut tx, ownership.topic, &candidates, &rejects).await?;
    advance_offsets(&mut tx, batch, ownership).await?;
    tx.commit().await?;

    // Candidates not counted were claimed before: same payload (duplicate) or a conflict.
    let earlier_duplicates = batch.candidates.len() - applied.counted - applied.conflicts.len();
    let all_rejects: Vec<&Reject> = batch.rejects.iter().chain(&applied.conflicts).collect();
    let report = BatchReport {
        consumed: batch.consumed,
        counted: applied.counted as u64,
        duplicates: batch.duplicates + earlier_duplicates as u64,
        rejected: count_by_reason(&all_rejects),
        windows: applied.windows,
        transaction: started.elapsed(),
    };
    Ok(report)
}

/// What [`apply`] wrote.
struct Applied {
    counted: usize,
    conflicts: Vec<Reject>,
    windows: u64,
}

/// Everything a batch writes but its offsets: claims the ids, adds the new events to the
/// windows, the daily rollup and the changed billing slots, records the rejects.
async fn apply(
    tx: &mut PgConnection,
    topic: &str,
    candidates: &[&Candidate],
    rejects: &[&Reject],
) -> Result<Applied, StoreError> {
    let (claimed, conflicts) = claim_ids(tx, candidates).await?;
    let counted: Vec<&Candidate> = candidates
        .iter()
        .zip(&claimed)
        .filter_map(|(candidate, &new)| new.then_some(*candidate))
        .collect();
    let minutes = fold(counted.iter().copied(), Granularity::Minute);
    let days = fold(counted.iter().copied(), Granularity::Day);
    let windows = minutes.len() as u64;
    record_slot_changes(tx, &minutes).await?;
    upsert_windows(tx, Granularity::Minute, minutes).await?;
    upsert_windows(tx, Granularity::Day, days).await?;
    let all_rejects: Vec<&Reject> = rejects.iter().copied().chain(&conflicts).collect();
    insert_rejects(tx, topic, &all_rejects).await?;
    Ok(Applied {
        counted: counted.len(),
        conflicts,
        windows,
    })
}

/// Runs [`apply`] on a part of a batch in a transaction that is always rolled back: does
/// Postgres take this part?
async fn probe(
    pool: &PgPool,
    topic: &str,
    candidates: &[&Candidate],
    rejects: &[&Reject],
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    let result = apply(&mut tx, topic, candidates, rejects).await.map(drop);
    tx.rollback().await?;
    result
}

/// After a batch failed with a data error (see [`StoreError::Data`]): finds, by halving it in
/// transactions that are rolled back, each event Postgres refuses on its own, and turns it into
/// an `unprocessable` reject holding the database's message (its text fields left out, since
/// they may be what Postgres refused; the raw bytes are kept). Everything else in the batch is
/// then committed as usual. Returns how many were found; none means the failure is not one
/// event's, and the batch is retried as it is.
pub(crate) async fn isolate_unprocessable(
    pool: &PgPool,
    topic: &str,
    batch: &mut Batch,
) -> Result<usize, StoreError> {
    let candidates: Vec<&Candidate> = batch.candidates.iter().collect();
    let bad_candidates = bisect(candidates.len(), |range| {
        probe(pool, topic, &candidates[range], &[])
    })
    .await?;
    let rejects: Vec<&Reject> = batch.rejects.iter().collect();
    let bad_rejects = bisect(rejects.len(), |range| {
        probe(pool, topic, &[], &rejects[range])
    })
    .await?;
    let found = bad_candidates.len() + bad_rejects.len();

    let unprocessable = |origin, error: &sqlx::Error| Reject {
        rejection: Rejection::new(
            RejectReason::Unprocessable,
            format!("valid by the event contract, but Postgres refused to store it: {error}"),
        ),
        event_id: None,
        customer: None,
        meter: None,
        origin,
    };
    for (index, error) in bad_rejects.iter().rev() {
        let origin = batch.rejects[*index].origin.clone();
        batch.rejects[*index] = unprocessable(origin, error);
    }
    for (index, error) in bad_candidates.iter().rev() {
        let candidate = batch.candidates.remove(*index);
        batch.rejects.push(unprocessable(candidate.origin, error));
    }
    Ok(found)
}

/// The items among `0..len` that fail on their own, with their errors: halves every failing
/// range until single items are left. Only data errors count as failing; any other error ends
/// the search.
async fn bisect<F, Fut>(len: usize, mut probe: F) -> Result<Vec<(usize, sqlx::Error)>, StoreError>
where
    F: FnMut(std::ops::Range<usize>) -> Fut,
    Fut: std::future::Future<Output = Result<(), StoreError>>,
{
    let mut failing = Vec::new();
    let mut ranges = Vec::new();
    ranges.push(0..len);
    while let Some(range) = ranges.pop() {
        if range.is_empty() {
            continue;
        }
        match probe(range.clone()).await {
            Ok(()) => {}
            Err(StoreError::Data(error)) if range.len() == 1 => failing.push((range.start, error)),
            Err(StoreError::Data(_)) => {
                let middle = range.start + range.len() / 2;
                ranges.push(middle..range.end);
                ranges.push(range.start..middle);
            }
            Err(other) => return Err(other),
        }
    }
    failing.sort_by_key(|(index, _)| *index);
    Ok(failing)
}

fn count_by_reason(rejects: &[&Reject]) -> Vec<(RejectReason, u64)> {
    let mut counts: Vec<(RejectReason, u64)> = Vec::new();
    for reject in rejects {
        match counts
            .iter_mut()
            .find(|(r, _)| *r == reject.rejection.reason)
        {
            Some((_, n)) => *n += 1,
            None => counts.push((reject.rejection.reason, 1)),
        }
    }
    counts.sort();
    counts
}

/// Claims the candidates' ids. Returns, aligned with `candidates`, whether each was new (and
/// is now claimed by this transaction), plus the rejects for ids already claimed with another
/// payload. An id is claimed once, whatever the timestamp of the copy that brings it.
///
/// Looking the ids up first and then inserting only the new ones is about twice as fast as
/// `INSERT .. ON CONFLICT DO NOTHING RETURNING`. If another aggregator claims one of the same
/// ids in between (only possible while a rebalance hands a partition over), the insert fails
/// with a unique violation, the transaction rolls back, and the batch is retried.
async fn claim_ids(
    tx: &mut PgConnection,
    candidates: &[&Candidate],
) -> Result<(Vec<bool>, Vec<Reject>), StoreError> {
    if candidates.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    // Sorted, so that the index is probed and extended in order.
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_unstable_by(|&a, &b| candidates[a].event.id.cmp(&candidates[b].event.id));
    let ids: Vec<&str> = order
        .iter()
        .map(|&i| candidates[i].event.id.as_str())
        .collect();
    // `ARRAY(SELECT unnest($1))` hides the array's length from the planner, which otherwise
    // sees tens of thousands of values and picks a (parallel) scan of the whole table over
    // the index probes: a second instead of a tenth of one, once the table holds weeks of ids.
    let stored: Vec<(String, i64)> = sqlx::query_as(
        "SELECT id, payload_hash FROM event_ids WHERE id = ANY(ARRAY(SELECT unnest($1::text[])))",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    let stored: HashMap<&str, i64> = stored
        .iter()
        .map(|(id, hash)| (id.as_str(), *hash))
        .collect();

    let mut new = vec![false; candidates.len()];
    let mut conflicts = Vec::new();
    let (mut new_ids, mut new_hashes) = (Vec::new(), Vec::new());
    for (position, &i) in order.iter().enumerate() {
        let candidate = candidates[i];
        match stored.get(ids[position]) {
            None => {
                new[i] = true;
                new_ids.push(ids[position]);
                new_hashes.push(candidate.payload_hash);
            }
            Some(&hash) if hash == candidate.payload_hash => {}
            Some(_) => conflicts.push(Reject::of(candidate, conflict(&candidate.event.id))),
        }
    }
    if !new_ids.is_empty() {
        sqlx::query(
            "INSERT INTO event_ids (id, claimed_on, payload_hash)
             SELECT i, (now() AT TIME ZONE 'UTC')::date, h
             FROM unnest($1::text[], $2::bigint[]) AS u(i, h)",
        )
        .bind(&new_ids)
        .bind(&new_hashes)
        .execute(&mut *tx)
        .await?;
    }
    Ok((new, conflicts))
}

/// The tables and the value merge rule for one granularity and aggregation.
fn upsert_sql(granularity: Granularity, aggregation: Aggregation) -> String {
    let (table, time_column, time_type) = match granularity {
        Granularity::Minute => ("usage_minute", "window_start", "timestamptz"),
        Granularity::Day => ("usage_daily", "day", "date"),
    };
    let (value, latest) = match aggregation {
        Aggregation::Sum | Aggregation::Count | Aggregation::UniqueCount => {
            ("w.value + excluded.value", "")
        }
        Aggregation::Max => ("GREATEST(w.value, excluded.value)", ""),
        Aggregation::Latest => (
            "CASE WHEN newer THEN excluded.value ELSE w.value END",
            ", latest_at = CASE WHEN newer THEN excluded.latest_at ELSE w.latest_at END,
               latest_id = CASE WHEN newer THEN excluded.latest_id ELSE w.latest_id END",
        ),
    };
    let newer = "(excluded.latest_at, excluded.latest_id) > (w.latest_at, w.latest_id)";
    format!(
        "INSERT INTO {table} AS w (customer_id, meter, {time_column}, group_key, value, event_count,
                                   latest_at, latest_id, first_updated, last_updated)
         SELECT c, m, t, g, v, n, la, li, now(), now()
         FROM unnest($1::text[], $2::text[], $3::{time_type}[], $4::text[], $5::numeric[],
                     $6::bigint[], $7::timestamptz[], $8::text[]) AS u(c, m, t, g, v, n, la, li)
         ON CONFLICT (customer_id, meter, {time_column}, group_key) DO UPDATE
            SET value = {value}, event_count = w.event_count + excluded.event_count,
                last_updated = excluded.last_updated{latest}"
    )
    .replace("newer", newer)
}

/// Tells the sink which 5-minute billing slots this batch changed. `unique_count` meters are
/// not billed (Stripe meters cannot count distinct values), so they are left out.
async fn record_slot_changes(
    tx: &mut PgConnection,
    minutes: &[WindowDelta],
) -> Result<(), StoreError> {
    let slots: BTreeSet<(&str, &str, DateTime<Utc>)> = minutes
        .iter()
        .filter(|d| d.aggregation != Aggregation::UniqueCount)
        .map(|d| {
            (
                d.key.customer.as_str(),
                d.key.meter.as_str(),
                slot_start(d.key.start),
            )
        })
        .collect();
    if slots.is_empty() {
        return Ok(());
    }
    let customers: Vec<&str> = slots.iter().map(|s| s.0).collect();
    let meters: Vec<&str> = slots.iter().map(|s| s.1).collect();
    let starts: Vec<DateTime<Utc>> = slots.iter().map(|s| s.2).collect();
    sqlx::query(
        "INSERT INTO usage_slot_changes (customer_id, meter, slot_start)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::timestamptz[])",
    )
    .bind(&customers)
    .bind(&meters)
    .bind(&starts)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Upserts the deltas of one granularity: one statement per aggregation present (and, in the
/// rare case a sum needed several partials, one more per extra partial).
async fn upsert_windows(
    tx: &mut PgConnection,
    granularity: Granularity,
    mut deltas: Vec<WindowDelta>,
) -> Result<(), StoreError> {
    add_new_unique_values(tx, granularity, &mut deltas).await?;
    for aggregation in [
        Aggregation::Sum,
        Aggregation::Count,
        Aggregation::Max,
        Aggregation::Latest,
        Aggregation::UniqueCount,
    ] {
        let mut rows: Vec<&WindowDelta> = deltas
            .iter()
            .filter(|d| d.aggregation == aggregation)
            .collect();
        let mut layer = 0;
        while !rows.is_empty() {
            upsert_rows(tx, granularity, aggregation, &rows, layer).await?;
            layer += 1;
            rows.retain(|d| d.partials.len() > layer);
        }
    }
    Ok(())
}

async fn upsert_rows(
    tx: &mut PgConnection,
    granularity: Granularity,
    aggregation: Aggregation,
    rows: &[&WindowDelta],
    layer: usize,
) -> Result<(), StoreError> {
    let customers: Vec<&str> = rows.iter().map(|d| d.key.customer.as_str()).collect();
    let meters: Vec<&str> = rows.iter().map(|d| d.key.meter.as_str()).collect();
    let groups: Vec<&str> = rows.iter().map(|d| d.key.group_key.as_str()).collect();
    let values: Vec<Decimal> = rows
        .iter()
        .map(|d| d.partials.get(layer).copied().unwrap_or(Decimal::ZERO))
        .collect();
    // Later layers carry only a value; the event count was added with the first.
    let counts: Vec<i64> = rows
        .iter()
        .map(|d| if layer == 0 { d.events } else { 0 })
        .collect();
    let latest_at: Vec<Option<DateTime<Utc>>> = rows
        .iter()
        .map(|d| d.latest.as_ref().map(|l| l.0))
        .collect();
    let latest_id: Vec<Option<&str>> = rows
        .iter()
        .map(|d| d.latest.as_ref().map(|l| l.1.as_str()))
        .collect();
    let sql = upsert_sql(granularity, aggregation);
    let query = sqlx::query(&sql).bind(&customers).bind(&meters);
    let query = match granularity {
        Granularity::Minute => query.bind(rows.iter().map(|d| d.key.start).collect::<Vec<_>>()),
        Granularity::Day => query.bind(
            rows.iter()
                .map(|d| d.key.start.date_naive())
                .collect::<Vec<_>>(),
        ),
    };
    query
        .bind(&groups)
        .bind(&values)
        .bind(&counts)
        .bind(&latest_at)
        .bind(&latest_id)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// For `unique_count` deltas: records the batch's values and sets each delta's value to the
/// number that were new to its window, so counts stay exact across batches.
async fn add_new_unique_values(
    tx: &mut PgConnection,
    granularity: Granularity,
    deltas: &mut [WindowDelta],
) -> Result<(), StoreError> {
    let mut customers = Vec::new();
    let mut meters = Vec::new();
    let mut starts = Vec::new();
    let mut groups = Vec::new();
    let mut values = Vec::new();
    for delta in deltas
        .iter()
        .filter(|d| d.aggregation == Aggregation::UniqueCount)
    {
        for value in &delta.unique_values {
            customers.push(delta.key.customer.as_str());
            meters.push(delta.key.meter.as_str());
            starts.push(delta.key.start);
            groups.push(delta.key.group_key.as_str());
            values.push(value.as_str());
        }
    }
    if values.is_empty() {
        return Ok(());
    }
    let sql = match granularity {
        Granularity::Minute => {
            "INSERT INTO usage_minute_values (customer_id, meter, window_start, group_key, value)
             SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::text[])
             ON CONFLICT DO NOTHING
             RETURNING customer_id, meter, window_start, group_key"
        }
        Granularity::Day => {
            "INSERT INTO usage_daily_values (customer_id, meter, day, group_key, value)
             SELECT c, m, (t AT TIME ZONE 'UTC')::date, g, v
             FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::text[])
                  AS u(c, m, t, g, v)
             ON CONFLICT DO NOTHING
             RETURNING customer_id, meter, day::timestamp AT TIME ZONE 'UTC', group_key"
        }
    };
    let new: Vec<(String, String, DateTime<Utc>, String)> = sqlx::query_as(sql)
        .bind(&customers)
        .bind(&meters)
        .bind(&starts)
        .bind(&groups)
        .bind(&values)
        .fetch_all(&mut *tx)
        .await?;
    let mut new_per_window: HashMap<(String, String, DateTime<Utc>, String), i64> = HashMap::new();
    for key in new {
        *new_per_window.entry(key).or_default() += 1;
    }
    for delta in deltas
        .iter_mut()
        .filter(|d| d.aggregation == Aggregation::UniqueCount)
    {
        let key = (
            delta.key.customer.clone(),
            delta.key.meter.clone(),
            delta.key.start,
            delta.key.group_key.clone(),
        );
        let new = new_per_window.get(&key).copied().unwrap_or(0);
        delta.partials = vec![Decimal::from(new)];
    }
    Ok(())
}

async fn insert_rejects(
    tx: &mut PgConnection,
    topic: &str,
    rejects: &[&Reject],
) -> Result<(), StoreError> {
    let rows: Vec<Rejected<'_>> = rejects
        .iter()
        .map(|r| Rejected {
            reason: r.rejection.reason.code(),
            detail: &r.rejection.detail,
            event_id: r.event_id.as_deref(),
            customer: r.customer.as_deref(),
            meter: r.meter.as_deref(),
            raw: &r.origin.raw,
            received: Received::Kafka {
                topic,
                partition: r.origin.partition,
                offset: r.origin.offset,
                key: r.origin.key.as_deref(),
            },
        })
        .collect();
    tally_db::rejects::insert(tx, &rows).await?;
    Ok(())
}

/// Stores the batch's next offsets, only where this aggregator's epoch is still current.
async fn advance_offsets(
    tx: &mut Transaction<'_, Postgres>,
    batch: &Batch,
    ownership: Ownership<'_>,
) -> Result<(), StoreError> {
    let mut partitions = Vec::new();
    let mut offsets = Vec::new();
    let mut epochs = Vec::new();
    for (&partition, &next) in &batch.next_offsets {
        let Some(&epoch) = ownership.epochs.get(&partition) else {
            return Err(StoreError::Fenced {
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
        return Err(StoreError::Fenced {
            topic: ownership.topic.into(),
            partition: lost,
        });
    }
    Ok(())
}

/// Deletes dedup claims made before `claimed_before` (older than the retention), in chunks of
/// short transactions so that neither locks nor WAL pile up, and minute unique-values past the
/// lateness horizon. Returns how many claims were deleted.
pub(crate) async fn delete_expired(
    pool: &PgPool,
    claimed_before: NaiveDate,
    values_before: DateTime<Utc>,
) -> Result<u64, StoreError> {
    const CHUNK: i64 = 20_000;
    let mut deleted = 0;
    loop {
        let chunk = sqlx::query(
            "DELETE FROM event_ids WHERE ctid = ANY(ARRAY(
                SELECT ctid FROM event_ids WHERE claimed_on < $1 LIMIT $2))",
        )
        .bind(claimed_before)
        .bind(CHUNK)
        .execute(pool)
        .await?
        .rows_affected();
        deleted += chunk;
        if chunk < CHUNK as u64 {
            break;
        }
    }
    sqlx::query("DELETE FROM usage_minute_values WHERE window_start < $1")
        .bind(values_before)
        .execute(pool)
        .await?;
    Ok(deleted)
}
