//! Checks on meters under `credits` enforcement: allowed while the projected balance covers
//! the usage at its rate (per dimension when asked), denied at zero with INSUFFICIENT_CREDITS,
//! the local count stopping a burst, and a grant or a burn seen after a reload.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use rust_decimal::Decimal;
use tally_billing::testing::subscribe;
use tally_billing::{apply_plans, PlanDefinition};
use tally_credits::queue::{enqueue, CountedUsage};
use tally_credits::{grant, Actor, GrantKind, NewGrant, RateDefinition};
use tally_db::testing::fresh_database;
use tally_quota::{Decision, Quota, QuotaError};

const PLANS: &str = r#"
    [[plans]]
    name = "PREPAID"
    [plans.limits.tokens]
    enforcement = "credits"
    [plans.limits.api_calls]
    limit = 3
    period = "day"
    enforcement = "credits"
"#;

fn d(text: &str) -> Decimal {
    text.parse().unwrap()
}

async fn top_up(pool: &sqlx::PgPool, customer: &str, amount: &str, key: &str) {
    let new = NewGrant {
        customer: customer.into(),
        kind: GrantKind::Purchased,
        amount: d(amount),
        priority: None,
        effective_at: None,
        expires_at: None,
        idempotency_key: key.into(),
        description: None,
    };
    grant(pool, &new, &Actor::new("ops", "top-up").unwrap())
        .await
        .unwrap();
}

fn credits_left(decision: &Decision) -> Option<Decimal> {
    match decision {
        Decision::Allow { credits, .. } | Decision::Warn { credits, .. } => *credits,
        Decision::Deny { .. } => None,
    }
}

#[tokio::test]
async fn credits_cover_usage_until_zero_then_checks_are_refused() {
    let db = fresh_database().await;
    sqlx::query("INSERT INTO meters (name, aggregation, group_by, stripe_event_name) VALUES ('tokens', 'sum', '{model}', 't'), ('api_calls', 'sum', '{}', 'a')")
        .execute(&db.pool)
        .await
        .unwrap();
    tally_credits::rates::record(
        &db.pool,
        &[
            RateDefinition {
                meter: "tokens".into(),
                credits_per_unit: d("0.001"),
                dimensions: BTreeMap::new(),
            },
            RateDefinition {
                meter: "tokens".into(),
                credits_per_unit: d("0.01"),
                dimensions: [("model".to_string(), "large".to_string())].into(),
            },
            RateDefinition {
                meter: "api_calls".into(),
                credits_per_unit: d("1"),
                dimensions: BTreeMap::new(),
            },
        ],
    )
    .await
    .unwrap();
    #[derive(serde::Deserialize)]
    struct File {
        plans: Vec<PlanDefinition>,
    }
    let plans = toml::from_str::<File>(PLANS).unwrap().plans;
    assert_eq!(
        plans[0].limits["tokens"].limit,
        d("-1"),
        "no ceiling but the credits"
    );
    apply_plans(&db.pool, &plans, "test").await.unwrap();
    for customer in ["acme", "broke"] {
        subscribe(
            &db.pool,
            customer,
            "PREPAID",
            Utc::now() - TimeDelta::days(2),
        )
        .await;
    }
    top_up(&db.pool, "acme", "10", "first").await;
    let quota = Quota::new(db.pool.clone(), Duration::from_secs(60))
        .await
        .unwrap();

    let small = quota.check("acme", "tokens", d("5000")).await.unwrap();
    assert!(
        matches!(small, Decision::Allow { limit: None, .. }),
        "{small:?}"
    );
    assert_eq!(credits_left(&small), Some(d("5")));
    let large = [("model".to_string(), "large".to_string())].into();
    let peeked = quota
        .peek_with("acme", "tokens", d("500"), &large)
        .await
        .unwrap();
    assert_eq!(credits_left(&peeked), Some(d("0")), "a peek counts nothing");
    let spent = quota
        .check_with("acme", "tokens", d("500"), &large)
        .await
        .unwrap();
    assert_eq!(credits_left(&spent), Some(d("0")));
    // At zero: refused, with the balance and what was needed.
    match quota.check("acme", "tokens", d("1")).await {
        Err(error @ QuotaError::InsufficientCredits { .. }) => {
            assert_eq!(
                (error.code(), error.http_status()),
                ("INSUFFICIENT_CREDITS", 402)
            );
            let QuotaError::InsufficientCredits {
                balance, required, ..
            } = error
            else {
                unreachable!()
            };
            assert_eq!((balance, required), (d("0"), d("0.001")));
        }
        other => panic!("{other:?}"),
    }
    assert!(
        quota.check("acme", "tokens", d("0")).await.is_ok(),
        "nothing to cover"
    );
    // A customer who never had credits has none.
    assert!(matches!(
        quota.check("broke", "tokens", d("1")).await,
        Err(QuotaError::InsufficientCredits { .. })
    ));

    // A top-up is seen once the customer is reloaded (the API invalidates at once).
    top_up(&db.pool, "acme", "2", "second").await;
    quota.invalidate("acme");
    // Committed usage the burner has not drawn yet already counts (1 credit of it).
    let mut tx = db.pool.begin().await.unwrap();
    let usage = CountedUsage {
        customer: "acme",
        meter: "tokens",
        group_key: "{}",
        window_start: Utc::now() - TimeDelta::seconds(5),
        quantity: d("1000"),
    };
    enqueue(&mut tx, &[usage]).await.unwrap();
    tx.commit().await.unwrap();
    quota.invalidate("acme");
    let after = quota.check("acme", "tokens", d("1000")).await.unwrap();
    // The local count went with the invalidation (nothing of it was committed in this test):
    // 12 granted, 1 committed but not burned, 1 now.
    assert_eq!(credits_left(&after), Some(d("12") - d("1") - d("1")));

    // A limit beside the credits is a ceiling of its own.
    quota.invalidate("acme");
    for _ in 0..3 {
        quota.check("acme", "api_calls", d("1")).await.unwrap();
    }
    let capped = quota.check("acme", "api_calls", d("1")).await.unwrap();
    assert!(matches!(capped, Decision::Deny { .. }), "{capped:?}");
}

