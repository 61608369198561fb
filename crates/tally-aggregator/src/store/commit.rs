//! The batch transaction: claims the ids, adds the newly claimed events to the windows, records
//! the rejects and advances the offsets, all or nothing, and reports what it did.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use sqlx::{PgConnection, PgPool};
use tally_core::RejectReason;
use tally_db::rejects::{Received, Rejected};

use super::claims::{claim_ids, Claims};
use super::ownership::{advance_offsets, Ownership};
use super::windows::{record_slot_changes, upsert_windows, WindowTables};
use super::AggregatorStoreError;
use crate::batch::{fold, Batch, Candidate, Granularity, Reject, WindowDelta};
use crate::telemetry::BatchReport;
use tally_core::Aggregation;
use tally_credits::queue::CountedUsage;

/// The batch's one transaction. Returns what it did; on any error nothing is written.
pub(crate) async fn commit_batch(
    pool: &PgPool,
    batch: &Batch,
    ownership: Ownership<'_>,
    priced_meters: &BTreeSet<String>,
) -> Result<BatchReport, AggregatorStoreError> {
    let started = Instant::now();
    let mut tx = pool.begin().await?;
    let candidates: Vec<&Candidate> = batch.candidates.iter().collect();
    let rejects: Vec<&Reject> = batch.rejects.iter().collect();
    let applied = apply(
        &mut tx,
        ownership.topic,
        &candidates,
        &rejects,
        priced_meters,
        &batch.versions,
    )
    .await?;
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
pub(super) struct Applied {
    counted: usize,
    conflicts: Vec<Reject>,
    windows: u64,
}

/// Everything a batch writes but its offsets: claims the ids, adds the new events to the
/// windows, the daily rollup and the changed billing slots, queues the usage of priced meters
/// for the credit burner, records the rejects.
pub(super) async fn apply(
    tx: &mut PgConnection,
    topic: &str,
    candidates: &[&Candidate],
    rejects: &[&Reject],
    priced_meters: &BTreeSet<String>,
    versions: &HashMap<String, i64>,
) -> Result<Applied, AggregatorStoreError> {
    check_versions(tx, candidates, rejects, versions).await?;
    let Claims { claimed, conflicts } = claim_ids(tx, candidates).await?;
    let counted: Vec<&Candidate> = candidates
        .iter()
        .zip(&claimed)
        .filter_map(|(candidate, &new)| new.then_some(*candidate))
        .collect();
    let minutes = fold(counted.iter().copied(), Granularity::Minute);
    let days = fold(counted.iter().copied(), Granularity::Day);
    let windows = minutes.len() as u64;
    record_slot_changes(tx, &minutes).await?;
    // The customers whose usage changed, for the alert evaluator and the quota caches: one
    // row per customer, from the folded windows (not from every event).
    let changed: BTreeSet<&str> = minutes.iter().map(|d| d.key.customer.as_str()).collect();
    let changed: Vec<&str> = changed.into_iter().collect();
    tally_db::changes::record(tx, &changed).await?;
    let priced_usage = priced_usage(&minutes, priced_meters);
    let live = WindowTables::live();
    upsert_windows(tx, &live, Granularity::Minute, minutes).await?;
    upsert_windows(tx, &live, Granularity::Day, days).await?;
    let all_rejects: Vec<&Reject> = rejects.iter().copied().chain(&conflicts).collect();
    insert_rejects(tx, topic, &all_rejects).await?;
    // Last, so that `queued_at` is close to the commit (the burn's lag is measured from it).
    let queued: Vec<CountedUsage<'_>> = priced_usage.iter().map(PricedWindow::usage).collect();
    tally_credits::queue::enqueue(tx, &queued).await?;
    Ok(Applied {
        counted: counted.len(),
        conflicts,
        windows,
    })
}

/// Takes the shared lock of the candidates' meters (first, in name order) and checks that the
/// batch was checked under their current definitions. `tally rebuild` takes its meter's lock
/// exclusively to swap in recomputed windows (and maybe a new definition), so a batch and a
/// swap take turns, and a batch checked under a replaced definition never commits.
async fn check_versions(
    tx: &mut PgConnection,
    candidates: &[&Candidate],
    rejects: &[&Reject],
    versions: &HashMap<String, i64>,
) -> Result<(), AggregatorStoreError> {
    // A refusal the meter's definition decided (no unique dimension) is checked too: under a
    // new definition the event may count.
    let refused_by_definition = rejects
        .iter()
        .filter(|r| r.rejection.reason == RejectReason::InvalidDimensions)
        .filter_map(|r| r.meter.as_deref());
    let meters: BTreeSet<&str> = candidates
        .iter()
        .map(|c| c.event.meter.as_str())
        .chain(refused_by_definition)
        .collect();
    let meters: Vec<&str> = meters.into_iter().collect();
    if meters.is_empty() {
        return Ok(());
    }
    let current = tally_db::meters::share_versions(tx, &meters).await?;
    for meter in meters {
        if current.get(meter) != versions.get(meter) {
            return Err(AggregatorStoreError::Redefined {
                meter: meter.to_owned(),
            });
        }
    }
    Ok(())
}

/// A window's newly counted usage of a meter with a credit rate, for the burner.
struct PricedWindow {
    customer: String,
    meter: String,
    group_key: String,
    start: chrono::DateTime<chrono::Utc>,
    quantity: rust_decimal::Decimal,
}

impl PricedWindow {
    fn usage(&self) -> CountedUsage<'_> {
        CountedUsage {
            customer: &self.customer,
            meter: &self.meter,
            group_key: &self.group_key,
            window_start: self.start,
            quantity: self.quantity,
        }
    }
}

/// The usage the burner draws down: one row per window (and partial sum) of a priced meter
/// this batch changed. Queued in the batch's transaction, so only counted events burn, once.
fn priced_usage(minutes: &[WindowDelta], priced_meters: &BTreeSet<String>) -> Vec<PricedWindow> {
    if priced_meters.is_empty() {
        return Vec::new();
    }
    minutes
        .iter()
        .filter(|d| matches!(d.aggregation, Aggregation::Sum | Aggregation::Count))
        .filter(|d| priced_meters.contains(&d.key.meter))
        .flat_map(|d| {
            d.partials.iter().map(|quantity| PricedWindow {
                customer: d.key.customer.clone(),
                meter: d.key.meter.clone(),
                group_key: d.key.group_key.clone(),
                start: d.key.start,
                quantity: *quantity,
            })
        })
        .collect()
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

async fn insert_rejects(
    tx: &mut PgConnection,
    topic: &str,
    rejects: &[&Reject],
) -> Result<(), AggregatorStoreError> {
    let rows: Vec<Rejected<'_>> = rejects
        .iter()
        .map(|r| Rejected {
            reason: r.rejection.reason.code(),
            detail: &r.rejection.detail,
            event_id: r.event_id.as_deref(),
            customer: r.customer.as_deref(),
            meter: r.meter.as_deref(),
            raw: &r.message.raw,
            received: Received::Kafka {
                topic,
                partition: r.message.partition,
                offset: r.message.offset,
                key: r.message.key.as_deref(),
            },
        })
        .collect();
    tally_db::rejects::insert(tx, &rows).await?;
    Ok(())
}
