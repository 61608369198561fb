//! The sink's Postgres side, one concern a file:
//!
//! - `meters.rs`: how each meter is billed (`meters` table).
//! - `accounting.rs`: the accounting transaction (settled slot changes → outbox rows).
//! - `outbox.rs`: leasing outbox rows, renewing leases, recording outcomes.
//! - `review.rs`: outbox rows parked as `needs_review`, and their resolution by an operator.
//! - `quarantine.rs`: customer+meter pairs set aside (`billing_quarantine`).
//! - `backlog.rs`: backlog figures for the metrics and `tally status`.
//! - `submissions.rs`: the outbox listed and failed rows retried, for operators.
//! - `reconcile_runs.rs`: each `tally reconcile` run's verdict counts.
//! - `customers.rs`: customer mapping (`stripe_customers`) and usage waiting for one.
//!
//! The error they share, [`SinkStoreError`], is here.

mod accounting;
mod backlog;
mod customers;
mod meters;
mod outbox;
mod quarantine;
mod reconcile_runs;
mod review;
mod submissions;

pub use accounting::AccountingReport;
pub(crate) use accounting::{account_slots, pairs_with_changes, Accounting};
pub(crate) use backlog::backlog;
pub use backlog::{outbox_status, OutboxStatus};
pub use customers::{
    customer_mappings, import_mappings, map_customer, map_customers, map_unmapped_customers,
    unmapped_customers, unmapped_usage, ChangedMapping, CustomerMapping, ImportReport,
    UnmappedUsage,
};
pub use meters::{billed_meters, BilledMeter};
pub(crate) use outbox::{has_rows_due, lease_pending, record_outcomes, renew_leases, RowOutcome};
pub use outbox::{Leased, Outcome};
pub(crate) use quarantine::quarantine;
pub use quarantine::{quarantined_pairs, release_quarantine, QuarantinedPair};
pub use reconcile_runs::{last_reconcile_run, record_reconcile_run, ReconcileRun};
pub use review::{needs_review, resolve_review, Resolution, ReviewRow};
pub use submissions::{
    failed_identifiers, list_submissions, retry_failed, RetryOutcome, SubmissionFilter,
    SubmissionRow,
};

#[derive(Debug, thiserror::Error)]
pub enum SinkStoreError {
    #[error("Postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// One customer+meter pair's data cannot be billed exactly: it is quarantined, and every
    /// other pair is billed.
    #[error("{customer:?} / {meter:?} cannot be billed: {detail}")]
    Unbillable {
        customer: String,
        meter: String,
        detail: String,
    },
}

impl SinkStoreError {
    /// Postgres is away or busy: try the same again later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, SinkStoreError::Postgres(e) if tally_db::is_retryable(e))
    }

    /// The data being processed is to blame (a value Postgres or a decimal cannot take), not
    /// Postgres: the work is split until the customer+meter pair at fault is found.
    pub fn is_data(&self) -> bool {
        match self {
            SinkStoreError::Postgres(e) => tally_db::is_data_error(e),
            SinkStoreError::Unbillable { .. } => true,
        }
    }
}
