//! The invoices Stripe's webhooks described (`stripe_invoices`), newest first: for
//! `GET /v1/customers/{id}/invoices`, `GET /v1/invoices/{id}` and `tally invoices`.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;

/// An invoice as tally keeps it. Amounts are in the currency's smallest unit (cents).
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Invoice {
    pub id: String,
    pub customer: Option<String>,
    pub stripe_customer: Option<String>,
    pub stripe_subscription: Option<String>,
    pub number: Option<String>,
    pub status: Option<String>,
    pub currency: String,
    pub amount_due: i64,
    pub amount_paid: i64,
    pub amount_remaining: i64,
    pub total: i64,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub created: Option<DateTime<Utc>>,
    pub hosted_invoice_url: Option<String>,
    pub invoice_pdf: Option<String>,
    /// `[{id, price, meter, description, quantity, amount, period_start, period_end}]`;
    /// `meter` names the tally meter of a plan's metered price.
    pub lines: Value,
    /// `false`: Stripe's event carried only the first lines; the invoice has more (see
    /// `hosted_invoice_url`).
    pub lines_complete: bool,
    pub updated_at: DateTime<Utc>,
}

const COLUMNS: &str = "invoice_id AS id, customer_id AS customer,
    stripe_customer_id AS stripe_customer, stripe_subscription_id AS stripe_subscription,
    number, status, currency, amount_due, amount_paid, amount_remaining, total, period_start,
    period_end, created, hosted_invoice_url, invoice_pdf, lines, lines_complete, updated_at";

/// Most invoices a page holds.
pub const MAX_PAGE: i64 = 100;

/// A page of the customer's invoices, newest first, after `starting_after` (an invoice id of
/// the previous page); `limit` is 1 to [`MAX_PAGE`]. The second value: whether more follow.
pub async fn list(
    pool: &PgPool,
    customer: &str,
    limit: i64,
    starting_after: Option<&str>,
) -> Result<(Vec<Invoice>, bool), sqlx::Error> {
    let limit = limit.clamp(1, MAX_PAGE);
    // Newest first by creation (an invoice described only by events of before 0017 has none:
    // its period start stands in), ties by id.
    let mut invoices: Vec<Invoice> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM stripe_invoices
         WHERE customer_id = $1
           AND ($2::text IS NULL OR (coalesce(created, period_start), invoice_id) <
                (SELECT coalesce(created, period_start), invoice_id FROM stripe_invoices
                 WHERE invoice_id = $2 AND customer_id = $1))
         ORDER BY coalesce(created, period_start) DESC, invoice_id DESC
         LIMIT $3"
    ))
    .bind(customer)
    .bind(starting_after)
    .bind(limit + 1)
    .fetch_all(pool)
    .await?;
    let more = invoices.len() as i64 > limit;
    invoices.truncate(limit as usize);
    Ok((invoices, more))
}

pub async fn get(pool: &PgPool, id: &str) -> Result<Option<Invoice>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM stripe_invoices WHERE invoice_id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await
}
