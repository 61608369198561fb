//! Subscriptions tally manages itself, against Postgres: the operations (audited, validated),
//! the scheduler (catching up once, with replicas racing), trials, the fallback plan, and the
//! business figures finance reads.

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;
use tally_billing::subscriptions::{
    self, run_due, Actor, NewSubscription, Source, Status, SubscriptionError, SubscriptionsConfig,
    Term, When,
};
use tally_billing::{apply_plans, BillingStoreError, PlanDefinition};
use tally_db::testing::fresh_database;

const PLANS: &str = r#"
    [[plans]]
    name = "FREE"
    [plans.limits.api_calls]
    limit = 100
    period = "day"

    [[plans]]
    name = "PRO"
    requires_payment_method = true
    price = { amount = "49.00", currency = "usd", interval = "month" }
    [plans.limits.api_calls]
    limit = 10000
    period = "day"

    [[plans]]
    name = "ENTERPRISE"
    price = { amount = "1200", currency = "usd", interval = "year" }
"#;

async fn seed(pool: &PgPool) {
    #[derive(serde::Deserialize)]
    struct File {
        plans: Vec<PlanDefinition>,
    }
    sqlx::query("INSERT INTO meters (name, aggregation, stripe_event_name) VALUES ('api_calls', 'sum', 'api_calls')")
        .execute(pool)
        .await
        .unwrap();
    let plans = toml::from_str::<File>(PLANS).unwrap().plans;
    apply_plans(pool, &plans, "test").await.unwrap();
}

fn ops(reason: &str) -> Actor {
    Actor::new("token:ops", reason).unwrap()
}

fn monthly(customer: &str, plan: &str) -> NewSubscription {
    NewSubscription {
        customer: customer.into(),
        plan: plan.into(),
        start: None,
        trial_end: None,
        term: Term::Month,
        payment_method: true,
    }
}

fn fallback(plan: Option<&str>) -> SubscriptionsConfig {
    SubscriptionsConfig {
        fallback_plan: plan.map(str::to_owned),
        ..SubscriptionsConfig::default()
    }
}

fn at(y: i32, m: u32, d: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap()
}

/// A transaction holding the customer's subscription lock, as a create, a cancel, a plan
/// change or a Stripe webhook holds it while it works.
async fn hold_customer_lock(
    pool: &PgPool,
    customer: &str,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('tally.subscriptions:' || $1, 0))")
        .bind(customer)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

/// An override raising acme's api_calls limit: it needs a plan that limits api_calls.
fn bigger_api_calls() -> tally_billing::Override {
    serde_json::from_value(serde_json::json!({
        "limits": { "api_calls": { "limit": "500" } }
    }))
    .unwrap()
}

/// `set_override` of acme, started now and left running.
fn set_override_meanwhile(pool: &PgPool) -> tokio::task::JoinHandle<Result<(), BillingStoreError>> {
    let pool = pool.clone();
    tokio::spawn(async move {
        tally_billing::store::set_override(&pool, "acme", &bigger_api_calls(), "bigger", "ops")
            .await
    })
}

