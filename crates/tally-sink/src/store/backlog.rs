//! Backlog figures for the metrics: pending and parked outbox rows, unmapped slots,
//! quarantined pairs.

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
