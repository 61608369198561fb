//! When a figure needs a person: the bounds `tally status` and the console's pipeline page
//! both judge by (and the Prometheus alerts in deploy/ are written with).

use std::time::Duration;

/// A submission waiting longer than this for Stripe is a problem (`TallyOutboxStale`).
pub const OUTBOX_STALE: Duration = Duration::from_secs(900);
/// Rejected events waiting longer than this for the DLQ topic (`TallyDlqStuck`).
pub const DLQ_STUCK: Duration = Duration::from_secs(900);
/// An aggregator's watchdog writes its row every few seconds: one silent this long stopped.
pub const MEMBER_SILENT: Duration = Duration::from_secs(30);
/// A reconcile older than this is stale (`TallyReconcileNotRunning`).
pub const RECONCILE_STALE: Duration = Duration::from_secs(3 * 3600);