async fn audit(pool: &PgPool, customer: &str) -> Vec<(String, String, Option<String>)> {
    sqlx::query_as(
        "SELECT action, actor, reason FROM entitlement_audit
         WHERE entity = 'subscription' AND entity_key = $1 ORDER BY audit_id",
    )
    .bind(customer)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn create_change_cancel_and_reactivate_each_audited_with_actor_and_reason() {
    let db = fresh_database().await;
    let pool = &db.pool;
    seed(pool).await;
    let created =
        subscriptions::create(pool, &monthly("acme", "PRO"), &ops("signed the order form"))
            .await
            .unwrap();
    let now = Utc::now();
    assert_eq!(
        (created.status, created.source),
        (Status::Active, Source::Tally)
    );
    assert!(created.current_period_start <= now && now < created.current_period_end);

    let id = created.id;
    let scheduled = subscriptions::change_plan(
        pool,
        id,
        "ENTERPRISE",
        When::PeriodEnd,
        &ops("upgrade next month"),
    )
    .await
    .unwrap();
    assert_eq!(
        (scheduled.plan.as_str(), scheduled.pending_plan.as_deref()),
        ("PRO", Some("ENTERPRISE"))
    );
    let changed = subscriptions::change_plan(
        pool,
        id,
        "ENTERPRISE",
        When::Now,
        &ops("upgrade now after all"),
    )
    .await
    .unwrap();
    assert_eq!(
        (changed.plan.as_str(), changed.pending_plan.as_deref()),
        ("ENTERPRISE", None)
    );
    let same = subscriptions::change_plan(pool, id, "ENTERPRISE", When::Now, &ops("again"))
        .await
        .unwrap();
    assert_eq!(
        same, changed,
        "asking for the plan it is on changes nothing"
    );

    let canceling = subscriptions::cancel(pool, id, When::PeriodEnd, None, &ops("customer asked"))
        .await
        .unwrap();
    assert!(canceling.cancel_at_period_end && canceling.status == Status::Active);
    let reactivated = subscriptions::reactivate(pool, id, &ops("customer stays"))
        .await
        .unwrap();
    assert!(!reactivated.cancel_at_period_end);
    assert!(matches!(
        subscriptions::reactivate(pool, id, &ops("again")).await,
        Err(SubscriptionError::NothingToReactivate(_))
    ));
    let canceled = subscriptions::cancel(pool, id, When::Now, None, &ops("contract ended"))
        .await
        .unwrap();
    assert_eq!(canceled.status, Status::Canceled);
    assert!(canceled.ended_at.is_some());
    let ended = subscriptions::change_plan(pool, id, "PRO", When::Now, &ops("too late")).await;
    assert!(
        matches!(ended, Err(SubscriptionError::Ended { .. })),
        "{ended:?}"
    );

    assert_eq!(
        audit(pool, "acme").await,
        [
            ("create", "signed the order form"),
            ("schedule_change", "upgrade next month"),
            ("change_plan", "upgrade now after all"),
            ("schedule_cancel", "customer asked"),
            ("reactivate", "customer stays"),
            ("cancel", "contract ended"),
        ]
        .map(|(action, reason)| (
            action.to_owned(),
            "token:ops".to_owned(),
            Some(reason.to_owned())
        ))
    );

    let listed = subscriptions::customer_subscriptions(pool, "acme")
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    let spans: Vec<(&str, Status, bool)> = listed[0]
        .history
        .iter()
        .map(|span| (span.plan.as_str(), span.status, span.to.is_none()))
        .collect();
    assert_eq!(
        spans,
        [
            ("PRO", Status::Active, false),
            ("ENTERPRISE", Status::Active, false),
            ("ENTERPRISE", Status::Canceled, true)
        ]
    );
}

#[tokio::test]
async fn what_is_refused_says_why_with_a_stable_code() {
    let db = fresh_database().await;
    let pool = &db.pool;
    seed(pool).await;
    assert!(matches!(
        Actor::new("ops", "  "),
        Err(SubscriptionError::ReasonRequired)
    ));
    let reason = ops("test");
    subscriptions::create(pool, &monthly("acme", "PRO"), &reason)
        .await
        .unwrap();
    let second = subscriptions::create(pool, &monthly("acme", "FREE"), &reason)
        .await
        .unwrap_err();
    assert_eq!(second.code(), "SECOND_LIVE_SUBSCRIPTION");
    let unknown = subscriptions::create(pool, &monthly("beta", "GOLD"), &reason)
        .await
        .unwrap_err();
    assert!(matches!(
        unknown,
        SubscriptionError::Store(BillingStoreError::UnknownPlan(_))
    ));
    assert_eq!(unknown.code(), "UNKNOWN_PLAN");

    let now = Utc::now();
    // Backdated to year 1 (or any time more than a year back): refused, saying why.
    let ancient = subscriptions::create(
        pool,
        &NewSubscription {
            start: Some(at(1, 1, 1)),
            ..monthly("beta", "PRO")
        },
        &reason,
    )
    .await
    .unwrap_err();
    assert_eq!(ancient.code(), "INVALID_SUBSCRIPTION");
    assert!(
        ancient.to_string().contains("restates finance"),
        "{ancient}"
    );
    let cases = [
        NewSubscription {
            start: Some(now + TimeDelta::days(2)),
            ..monthly("beta", "PRO")
        },
        NewSubscription {
            start: Some(now - TimeDelta::days(367)),
            ..monthly("beta", "PRO")
        },
        NewSubscription {
            trial_end: Some(now - TimeDelta::days(1)),
            ..monthly("beta", "PRO")
        },
        NewSubscription {
            trial_end: Some(now + TimeDelta::days(7)),
            term: Term::Until(now + TimeDelta::days(30)),
            ..monthly("beta", "PRO")
        },
        NewSubscription {
            term: Term::Until(now - TimeDelta::days(1)),
            ..monthly("beta", "PRO")
        },
        NewSubscription {
            customer: String::new(),
            ..monthly("beta", "PRO")
        },
        NewSubscription {
            customer: "a\u{0}b".into(),
            ..monthly("beta", "PRO")
        },
    ];
    for case in cases {
        let error = subscriptions::create(pool, &case, &reason)
            .await
            .unwrap_err();
        assert_eq!(error.code(), "INVALID_SUBSCRIPTION", "{case:?}: {error}");
    }

    // A subscription that follows Stripe is Stripe's to change.
    sqlx::query(
        "INSERT INTO subscriptions (customer_id, plan, status, source, stripe_subscription_id,
                current_period_start, current_period_end, billing_anchor, started_at)
         VALUES ('gamma', 'PRO', 'active', 'stripe', 'sub_1', now(), now() + interval '30 days', now(), now())",
    )
    .execute(pool)
    .await
    .unwrap();
    let stripe = subscriptions::live_subscription(pool, "gamma")
        .await
        .unwrap()
        .unwrap();
    for refused in [
        subscriptions::cancel(pool, stripe.id, When::Now, None, &reason).await,
        subscriptions::change_plan(pool, stripe.id, "FREE", When::Now, &reason).await,
    ] {
        assert_eq!(refused.unwrap_err().code(), "STRIPE_MANAGED");
    }
    assert_eq!(
        subscriptions::get(pool, 999_999).await.unwrap_err().code(),
        "NO_SUCH_SUBSCRIPTION"
    );
    let fixed = subscriptions::create(
        pool,
        &NewSubscription {
            term: Term::Until(now + TimeDelta::days(90)),
            ..monthly("delta", "PRO")
        },
        &reason,
    )
    .await
    .unwrap();
    let no_next =
        subscriptions::change_plan(pool, fixed.id, "FREE", When::PeriodEnd, &reason).await;
    assert_eq!(no_next.unwrap_err().code(), "NO_NEXT_PERIOD");
}

