//! The outbox seen by the sender: lease pending rows (whole customer+meter pairs), renew the
//! leases of rows still being sent, record what became of each row.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;
use tally_core::reject::printable;
use tally_db::ExactDecimal;

use super::SinkStoreError;

/// An outbox row leased for sending.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Leased {
    pub submission_id: i64,
    pub identifier: String,
    pub customer_id: String,
    pub meter: String,
    pub stripe_customer_id: String,
    pub event_name: String,
    pub kind: String,
    #[sqlx(try_from = "ExactDecimal")]
    pub value: Decimal,
    pub event_timestamp: DateTime<Utc>,
    pub attempts: i32,
    /// For a `cancel` row: the identifier of the event to withdraw.
    pub cancels: Option<String>,
    /// For a `cancel` row: when the event it withdraws was sent.
    pub cancels_sent_at: Option<DateTime<Utc>>,
    /// When an attempt whose outcome is unknown (no answer, a 5xx) was first made: Stripe may
    /// hold the event, and remembers its identifier only for about 24 hours after that.
    pub first_uncertain_at: Option<DateTime<Utc>>,
}

/// Leases the pending rows of up to `limit` customer+meter pairs whose oldest pending row is
/// due and free. Taking whole pairs, head first, keeps a pair's revisions in order (a later
/// `last` value must not overtake an earlier one, even when the earlier waits for a retry) and
/// one sink per pair at a time (Stripe allows one call per customer and meter).
pub(crate) async fn lease_pending(
    pool: &PgPool,
    limit: usize,
    lease: Duration,
) -> Result<Vec<Leased>, SinkStoreError> {
    let rows = sqlx::query_as::<_, Leased>(
        "WITH heads AS (
             SELECT DISTINCT ON (customer_id, meter)
                    submission_id, customer_id, meter, next_attempt_at, leased_until
             FROM stripe_submissions p
             WHERE status = 'pending'
               AND NOT EXISTS (SELECT 1 FROM billing_quarantine q
                               WHERE q.customer_id = p.customer_id AND q.meter = p.meter)
             ORDER BY customer_id, meter, submission_id),
         due AS (
             SELECT customer_id, meter FROM heads
             WHERE next_attempt_at <= now() AND (leased_until IS NULL OR leased_until < now())
             ORDER BY submission_id
             LIMIT $1)
         UPDATE stripe_submissions s
            SET leased_until = now() + $2::interval,
                leased_at = now(),
                -- An earlier lease that expired unrecorded: its sink died, perhaps mid-call.
                first_uncertain_at = CASE WHEN s.leased_until IS NOT NULL
                                          THEN coalesce(s.first_uncertain_at, s.leased_at)
                                          ELSE s.first_uncertain_at END
         WHERE s.submission_id IN (
             SELECT p.submission_id FROM stripe_submissions p
             JOIN due ON due.customer_id = p.customer_id AND due.meter = p.meter
             WHERE p.status = 'pending' AND (p.leased_until IS NULL OR p.leased_until < now())
             FOR UPDATE OF p SKIP LOCKED)
         RETURNING s.submission_id, s.identifier, s.customer_id, s.meter, s.stripe_customer_id,
                   s.event_name, s.kind, s.value, s.event_timestamp, s.attempts, s.cancels,
                   (SELECT t.sent_at FROM stripe_submissions t WHERE t.identifier = s.cancels)
                       AS cancels_sent_at,
                   s.first_uncertain_at",
    )
    .bind(limit as i64)
    .bind(lease)
    .fetch_all(pool)
    .await?;
    let mut rows = rows;
    rows.sort_by_key(|row| row.submission_id);
    Ok(rows)
}

/// Whether any pending row is due and free: what a pass would send.
pub(crate) async fn has_rows_due(pool: &PgPool) -> Result<bool, SinkStoreError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM stripe_submissions
                        WHERE status = 'pending' AND next_attempt_at <= now()
                          AND (leased_until IS NULL OR leased_until < now()))",
    )
    .fetch_one(pool)
    .await?)
}

