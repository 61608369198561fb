//! Reading the ledger, `credit_transactions`: a customer's entries page by page, and the credits
//! applied in a period (the invoice preview).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;
use tally_db::ExactDecimal;

use crate::grants::CreditError;

/// One ledger entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LedgerEntry {
    pub transaction_id: i64,
    pub grant_id: Option<i64>,
    /// `grant`, `consume`, `expire` or `void`.
    pub kind: String,
    /// Signed: positive for a grant, negative for the rest.
    pub amount: Decimal,
    /// For `consume`: the source window, and the usage of it this entry paid for.
    pub meter: Option<String>,
    pub group_key: Option<String>,
    pub window_start: Option<DateTime<Utc>>,
    pub quantity: Option<Decimal>,
    pub credits_per_unit: Option<Decimal>,
    pub actor: String,
    pub reason: Option<String>,
    pub at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct LedgerRow {
    transaction_id: i64,
    grant_id: Option<i64>,
    kind: String,
    amount: ExactDecimal,
    meter: Option<String>,
    group_key: Option<String>,
    window_start: Option<DateTime<Utc>>,
    quantity: Option<ExactDecimal>,
    credits_per_unit: Option<ExactDecimal>,
    actor: String,
    reason: Option<String>,
    at: DateTime<Utc>,
}

/// Most entries one page of the ledger holds.
pub const MAX_LEDGER_PAGE: i64 = 1000;

/// Which way a page of the ledger runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerPage {
    /// Oldest first, after this entry (0: from the start); a client polls with the last id.
    After(i64),
    /// Newest first, before this entry (`None`: from the newest): what a person reads.
    Before(Option<i64>),
}

/// A page of a customer's ledger (at most `limit`, capped at [`MAX_LEDGER_PAGE`]).
pub async fn ledger(
    pool: &PgPool,
    customer: &str,
    page: LedgerPage,
    limit: i64,
) -> Result<Vec<LedgerEntry>, CreditError> {
    let columns =
        "transaction_id, grant_id, kind, amount, meter, group_key, window_start, quantity,
                   credits_per_unit, actor, reason, at";
    let limit = limit.clamp(1, MAX_LEDGER_PAGE);
    let rows: Vec<LedgerRow> = match page {
        LedgerPage::After(after) => {
            sqlx::query_as(&format!(
                "SELECT {columns} FROM credit_transactions
                 WHERE customer_id = $1 AND transaction_id > $2 ORDER BY transaction_id LIMIT $3"
            ))
            .bind(customer)
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await?
        }
        LedgerPage::Before(before) => {
            sqlx::query_as(&format!(
                "SELECT {columns} FROM credit_transactions
                 WHERE customer_id = $1 AND transaction_id < $2
                 ORDER BY transaction_id DESC LIMIT $3"
            ))
            .bind(customer)
            .bind(before.unwrap_or(i64::MAX))
            .bind(limit)
            .fetch_all(pool)
            .await?
        }
    };
    Ok(rows
        .into_iter()
        .map(|r| LedgerEntry {
            transaction_id: r.transaction_id,
            grant_id: r.grant_id,
            kind: r.kind,
            amount: r.amount.0,
            meter: r.meter,
            group_key: r.group_key,
            window_start: r.window_start,
            quantity: r.quantity.map(|q| q.0),
            credits_per_unit: r.credits_per_unit.map(|q| q.0),
            actor: r.actor,
            reason: r.reason,
            at: r.at,
        })
        .collect())
}

/// One meter's usage in a period that grants paid for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MeterCredits {
    /// The usage (in the meter's unit) drawn from grants.
    pub quantity: Decimal,
    /// The credits drawn for it.
    pub credits: Decimal,
}

/// What credits did for usage in a period (for the invoice preview): `consume` entries whose
/// source window starts in the period.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PeriodCredits {
    /// Per meter, the usage grants paid for (uncovered usage is not in it: it is billed).
    pub per_meter: BTreeMap<String, MeterCredits>,
    /// Credits drawn from grants.
    pub applied: Decimal,
    /// Credits of usage no grant covered.
    pub uncovered: Decimal,
}

/// One meter's `consume` entries of a period, covered by grants or not, summed.
#[derive(sqlx::FromRow)]
struct PeriodRow {
    meter: Option<String>,
    covered: bool,
    quantity: Option<ExactDecimal>,
    credits: Option<ExactDecimal>,
}

/// The customer's `consume` entries for windows starting in `[start, end)`, summed. By window,
/// not by when the burn ran: a late event burned next month still belongs to this period's
/// usage, as it does on the invoice.
pub async fn applied_in_period(
    pool: &PgPool,
    customer: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Result<PeriodCredits, CreditError> {
    let rows: Vec<PeriodRow> = sqlx::query_as(
        "SELECT meter, grant_id IS NOT NULL AS covered, sum(quantity) AS quantity,
                -sum(amount) AS credits
         FROM credit_transactions
         WHERE customer_id = $1 AND kind = 'consume'
           AND window_start >= $2 AND window_start < $3
         GROUP BY 1, 2",
    )
    .bind(customer)
    .bind(start)
    .bind(end)
    .fetch_all(pool)
    .await?;
    let out_of_range = || CreditError::OutOfRange("the credits of this period");
    let mut period = PeriodCredits::default();
    for row in rows {
        let quantity = row.quantity.unwrap_or_default().0;
        let credits = row.credits.unwrap_or_default().0;
        if !row.covered {
            period.uncovered = period
                .uncovered
                .checked_add(credits)
                .ok_or_else(out_of_range)?;
            continue;
        }
        period.applied = period
            .applied
            .checked_add(credits)
            .ok_or_else(out_of_range)?;
        // Every consume entry names its meter (the burner writes it from the window).
        let Some(meter) = row.meter else { continue };
        let line = period.per_meter.entry(meter).or_default();
        line.quantity = line
            .quantity
            .checked_add(quantity)
            .ok_or_else(out_of_range)?;
        line.credits = line.credits.checked_add(credits).ok_or_else(out_of_range)?;
    }
    Ok(period)
}
