//! Backlog figures for the metrics and `tally status`: pending, failed and parked outbox rows,
//! unmapped slots and customers, quarantined pairs.

use sqlx::PgPool;

use super::SinkStoreError;

/// Backlog figures for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(crate) struct Backlog {
    pub(crate) pending: i64,
    pub(crate) oldest_pending_seconds: f64,
    pub(crate) needs_review: i64,
    pub(crate) unmapped_slots: i64,
    pub(crate) quarantined_pairs: i64,
}

pub(crate) async fn backlog(pool: &PgPool) -> Result<Backlog, SinkStoreError> {
    let (pending, oldest, needs_review): (i64, Option<f64>, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'pending'),
                extract(epoch FROM now() - min(created_at) FILTER (WHERE status = 'pending'))::float8,
                count(*) FILTER (WHERE status = 'needs_review')
         FROM stripe_submissions WHERE status IN ('pending', 'needs_review')",
    )
    .fetch_one(pool)
    .await?;
    let unmapped: Option<i64> =
        sqlx::query_scalar("SELECT sum(slots)::bigint FROM stripe_unmapped_usage")
            .fetch_one(pool)
            .await?;
    let quarantined: i64 = sqlx::query_scalar("SELECT count(*) FROM billing_quarantine")
        .fetch_one(pool)
        .await?;
    Ok(Backlog {
        pending,
        oldest_pending_seconds: oldest.unwrap_or(0.0),
        needs_review,
        unmapped_slots: unmapped.unwrap_or(0),
        quarantined_pairs: quarantined,
    })
}

/// The outbox and mapping backlog as `tally status` shows it.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct OutboxStatus {
    pub pending: i64,
    pub oldest_pending_seconds: f64,
    pub failed: i64,
    pub needs_review: i64,
    pub quarantined_pairs: i64,
    pub unmapped_slots: i64,
    pub unmapped_customers: i64,
}

pub async fn outbox_status(pool: &PgPool) -> Result<OutboxStatus, SinkStoreError> {
    let backlog = backlog(pool).await?;
    let failed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM stripe_submissions WHERE status = 'failed'")
            .fetch_one(pool)
            .await?;
    let unmapped_customers: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT customer_id) FROM stripe_unmapped_usage")
            .fetch_one(pool)
            .await?;
    Ok(OutboxStatus {
        pending: backlog.pending,
        oldest_pending_seconds: backlog.oldest_pending_seconds,
        failed,
        needs_review: backlog.needs_review,
        quarantined_pairs: backlog.quarantined_pairs,
        unmapped_slots: backlog.unmapped_slots,
        unmapped_customers,
    })
}
