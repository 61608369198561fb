//! The archiver's metrics and their Prometheus names, in one place. Recorded per flush, never
//! per record.

use std::time::Duration;

use metrics::{counter, gauge, histogram};

/// Records archived (in a file Postgres recorded), by `status` (accepted, rejected).
pub(crate) const RECORDS: &str = "tally_archive_records_total";
pub(crate) const FILES: &str = "tally_archive_files_total";
pub(crate) const BYTES: &str = "tally_archive_bytes_total";
pub(crate) const FLUSH_SECONDS: &str = "tally_archive_flush_seconds";
/// Flushes that recorded nothing (their records are read again), by `reason`.
pub(crate) const FLUSH_FAILURES: &str = "tally_archive_flush_failures_total";
/// When the last flush was recorded (Unix seconds): an archive falling behind shows here.
pub(crate) const LAST_FLUSH: &str = "tally_archive_last_flush_timestamp_seconds";
pub(crate) const BUFFERED: &str = "tally_archive_buffered_records";
pub(crate) const CONSUMER_LAG: &str = "tally_archive_consumer_lag_messages";
/// Offsets skipped between a partition's archived end and the next record Kafka served:
/// records Kafka deleted before they were archived (or a compacted or transactional topic's
/// gaps). Nonzero after an outage longer than the topic's retention.
pub(crate) const OFFSETS_SKIPPED: &str = "tally_archive_offsets_skipped_total";
/// Files Postgres recorded that the store lost (a disk failure, or removed by hand).
pub(crate) const FILES_LOST: &str = "tally_archive_files_lost_total";
/// Partitions whose archive ends past Kafka's log end (the topic recreated or cut short),
/// left unread for a person.
pub(crate) const PARTITIONS_AHEAD: &str = "tally_archive_partitions_ahead_of_kafka";
/// Files deleted for `archive.retention`.
pub(crate) const FILES_EXPIRED: &str = "tally_archive_files_expired_total";

pub(crate) const FAILURE_REASONS: [&str; 5] = ["store", "postgres", "fenced", "overlap", "slow"];

pub(crate) fn record_flush(
    accepted: usize,
    rejected: usize,
    files: usize,
    bytes: u64,
    took: Duration,
) {
    counter!(RECORDS, "status" => "accepted").increment(accepted as u64);
    counter!(RECORDS, "status" => "rejected").increment(rejected as u64);
    counter!(FILES).increment(files as u64);
    counter!(BYTES).increment(bytes);
    histogram!(FLUSH_SECONDS).record(took.as_secs_f64());
    gauge!(LAST_FLUSH).set(chrono::Utc::now().timestamp() as f64);
}

pub(crate) fn record_failure(reason: &'static str) {
    counter!(FLUSH_FAILURES, "reason" => reason).increment(1);
}

pub(crate) fn record_buffered(records: usize) {
    gauge!(BUFFERED).set(records as f64);
}

pub(crate) fn record_lag(partition: i32, lag: i64) {
    gauge!(CONSUMER_LAG, "partition" => partition.to_string()).set(lag.max(0) as f64);
}

pub(crate) fn record_skipped(offsets: i64) {
    counter!(OFFSETS_SKIPPED).increment(offsets.max(0) as u64);
}

pub(crate) fn record_ahead(partitions: usize) {
    gauge!(PARTITIONS_AHEAD).set(partitions as f64);
}

pub(crate) fn record_lost() {
    counter!(FILES_LOST).increment(1);
}

pub(crate) fn record_expired(files: usize) {
    counter!(FILES_EXPIRED).increment(files as u64);
}

/// Registers the series at zero, so dashboards and alerts see them before the first event.
pub(crate) fn describe() {
    for status in ["accepted", "rejected"] {
        counter!(RECORDS, "status" => status).increment(0);
    }
    for reason in FAILURE_REASONS {
        counter!(FLUSH_FAILURES, "reason" => reason).increment(0);
    }
    counter!(FILES).increment(0);
    counter!(BYTES).increment(0);
    counter!(OFFSETS_SKIPPED).increment(0);
    counter!(FILES_EXPIRED).increment(0);
    counter!(FILES_LOST).increment(0);
    gauge!(BUFFERED).set(0.0);
    gauge!(PARTITIONS_AHEAD).set(0.0);
}
