//! The burner's metrics.

use std::time::Duration;

/// Queue rows (a window's usage from one aggregator batch) burned.
pub const WINDOWS_BURNED: &str = "tally_credit_windows_burned_total";
/// From the aggregator's commit of usage to its burn, per pass (the oldest row).
pub const BURN_LAG: &str = "tally_credit_burn_lag_seconds";
/// Grants closed as expired.
pub const GRANTS_EXPIRED: &str = "tally_credit_grants_expired_total";
/// Failed burner passes and plan grants (each is retried).
pub const BURN_ERRORS: &str = "tally_credit_burn_errors_total";
/// Queue rows set aside because their cost could not be computed.
pub const STUCK: &str = "tally_credit_usage_stuck_total";

/// A burn pass: the queue rows it took, and how long the oldest had waited since its commit.
pub(crate) fn burned(rows: usize, oldest_wait: Option<Duration>) {
    metrics::counter!(WINDOWS_BURNED).increment(rows as u64);
    if let Some(wait) = oldest_wait {
        metrics::histogram!(BURN_LAG).record(wait.as_secs_f64());
    }
}

pub(crate) fn expired(count: usize) {
    metrics::counter!(GRANTS_EXPIRED).increment(count as u64);
}

pub(crate) fn burn_error() {
    metrics::counter!(BURN_ERRORS).increment(1);
}

pub(crate) fn stuck(count: usize) {
    metrics::counter!(STUCK).increment(count as u64);
}
