//! A customer's credits now: the balance the API and the CLI show, and the projected balances
//! quota checks load (open grants in effect, less committed usage not yet burned).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;
use tally_db::ExactDecimal;

use crate::grants::{CreditError, Grant, GrantRow, DRAW_ORDER, GRANT_COLUMNS};
use crate::rates::RateCard;

/// A customer's credits now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Balance {
    pub customer: String,
    /// What open grants in effect now hold.
    pub available: Decimal,
    /// Committed usage not yet burned, priced at the rate card (it will be drawn within
    /// about a second).
    pub pending: Decimal,
    /// `available - pending`: what a check counts on.
    pub projected: Decimal,
    /// Usage no grant covered, since the customer's first grant (recorded as `consume`
    /// entries without a grant).
    pub uncovered: Decimal,
    /// Open grants, in the order they are drawn.
    pub grants: Vec<Grant>,
}

/// The customer's balance and open grants.
pub async fn balance(
    pool: &PgPool,
    customer: &str,
    rates: &RateCard,
    now: DateTime<Utc>,
) -> Result<Balance, CreditError> {
    let rows: Vec<GrantRow> = sqlx::query_as(&format!(
        "SELECT {GRANT_COLUMNS} FROM credit_grants WHERE customer_id = $1 AND closed_at IS NULL
         ORDER BY {DRAW_ORDER}"
    ))
    .bind(customer)
    .fetch_all(pool)
    .await?;
    let grants: Vec<Grant> = rows.into_iter().map(Grant::from).collect();
    let available = available_now(&grants, now)?;
    let pending = pending_costs(pool, &[customer], rates)
        .await?
        .remove(customer)
        .unwrap_or_default();
    let uncovered: Option<ExactDecimal> = sqlx::query_scalar(
        "SELECT -sum(amount) FROM credit_transactions
         WHERE customer_id = $1 AND kind = 'consume' AND grant_id IS NULL",
    )
    .bind(customer)
    .fetch_one(pool)
    .await?;
    Ok(Balance {
        customer: customer.to_owned(),
        available,
        pending,
        projected: available - pending,
        uncovered: uncovered.unwrap_or_default().0,
        grants,
    })
}

fn available_now(grants: &[Grant], now: DateTime<Utc>) -> Result<Decimal, CreditError> {
    grants
        .iter()
        .filter(|g| g.effective_at <= now && g.expires_at.is_none_or(|at| at > now))
        .try_fold(Decimal::ZERO, |sum, g| sum.checked_add(g.remaining))
        .ok_or(CreditError::OutOfRange("the balance"))
}

/// For the quota checks, in one query per batch of customers: each customer's projected
/// balance (open grants in effect now, less committed usage not yet burned). Customers
/// without any grant are absent.
pub async fn projected_balances(
    pool: &PgPool,
    customers: &[&str],
    rates: &RateCard,
    now: DateTime<Utc>,
) -> Result<HashMap<String, Decimal>, sqlx::Error> {
    let rows: Vec<(String, Option<ExactDecimal>)> = sqlx::query_as(
        "SELECT customer_id, sum(remaining) FILTER (WHERE effective_at <= $2
                    AND (expires_at IS NULL OR expires_at > $2))
         FROM credit_grants WHERE customer_id = ANY($1) AND closed_at IS NULL
         GROUP BY customer_id",
    )
    .bind(customers)
    .bind(now)
    .fetch_all(pool)
    .await?;
    let pending = pending_costs(pool, customers, rates).await?;
    let mut balances: HashMap<String, Decimal> = customers
        .iter()
        .map(|c| (c.to_string(), Decimal::ZERO))
        .collect();
    for (customer, available) in rows {
        balances.insert(customer, available.unwrap_or_default().0);
    }
    for (customer, cost) in pending {
        let balance = balances.entry(customer).or_default();
        *balance = balance.saturating_sub(cost);
    }
    Ok(balances)
}

/// When each customer's available credits next change by the clock alone: the next start
/// (`effective_at`) or expiry (`expires_at`) of one of its open grants after `now`. No write
/// happens then, so nothing notifies: a cache that holds a balance reloads it at that moment.
/// Customers with no such moment are absent.
pub async fn next_balance_changes(
    pool: &PgPool,
    customers: &[&str],
    now: DateTime<Utc>,
) -> Result<HashMap<String, DateTime<Utc>>, sqlx::Error> {
    let rows: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT customer_id, min(least(CASE WHEN effective_at > $2 THEN effective_at END,
                                      CASE WHEN expires_at > $2 THEN expires_at END))
         FROM credit_grants
         WHERE customer_id = ANY($1) AND closed_at IS NULL
           AND (effective_at > $2 OR expires_at > $2)
         GROUP BY customer_id",
    )
    .bind(customers)
    .bind(now)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// [`projected_balances`] for a batch in which one customer's data may be beyond what Postgres
/// can sum (a grant's remaining beyond a 28-digit decimal): those customers are returned
/// apart, with the error, and everyone else gets their balance.
pub async fn projected_balances_isolating(
    pool: &PgPool,
    customers: &[&str],
    rates: &RateCard,
    now: DateTime<Utc>,
) -> Result<(HashMap<String, Decimal>, Vec<(String, sqlx::Error)>), sqlx::Error> {
    let owned: Vec<String> = customers.iter().map(|c| c.to_string()).collect();
    let (balances, failed) = tally_db::isolate(&owned, |part| async move {
        let part: Vec<&str> = part.iter().map(String::as_str).collect();
        let balances = projected_balances(pool, &part, rates, now).await?;
        Ok(balances.into_iter().collect::<Vec<_>>())
    })
    .await?;
    Ok((balances.into_iter().collect(), failed))
}

/// Committed usage still in the queue, priced, per customer.
async fn pending_costs(
    pool: &PgPool,
    customers: &[&str],
    rates: &RateCard,
) -> Result<HashMap<String, Decimal>, sqlx::Error> {
    let rows: Vec<(String, String, String, ExactDecimal)> = sqlx::query_as(
        "SELECT customer_id, meter, group_key, sum(quantity) FROM credit_usage_queue
         WHERE customer_id = ANY($1) GROUP BY customer_id, meter, group_key",
    )
    .bind(customers)
    .fetch_all(pool)
    .await?;
    let mut costs: HashMap<String, Decimal> = HashMap::new();
    for (customer, meter, group_key, quantity) in rows {
        let rate = rates
            .rate_for_window(&meter, &group_key)
            .unwrap_or_default();
        let cost = quantity.0.saturating_mul(rate);
        let total = costs.entry(customer).or_default();
        *total = total.saturating_add(cost);
    }
    Ok(costs)
}
