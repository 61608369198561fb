//! Customer mapping (`stripe_customers`): which Stripe customer a tally customer's usage is
//! billed to, and the usage that waits for a mapping (`stripe_unmapped_usage`).
//!
//! A mapping is all the sink needs: the accounting pass bills the change rows of mapped
//! customers only, so usage that waited is billed on the first pass after its customer is
//! mapped, whichever command mapped it (`tally customers map`, `import` or `sync`).

use std::collections::HashMap;

use sqlx::{PgExecutor, PgPool};

use super::SinkStoreError;

/// `tally customers map`: sets (or changes) a customer's Stripe customer id.
pub async fn map_customer(
    pool: &PgPool,
    customer: &str,
    stripe_customer_id: &str,
) -> Result<(), SinkStoreError> {
    map_customers(
        pool,
        &[(customer.to_owned(), stripe_customer_id.to_owned())],
    )
    .await
}

/// Sets (or changes) many mappings in one statement, as `tally customers map` does for one.
/// A customer must appear once in `mappings` (Postgres refuses to change a row twice in one
/// statement).
pub async fn map_customers<'e>(
    executor: impl PgExecutor<'e>,
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
    .execute(executor)
    .await?;
    Ok(())
}

/// A customer whose Stripe customer an import changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedMapping {
    pub customer_id: String,
    pub old_stripe_customer_id: String,
    pub new_stripe_customer_id: String,
}

/// What `tally customers import` did (or, refused, would have done).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    pub added: usize,
    /// By customer id.
    pub changed: Vec<ChangedMapping>,
    pub unchanged: usize,
}

/// `tally customers import`: sets every mapping of `mappings` (one row per customer) in one
/// transaction, with [`map_customers`] (the effect of `tally customers map` per row), writing
/// only the rows that add or change a mapping, so importing the same file again writes
/// nothing. Imports are serialized (a lock that only other writers of `stripe_customers` wait
/// for) so the report is exact.
pub async fn import_mappings(
    pool: &PgPool,
    mappings: &[(String, String)],
) -> Result<ImportReport, SinkStoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("LOCK TABLE stripe_customers IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let customers: Vec<&str> = mappings.iter().map(|m| m.0.as_str()).collect();
    let current: HashMap<String, String> = sqlx::query_as(
        "SELECT customer_id, stripe_customer_id FROM stripe_customers WHERE customer_id = ANY($1::text[])",
    )
    .bind(&customers)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let mut report = ImportReport::default();
    let mut writes = Vec::new();
    for (customer, stripe_id) in mappings {
        match current.get(customer) {
            None => report.added += 1,
            Some(old) if old == stripe_id => {
                report.unchanged += 1;
                continue;
            }
            Some(old) => report.changed.push(ChangedMapping {
                customer_id: customer.clone(),
                old_stripe_customer_id: old.clone(),
                new_stripe_customer_id: stripe_id.clone(),
            }),
        }
        writes.push((customer.clone(), stripe_id.clone()));
    }
    report
        .changed
        .sort_by(|a, b| a.customer_id.cmp(&b.customer_id));
    if !writes.is_empty() {
        map_customers(&mut *tx, &writes).await?;
    }
    tx.commit().await?;
    Ok(report)
}

/// `tally customers sync`: maps the customers of `mappings` that are still unmapped, leaving
/// any mapping made meanwhile (an operator's `tally customers map` wins over a sync). Returns
/// the customers it mapped.
pub async fn map_unmapped_customers(
    pool: &PgPool,
    mappings: &[(String, String)],
) -> Result<Vec<String>, SinkStoreError> {
    let customers: Vec<&str> = mappings.iter().map(|m| m.0.as_str()).collect();
    let stripe_ids: Vec<&str> = mappings.iter().map(|m| m.1.as_str()).collect();
    Ok(sqlx::query_scalar(
        "INSERT INTO stripe_customers (customer_id, stripe_customer_id)
         SELECT * FROM unnest($1::text[], $2::text[])
         ON CONFLICT (customer_id) DO NOTHING
         RETURNING customer_id",
    )
    .bind(&customers)
    .bind(&stripe_ids)
    .fetch_all(pool)
    .await?)
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

/// The customers `tally customers sync` looks for in Stripe: every one with usage waiting for
/// a mapping (`stripe_unmapped_usage`) or a subscription that is not canceled, and no mapping.
pub async fn unmapped_customers(pool: &PgPool) -> Result<Vec<String>, SinkStoreError> {
    Ok(sqlx::query_scalar(
        "SELECT customer_id FROM stripe_unmapped_usage
         UNION
         SELECT s.customer_id FROM subscriptions s
         WHERE s.status <> 'canceled'
           AND NOT EXISTS (SELECT 1 FROM stripe_customers m WHERE m.customer_id = s.customer_id)
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await?)
}