/// Puts subscription `id` on a literal calendar: anchored at `anchor`, in its first period.
async fn anchor_at(pool: &PgPool, id: i64, anchor: DateTime<Utc>, first_end: DateTime<Utc>) {
    sqlx::query(
        "UPDATE subscriptions SET billing_anchor = $2, started_at = $2, current_period_start = $2,
                current_period_end = $3
         WHERE subscription_id = $1",
    )
    .bind(id)
    .bind(anchor)
    .bind(first_end)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("UPDATE subscription_history SET valid_from = $2 WHERE subscription_id = $1")
        .bind(id)
        .bind(anchor)
        .execute(pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_scheduler_that_was_down_catches_up_once_across_month_ends_and_leap_days_with_replicas_racing(
) {
    let db = fresh_database().await;
    let pool = &db.pool;
    seed(pool).await;
    let reason = ops("test");
    let monthly_sub = subscriptions::create(pool, &monthly("acme", "PRO"), &reason)
        .await
        .unwrap();
    anchor_at(pool, monthly_sub.id, at(2024, 1, 31), at(2024, 2, 29)).await;
    subscriptions::change_plan(pool, monthly_sub.id, "ENTERPRISE", When::PeriodEnd, &reason)
        .await
        .unwrap();
    let yearly = subscriptions::create(
        pool,
        &NewSubscription {
            term: Term::Year,
            ..monthly("beta", "ENTERPRISE")
        },
        &reason,
    )
    .await
    .unwrap();
    anchor_at(pool, yearly.id, at(2024, 2, 29), at(2025, 2, 28)).await;

    // Down from before February 29, 2024 until May 1, 2028; two replicas wake up at once.
    let now = at(2028, 5, 1);
    let config = fallback(None);
    let (first, second) = tokio::join!(run_due(pool, &config, now), run_due(pool, &config, now));
    let (first, second) = (first.unwrap(), second.unwrap());
    // Monthly: Feb 29 2024 … Apr 30 2028 is 51 period ends; yearly: Feb 28 2025, Feb 28 2026,
    // Feb 28 2027, Feb 29 2028.
    assert_eq!(first.transitions + second.transitions, 51 + 4);
    assert_eq!(first.failed + second.failed, 0);
    let again = run_due(pool, &config, now).await.unwrap();
    assert_eq!(again.transitions, 0, "caught up once");

    let acme = subscriptions::get(pool, monthly_sub.id).await.unwrap();
    assert_eq!(
        (acme.current_period_start, acme.current_period_end),
        (at(2028, 4, 30), at(2028, 5, 31))
    );
    assert_eq!(
        (acme.plan.as_str(), acme.status_since),
        ("ENTERPRISE", at(2024, 2, 29))
    );
    let beta = subscriptions::get(pool, yearly.id).await.unwrap();
    assert_eq!(
        (beta.current_period_start, beta.current_period_end),
        (at(2028, 2, 29), at(2029, 2, 28))
    );

    let renewals: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM entitlement_audit WHERE action = 'renew' AND actor = 'scheduler'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(renewals, 55, "one audit row per period end, none twice");
    let spans = &subscriptions::customer_subscriptions(pool, "acme")
        .await
        .unwrap()[0]
        .history;
    assert_eq!(spans.len(), 2);
    assert_eq!(
        (spans[1].plan.as_str(), spans[1].from),
        ("ENTERPRISE", at(2024, 2, 29))
    );
}

#[tokio::test]
async fn trials_convert_or_expire_and_an_ended_customer_moves_to_the_fallback_once() {
    let db = fresh_database().await;
    let pool = &db.pool;
    seed(pool).await;
    let reason = ops("test");
    let now = Utc::now();
    let trial = |customer: &str, payment_method| NewSubscription {
        trial_end: Some(now + TimeDelta::days(14)),
        payment_method,
        ..monthly(customer, "PRO")
    };
    let with_card = subscriptions::create(pool, &trial("acme", true), &reason)
        .await
        .unwrap();
    let without = subscriptions::create(pool, &trial("beta", false), &reason)
        .await
        .unwrap();
    assert_eq!(with_card.status, Status::Trialing);
    assert_eq!(with_card.current_period_end, with_card.trial_end.unwrap());

    let config = fallback(Some("FREE"));
    let later = now + TimeDelta::days(15);
    let run = run_due(pool, &config, later).await.unwrap();
    assert_eq!((run.transitions, run.fallbacks), (2, 1));
    let acme = subscriptions::get(pool, with_card.id).await.unwrap();
    assert_eq!(acme.status, Status::Active);
    assert_eq!(
        acme.current_period_start,
        acme.trial_end.unwrap(),
        "paid periods start at the trial's end"
    );
    let beta = subscriptions::get(pool, without.id).await.unwrap();
    assert_eq!(
        (beta.status, beta.ended_at),
        (Status::Canceled, beta.trial_end)
    );
    let on_free = subscriptions::live_subscription(pool, "beta")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (on_free.plan.as_str(), on_free.source),
        ("FREE", Source::Fallback)
    );
    assert_eq!(
        on_free.started_at,
        beta.trial_end.unwrap(),
        "from the moment the trial ended"
    );
    assert_eq!(
        run_due(pool, &config, later).await.unwrap().fallbacks,
        0,
        "once"
    );

    // Subscribing again replaces the fallback; canceling that leaves FREE again, via the API.
    let paid = subscriptions::create(pool, &monthly("beta", "PRO"), &reason)
        .await
        .unwrap();
    let replaced = subscriptions::get(pool, on_free.id).await.unwrap();
    assert_eq!(replaced.status, Status::Canceled);
    subscriptions::cancel(pool, paid.id, When::Now, Some("FREE"), &reason)
        .await
        .unwrap();
    let back = subscriptions::live_subscription(pool, "beta")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (back.plan.as_str(), back.source),
        ("FREE", Source::Fallback)
    );
    // Canceling the fallback itself leaves the customer without a plan, for good.
    subscriptions::cancel(pool, back.id, When::Now, Some("FREE"), &reason)
        .await
        .unwrap();
    assert_eq!(run_due(pool, &config, later).await.unwrap().fallbacks, 0);
    assert!(subscriptions::live_subscription(pool, "beta")
        .await
        .unwrap()
        .is_none());

    // A subscription Stripe deleted: the sweep moves its customer, once.
    sqlx::query(
        "INSERT INTO subscriptions (customer_id, plan, status, source, stripe_subscription_id,
                current_period_start, current_period_end, billing_anchor, started_at, ended_at)
         VALUES ('gamma', 'PRO', 'canceled', 'stripe', 'sub_9', now() - interval '30 days', now(),
                 now() - interval '30 days', now() - interval '30 days', now())",
    )
    .execute(pool)
    .await
    .unwrap();
    assert_eq!(run_due(pool, &config, later).await.unwrap().fallbacks, 1);
    assert_eq!(run_due(pool, &config, later).await.unwrap().fallbacks, 0);
    let actions: Vec<String> = audit(pool, "beta")
        .await
        .into_iter()
        .map(|(a, _, _)| a)
        .collect();
    assert_eq!(
        actions,
        [
            "create",
            "trial_expired",
            "create",
            "replace",
            "create",
            "cancel",
            "create",
            "cancel"
        ]
    );
}