/// Extends the leases of rows this process is still sending, so that a slow pair (retries,
/// timeouts) is not leased by another sink meanwhile. Rows already recorded are not touched.
pub(crate) async fn renew_leases(
    pool: &PgPool,
    submission_ids: &[i64],
    lease: Duration,
) -> Result<(), SinkStoreError> {
    sqlx::query(
        "UPDATE stripe_submissions SET leased_until = now() + $2::interval
         WHERE submission_id = ANY($1) AND status = 'pending'",
    )
    .bind(submission_ids)
    .bind(lease)
    .execute(pool)
    .await?;
    Ok(())
}

/// What became of a leased row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Sent,
    /// Try again at `retry_at`. `uncertain_at`: an attempt whose outcome is unknown (Stripe
    /// may have recorded it) was made then.
    Retry {
        error: String,
        retry_at: DateTime<Utc>,
        uncertain_at: Option<DateTime<Utc>>,
    },
    /// Stripe refused it for good; an operator must look.
    Failed {
        error: String,
    },
    /// Stripe may hold the event from an attempt more than 23 hours ago, and no longer promises
    /// to recognise its identifier: sending it again could bill twice. An operator checks
    /// Stripe and resolves it (`tally submissions resolve`).
    NeedsReview {
        error: String,
    },
    /// Not attempted (shutdown, or an earlier revision of its pair is not sent yet).
    Released,
}

/// What became of one leased row, after how many attempts in this lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RowOutcome {
    pub(crate) submission_id: i64,
    pub(crate) attempts: u32,
    pub(crate) outcome: Outcome,
}

/// Records outcomes: one statement per batch of rows, and frees their leases.
pub(crate) async fn record_outcomes(
    pool: &PgPool,
    outcomes: &[RowOutcome],
) -> Result<(), SinkStoreError> {
    if outcomes.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::new();
    let mut attempts = Vec::new();
    let mut statuses = Vec::new();
    let mut errors: Vec<Option<String>> = Vec::new();
    let mut retry_at: Vec<Option<DateTime<Utc>>> = Vec::new();
    let mut uncertain_at: Vec<Option<DateTime<Utc>>> = Vec::new();
    for RowOutcome {
        submission_id,
        attempts: tries,
        outcome,
    } in outcomes
    {
        ids.push(*submission_id);
        attempts.push(*tries as i32);
        let (status, error, at, uncertain) = match outcome {
            Outcome::Sent => ("sent", None, None, None),
            Outcome::Retry {
                error,
                retry_at,
                uncertain_at,
            } => ("pending", Some(error), Some(*retry_at), *uncertain_at),
            Outcome::Failed { error } => ("failed", Some(error), None, None),
            Outcome::NeedsReview { error } => ("needs_review", Some(error), None, None),
            Outcome::Released => ("pending", None, None, None),
        };
        statuses.push(status);
        // Stripe's messages (and ours quoting them) go into `text`: made printable.
        errors.push(error.map(|e| printable(e.clone())));
        retry_at.push(at);
        uncertain_at.push(uncertain);
    }
    sqlx::query(
        "UPDATE stripe_submissions s
            SET status = u.status,
                attempts = s.attempts + u.attempts,
                last_error = coalesce(u.error, s.last_error),
                next_attempt_at = coalesce(u.retry_at, s.next_attempt_at),
                first_uncertain_at = coalesce(s.first_uncertain_at, u.uncertain),
                sent_at = CASE WHEN u.status = 'sent' THEN now() ELSE s.sent_at END,
                leased_until = NULL
         FROM unnest($1::bigint[], $2::int[], $3::text[], $4::text[], $5::timestamptz[],
                     $6::timestamptz[])
              AS u(id, attempts, status, error, retry_at, uncertain)
         WHERE s.submission_id = u.id AND s.status = 'pending'",
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(&statuses)
    .bind(&errors)
    .bind(&retry_at)
    .bind(&uncertain_at)
    .execute(pool)
    .await?;
    Ok(())
}
