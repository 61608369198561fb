//! Quota checks against Postgres: modes, periods, overrides, no subscription, feature gates,
//! and the local count that stops a burst.

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use rust_decimal::Decimal;
use tally_billing::store::set_override;
use tally_billing::testing::subscribe;
use tally_billing::{apply_plans, Override, PlanDefinition};
use tally_db::testing::fresh_database;
use tally_quota::testing::daily_usage as daily;
use tally_quota::{Decision, Quota, QuotaError};

const PLANS: &str = r#"
    [[plans]]
    name = "FREE"
    features = { api = true }
    [plans.limits.api_calls]
    limit = 100
    period = "day"
    [plans.limits.tokens]
    limit = 1000
    period = "month"
    enforcement = "grace"
    grace_percent = 10
    [plans.limits.storage_gb]
    limit = 5
    period = "billing_period"
    enforcement = "soft"
"#;

async fn setup() -> (tally_db::testing::TestDatabase, Quota) {
    let db = fresh_database().await;
    sqlx::query("INSERT INTO meters (name, aggregation, stripe_event_name) VALUES ('api_calls', 'sum', 'a'), ('tokens', 'sum', 't'), ('storage_gb', 'max', 's'), ('seats', 'latest', 'x')")
        .execute(&db.pool)
        .await
        .unwrap();
    #[derive(serde::Deserialize)]
    struct File {
        plans: Vec<PlanDefinition>,
    }
    apply_plans(
        &db.pool,
        &toml::from_str::<File>(PLANS).unwrap().plans,
        "test",
    )
    .await
    .unwrap();
    subscribe(&db.pool, "acme", "FREE", Utc::now() - TimeDelta::days(2)).await;
    let quota = Quota::new(db.pool.clone(), Duration::from_secs(60))
        .await
        .unwrap();
    (db, quota)
}

fn n(value: i64) -> Decimal {
    Decimal::from(value)
}

#[tokio::test]
async fn periods_modes_and_the_local_count() {
    let (db, quota) = setup().await;
    daily(&db.pool, "acme", "api_calls", 0, 90).await;
    daily(&db.pool, "acme", "api_calls", 1, 1000).await; // yesterday: not today's quota
    daily(&db.pool, "acme", "tokens", 0, 900).await;
    daily(&db.pool, "acme", "tokens", 40, 5000).await; // an earlier month
    daily(&db.pool, "acme", "storage_gb", 1, 4).await;
    daily(&db.pool, "acme", "storage_gb", 5, 50).await; // before the billing period

    let first = quota.check("acme", "api_calls", n(5)).await.unwrap();
    let tomorrow = (Utc::now().date_naive() + TimeDelta::days(1))
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    assert_eq!(
        first,
        Decision::Allow {
            used: n(90),
            limit: Some(n(100)),
            remaining: Some(n(5)),
            resets_at: Some(tomorrow),
            credits: None,
        }
    );
    // A burst: what this process allowed counts before the aggregator has it.
    assert!(
        matches!(quota.check("acme", "api_calls", n(5)).await.unwrap(), Decision::Allow { remaining: Some(r), .. } if r.is_zero())
    );
    assert!(
        matches!(quota.check("acme", "api_calls", n(1)).await.unwrap(), Decision::Deny { used, .. } if used == n(100))
    );

    assert!(matches!(
        quota.check("acme", "tokens", n(100)).await.unwrap(),
        Decision::Allow { .. }
    ));
    assert!(
        matches!(
            quota.check("acme", "tokens", n(50)).await.unwrap(),
            Decision::Warn { .. }
        ),
        "1,050 of 1,000 + 10% grace"
    );
    assert!(
        matches!(
            quota.check("acme", "tokens", n(51)).await.unwrap(),
            Decision::Deny { .. }
        ),
        "1,101 is beyond the grace"
    );

    // storage_gb: max over the billing period (4, not the 50 from before it), soft limit 5.
    assert!(
        matches!(quota.check("acme", "storage_gb", n(1)).await.unwrap(), Decision::Allow { used, .. } if used == n(4))
    );
    assert!(matches!(
        quota.check("acme", "storage_gb", n(1)).await.unwrap(),
        Decision::Warn { .. }
    ));

    // A meter without a limit in the plan is allowed; an unknown meter is an error.
    assert!(matches!(
        quota.check("acme", "seats", n(1)).await.unwrap(),
        Decision::Allow { limit: None, .. }
    ));
    assert!(matches!(
        quota.check("acme", "nope", n(1)).await.unwrap_err(),
        QuotaError::UnknownMeter(_)
    ));
}

#[tokio::test]
async fn no_subscription_features_and_overrides() {
    let (db, quota) = setup().await;
    let none = quota.check("nobody", "api_calls", n(1)).await.unwrap_err();
    assert_eq!(none.code(), "NO_ACTIVE_SUBSCRIPTION");
    assert!(quota.require_feature("acme", "api").await.is_ok());
    assert_eq!(
        quota
            .require_feature("acme", "sso")
            .await
            .unwrap_err()
            .code(),
        "FEATURE_DISABLED"
    );

    daily(&db.pool, "acme", "api_calls", 0, 100).await;
    quota.invalidate("acme"); // the cache still holds usage from before the insert
    assert!(matches!(
        quota.check("acme", "api_calls", n(1)).await.unwrap(),
        Decision::Deny { .. }
    ));
    let overrides: Override = serde_json::from_value(serde_json::json!({
        "features": { "sso": true }, "limits": { "api_calls": { "limit": "500" } }
    }))
    .unwrap();
    set_override(&db.pool, "acme", &overrides, "support ticket 42", "ops")
        .await
        .unwrap();
    quota.invalidate("acme");
    assert!(
        matches!(quota.check("acme", "api_calls", n(1)).await.unwrap(), Decision::Allow { limit: Some(l), .. } if l == n(500))
    );
    assert!(quota.require_feature("acme", "sso").await.is_ok());
}
