//! Each `tally reconcile` run's verdict counts (`reconcile_runs`), for `tally status`.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::SinkStoreError;

/// One reconcile run: the range it compared and how many customer-meter pairs got each verdict.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ReconcileRun {
    pub ran_at: DateTime<Utc>,
    pub range_from: DateTime<Utc>,
    pub range_to: DateTime<Utc>,
    pub ok: i32,
    pub unbilled: i32,
    pub unmapped: i32,
    pub drift: i32,
    pub quarantined: i32,
    pub review: i32,
    pub meter_error_reports: i32,
}

impl ReconcileRun {
    /// Something a person must look at: drift, Stripe's error reports, quarantine, review.
    pub fn needs_a_person(&self) -> bool {
        self.drift + self.meter_error_reports + self.quarantined + self.review > 0
    }
}

pub async fn record_reconcile_run(pool: &PgPool, run: &ReconcileRun) -> Result<(), SinkStoreError> {
    sqlx::query(
        "INSERT INTO reconcile_runs (ran_at, range_from, range_to, ok, unbilled, unmapped, drift,
                                     quarantined, review, meter_error_reports)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(run.ran_at)
    .bind(run.range_from)
    .bind(run.range_to)
    .bind(run.ok)
    .bind(run.unbilled)
    .bind(run.unmapped)
    .bind(run.drift)
    .bind(run.quarantined)
    .bind(run.review)
    .bind(run.meter_error_reports)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn last_reconcile_run(pool: &PgPool) -> Result<Option<ReconcileRun>, SinkStoreError> {
    Ok(sqlx::query_as(
        "SELECT ran_at, range_from, range_to, ok, unbilled, unmapped, drift, quarantined, review,
                meter_error_reports
         FROM reconcile_runs ORDER BY run_id DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await?)
}
