//! `customer_errors`, the one owner: customers a background loop (the alert evaluator, the
//! credit burner, the subscription scheduler) could not process. Such a customer is set aside
//! with its error, the loop goes on with everyone else, and the customer is tried again later
//! (after a minute, doubling to an hour), the way the aggregator sets aside one bad event.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

/// Longest error kept (the rest is cut).
const MAX_ERROR_CHARS: usize = 2000;

/// Records that `stage` failed on `customer` (again); it is due again after a backoff.
pub async fn record(
    conn: &mut PgConnection,
    stage: &str,
    customer: &str,
    error: &str,
) -> Result<(), sqlx::Error> {
    let error: String = error.chars().take(MAX_ERROR_CHARS).collect();
    metrics::counter!(CUSTOMER_ERRORS, "stage" => stage.to_owned()).increment(1);
    sqlx::query(
        "INSERT INTO customer_errors AS e (stage, customer_id, error, retry_at)
         VALUES ($1, $2, $3, now() + interval '1 minute')
         ON CONFLICT (stage, customer_id) DO UPDATE
            SET error = excluded.error, attempts = e.attempts + 1, last_at = now(),
                retry_at = now() + make_interval(secs => least(3600, 60 * power(2, least(e.attempts, 6))))",
    )
    .bind(stage)
    .bind(customer)
    .bind(&error)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The customers of `stage` that succeeded: their rows go.
pub async fn clear(
    conn: &mut PgConnection,
    stage: &str,
    customers: &[String],
) -> Result<(), sqlx::Error> {
    if customers.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM customer_errors WHERE stage = $1 AND customer_id = ANY($2)")
        .bind(stage)
        .bind(customers)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Up to `most` customers of `stage` due to be tried again.
pub async fn due(
    conn: &mut PgConnection,
    stage: &str,
    most: i64,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT customer_id FROM customer_errors WHERE stage = $1 AND retry_at <= now()
         ORDER BY retry_at LIMIT $2",
    )
    .bind(stage)
    .bind(most)
    .fetch_all(&mut *conn)
    .await
}

/// A customer set aside by a loop, as `tally status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CustomerError {
    pub stage: String,
    pub customer_id: String,
    pub error: String,
    pub attempts: i32,
    pub first_at: DateTime<Utc>,
    pub retry_at: DateTime<Utc>,
}

/// Every customer set aside, oldest first (at most `most`), and how many there are.
pub async fn list(
    conn: &mut PgConnection,
    most: i64,
) -> Result<(Vec<CustomerError>, i64), sqlx::Error> {
    let rows = sqlx::query_as(
        "SELECT stage, customer_id, error, attempts, first_at, retry_at FROM customer_errors
         ORDER BY first_at, stage, customer_id LIMIT $1",
    )
    .bind(most)
    .fetch_all(&mut *conn)
    .await?;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM customer_errors")
        .fetch_one(&mut *conn)
        .await?;
    Ok((rows, total))
}

/// Customers a loop set aside (each try counts), by `stage`.
pub const CUSTOMER_ERRORS: &str = "tally_customer_errors_total";
