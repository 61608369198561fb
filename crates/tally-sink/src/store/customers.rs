//! Customer mapping (`stripe_customers`): which Stripe customer a tally customer's usage is
//! billed to, and the usage that waits for a mapping (`stripe_unmapped_usage`).

use sqlx::PgPool;

use super::SinkStoreError;

/// `tally customers map`: sets (or changes) a customer's Stripe customer id.
pub async fn map_customer(
    pool: &PgPool,
    customer: &str,
    stripe_customer_id: &str,
) -> Result<(), SinkStoreError> {
    sqlx::query(
        "INSERT INTO stripe_customers (customer_id, stripe_customer_id) VALUES ($1, $2)
         ON CONFLICT (customer_id) DO UPDATE SET stripe_customer_id = excluded.stripe_customer_id, mapped_at = now()",
    )
    .bind(customer)
    .bind(stripe_customer_id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Many mappings at once (the demo maps hundreds of customers).
pub async fn map_customers(
    pool: &PgPool,
    mappings: &[(String, String)],
) -> Result<(), SinkStoreError> {
    let customers: Vec<&str> = mappings.iter().map(|m| m.0.as_str()).collect();
    let stripe_ids: Vec<&str> = mappings.iter().map(|m| m.1.as_str()).collect();
    sqlx::query(
        "INSERT INTO stripe_customers (customer_id, stripe_customer_id)
         SELECT * FROM unnest($1::text[], $2::text[])
         ON CONFLICT (customer_id) DO UPDATE SET stripe_customer_id = excluded.stripe_customer_id, mapped_at = now()",
    )
    .bind(&customers)
    .bind(&stripe_ids)
    .execute(pool)
    .await?;
    Ok(())
}

/// A tally customer and the Stripe customer its usage is billed to.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CustomerMapping {
    pub customer_id: String,
    pub stripe_customer_id: String,
}

/// Every mapping, by customer.
pub async fn customer_mappings(pool: &PgPool) -> Result<Vec<CustomerMapping>, SinkStoreError> {
    Ok(sqlx::query_as(
        "SELECT customer_id, stripe_customer_id FROM stripe_customers ORDER BY customer_id",
    )
    .fetch_all(pool)
    .await?)
}

/// Usage of a customer with no Stripe mapping yet: it waits, unbilled, until one is added.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct UnmappedUsage {
    pub customer_id: String,
    pub meter: String,
    /// Slots waiting.
    pub slots: i64,
}

/// Every customer and meter whose usage waits for a mapping.
pub async fn unmapped_usage(pool: &PgPool) -> Result<Vec<UnmappedUsage>, SinkStoreError> {
    Ok(sqlx::query_as(
        "SELECT customer_id, meter, slots FROM stripe_unmapped_usage ORDER BY customer_id, meter",
    )
    .fetch_all(pool)
    .await?)
}
