//! `usage_slot_changes`, written in the transaction that changed a billing slot (the
//! aggregator's batch, a burn of its usage) and taken by the sink, which accounts the slot again.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

/// Records that these (customer, meter, slot start) changed, each once.
pub async fn record(
    tx: &mut PgConnection,
    slots: &BTreeSet<(&str, &str, DateTime<Utc>)>,
) -> Result<(), sqlx::Error> {
    if slots.is_empty() {
        return Ok(());
    }
    let customers: Vec<&str> = slots.iter().map(|s| s.0).collect();
    let meters: Vec<&str> = slots.iter().map(|s| s.1).collect();
    let starts: Vec<DateTime<Utc>> = slots.iter().map(|s| s.2).collect();
    sqlx::query(
        "INSERT INTO usage_slot_changes (customer_id, meter, slot_start)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::timestamptz[])",
    )
    .bind(&customers)
    .bind(&meters)
    .bind(&starts)
    .execute(&mut *tx)
    .await?;
    Ok(())
}
