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
