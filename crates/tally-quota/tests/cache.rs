//! The quota cache facing the internet, against Postgres: the bound on cached customers under
//! a flood of made-up ids, one load for many concurrent first checks, failed loads cached
//! briefly, peeks that count nothing, and period ends answered without a synchronous load
//! per customer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use rust_decimal::Decimal;
use tally_billing::store::{create_subscription, Subscription};
use tally_billing::testing::subscribe;
use tally_billing::{apply_plans, PlanDefinition};
use tally_db::testing::{fresh_database, TestDatabase};
use tally_quota::testing::daily_usage;
use tally_quota::{Decision, Quota, QuotaError, QuotaOptions};
use tokio::task::JoinSet;

/// Meter `api_calls`; plan `DAILY` allows 100 a UTC day, plan `BILLED` 100 a billing period,
/// both hard limits.
async fn database() -> TestDatabase {
    let db = fresh_database().await;
    sqlx::query(
        "INSERT INTO meters (name, aggregation, stripe_event_name) VALUES ('api_calls', 'sum', 'a')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let plans: Vec<PlanDefinition> = serde_json::from_value(serde_json::json!([
        { "name": "DAILY", "limits": { "api_calls": { "limit": "100", "period": "day" } } },
        { "name": "BILLED", "limits": { "api_calls": { "limit": "100", "period": "billing_period" } } }
    ]))
    .unwrap();
    apply_plans(&db.pool, &plans, "test").await.unwrap();
    db
}

async fn quota(db: &TestDatabase, change: impl FnOnce(&mut QuotaOptions)) -> Arc<Quota> {
    let mut options = QuotaOptions::new(Duration::from_secs(60));
    change(&mut options);
    Arc::new(Quota::with_options(db.pool.clone(), options).await.unwrap())
}

async fn customers_on_daily(db: &TestDatabase, prefix: &str, count: usize) -> Vec<String> {
    let customers: Vec<String> = (0..count).map(|i| format!("{prefix}{i}")).collect();
    for customer in &customers {
        subscribe(&db.pool, customer, "DAILY", Utc::now() - TimeDelta::days(2)).await;
    }
    customers
}

fn n(value: i64) -> Decimal {
    Decimal::from(value)
}

