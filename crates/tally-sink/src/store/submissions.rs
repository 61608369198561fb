//! The outbox as operators see it: `tally submissions list` and `tally submissions retry`,
//! instead of hand-written SQL.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;
use tally_db::ExactDecimal;

use super::SinkStoreError;

/// One outbox row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SubmissionRow {
    pub identifier: String,
    pub customer_id: String,
    pub meter: String,
    pub slot_start: DateTime<Utc>,
    pub revision: i32,
    pub kind: String,
    #[sqlx(try_from = "ExactDecimal")]
    pub value: Decimal,
    pub status: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
}

/// Which rows to list.
#[derive(Debug, Clone, Default)]
pub struct SubmissionFilter {
    /// pending | sent | failed | needs_review; `None`: every status.
    pub status: Option<String>,
    pub customer: Option<String>,
    pub meter: Option<String>,
    pub limit: i64,
}

/// Outbox rows, newest first.
pub async fn list_submissions(
    pool: &PgPool,
    filter: &SubmissionFilter,
) -> Result<Vec<SubmissionRow>, SinkStoreError> {
    Ok(sqlx::query_as(
        "SELECT identifier, customer_id, meter, slot_start, revision, kind, value, status,
                attempts, last_error, created_at, sent_at
         FROM stripe_submissions
         WHERE ($1::text IS NULL OR status = $1)
           AND ($2::text IS NULL OR customer_id = $2)
           AND ($3::text IS NULL OR meter = $3)
         ORDER BY submission_id DESC LIMIT $4",
    )
    .bind(&filter.status)
    .bind(&filter.customer)
    .bind(&filter.meter)
    .bind(filter.limit)
    .fetch_all(pool)
    .await?)
}

/// What happened to one submission an operator asked to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryOutcome {
    /// Back to `pending`: the sink sends it on its next pass, with the same identifier.
    Queued,
    /// No failed submission by that identifier.
    NotFailed,
    /// A later revision of the same slot reached Stripe: sending this one now could undo it
    /// (a `last` meter would take the older value), so it stays failed.
    Superseded { by_revision: i32 },
}

/// Puts failed submissions back to `pending`. Safe: `failed` means Stripe refused the event
/// for good, so it holds nothing under that identifier, and the sink sends a pair's rows in
/// order. A row whose slot has a later revision Stripe already has is left alone.
pub async fn retry_failed(
    pool: &PgPool,
    identifiers: &[String],
) -> Result<Vec<(String, RetryOutcome)>, SinkStoreError> {
    let mut outcomes = Vec::with_capacity(identifiers.len());
    let mut tx = pool.begin().await?;
    for identifier in identifiers {
        let superseded: Option<(i32,)> = sqlx::query_as(
            "SELECT later.revision FROM stripe_submissions failed
             JOIN stripe_submissions later
               ON later.customer_id = failed.customer_id AND later.meter = failed.meter
              AND later.slot_start = failed.slot_start AND later.revision > failed.revision
              AND later.status = 'sent'
             WHERE failed.identifier = $1 AND failed.status = 'failed'
             ORDER BY later.revision DESC LIMIT 1",
        )
        .bind(identifier)
        .fetch_optional(&mut *tx)
        .await?;
        let outcome = if let Some((by_revision,)) = superseded {
            RetryOutcome::Superseded { by_revision }
        } else {
            let updated = sqlx::query(
                "UPDATE stripe_submissions
                 SET status = 'pending', next_attempt_at = now(), leased_until = NULL,
                     last_error = 'retried by an operator after: ' || COALESCE(last_error, '')
                 WHERE identifier = $1 AND status = 'failed'",
            )
            .bind(identifier)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated == 1 {
                RetryOutcome::Queued
            } else {
                RetryOutcome::NotFailed
            }
        };
        outcomes.push((identifier.clone(), outcome));
    }
    tx.commit().await?;
    Ok(outcomes)
}

/// Identifiers of every failed submission, optionally of one customer.
pub async fn failed_identifiers(
    pool: &PgPool,
    customer: Option<&str>,
) -> Result<Vec<String>, SinkStoreError> {
    Ok(sqlx::query_scalar(
        "SELECT identifier FROM stripe_submissions
         WHERE status = 'failed' AND ($1::text IS NULL OR customer_id = $1)
         ORDER BY submission_id",
    )
    .bind(customer)
    .fetch_all(pool)
    .await?)
}
