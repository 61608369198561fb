//! For tests and benchmarks: subscriptions without the ceremony.

use chrono::{DateTime, TimeDelta, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;

use crate::store::{create_subscription, Subscription};

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

/// Puts `customer` on `plan`, active, for the 30 days from `period_start`.
pub async fn subscribe(pool: &PgPool, customer: &str, plan: &str, period_start: DateTime<Utc>) {
    let subscription = Subscription {
        customer_id: customer.into(),
        plan: plan.into(),
        status: "active".into(),
        current_period_start: period_start,
        current_period_end: period_start + TimeDelta::days(30),
        cancel_at_period_end: false,
    };
    create_subscription(pool, &subscription, "test")
        .await
        .expect("the subscription is created");
}

/// For benchmarks: meter `api_calls`, plan `PRO` allowing a billion calls a day, and customers
/// `c0`…`c{count-1}` subscribed to it. Returns the customer ids.
pub async fn unlimited_customers(pool: &PgPool, count: usize) -> Vec<String> {
    sqlx::query(
        "INSERT INTO meters (name, aggregation, stripe_event_name) VALUES ('api_calls', 'sum', 'api_calls')
         ON CONFLICT (name) DO NOTHING",
    )
    .execute(pool)
    .await
    .expect("the meter is recorded");
    let plan: crate::PlanDefinition = serde_json::from_value(serde_json::json!({
        "name": "PRO", "limits": { "api_calls": { "limit": "1000000000", "period": "day" } }
    }))
    .expect("a valid plan");
    crate::apply_plans(pool, &[plan], "bench")
        .await
        .expect("the plan is applied");
    let customers: Vec<String> = (0..count).map(|i| format!("c{i}")).collect();
    for customer in &customers {
        subscribe(pool, customer, "PRO", Utc::now() - TimeDelta::days(1)).await;
    }
    customers
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