#[tokio::test]
async fn finance_reads_subscriptions_by_plan_trials_cancellations_and_recurring_revenue() {
    let db = fresh_database().await;
    let pool = &db.pool;
    seed(pool).await;
    let reason = ops("test");
    for customer in ["a", "b", "c"] {
        subscriptions::create(pool, &monthly(customer, "PRO"), &reason)
            .await
            .unwrap();
    }
    subscriptions::create(
        pool,
        &NewSubscription {
            term: Term::Year,
            ..monthly("d", "ENTERPRISE")
        },
        &reason,
    )
    .await
    .unwrap();
    subscriptions::create(
        pool,
        &NewSubscription {
            trial_end: Some(Utc::now() + TimeDelta::days(7)),
            ..monthly("e", "PRO")
        },
        &reason,
    )
    .await
    .unwrap();
    let c = subscriptions::live_subscription(pool, "c")
        .await
        .unwrap()
        .unwrap();
    subscriptions::cancel(pool, c.id, When::Now, None, &reason)
        .await
        .unwrap();

    let today: (i64, i64) = sqlx::query_as(
        "SELECT active, trialing FROM finance_subscriptions_daily
         WHERE day = (now() AT TIME ZONE 'UTC')::date AND plan = 'PRO'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(today, (2, 1));
    let events: (i64, i64, i64) = sqlx::query_as(
        "SELECT started, trials_started, cancellations FROM finance_subscription_events_daily
         WHERE day = (now() AT TIME ZONE 'UTC')::date AND plan = 'PRO'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(events, (4, 1, 1));
    let revenue: Vec<(String, String, i64, Decimal, Decimal)> = sqlx::query_as(
        "SELECT plan, currency, paying_subscriptions, mrr, arr FROM finance_mrr_daily
         WHERE day = (now() AT TIME ZONE 'UTC')::date ORDER BY plan",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let d = |text: &str| text.parse::<Decimal>().unwrap();
    assert_eq!(
        revenue,
        [
            ("ENTERPRISE".into(), "usd".into(), 1, d("100"), d("1200")),
            ("PRO".into(), "usd".into(), 2, d("98"), d("1176")),
        ]
    );
}

#[tokio::test]
async fn subscribing_in_stripe_replaces_the_fallback_and_a_stripe_deletion_leads_to_it() {
    use tally_billing::events::{
        SameSecond, StripeEvent, StripePrice, StripeSubscription, WebhookEffect,
    };
    use tally_billing::stripe::apply_webhook;
    let db = fresh_database().await;
    let pool = &db.pool;
    seed(pool).await;
    sqlx::query(
        "INSERT INTO stripe_customers (customer_id, stripe_customer_id) VALUES ('acme', 'cus_1')",
    )
    .execute(pool)
    .await
    .unwrap();
    let reason = ops("test");
    let free = subscriptions::create(pool, &monthly("acme", "PRO"), &reason)
        .await
        .unwrap();
    subscriptions::cancel(pool, free.id, When::Now, Some("FREE"), &reason)
        .await
        .unwrap();
    let on_fallback = subscriptions::live_subscription(pool, "acme")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(on_fallback.source, Source::Fallback);

    // Stripe's clock has whole seconds.
    let now = DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap();
    let event = |id: &str, status: &str, deleted: bool, seconds: i64| {
        let created = now + TimeDelta::seconds(seconds);
        (
            StripeEvent {
                id: id.into(),
                event_type: "customer.subscription.updated".into(),
                created,
                livemode: false,
                payload: "{}".into(),
            },
            WebhookEffect::Subscription(StripeSubscription {
                id: "sub_1".into(),
                stripe_customer: "cus_1".into(),
                status: status.into(),
                current_period_start: now,
                current_period_end: now + TimeDelta::days(30),
                cancel_at_period_end: false,
                prices: vec![StripePrice {
                    id: "price_pro".into(),
                    tally_plan: Some("PRO".into()),
                }],
                deleted,
                checkout_id: None,
            }),
        )
    };
    let (created, effect) = event("evt_1", "active", false, 0);
    apply_webhook(pool, &created, &effect, SameSecond::ByStatus)
        .await
        .unwrap();
    let live = subscriptions::live_subscription(pool, "acme")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((live.source, live.plan.as_str()), (Source::Stripe, "PRO"));
    let replaced = subscriptions::get(pool, on_fallback.id).await.unwrap();
    assert_eq!(replaced.status, Status::Canceled);

    let (deleted, effect) = event("evt_2", "canceled", true, 10);
    apply_webhook(pool, &deleted, &effect, SameSecond::ByStatus)
        .await
        .unwrap();
    let ended = subscriptions::get(pool, live.id).await.unwrap();
    assert_eq!(
        (ended.status, ended.ended_at),
        (Status::Canceled, Some(deleted.created))
    );
    let run = run_due(pool, &fallback(Some("FREE")), Utc::now())
        .await
        .unwrap();
    assert_eq!(run.fallbacks, 1);
    let back = subscriptions::live_subscription(pool, "acme")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (back.source, back.plan.as_str()),
        (Source::Fallback, "FREE")
    );
}

/// One customer whose renewal Postgres refuses (planted with a trigger, as data no one
/// foresaw would be) is set aside in `customer_errors` and tried again later; every other
/// subscription renews. Fixed, it renews at its next try.
#[tokio::test]
async fn a_subscription_that_cannot_renew_is_set_aside_and_the_others_renew() {
    let db = fresh_database().await;
    let pool = &db.pool;
    seed(pool).await;
    let reason = ops("test");
    let mut ids = Vec::new();
    for customer in ["a-bad", "b-good", "c-good"] {
        let created = subscriptions::create(pool, &monthly(customer, "FREE"), &reason)
            .await
            .unwrap();
        anchor_at(pool, created.id, at(2026, 1, 1), at(2026, 2, 1)).await;
        ids.push(created.id);
    }
    sqlx::query(
        "CREATE FUNCTION refuse_bad() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.customer_id = 'a-bad' THEN
                 RAISE EXCEPTION 'planted' USING ERRCODE = '22023';
             END IF;
             RETURN NEW;
         END $$",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("CREATE TRIGGER refuse_bad BEFORE UPDATE ON subscriptions FOR EACH ROW EXECUTE FUNCTION refuse_bad()")
        .execute(pool)
        .await
        .unwrap();
    let now = at(2026, 3, 15);
    let run = run_due(pool, &fallback(None), now).await.unwrap();
    assert_eq!((run.transitions, run.failed), (4, 1), "{run:?}");
    for id in &ids[1..] {
        let renewed = subscriptions::get(pool, *id).await.unwrap();
        assert_eq!(renewed.current_period_end, at(2026, 4, 1));
    }
    let set_aside: Vec<(String, String, String)> =
        sqlx::query_as("SELECT stage, customer_id, error FROM customer_errors")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(set_aside.len(), 1, "{set_aside:?}");
    assert_eq!(
        (set_aside[0].0.as_str(), set_aside[0].1.as_str()),
        ("subscriptions", "a-bad")
    );
    assert!(set_aside[0].2.contains("planted"), "{set_aside:?}");
    // Not tried again before its retry is due.
    let again = run_due(pool, &fallback(None), now).await.unwrap();
    assert_eq!((again.transitions, again.failed), (0, 0), "{again:?}");
    // Fixed and due: renewed, and forgotten.
    sqlx::query("DROP TRIGGER refuse_bad ON subscriptions")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("UPDATE customer_errors SET retry_at = now() - interval '1 second'")
        .execute(pool)
        .await
        .unwrap();
    let retried = run_due(pool, &fallback(None), now).await.unwrap();
    assert_eq!((retried.transitions, retried.failed), (2, 0), "{retried:?}");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM customer_errors")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
}

/// A plan change that would leave a customer's override without a meaning is refused where it
/// is made: `plans apply`, creating a subscription, changing its plan (now or at the period's
/// end). Once the override is changed, the same change goes through.
#[tokio::test]
async fn plan_changes_that_an_override_does_not_fit_are_refused() {
    let db = fresh_database().await;
    let pool = &db.pool;
    seed(pool).await;
    sqlx::query("INSERT INTO meters (name, aggregation, stripe_event_name) VALUES ('tokens', 'sum', 'tokens')")
        .execute(pool)
        .await
        .unwrap();
    let reason = ops("test");
    let acme = subscriptions::create(pool, &monthly("acme", "FREE"), &reason)
        .await
        .unwrap();
    // An override that raises FREE's api_calls limit: it needs a plan that limits api_calls.
    let overrides = bigger_api_calls();
    tally_billing::store::set_override(pool, "acme", &overrides, "a bigger allowance", "ops")
        .await
        .unwrap();
    // ENTERPRISE does not limit api_calls: moving acme there, now or later, is refused.
    for when in [When::Now, When::PeriodEnd] {
        let refused = subscriptions::change_plan(pool, acme.id, "ENTERPRISE", when, &reason)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), "OVERRIDE_CONFLICT", "{refused}");
        assert!(
            refused
                .to_string()
                .contains("does not fit plan \"ENTERPRISE\""),
            "{refused}"
        );
    }
    // A plan rewritten under the override: the whole apply is refused, nothing changes.
    #[derive(serde::Deserialize)]
    struct File {
        plans: Vec<PlanDefinition>,
    }
    let mut plans = toml::from_str::<File>(PLANS).unwrap().plans;
    plans[0].limits.clear(); // FREE without its api_calls limit
    let refused = apply_plans(pool, &plans, "ops").await.unwrap_err();
    assert!(
        matches!(
            refused,
            BillingStoreError::OverridesDoNotFit { count: 1, .. }
        ),
        "{refused}"
    );
    assert!(refused.to_string().contains("acme on FREE"), "{refused}");
    let stored: serde_json::Value =
        sqlx::query_scalar("SELECT definition FROM plans WHERE name = 'FREE'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert!(
        stored["limits"]["api_calls"].is_object(),
        "unchanged: {stored}"
    );
    // A customer with such an override cannot be subscribed to a plan it does not fit.
    tally_billing::store::set_override(pool, "beta", &overrides, "a bigger allowance", "ops")
        .await
        .unwrap();
    let refused = subscriptions::create(pool, &monthly("beta", "ENTERPRISE"), &reason)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), "OVERRIDE_CONFLICT", "{refused}");
    // The override changed first, the change goes through.
    tally_billing::store::delete_override(pool, "acme", "fits now", "ops")
        .await
        .unwrap();
    subscriptions::change_plan(pool, acme.id, "ENTERPRISE", When::Now, &reason)
        .await
        .unwrap();
}

