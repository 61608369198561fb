//! Outbox rows parked as `needs_review` (an uncertain attempt older than Stripe remembers an
//! identifier): listed for an operator, and resolved by one.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;
use tally_db::ExactDecimal;

use super::SinkStoreError;

/// A submission parked as `needs_review`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ReviewRow {
    pub identifier: String,
    pub customer_id: String,
    pub meter: String,
    pub slot_start: DateTime<Utc>,
    pub kind: String,
    #[sqlx(try_from = "ExactDecimal")]
    pub value: Decimal,
    pub first_uncertain_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

/// Submissions waiting for an operator's decision.
pub async fn needs_review(pool: &PgPool) -> Result<Vec<ReviewRow>, SinkStoreError> {
    Ok(sqlx::query_as(
        "SELECT identifier, customer_id, meter, slot_start, kind, value, first_uncertain_at,
                last_error
         FROM stripe_submissions WHERE status = 'needs_review' ORDER BY submission_id",
    )
    .fetch_all(pool)
    .await?)
}

/// How an operator resolves a `needs_review` submission after looking at Stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Stripe has the event: record it as sent.
    Sent,
    /// Stripe does not have it: send it again (a new attempt with the same identifier).
    Resend,
}

/// Resolves one `needs_review` submission. Returns false when there is none by that identifier.
pub async fn resolve_review(
    pool: &PgPool,
    identifier: &str,
    resolution: Resolution,
) -> Result<bool, SinkStoreError> {
    let sql = match resolution {
        Resolution::Sent => {
            "UPDATE stripe_submissions SET status = 'sent', sent_at = now(),
                    last_error = 'resolved by an operator: Stripe has it'
             WHERE identifier = $1 AND status = 'needs_review'"
        }
        Resolution::Resend => {
            "UPDATE stripe_submissions SET status = 'pending', next_attempt_at = now(),
                    first_uncertain_at = NULL,
                    last_error = 'resolved by an operator: Stripe does not have it; resending'
             WHERE identifier = $1 AND status = 'needs_review'"
        }
    };
    let updated = sqlx::query(sql)
        .bind(identifier)
        .execute(pool)
        .await?
        .rows_affected();
    Ok(updated > 0)
}
