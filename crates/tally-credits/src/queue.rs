//! The aggregator's side of the burn: queuing the newly counted usage of priced meters, in the
//! batch's own transaction (`credit_usage_queue`; the burner owns the rest of its life).

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgConnection;

/// One window's usage newly counted by a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CountedUsage<'a> {
    pub customer: &'a str,
    pub meter: &'a str,
    pub group_key: &'a str,
    pub window_start: DateTime<Utc>,
    pub quantity: Decimal,
}

/// Queues the usage for the burner, in one statement.
pub async fn enqueue(tx: &mut PgConnection, usage: &[CountedUsage<'_>]) -> Result<(), sqlx::Error> {
    if usage.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO credit_usage_queue (customer_id, meter, group_key, window_start, quantity,
                queued_at)
         SELECT c, m, k, w, q, clock_timestamp()
         FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::numeric[])
              AS u(c, m, k, w, q)",
    )
    .bind(usage.iter().map(|u| u.customer).collect::<Vec<_>>())
    .bind(usage.iter().map(|u| u.meter).collect::<Vec<_>>())
    .bind(usage.iter().map(|u| u.group_key).collect::<Vec<_>>())
    .bind(usage.iter().map(|u| u.window_start).collect::<Vec<_>>())
    .bind(usage.iter().map(|u| u.quantity).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    Ok(())
}