/// The review's case: a gateway checks, usage is then burned elsewhere, and after a quiet spell
/// the next check must decide on the balance Postgres holds now, not the one cached before
/// (it used to be allowed with `credits_remaining` 24.00 and refused a second later). With two
/// replicas, the one that did not see the usage decides on fresh state too.
#[tokio::test]
async fn after_a_quiet_spell_a_check_decides_on_state_no_older_than_max_staleness() {
    let db = fresh_database().await;
    sqlx::query("INSERT INTO meters (name, aggregation, group_by, stripe_event_name) VALUES ('tokens', 'sum', '{}', 't')")
        .execute(&db.pool)
        .await
        .unwrap();
    tally_credits::rates::record(
        &db.pool,
        &[RateDefinition {
            meter: "tokens".into(),
            credits_per_unit: d("0.25"),
            dimensions: BTreeMap::new(),
        }],
    )
    .await
    .unwrap();
    let plans: Vec<PlanDefinition> = serde_json::from_value(serde_json::json!([
        { "name": "PREPAID", "limits": { "tokens": { "enforcement": "credits" } } }
    ]))
    .unwrap();
    apply_plans(&db.pool, &plans, "test").await.unwrap();
    subscribe(&db.pool, "acme", "PREPAID", Utc::now() - TimeDelta::days(2)).await;
    top_up(&db.pool, "acme", "100", "first").await;
    // Two replicas behind one load balancer, as `tally serve` runs them (refresh 250 ms).
    let one = Quota::new(db.pool.clone(), Duration::from_millis(250))
        .await
        .unwrap();
    let two = Quota::new(db.pool.clone(), Duration::from_millis(250))
        .await
        .unwrap();
    for quota in [&one, &two] {
        let first = quota.check("acme", "tokens", d("4")).await.unwrap();
        assert_eq!(credits_left(&first), Some(d("99")));
    }
    // 105.25 tokens are used and burned: 26.3125 credits; 73.6875 left.
    let mut tx = db.pool.begin().await.unwrap();
    enqueue(
        &mut tx,
        &[CountedUsage {
            customer: "acme",
            meter: "tokens",
            group_key: "",
            window_start: Utc::now() - TimeDelta::minutes(1),
            quantity: d("105.25"),
        }],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let rates = tally_credits::RateCard::load(&db.pool).await.unwrap();
    while tally_credits::burn_once(&db.pool, &rates).await.unwrap().1 {}
    // A quiet spell longer than max_staleness (1 s at this refresh).
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    for quota in [&one, &two] {
        // 300 tokens cost 75 credits: more than the 73.6875 left.
        match quota.check("acme", "tokens", d("300")).await {
            Err(QuotaError::InsufficientCredits {
                balance, required, ..
            }) => {
                assert_eq!((balance, required), (d("73.6875"), d("75")));
            }
            other => panic!("decided on stale state: {other:?}"),
        }
        let fits = quota.check("acme", "tokens", d("4")).await.unwrap();
        assert_eq!(credits_left(&fits), Some(d("72.6875")));
    }
}

/// An invalidation (a webhook changed the customer) that races a load started before it is
/// not overwritten by that load's older result.
#[tokio::test]
async fn an_invalidation_is_never_overwritten_by_a_load_that_started_before_it() {
    let db = fresh_database().await;
    sqlx::query("INSERT INTO meters (name, aggregation, group_by, stripe_event_name) VALUES ('api_calls', 'sum', '{}', 'a')")
        .execute(&db.pool)
        .await
        .unwrap();
    let plans: Vec<PlanDefinition> = serde_json::from_value(serde_json::json!([
        { "name": "SMALL", "limits": { "api_calls": { "limit": "1", "period": "day" } } },
        { "name": "LARGE", "limits": { "api_calls": { "limit": "1000", "period": "day" } } }
    ]))
    .unwrap();
    apply_plans(&db.pool, &plans, "test").await.unwrap();
    subscribe(&db.pool, "acme", "SMALL", Utc::now() - TimeDelta::days(2)).await;
    let quota = std::sync::Arc::new(
        Quota::new(db.pool.clone(), Duration::from_secs(3600))
            .await
            .unwrap(),
    );
    // A load that has read the old plan and waits for its usage query (a lock on usage_daily
    // holds it there), while the plan changes and the cache is told.
    let mut blocker = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE usage_daily IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let loading = {
        let quota = quota.clone();
        tokio::spawn(async move { quota.check("acme", "api_calls", d("5")).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    sqlx::query("UPDATE subscriptions SET plan = 'LARGE' WHERE customer_id = 'acme'")
        .execute(&db.pool)
        .await
        .unwrap();
    quota.invalidate("acme");
    blocker.rollback().await.unwrap();
    // The load that started first answers its own check from the old plan (it began before
    // the change) ...
    let old = loading.await.unwrap().unwrap();
    assert!(matches!(old, Decision::Deny { .. }), "{old:?}");
    // ... but is not cached in place of the invalidation: the next check loads the new plan.
    let new = quota.check("acme", "api_calls", d("5")).await.unwrap();
    assert!(matches!(new, Decision::Allow { .. }), "{new:?}");
}

/// A grant that starts later changes the balance when it starts, with no write then to notify
/// the cache: the load that cached the balance knew when, and a check at that moment reloads,
/// however long the cache would otherwise trust its state.
#[tokio::test]
async fn a_grant_that_starts_later_is_seen_when_it_starts() {
    let db = fresh_database().await;
    sqlx::query("INSERT INTO meters (name, aggregation, stripe_event_name) VALUES ('tokens', 'sum', 't'), ('api_calls', 'sum', 'a')")
        .execute(&db.pool)
        .await
        .unwrap();
    let rate = |meter: &str| RateDefinition {
        meter: meter.into(),
        credits_per_unit: d("1"),
        dimensions: BTreeMap::new(),
    };
    tally_credits::rates::record(&db.pool, &[rate("tokens"), rate("api_calls")])
        .await
        .unwrap();
    #[derive(serde::Deserialize)]
    struct File {
        plans: Vec<PlanDefinition>,
    }
    let plans = toml::from_str::<File>(PLANS).unwrap().plans;
    apply_plans(&db.pool, &plans, "test").await.unwrap();
    subscribe(&db.pool, "acme", "PREPAID", Utc::now() - TimeDelta::days(2)).await;
    let later = NewGrant {
        customer: "acme".into(),
        kind: GrantKind::Purchased,
        amount: d("10"),
        priority: None,
        effective_at: Some(Utc::now() + TimeDelta::milliseconds(1500)),
        expires_at: None,
        idempotency_key: "later".into(),
        description: None,
    };
    grant(
        &db.pool,
        &later,
        &Actor::new("ops", "starts later").unwrap(),
    )
    .await
    .unwrap();
    let quota = Quota::with_options(
        db.pool.clone(),
        tally_quota::QuotaOptions {
            max_staleness: Duration::from_secs(60),
            ..tally_quota::QuotaOptions::new(Duration::from_secs(60))
        },
    )
    .await
    .unwrap();
    assert!(matches!(
        quota.check("acme", "tokens", d("1")).await,
        Err(QuotaError::InsufficientCredits { .. })
    ));
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let after = quota.check("acme", "tokens", d("1")).await.unwrap();
    assert_eq!(credits_left(&after), Some(d("9")));
}
