//! The aggregator's metrics and their Prometheus names, in one place. Recorded once per batch,
//! never per event, so the cost does not grow with the event rate.

use std::time::Duration;

use metrics::{counter, gauge, histogram};
use tally_core::RejectReason;

pub(crate) const EVENTS_CONSUMED: &str = "tally_aggregator_events_consumed_total";
pub(crate) const EVENTS_COUNTED: &str = "tally_aggregator_events_counted_total";
pub(crate) const EVENTS_DUPLICATE: &str = "tally_aggregator_events_duplicate_total";
pub(crate) const EVENTS_REJECTED: &str = "tally_aggregator_events_rejected_total";
pub(crate) const WINDOWS_UPSERTED: &str = "tally_aggregator_windows_upserted_total";
pub(crate) const BATCH_EVENTS: &str = "tally_aggregator_batch_events";
pub(crate) const TRANSACTION_SECONDS: &str = "tally_aggregator_transaction_seconds";
pub(crate) const APPEND_TO_COMMIT_SECONDS: &str = "tally_aggregator_append_to_commit_seconds";
pub(crate) const BATCHES_FENCED: &str = "tally_aggregator_batches_fenced_total";
pub(crate) const BATCHES_RETRIED: &str = "tally_aggregator_batches_retried_total";
pub(crate) const CONSUMER_LAG: &str = "tally_aggregator_consumer_lag_messages";
/// Partitions the group assigned this member now.
pub(crate) const ASSIGNED_PARTITIONS: &str = "tally_aggregator_assigned_partitions";
/// How long this member has held lagging partitions without progress (or held none while
/// partitions nobody consumes lag); 0 while it consumes (`watchdog.rs`).
pub(crate) const STALLED_SECONDS: &str = "tally_aggregator_stalled_seconds";
/// Times this member left the group and joined again with a fresh consumer after a stall.
pub(crate) const REJOINS: &str = "tally_aggregator_rejoins_total";
/// Rejected events not yet copied to the DLQ topic, and the age of the oldest: a backlog that
/// only grows means the DLQ publisher is stuck.
pub(crate) const DLQ_PENDING: &str = "tally_aggregator_dlq_pending";
pub(crate) const DLQ_OLDEST_PENDING_SECONDS: &str = "tally_aggregator_dlq_oldest_pending_seconds";

/// What one committed batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Kafka messages in the batch.
    pub consumed: u64,
    /// Events added to windows.
    pub counted: u64,
    /// Events whose id was already counted with the same payload.
    pub duplicates: u64,
    /// Events refused, by reason (each also in `rejected_events`).
    pub rejected: Vec<(RejectReason, u64)>,
    /// Minute windows written.
    pub windows: u64,
    /// How long the Postgres transaction took.
    pub transaction: Duration,
}

impl BatchReport {
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().map(|(_, n)| n).sum()
    }
}

pub(crate) fn record_batch(report: &BatchReport, append_ms: &[i64], committed_ms: i64) {
    counter!(EVENTS_CONSUMED).increment(report.consumed);
    counter!(EVENTS_COUNTED).increment(report.counted);
    counter!(EVENTS_DUPLICATE).increment(report.duplicates);
    for (reason, n) in &report.rejected {
        counter!(EVENTS_REJECTED, "reason" => reason.code()).increment(*n);
    }
    counter!(WINDOWS_UPSERTED).increment(report.windows);
    histogram!(BATCH_EVENTS).record(report.consumed as f64);
    histogram!(TRANSACTION_SECONDS).record(report.transaction.as_secs_f64());
    let append_to_commit = histogram!(APPEND_TO_COMMIT_SECONDS);
    for &appended in append_ms {
        append_to_commit.record((committed_ms - appended).max(0) as f64 / 1000.0);
    }
}

pub(crate) fn record_dlq_backlog(pending: i64, oldest_seconds: f64) {
    gauge!(DLQ_PENDING).set(pending as f64);
    gauge!(DLQ_OLDEST_PENDING_SECONDS).set(oldest_seconds);
}

pub(crate) fn record_fenced() {
    counter!(BATCHES_FENCED).increment(1);
}

pub(crate) fn record_retry() {
    counter!(BATCHES_RETRIED).increment(1);
}

pub(crate) fn record_assigned(partitions: usize) {
    gauge!(ASSIGNED_PARTITIONS).set(partitions as f64);
}

pub(crate) fn record_stalled(for_: Duration) {
    gauge!(STALLED_SECONDS).set(for_.as_secs_f64());
}

pub(crate) fn record_rejoin() {
    counter!(REJOINS).increment(1);
}

pub(crate) fn record_lag(partition: i32, lag: i64) {
    gauge!(CONSUMER_LAG, "partition" => partition.to_string()).set(lag.max(0) as f64);
}

/// Registers every reason's series at zero, so dashboards see them before the first reject.
pub(crate) fn describe() {
    counter!(REJOINS).increment(0);
    gauge!(STALLED_SECONDS).set(0.0);
    for reason in RejectReason::ALL {
        counter!(EVENTS_REJECTED, "reason" => reason.code()).increment(0);
    }
}
