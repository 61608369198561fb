//! For tests and benchmarks: the cache's counts and usage without the aggregator.

use rust_decimal::Decimal;
use sqlx::PgPool;

/// What a [`crate::Quota`]'s cache holds and did so far (`Quota::cache_counts`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheCounts {
    /// Customers cached now (live, without a subscription, failed loads).
    pub cached: usize,
    /// Loads a check waited for (one per customer load, however many checks shared it).
    pub waited_loads: u64,
    /// The background refresher's batches.
    pub background_loads: u64,
    /// Customers evicted to stay within `max_customers`.
    pub evicted: u64,
    /// The most loads checks waited for that ran at once.
    pub peak_running_loads: u64,
}

/// Usage as the aggregator's daily rollup holds it: `value` of `meter` on the UTC day
/// `days_ago` days before today.
pub async fn daily_usage(pool: &PgPool, customer: &str, meter: &str, days_ago: i64, value: i64) {
    sqlx::query(
        "INSERT INTO usage_daily (customer_id, meter, day, group_key, value, event_count, first_updated, last_updated)
         VALUES ($1, $2, (now() AT TIME ZONE 'UTC')::date - $3::int, '', $4, 1, now(), now())",
    )
    .bind(customer)
    .bind(meter)
    .bind(days_ago as i32)
    .bind(Decimal::from(value))
    .execute(pool)
    .await
    .expect("the usage is recorded");
}
