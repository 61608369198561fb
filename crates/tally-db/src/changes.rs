//! `customer_changes`, the one owner: customers whose usage or credits just changed, written
//! in the transaction that changed them (the aggregator's batch, a burn, a grant) and taken by
//! the alert evaluator, which re-evaluates those customers' rules.

use sqlx::PgConnection;

/// Records that these (customer, meter) pairs changed; `meter` is `''` for credits.
pub async fn record(tx: &mut PgConnection, changes: &[(&str, &str)]) -> Result<(), sqlx::Error> {
    if changes.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO customer_changes (customer_id, meter)
         SELECT * FROM unnest($1::text[], $2::text[])",
    )
    .bind(changes.iter().map(|c| c.0).collect::<Vec<_>>())
    .bind(changes.iter().map(|c| c.1).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Takes (deletes, in the caller's transaction) up to `most` changes others are not taking,
/// and returns the customers they name, each once, sorted.
pub async fn take(tx: &mut PgConnection, most: i64) -> Result<Vec<String>, sqlx::Error> {
    let mut customers: Vec<String> = sqlx::query_scalar(
        "DELETE FROM customer_changes WHERE change_id IN (
             SELECT change_id FROM customer_changes ORDER BY change_id LIMIT $1
             FOR UPDATE SKIP LOCKED)
         RETURNING customer_id",
    )
    .bind(most)
    .fetch_all(&mut *tx)
    .await?;
    customers.sort_unstable();
    customers.dedup();
    Ok(customers)
}
