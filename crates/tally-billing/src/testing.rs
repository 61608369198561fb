//! For tests and benchmarks: subscriptions without the ceremony.

use chrono::{DateTime, TimeDelta, Utc};
use sqlx::PgPool;

use crate::store::{create_subscription, Subscription};

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
