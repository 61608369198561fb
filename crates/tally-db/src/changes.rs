//! `customer_changes`, the one owner: customers whose usage or credits just changed, written
//! in the transaction that changed them (the aggregator's batch, a burn, a grant) and taken by
//! the alert evaluator, which re-evaluates those customers' rules. Inserting rows here also
//! notifies the quota caches (migration 0019's trigger), so this is how a writer says "these
//! customers' quota state changed".

use sqlx::PgConnection;

/// Records that these customers' usage or credits changed: one row each (`meter` is left
/// `''`: the evaluator re-evaluates a customer's every rule, so naming the meters only tripled
/// the rows a batch writes).
pub async fn record(tx: &mut PgConnection, customers: &[&str]) -> Result<(), sqlx::Error> {
    if customers.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO customer_changes (customer_id, meter)
         SELECT c, '' FROM unnest($1::text[]) AS c",
    )
    .bind(customers)
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