fn used(decision: &Decision) -> Decimal {
    decision.used()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_customers_stays_within_the_bound_and_keeps_hot_ones() {
    let db = database().await;
    let max = 200;
    let quota = quota(&db, |options| {
        options.max_customers = max;
        options.max_concurrent_loads = 3;
    })
    .await;
    let hot = customers_on_daily(&db, "hot", 20).await;
    for customer in &hot {
        quota.check(customer, "api_calls", n(1)).await.unwrap();
    }
    assert_eq!(quota.cache_counts().waited_loads, 20);

    // 2,000 made-up ids, 100 at a time, the hot customers checked between rounds.
    for round in 0..20 {
        let mut flood = JoinSet::new();
        for i in 0..100 {
            let quota = quota.clone();
            flood.spawn(async move {
                let customer = format!("made-up-{round}-{i}");
                quota.check(&customer, "api_calls", n(1)).await
            });
        }
        while let Some(answer) = flood.join_next().await {
            assert!(matches!(
                answer.unwrap(),
                Err(QuotaError::NoActiveSubscription(_))
            ));
        }
        let counts = quota.cache_counts();
        assert!(counts.cached <= max, "round {round}: {counts:?}");
        for customer in &hot {
            quota.check(customer, "api_calls", n(1)).await.unwrap();
        }
    }
    let counts = quota.cache_counts();
    assert!(counts.cached <= max, "{counts:?}");
    assert!(counts.evicted >= 1800, "{counts:?}");
    assert_eq!(
        counts.waited_loads,
        20 + 2000,
        "the hot customers were never evicted: they never loaded again"
    );
    assert!(
        counts.peak_running_loads <= 3,
        "at most max_concurrent_loads loads at once: {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_checks_of_a_customer_share_one_load() {
    let db = database().await;
    subscribe(&db.pool, "acme", "DAILY", Utc::now() - TimeDelta::days(2)).await;
    daily_usage(&db.pool, "acme", "api_calls", 0, 10).await;
    let quota = quota(&db, |_| {}).await;
    let mut checks = JoinSet::new();
    for _ in 0..500 {
        let quota = quota.clone();
        checks.spawn(async move { quota.peek("acme", "api_calls", n(1)).await });
    }
    while let Some(answer) = checks.join_next().await {
        assert_eq!(used(&answer.unwrap().unwrap()), n(10));
    }
    assert_eq!(quota.cache_counts().waited_loads, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_load_is_answered_from_the_cache_briefly_then_retried() {
    let db = database().await;
    subscribe(&db.pool, "acme", "DAILY", Utc::now() - TimeDelta::days(2)).await;
    subscribe(&db.pool, "beta", "DAILY", Utc::now() - TimeDelta::days(2)).await;
    let ttl = Duration::from_millis(500);
    let quota = quota(&db, |options| options.failed_load_ttl = ttl).await;
    quota.check("acme", "api_calls", n(1)).await.unwrap(); // the meter list is loaded

    // Postgres fails beta's load (its usage query): the API would answer 503.
    sqlx::query("ALTER TABLE usage_daily RENAME TO usage_daily_away")
        .execute(&db.pool)
        .await
        .unwrap();
    let failed_at = Instant::now();
    let first = quota.check("beta", "api_calls", n(1)).await.unwrap_err();
    assert!(matches!(first, QuotaError::Store(_)), "{first}");
    let loads = quota.cache_counts().waited_loads;
    for _ in 0..20 {
        let again = quota.check("beta", "api_calls", n(1)).await.unwrap_err();
        assert!(matches!(again, QuotaError::Store(_)), "{again}");
        assert_eq!(again.code(), first.code());
        assert!(again.to_string().contains("moments ago"), "{again}");
    }
    assert!(failed_at.elapsed() < ttl, "the test was too slow to tell");
    assert_eq!(
        quota.cache_counts().waited_loads,
        loads,
        "within the TTL, checks do not ask Postgres"
    );

    sqlx::query("ALTER TABLE usage_daily_away RENAME TO usage_daily")
        .execute(&db.pool)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while quota.check("beta", "api_calls", n(1)).await.is_err() {
        assert!(Instant::now() < deadline, "beta never loaded again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(failed_at.elapsed() >= ttl);
    assert_eq!(
        quota.cache_counts().waited_loads,
        loads + 1,
        "one retry, once the TTL passed"
    );
}

#[tokio::test]
async fn peek_answers_what_check_would_and_counts_nothing() {
    let db = database().await;
    subscribe(&db.pool, "acme", "DAILY", Utc::now() - TimeDelta::days(2)).await;
    daily_usage(&db.pool, "acme", "api_calls", 0, 90).await;
    let quota = quota(&db, |_| {}).await;
    let tomorrow = (Utc::now().date_naive() + TimeDelta::days(1))
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    let allow = |used: i64, remaining: i64| Decision::Allow {
        used: n(used),
        limit: Some(n(100)),
        remaining: Some(n(remaining)),
        resets_at: Some(tomorrow),
        credits: None,
    };
    for _ in 0..3 {
        assert_eq!(
            quota.peek("acme", "api_calls", n(5)).await.unwrap(),
            allow(90, 5)
        );
    }
    assert!(matches!(
        quota.peek("acme", "api_calls", n(11)).await.unwrap(),
        Decision::Deny { .. }
    ));
    assert_eq!(
        quota.check("acme", "api_calls", n(5)).await.unwrap(),
        allow(90, 5),
        "the check answers what the peeks did: they counted nothing"
    );
    assert_eq!(
        quota.peek("acme", "api_calls", n(5)).await.unwrap(),
        allow(95, 0),
        "the peek sees what the check counted"
    );
    let peeked = quota.peek("acme", "api_calls", n(6)).await.unwrap();
    assert!(matches!(peeked, Decision::Deny { .. }));
    assert_eq!(
        quota.check("acme", "api_calls", n(6)).await.unwrap(),
        peeked
    );
    assert_eq!(
        quota
            .peek("nobody", "api_calls", n(1))
            .await
            .unwrap_err()
            .code(),
        "NO_ACTIVE_SUBSCRIPTION"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_ending_for_many_customers_makes_no_synchronous_load() {
    let db = database().await;
    let customers = customers_on_daily(&db, "c", 40).await;
    for customer in &customers {
        daily_usage(&db.pool, customer, "api_calls", 0, 90).await;
    }
    let quota = quota(&db, |_| {}).await; // refresh 60 s: reloads come from the period end
    for customer in &customers {
        assert_eq!(
            used(&quota.check(customer, "api_calls", n(1)).await.unwrap()),
            n(90)
        );
    }
    let before = quota.cache_counts();
    assert_eq!(before.waited_loads, 40);

    // Midnight, for every cached customer at once.
    quota.end_periods_now();
    let mut checks = JoinSet::new();
    for customer in customers.clone() {
        let quota = quota.clone();
        checks.spawn(async move { quota.check(&customer, "api_calls", n(1)).await });
    }
    while let Some(answer) = checks.join_next().await {
        match answer.unwrap().unwrap() {
            Decision::Allow {
                used, resets_at, ..
            } => {
                assert_eq!(used, n(0), "a new period starts at zero");
                assert!(resets_at.unwrap() > Utc::now());
            }
            other => panic!("{other:?}"),
        }
    }
    let after = quota.cache_counts();
    assert_eq!(
        after.waited_loads, before.waited_loads,
        "no check waited for Postgres"
    );

    // One background reload per customer, in batches, brings the new period's real usage
    // (here the 90 recorded today, as the period end was simulated).
    let deadline = Instant::now() + Duration::from_secs(10);
    for customer in &customers {
        while used(&quota.peek(customer, "api_calls", n(1)).await.unwrap()) != n(90) {
            assert!(Instant::now() < deadline, "{customer} was never reloaded");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let reloaded = quota.cache_counts();
    assert_eq!(reloaded.waited_loads, before.waited_loads);
    let batches = reloaded.background_loads - before.background_loads;
    assert!(
        (1..=5).contains(&batches),
        "40 customers reloaded in {batches} batches"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_billing_period_end_reloads_once_for_all_the_checks_waiting() {
    let db = database().await;
    let end = Utc::now() + TimeDelta::milliseconds(1500);
    let subscription = Subscription {
        customer_id: "acme".into(),
        plan: "BILLED".into(),
        status: "active".into(),
        current_period_start: end - TimeDelta::days(30),
        current_period_end: end,
        cancel_at_period_end: false,
    };
    create_subscription(&db.pool, &subscription, "test")
        .await
        .unwrap();
    daily_usage(&db.pool, "acme", "api_calls", 0, 40).await;
    let quota = quota(&db, |_| {}).await;
    quota.check("acme", "api_calls", n(1)).await.unwrap();
    assert_eq!(quota.cache_counts().waited_loads, 1);

    // Wall-clock time has to pass: the period ends at `end`.
    let wait = (end - Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(50)).await;
    let mut checks = JoinSet::new();
    for _ in 0..100 {
        let quota = quota.clone();
        checks.spawn(async move { quota.peek("acme", "api_calls", n(1)).await });
    }
    while let Some(answer) = checks.join_next().await {
        // No renewal has arrived: the period that ended still counts (the safe side).
        assert_eq!(used(&answer.unwrap().unwrap()), n(40));
    }
    assert_eq!(
        quota.cache_counts().waited_loads,
        2,
        "one reload, shared by every check waiting"
    );
    // Reloaded after the end, the entry is not reloaded again on every check.
    for _ in 0..10 {
        quota.check("acme", "api_calls", n(1)).await.unwrap();
    }
    assert_eq!(quota.cache_counts().waited_loads, 2);
}

/// Before: invalidating a customer the cache did not hold still put a mark in it, and the
/// scheduler invalidates every customer it advances (thousands at a month's start): the marks
/// evicted the customers being checked, who then waited for a load each. Now only a customer
/// cached or being loaded is marked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidating_customers_the_cache_does_not_hold_evicts_no_one() {
    let db = database().await;
    let quota = quota(&db, |options| options.max_customers = 20).await;
    let hot = customers_on_daily(&db, "hot", 20).await;
    for customer in &hot {
        quota.check(customer, "api_calls", n(1)).await.unwrap();
    }
    let before = quota.cache_counts();
    for i in 0..1_000 {
        quota.invalidate(&format!("elsewhere-{i}"));
    }
    let after = quota.cache_counts();
    assert_eq!(after.evicted, before.evicted, "{after:?}");
    for customer in &hot {
        quota.check(customer, "api_calls", n(1)).await.unwrap();
    }
    assert_eq!(
        quota.cache_counts().waited_loads,
        before.waited_loads,
        "the checked customers stayed cached"
    );
}