/// Creating a subscription and cancelling one (now) for the same customer take their locks in
/// the same order: the customer's lock, then the rows. In the other order (row, then lock) a
/// create holding the customer's lock and waiting for the live row deadlocked with a cancel
/// holding the row and waiting for the lock; Postgres killed one (an API 503).
#[tokio::test]
async fn create_and_cancel_now_for_one_customer_never_deadlock() {
    let db = fresh_database().await;
    let pool = &db.pool;
    seed(pool).await;
    let reason = ops("test");
    let live = subscriptions::create(pool, &monthly("acme", "FREE"), &reason)
        .await
        .unwrap();
    // A create in flight: it holds acme's lock and is about to read acme's live row.
    let mut create = hold_customer_lock(pool, "acme").await;
    let cancel = {
        let pool = pool.clone();
        let reason = reason.clone();
        tokio::spawn(async move {
            subscriptions::cancel(&pool, live.id, When::Now, Some("FREE"), &reason).await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // The create reads the live row for update, as `create` does next.
    let row: Option<(i64,)> = sqlx::query_as(
        "SELECT subscription_id FROM subscriptions
         WHERE customer_id = 'acme' AND status IN ('active', 'trialing') FOR UPDATE",
    )
    .fetch_optional(&mut *create)
    .await
    .expect("no deadlock: the cancel waits for the customer's lock before locking the row");
    assert_eq!(row, Some((live.id,)));
    create.commit().await.unwrap();
    let canceled = cancel
        .await
        .unwrap()
        .expect("the cancel goes through after the create");
    assert_eq!(canceled.status, Status::Canceled);
}

/// Before: `stripe_webhook_events` and `stripe_meter_error_reports` grew for ever. Rows older
/// than the retention go, in chunks; newer ones stay.
#[tokio::test]
async fn webhook_events_and_meter_error_reports_are_kept_for_the_retention_only() {
    let db = fresh_database().await;
    let pool = &db.pool;
    sqlx::query(
        "INSERT INTO stripe_webhook_events (event_id, type, created, livemode, outcome, payload, received_at)
         SELECT 'evt_' || i, 'invoice.paid', now() - make_interval(days => d), false, 'applied', '{}'::jsonb,
                now() - make_interval(days => d)
         FROM generate_series(1, 25000) i, LATERAL (SELECT CASE WHEN i <= 24990 THEN 100 ELSE 1 END AS d) age",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO stripe_meter_error_reports (event_id, type, created, livemode)
         VALUES ('evtmr_old', 'v1.billing.meter.no_meter_found', now() - interval '100 days', false),
                ('evtmr_new', 'v1.billing.meter.no_meter_found', now() - interval '1 day', false)",
    )
    .execute(pool)
    .await
    .unwrap();
    let cutoff = Utc::now() - TimeDelta::days(90);
    let deleted = tally_billing::stripe::delete_expired_webhook_events(pool, cutoff)
        .await
        .unwrap();
    assert_eq!(deleted, 24_990 + 1);
    let kept: Vec<String> = sqlx::query_scalar(
        "SELECT event_id FROM stripe_webhook_events UNION ALL SELECT event_id FROM stripe_meter_error_reports ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(kept.len(), 11, "{kept:?}");
    assert!(kept.contains(&"evtmr_new".to_owned()));
}

/// Before: the fallback sweep locked a canceled subscription's row, then waited for its
/// customer's lock, while a Stripe webhook for that subscription held the customer's lock and
/// waited for the row: a deadlock, one side aborted. Now the sweep takes the customer's lock
/// first (only if free) and leaves a busy customer to its next run.
#[tokio::test]
async fn the_fallback_sweep_and_a_webhook_never_deadlock() {
    let db = fresh_database().await;
    let pool = &db.pool;
    seed(pool).await;
    let reason = ops("test");
    let live = subscriptions::create(pool, &monthly("acme", "PRO"), &reason)
        .await
        .unwrap();
    subscriptions::cancel(pool, live.id, When::Now, None, &reason)
        .await
        .unwrap();
    sqlx::query("UPDATE subscriptions SET fallback_checked_at = NULL WHERE subscription_id = $1")
        .bind(live.id)
        .execute(pool)
        .await
        .unwrap();
    // A webhook in flight: it holds acme's lock and is about to lock the subscription's row.
    let mut webhook = hold_customer_lock(pool, "acme").await;
    let sweep = {
        let pool = pool.clone();
        tokio::spawn(async move { run_due(&pool, &fallback(Some("FREE")), Utc::now()).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    sqlx::query("SET LOCAL lock_timeout = '2s'")
        .execute(&mut *webhook)
        .await
        .unwrap();
    sqlx::query("SELECT 1 FROM subscriptions WHERE subscription_id = $1 FOR UPDATE")
        .bind(live.id)
        .execute(&mut *webhook)
        .await
        .expect("the sweep holds no row it waits on the customer for");
    webhook.commit().await.unwrap();
    let run = sweep.await.unwrap().unwrap();
    assert_eq!(
        (run.fallbacks, run.failed),
        (0, 0),
        "acme was busy: left to the next run"
    );
    let run = run_due(pool, &fallback(Some("FREE")), Utc::now())
        .await
        .unwrap();
    assert_eq!(run.fallbacks, 1, "the next run puts acme on the fallback");
}

/// Before: an override was checked against the customer's plan outside any lock, so an
/// override and a plan change made at once could each fit the other's old state and leave
/// the customer with an override its plan cannot take (every check then 409). Now the
/// override is checked under the customer's lock, which plan changes hold while they check.
#[tokio::test]
async fn an_override_and_a_plan_change_at_once_cannot_both_win() {
    let db = fresh_database().await;
    let pool = &db.pool;
    seed(pool).await;
    let reason = ops("test");
    let acme = subscriptions::create(pool, &monthly("acme", "FREE"), &reason)
        .await
        .unwrap();
    // A plan change in flight: it holds acme's lock, found no override, and moves acme to
    // ENTERPRISE (which does not limit api_calls).
    let mut change = hold_customer_lock(pool, "acme").await;
    let set = set_override_meanwhile(pool);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    sqlx::query("UPDATE subscriptions SET plan = 'ENTERPRISE' WHERE subscription_id = $1")
        .bind(acme.id)
        .execute(&mut *change)
        .await
        .unwrap();
    change.commit().await.unwrap();
    let refused = set.await.unwrap().unwrap_err();
    assert!(
        matches!(refused, BillingStoreError::OverrideDoesNotFit { ref plan, .. } if plan == "ENTERPRISE"),
        "{refused}"
    );
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM customer_overrides")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(stored, 0);
}

/// Before: a customer set aside by the scheduler whose subscription then ended (canceled by
/// hand) was never due again, so its `customer_errors` row stayed, and `tally status` flagged
/// it for ever. Now a set-aside customer with nothing left to advance is forgotten.
#[tokio::test]
async fn a_set_aside_customer_with_nothing_left_to_advance_is_forgotten() {
    let db = fresh_database().await;
    let pool = &db.pool;
    seed(pool).await;
    let reason = ops("test");
    let acme = subscriptions::create(pool, &monthly("acme", "FREE"), &reason)
        .await
        .unwrap();
    // Due, and set aside (its retry a minute away); and a customer with no subscription.
    sqlx::query("UPDATE subscriptions SET current_period_end = now() - interval '1 day', current_period_start = now() - interval '31 days' WHERE subscription_id = $1")
        .bind(acme.id)
        .execute(pool)
        .await
        .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    for customer in ["acme", "gone"] {
        tally_db::customer_errors::record(&mut conn, "subscriptions", customer, "planted")
            .await
            .unwrap();
    }
    drop(conn);
    let left = || async {
        sqlx::query_scalar::<_, String>("SELECT customer_id FROM customer_errors ORDER BY 1")
            .fetch_all(pool)
            .await
            .unwrap()
    };
    let run = run_due(pool, &fallback(None), Utc::now()).await.unwrap();
    assert_eq!(run.transitions, 0, "not retried before its time");
    assert_eq!(
        left().await,
        ["acme"],
        "kept while due; a customer with nothing due is forgotten"
    );
    // Canceled meanwhile: it would never be due again, so it is forgotten.
    subscriptions::cancel(pool, acme.id, When::Now, None, &reason)
        .await
        .unwrap();
    run_due(pool, &fallback(None), Utc::now()).await.unwrap();
    assert!(left().await.is_empty());
}

/// Before: an override read its plan's definition without a lock, so a `plans apply` changing
/// the plan at the same moment (and finding no override to check) and the override (checked
/// against the plan as it was) both went through. Now the override reads the plan FOR SHARE:
/// it waits for the apply and checks the plan as written.
#[tokio::test]
async fn an_override_and_a_plans_apply_at_once_cannot_both_win() {
    let db = fresh_database().await;
    let pool = &db.pool;
    seed(pool).await;
    let reason = ops("test");
    subscriptions::create(pool, &monthly("acme", "FREE"), &reason)
        .await
        .unwrap();
    // A plans apply in flight: FREE loses its api_calls limit; it found no override.
    let mut apply = pool.begin().await.unwrap();
    sqlx::query("UPDATE plans SET definition = definition - 'limits' WHERE name = 'FREE'")
        .execute(&mut *apply)
        .await
        .unwrap();
    let set = set_override_meanwhile(pool);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    apply.commit().await.unwrap();
    let refused = set.await.unwrap().unwrap_err();
    assert!(
        matches!(refused, BillingStoreError::OverrideDoesNotFit { ref plan, .. } if plan == "FREE"),
        "{refused}"
    );
}
