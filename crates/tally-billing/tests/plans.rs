//! Plans, subscriptions and overrides in Postgres.

use chrono::{TimeDelta, Utc};
use rust_decimal::Decimal;
use tally_billing::store::{create_subscription, entitlements, set_override};
use tally_billing::{
    apply_plans, BillingStoreError, Override, PlanChange, PlanDefinition, Subscription,
};
use tally_db::testing::fresh_database;

fn plans(text: &str) -> Vec<PlanDefinition> {
    #[derive(serde::Deserialize)]
    struct File {
        plans: Vec<PlanDefinition>,
    }
    toml::from_str::<File>(text).unwrap().plans
}

const SEED: &str = r#"
    [[plans]]
    name = "FREE"
    [plans.limits.api_calls]
    limit = 100
    period = "day"

    [[plans]]
    name = "PRO"
    features = { sso = true }
    [plans.limits.api_calls]
    limit = 10000
    period = "day"
"#;

fn subscription(customer: &str, plan: &str, status: &str) -> Subscription {
    let now = Utc::now();
    Subscription {
        customer_id: customer.into(),
        plan: plan.into(),
        status: status.into(),
        current_period_start: now - TimeDelta::days(3),
        current_period_end: now + TimeDelta::days(27),
        cancel_at_period_end: false,
    }
}

#[tokio::test]
async fn apply_creates_updates_deletes_and_audits() {
    let db = fresh_database().await;
    let pool = &db.pool;
    let first = apply_plans(pool, &plans(SEED), "test").await.unwrap();
    assert_eq!(
        first,
        vec![
            PlanChange::Created("FREE".into()),
            PlanChange::Created("PRO".into())
        ]
    );
    let again = apply_plans(pool, &plans(SEED), "test").await.unwrap();
    assert_eq!(
        again,
        vec![
            PlanChange::Unchanged("FREE".into()),
            PlanChange::Unchanged("PRO".into())
        ]
    );

    let changed = SEED.replace("limit = 100\n", "limit = 200\n");
    let only_free = changed
        .split("[[plans]]\n    name = \"PRO\"")
        .next()
        .unwrap()
        .to_owned();
    create_subscription(pool, &subscription("acme", "PRO", "active"), "test")
        .await
        .unwrap();
    let refused = apply_plans(pool, &plans(&only_free), "test")
        .await
        .unwrap_err();
    assert!(
        matches!(refused, BillingStoreError::PlanInUse { ref plan, subscriptions: 1 } if plan == "PRO"),
        "{refused}"
    );
    let updated = apply_plans(pool, &plans(&changed), "ops@example.com")
        .await
        .unwrap();
    assert_eq!(updated[0], PlanChange::Updated("FREE".into()));

    let audit: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT entity, entity_key, action, actor FROM entitlement_audit ORDER BY audit_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(audit.len(), 4, "{audit:?}");
    assert_eq!(
        audit[3],
        (
            "plan".into(),
            "FREE".into(),
            "update".into(),
            "ops@example.com".into()
        )
    );
    let (before, after): (serde_json::Value, serde_json::Value) =
        sqlx::query_as("SELECT before, after FROM entitlement_audit WHERE action = 'update'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(before["limits"]["api_calls"]["limit"], "100");
    assert_eq!(after["limits"]["api_calls"]["limit"], "200");
}

#[tokio::test]
async fn one_live_subscription_per_customer_and_no_implicit_plan() {
    let db = fresh_database().await;
    let pool = &db.pool;
    apply_plans(pool, &plans(SEED), "test").await.unwrap();
    assert!(
        entitlements(pool, "acme").await.unwrap().is_none(),
        "no subscription: no entitlements"
    );
    create_subscription(pool, &subscription("acme", "FREE", "canceled"), "test")
        .await
        .unwrap();
    assert!(
        entitlements(pool, "acme").await.unwrap().is_none(),
        "a canceled one does not count"
    );
    create_subscription(pool, &subscription("acme", "FREE", "trialing"), "test")
        .await
        .unwrap();
    let second = create_subscription(pool, &subscription("acme", "PRO", "active"), "test")
        .await
        .unwrap_err();
    assert!(
        matches!(second, BillingStoreError::SecondLiveSubscription { .. }),
        "{second}"
    );
    let unknown = create_subscription(pool, &subscription("zeta", "GOLD", "active"), "test")
        .await
        .unwrap_err();
    assert!(
        matches!(unknown, BillingStoreError::UnknownPlan(_)),
        "{unknown}"
    );

    let (live, granted) = entitlements(pool, "acme").await.unwrap().unwrap();
    assert_eq!(
        (live.plan.as_str(), live.status.as_str()),
        ("FREE", "trialing")
    );
    assert_eq!(granted.limits["api_calls"].limit, Decimal::from(100));
    assert!(!granted.feature("sso"));

    let overrides: Override = serde_json::from_value(serde_json::json!({
        "features": { "sso": true }, "limits": { "api_calls": { "limit": "150" } }
    }))
    .unwrap();
    set_override(
        pool,
        "acme",
        &overrides,
        "pilot for the Q4 deal",
        "sales@example.com",
    )
    .await
    .unwrap();
    let (_, granted) = entitlements(pool, "acme").await.unwrap().unwrap();
    assert_eq!(granted.limits["api_calls"].limit, Decimal::from(150));
    assert!(granted.feature("sso"));
    let audited: (String, String) =
        sqlx::query_as("SELECT actor, reason FROM entitlement_audit WHERE entity = 'override'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(
        audited,
        ("sales@example.com".into(), "pilot for the Q4 deal".into())
    );
}
