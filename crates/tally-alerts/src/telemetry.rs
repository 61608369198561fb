//! The alerts' metrics.

use std::time::Duration;

/// Crossings recorded.
pub const FIRED: &str = "tally_alerts_fired_total";
/// Delivery attempts by `outcome`: `delivered`, `retrying` (will be tried again), `failed`
/// (given up after `alerts.retry_for`).
pub const DELIVERIES: &str = "tally_alert_deliveries_total";
/// From a crossing's recording to its delivery's 2xx.
pub const DELIVERY_LATENCY: &str = "tally_alert_delivery_seconds";
/// Failed evaluation and delivery rounds (each is retried).
pub const ERRORS: &str = "tally_alert_errors_total";

pub(crate) fn fired(count: usize) {
    metrics::counter!(FIRED).increment(count as u64);
}

pub(crate) fn delivered(latency: Duration) {
    metrics::counter!(DELIVERIES, "outcome" => "delivered").increment(1);
    metrics::histogram!(DELIVERY_LATENCY).record(latency.as_secs_f64());
}

pub(crate) fn not_delivered(given_up: bool) {
    let outcome = if given_up { "failed" } else { "retrying" };
    metrics::counter!(DELIVERIES, "outcome" => outcome).increment(1);
}

pub(crate) fn error() {
    metrics::counter!(ERRORS).increment(1);
}
