//! Quarantine (`billing_quarantine`): customer+meter pairs set aside so that every other pair
//! is billed; listed and released by an operator.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tally_core::reject::printable;

use super::SinkStoreError;

/// A customer+meter pair set aside (`billing_quarantine`).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct QuarantinedPair {
    pub customer_id: String,
    pub meter: String,
    pub reason: String,
    pub detail: String,
    pub since: DateTime<Utc>,
}

/// Sets a pair aside: its changes wait (and its outbox rows are not sent) until an operator
/// releases it. Returns false when it already was.
pub(crate) async fn quarantine(
    pool: &PgPool,
    customer: &str,
    meter: &str,
    reason: &str,
    detail: &str,
) -> Result<bool, SinkStoreError> {
    let inserted = sqlx::query(
        "INSERT INTO billing_quarantine (customer_id, meter, reason, detail)
         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
    )
    .bind(customer)
    .bind(meter)
    .bind(reason)
    .bind(printable(detail.to_owned()))
    .execute(pool)
    .await?
    .rows_affected();
    Ok(inserted > 0)
}

/// Every quarantined pair, oldest first.
pub async fn quarantined_pairs(pool: &PgPool) -> Result<Vec<QuarantinedPair>, SinkStoreError> {
    Ok(sqlx::query_as(
        "SELECT customer_id, meter, reason, detail, since FROM billing_quarantine ORDER BY since",
    )
    .fetch_all(pool)
    .await?)
}

/// `tally quarantine release`: bills the pair again from the next pass. Returns false when it
/// was not quarantined.
pub async fn release_quarantine(
    pool: &PgPool,
    customer: &str,
    meter: &str,
) -> Result<bool, SinkStoreError> {
    let deleted =
        sqlx::query("DELETE FROM billing_quarantine WHERE customer_id = $1 AND meter = $2")
            .bind(customer)
            .bind(meter)
            .execute(pool)
            .await?
            .rows_affected();
    Ok(deleted > 0)
}
