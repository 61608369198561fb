//! Credits against Postgres: idempotent grants, the draw order, expiry, voids, the burn
//! exactly once with burners racing, plan grants each period, and the ledger's integrity.

use chrono::{DateTime, TimeDelta, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;
use tally_credits::queue::{enqueue, CountedUsage};
use tally_credits::{
    balance, burn_once, grant, ledger, settle, void, Actor, CreditError, GrantKind, LedgerPage,
    NewGrant, RateCard, RateDefinition,
};
use tally_db::testing::fresh_database;

fn d(text: &str) -> Decimal {
    text.parse().unwrap()
}

fn actor() -> Actor {
    Actor::new("ops", "a test").unwrap()
}

fn new_grant(customer: &str, kind: GrantKind, amount: &str, key: &str) -> NewGrant {
    NewGrant {
        customer: customer.into(),
        kind,
        amount: d(amount),
        priority: None,
        effective_at: Some(Utc::now() - TimeDelta::hours(1)),
        expires_at: (kind != GrantKind::Purchased).then(|| Utc::now() + TimeDelta::days(30)),
        idempotency_key: key.into(),
        description: None,
    }
}

async fn rates(pool: &PgPool) -> RateCard {
    let rates = [
        RateDefinition {
            meter: "tokens".into(),
            credits_per_unit: d("0.001"),
            dimensions: Default::default(),
        },
        RateDefinition {
            meter: "tokens".into(),
            credits_per_unit: d("0.01"),
            dimensions: [("model".to_string(), "large".to_string())].into(),
        },
    ];
    tally_credits::rates::record(pool, &rates).await.unwrap();
    RateCard::load(pool).await.unwrap()
}

async fn queue(pool: &PgPool, customer: &str, group_key: &str, at: DateTime<Utc>, quantity: &str) {
    let mut tx = pool.begin().await.unwrap();
    enqueue(
        &mut tx,
        &[CountedUsage {
            customer,
            meter: "tokens",
            group_key,
            window_start: at,
            quantity: d(quantity),
        }],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

async fn burn_all(pool: &PgPool, rates: &RateCard) {
    while burn_once(pool, rates).await.unwrap().1 {}
}

fn minute(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(at.timestamp() - at.timestamp().rem_euclid(60), 0).unwrap()
}

/// The ledger and the grants agree: each grant's remaining is its entries' sum.
async fn assert_ledger_matches_grants(pool: &PgPool) {
    let mismatched: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM credit_grants g
         WHERE g.remaining <> (SELECT sum(amount) FROM credit_transactions t WHERE t.grant_id = g.grant_id)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(
        mismatched, 0,
        "every grant's remaining is the sum of its ledger entries"
    );
}

#[tokio::test]
async fn the_same_top_up_sent_twice_is_one_grant() {
    let db = fresh_database().await;
    let top_up = new_grant("acme", GrantKind::Purchased, "100", "order-42");
    let first = grant(&db.pool, &top_up, &actor()).await.unwrap();
    assert!(first.created);
    let again = grant(&db.pool, &top_up, &actor()).await.unwrap();
    assert!(!again.created);
    assert_eq!(again.grant.grant_id, first.grant.grant_id);

    // Sent concurrently (a client retrying on a timeout): still one grant.
    let mut racing = tokio::task::JoinSet::new();
    let retried = new_grant("acme", GrantKind::Purchased, "50", "order-43");
    for _ in 0..8 {
        let pool = db.pool.clone();
        let top_up = retried.clone();
        racing.spawn(async move { grant(&pool, &top_up, &actor()).await.unwrap().created });
    }
    let created = racing.join_all().await.into_iter().filter(|c| *c).count();
    assert_eq!(created, 1);

    let other = NewGrant {
        amount: d("101"),
        ..top_up
    };
    match grant(&db.pool, &other, &actor()).await {
        Err(error @ CreditError::IdempotencyConflict { .. }) => {
            assert_eq!(error.code(), "IDEMPOTENCY_CONFLICT")
        }
        other => panic!("{other:?}"),
    }
    // Another customer may use the same key.
    assert!(
        grant(
            &db.pool,
            &new_grant("globex", GrantKind::Purchased, "1", "order-42"),
            &actor()
        )
        .await
        .unwrap()
        .created
    );
    let entries = ledger(&db.pool, "acme", LedgerPage::After(0), 100)
        .await
        .unwrap();
    assert_eq!(entries.iter().filter(|e| e.kind == "grant").count(), 2);
    let card = RateCard::default();
    assert_eq!(
        balance(&db.pool, "acme", &card, Utc::now())
            .await
            .unwrap()
            .available,
        d("150")
    );
}

#[tokio::test]
async fn what_is_refused_says_why() {
    let db = fresh_database().await;
    let cases = [
        (
            NewGrant {
                amount: d("0"),
                ..new_grant("acme", GrantKind::Purchased, "1", "k")
            },
            "more than 0",
        ),
        (
            NewGrant {
                amount: d("0.0000000001"),
                ..new_grant("acme", GrantKind::Purchased, "1", "k")
            },
            "9 decimal places",
        ),
        (
            NewGrant {
                expires_at: None,
                ..new_grant("acme", GrantKind::Promotional, "1", "k")
            },
            "needs expires_at",
        ),
        (
            NewGrant {
                expires_at: Some(Utc::now() - TimeDelta::days(1)),
                ..new_grant("acme", GrantKind::Promotional, "1", "k")
            },
            "in the future",
        ),
        (
            NewGrant {
                priority: Some(-1),
                ..new_grant("acme", GrantKind::Purchased, "1", "k")
            },
            "priority",
        ),
        (
            NewGrant {
                idempotency_key: String::new(),
                ..new_grant("acme", GrantKind::Purchased, "1", "k")
            },
            "idempotency_key",
        ),
        (
            NewGrant {
                customer: "bad\u{0}id".into(),
                ..new_grant("acme", GrantKind::Purchased, "1", "k")
            },
            "customer",
        ),
    ];
    for (new, says) in cases {
        let error = grant(&db.pool, &new, &actor()).await.unwrap_err();
        assert_eq!(error.code(), "INVALID_GRANT", "{error}");
        assert!(error.to_string().contains(says), "{error}");
    }
    assert!(matches!(
        Actor::new("ops", " "),
        Err(CreditError::ReasonRequired)
    ));
}

#[tokio::test]
async fn grants_are_drawn_by_kind_then_priority_and_usage_beyond_them_is_uncovered() {
    let db = fresh_database().await;
    let card = rates(&db.pool).await;
    for (kind, amount, key) in [
        (GrantKind::Promotional, "5", "promo"),
        (GrantKind::Subscription, "5", "plan"),
        (GrantKind::Purchased, "5", "bought"),
    ] {
        grant(&db.pool, &new_grant("acme", kind, amount, key), &actor())
            .await
            .unwrap();
    }
    // A promotional grant with an explicit priority goes first of all.
    let first = NewGrant {
        priority: Some(1),
        ..new_grant("acme", GrantKind::Promotional, "1", "vip")
    };
    grant(&db.pool, &first, &actor()).await.unwrap();
    let now = minute(Utc::now());
    // 1 + 5 + 2 credits: the vip grant, all the purchased, two of the subscription's.
    queue(&db.pool, "acme", "", now, "8000").await;
    burn_all(&db.pool, &card).await;
    let balance_now = balance(&db.pool, "acme", &card, Utc::now()).await.unwrap();
    let left: Vec<(GrantKind, Decimal)> = balance_now
        .grants
        .iter()
        .map(|g| (g.kind, g.remaining))
        .collect();
    assert_eq!(
        left,
        vec![
            (GrantKind::Promotional, d("0")),
            (GrantKind::Purchased, d("0")),
            (GrantKind::Subscription, d("3")),
            (GrantKind::Promotional, d("5")),
        ]
    );
    // The large model costs ten times as much: 10,000 tokens are 100 credits; 8 are covered.
    queue(&db.pool, "acme", r#"{"model":"large"}"#, now, "10000").await;
    burn_all(&db.pool, &card).await;
    let after = balance(&db.pool, "acme", &card, Utc::now()).await.unwrap();
    assert_eq!(after.available, d("0"));
    assert_eq!(after.uncovered, d("92"));
    let consumed = ledger(&db.pool, "acme", LedgerPage::After(0), 100)
        .await
        .unwrap();
    let large: Vec<_> = consumed
        .iter()
        .filter(|e| e.group_key.as_deref() == Some(r#"{"model":"large"}"#))
        .collect();
    assert_eq!(
        large.iter().map(|e| e.quantity.unwrap()).sum::<Decimal>(),
        d("10000"),
        "the shares add up to the window's usage"
    );
    assert_eq!(large.last().unwrap().grant_id, None, "the uncovered rest");
    assert_ledger_matches_grants(&db.pool).await;

    // A customer who never had credits leaves no entries.
    queue(&db.pool, "nobody", "", now, "1000").await;
    burn_all(&db.pool, &card).await;
    assert!(ledger(&db.pool, "nobody", LedgerPage::After(0), 10)
        .await
        .unwrap()
        .is_empty());
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM credit_usage_queue")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(queued, 0);
}

#[tokio::test]
async fn racing_burners_burn_every_window_exactly_once() {
    let db = fresh_database().await;
    let card = rates(&db.pool).await;
    grant(
        &db.pool,
        &new_grant("acme", GrantKind::Purchased, "1000000", "big"),
        &actor(),
    )
    .await
    .unwrap();
    grant(
        &db.pool,
        &new_grant("globex", GrantKind::Purchased, "3", "small"),
        &actor(),
    )
    .await
    .unwrap();
    let start = minute(Utc::now()) - TimeDelta::minutes(30);
    let mut expected_acme = Decimal::ZERO;
    for i in 0..3000i64 {
        let at = start + TimeDelta::minutes(i % 30);
        let customer = if i % 3 == 0 { "globex" } else { "acme" };
        let quantity = Decimal::from(i % 97 + 1);
        if customer == "acme" {
            expected_acme += quantity * d("0.001");
        }
        queue(&db.pool, customer, "", at, &quantity.to_string()).await;
    }
    let mut burners = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let pool = db.pool.clone();
        let card = card.clone();
        burners.spawn(async move { burn_all(&pool, &card).await });
    }
    burners.join_all().await;
    let acme = balance(&db.pool, "acme", &card, Utc::now()).await.unwrap();
    assert_eq!(acme.available, d("1000000") - expected_acme);
    let globex = balance(&db.pool, "globex", &card, Utc::now())
        .await
        .unwrap();
    assert_eq!(globex.available, d("0"));
    assert!(globex.uncovered > Decimal::ZERO);
    assert_ledger_matches_grants(&db.pool).await;
    // Every queued unit is accounted for once: covered plus uncovered is the usage.
    let total: Decimal = sqlx::query_scalar::<_, Decimal>(
        "SELECT sum(quantity) FROM credit_transactions WHERE kind = 'consume'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let queued: Decimal = (0..3000i64).map(|i| Decimal::from(i % 97 + 1)).sum();
    assert_eq!(total, queued);
}

#[tokio::test]
async fn expiry_waits_for_earlier_usage_then_expires_the_rest_and_voids_are_final() {
    let db = fresh_database().await;
    let card = rates(&db.pool).await;
    let now = Utc::now();
    let expires = minute(now) - TimeDelta::minutes(2);
    let promo = NewGrant {
        effective_at: Some(expires - TimeDelta::days(1)),
        expires_at: Some(now + TimeDelta::seconds(1)),
        ..new_grant("acme", GrantKind::Promotional, "10", "promo")
    };
    let promo = grant(&db.pool, &promo, &actor()).await.unwrap().grant;
    // Pretend it expired two minutes ago (no API makes a grant expire in the past).
    sqlx::query("UPDATE credit_grants SET expires_at = $1 WHERE grant_id = $2")
        .bind(expires)
        .bind(promo.grant_id)
        .execute(&db.pool)
        .await
        .unwrap();
    let bought = grant(
        &db.pool,
        &new_grant("acme", GrantKind::Purchased, "10", "bought"),
        &actor(),
    )
    .await
    .unwrap()
    .grant;
    // Usage from before the expiry is still queued: the promo grant is not closed yet.
    queue(
        &db.pool,
        "acme",
        "",
        expires - TimeDelta::minutes(1),
        "4000",
    )
    .await;
    settle(&db.pool, Utc::now()).await.unwrap();
    assert_eq!(
        tally_credits::get_grant(&db.pool, "acme", promo.grant_id)
            .await
            .unwrap()
            .closed_as,
        None
    );
    // Burned: the purchased grant goes first (4), then the expiry closes the promo grant (10 left).
    queue(
        &db.pool,
        "acme",
        "",
        expires + TimeDelta::minutes(1),
        "1000",
    )
    .await;
    burn_all(&db.pool, &card).await;
    let settled = settle(&db.pool, Utc::now()).await.unwrap();
    assert_eq!(settled.expired, 1);
    let entries = ledger(&db.pool, "acme", LedgerPage::After(0), 100)
        .await
        .unwrap();
    let expire: Vec<_> = entries.iter().filter(|e| e.kind == "expire").collect();
    assert_eq!((expire.len(), expire[0].amount), (1, d("-10")));
    assert_eq!(
        balance(&db.pool, "acme", &card, Utc::now())
            .await
            .unwrap()
            .available,
        d("5")
    );
    // Usage after the expiry never draws from the expired grant; a late event from before it
    // draws from what is open.
    queue(
        &db.pool,
        "acme",
        "",
        expires - TimeDelta::minutes(1),
        "1000",
    )
    .await;
    burn_all(&db.pool, &card).await;
    assert_eq!(
        balance(&db.pool, "acme", &card, Utc::now())
            .await
            .unwrap()
            .available,
        d("4")
    );

    let voided = void(&db.pool, "acme", bought.grant_id, &actor())
        .await
        .unwrap();
    assert_eq!(
        (voided.remaining, voided.closed_as.as_deref()),
        (d("0"), Some("voided"))
    );
    let again = void(&db.pool, "acme", bought.grant_id, &actor())
        .await
        .unwrap_err();
    assert_eq!(again.code(), "GRANT_CLOSED");
    let missing = void(&db.pool, "globex", bought.grant_id, &actor())
        .await
        .unwrap_err();
    assert_eq!(missing.code(), "NO_SUCH_GRANT");
    let entries = ledger(&db.pool, "acme", LedgerPage::After(0), 100)
        .await
        .unwrap();
    assert_eq!(entries.last().unwrap().amount, d("-4"));
    assert_eq!(entries.last().unwrap().kind, "void");
    assert_ledger_matches_grants(&db.pool).await;

    // Paging.
    let first_two = ledger(&db.pool, "acme", LedgerPage::After(0), 2)
        .await
        .unwrap();
    let rest = ledger(
        &db.pool,
        "acme",
        LedgerPage::After(first_two[1].transaction_id),
        100,
    )
    .await
    .unwrap();
    assert_eq!(first_two.len() + rest.len(), entries.len());

    // Append-only.
    for statement in [
        "UPDATE credit_transactions SET amount = 0",
        "DELETE FROM credit_transactions",
    ] {
        let error = sqlx::query(statement).execute(&db.pool).await.unwrap_err();
        assert!(error.to_string().contains("append-only"), "{error}");
    }
}

#[tokio::test]
async fn plans_grant_their_credits_once_per_period() {
    let db = fresh_database().await;
    sqlx::query(
        "INSERT INTO plans (name, definition) VALUES
           ('PRO', '{\"features\":{},\"limits\":{},\"credits\":{\"amount\":\"1000\"}}'),
           ('FREE', '{\"features\":{},\"limits\":{}}')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let start =
        DateTime::from_timestamp_micros((Utc::now() - TimeDelta::days(3)).timestamp_micros())
            .unwrap();
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO subscriptions (customer_id, plan, status, current_period_start,
                current_period_end, billing_anchor, started_at, status_since)
         VALUES ('acme', 'PRO', 'active', $1, $2, $1, $1, $1),
                ('globex', 'FREE', 'active', $1, $2, $1, $1, $1)
         RETURNING subscription_id",
    )
    .bind(start)
    .bind(start + TimeDelta::days(30))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    for _ in 0..3 {
        settle(&db.pool, Utc::now()).await.unwrap();
    }
    let card = RateCard::default();
    let acme = balance(&db.pool, "acme", &card, Utc::now()).await.unwrap();
    assert_eq!(acme.grants.len(), 1);
    assert_eq!(
        (acme.grants[0].kind, acme.grants[0].amount),
        (GrantKind::Subscription, d("1000"))
    );
    assert_eq!(acme.grants[0].expires_at, Some(start + TimeDelta::days(30)));
    assert_eq!(acme.grants[0].subscription_id, Some(id));
    assert!(balance(&db.pool, "globex", &card, Utc::now())
        .await
        .unwrap()
        .grants
        .is_empty());
    // The next period: a new grant; the old one expires at its end.
    sqlx::query("UPDATE subscriptions SET current_period_start = now() - interval '1 minute', current_period_end = now() + interval '30 days' WHERE customer_id = 'acme'")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE credit_grants SET expires_at = now() - interval '1 minute'")
        .execute(&db.pool)
        .await
        .unwrap();
    let settled = settle(&db.pool, Utc::now()).await.unwrap();
    assert_eq!((settled.expired, settled.plan_grants.len()), (1, 1));
    let acme = balance(&db.pool, "acme", &card, Utc::now()).await.unwrap();
    assert_eq!(acme.available, d("1000"));
    assert_ledger_matches_grants(&db.pool).await;
}

#[tokio::test]
async fn the_balance_counts_usage_not_burned_yet() {
    let db = fresh_database().await;
    let card = rates(&db.pool).await;
    grant(
        &db.pool,
        &new_grant("acme", GrantKind::Purchased, "10", "k"),
        &actor(),
    )
    .await
    .unwrap();
    queue(&db.pool, "acme", "", minute(Utc::now()), "3000").await;
    let before = balance(&db.pool, "acme", &card, Utc::now()).await.unwrap();
    assert_eq!(
        (before.available, before.pending, before.projected),
        (d("10"), d("3"), d("7"))
    );
    let projected =
        tally_credits::projected_balances(&db.pool, &["acme", "globex"], &card, Utc::now())
            .await
            .unwrap();
    assert_eq!(projected["acme"], d("7"));
    assert_eq!(projected["globex"], d("0"));
    burn_all(&db.pool, &card).await;
    let after = balance(&db.pool, "acme", &card, Utc::now()).await.unwrap();
    assert_eq!(
        (after.available, after.pending, after.projected),
        (d("7"), d("0"), d("7"))
    );
}

/// Subscriptions whose period started on a fraction of a second of .5 or more (as the API's
/// default start, `now`, often does) stayed "due" their plan grant for ever when the key was
/// built twice (rounded in SQL, truncated in Rust); with no order and a limit of 1,000 they
/// starved newly due subscriptions. One definition of the key, an ordered due query visited
/// page by page: a thousand such subscriptions and a new one are all granted once.
#[tokio::test]
async fn a_thousand_fractional_period_starts_and_a_new_subscription_are_all_granted_once() {
    let db = fresh_database().await;
    sqlx::query(
        "INSERT INTO plans (name, definition) VALUES
           ('PRO', '{\"features\":{},\"limits\":{},\"credits\":{\"amount\":\"100\"}}')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO subscriptions (customer_id, plan, status, current_period_start,
                current_period_end, billing_anchor, started_at, status_since)
         SELECT 'c' || i, 'PRO', 'active', s, s + interval '30 days', s, s, s
         FROM generate_series(1, 1000) AS i,
              LATERAL (SELECT date_trunc('second', now()) - interval '3 days'
                              + interval '750 milliseconds' + i * interval '1 second' AS s) AS t",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let settled = settle(&db.pool, Utc::now()).await.unwrap();
    assert_eq!(settled.plan_grants.len(), 1000);
    // A new subscription, newer than all of them.
    sqlx::query(
        "INSERT INTO subscriptions (customer_id, plan, status, current_period_start,
                current_period_end, billing_anchor, started_at, status_since)
         VALUES ('newcomer', 'PRO', 'active', now() - interval '1 second' + interval '600 milliseconds',
                 now() + interval '30 days', now(), now(), now())",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let settled = settle(&db.pool, Utc::now()).await.unwrap();
    assert_eq!(settled.plan_grants, ["newcomer"]);
    // Nothing is due any more, and every customer has exactly one grant.
    let settled = settle(&db.pool, Utc::now()).await.unwrap();
    assert!(settled.plan_grants.is_empty());
    let due: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM subscriptions s WHERE NOT EXISTS (
             SELECT 1 FROM credit_grants g WHERE g.customer_id = s.customer_id
               AND g.idempotency_key = plan_grant_key(s.subscription_id, s.current_period_start))",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(due, 0);
    let grants: Vec<(i64,)> = sqlx::query_as(
        "SELECT count(*) FROM credit_grants GROUP BY customer_id HAVING count(*) <> 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(grants.is_empty(), "{grants:?}");
    let newcomer = balance(&db.pool, "newcomer", &RateCard::default(), Utc::now())
        .await
        .unwrap();
    assert_eq!(newcomer.available, d("100"));
    // An operator's grant may not take a plan grant's key.
    let taken = grant(
        &db.pool,
        &new_grant("other", GrantKind::Purchased, "5", "plan:99999:1800000000"),
        &actor(),
    )
    .await
    .unwrap_err();
    assert_eq!(taken.code(), "INVALID_GRANT");
    assert!(
        taken.to_string().contains("reserved for plan grants"),
        "{taken}"
    );
}

/// One subscription whose plan grant cannot be made (its plan's amount is not a decimal) is
/// set aside in `customer_errors` and tried again later; the others are granted.
#[tokio::test]
async fn a_plan_grant_that_cannot_be_made_is_set_aside_and_the_others_are_granted() {
    let db = fresh_database().await;
    sqlx::query(
        "INSERT INTO plans (name, definition) VALUES
           ('PRO', '{\"features\":{},\"limits\":{},\"credits\":{\"amount\":\"100\"}}'),
           ('BROKEN', '{\"features\":{},\"limits\":{},\"credits\":{\"amount\":\"lots\"}}')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO subscriptions (customer_id, plan, status, current_period_start,
                current_period_end, billing_anchor, started_at, status_since)
         VALUES ('a-broken', 'BROKEN', 'active', now() - interval '1 day', now() + interval '29 days', now(), now(), now()),
                ('b-fine', 'PRO', 'active', now() - interval '1 day', now() + interval '29 days', now(), now(), now())",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let settled = settle(&db.pool, Utc::now()).await.unwrap();
    assert_eq!(settled.plan_grants, ["b-fine"]);
    let set_aside: Vec<(String, String, String)> =
        sqlx::query_as("SELECT stage, customer_id, error FROM customer_errors")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(set_aside.len(), 1, "{set_aside:?}");
    assert_eq!(
        (set_aside[0].0.as_str(), set_aside[0].1.as_str()),
        ("plan_credits", "a-broken")
    );
    assert!(set_aside[0].2.contains("is not a decimal"), "{set_aside:?}");
    // Not tried again before its retry is due; fixed, it is granted and forgotten.
    assert!(settle(&db.pool, Utc::now())
        .await
        .unwrap()
        .plan_grants
        .is_empty());
    sqlx::query("UPDATE plans SET definition = jsonb_set(definition, '{credits,amount}', '\"7\"') WHERE name = 'BROKEN'")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE customer_errors SET retry_at = now() - interval '1 second'")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        settle(&db.pool, Utc::now()).await.unwrap().plan_grants,
        ["a-broken"]
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM customer_errors")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
}

/// Before: a grant's remaining with more digits than a decimal keeps (a rate of 1e-9 on a
/// quantity of 1e-9 leaves 18 fraction digits on 11 integer ones) was read rounded up, the
/// burner drew the rounded amount, the grant's check refused the one statement holding every
/// customer's entries, and burning stopped for everyone on every pass. Now it is read rounded
/// toward zero (the dust below stays on the grant), and entries Postgres refuses for any
/// reason set aside their customer alone.
#[tokio::test]
async fn a_grant_rounded_in_rust_or_entries_postgres_refuses_stop_no_one_else() {
    let db = fresh_database().await;
    let rates = rates(&db.pool).await;
    for (customer, amount) in [
        ("a-rounded", "99999999999"),
        ("b-refused", "100"),
        ("c-good", "100"),
    ] {
        grant(
            &db.pool,
            &new_grant(customer, GrantKind::Purchased, amount, "top-up"),
            &actor(),
        )
        .await
        .unwrap();
    }
    // What a 1e-9 rate on a 1e-9 quantity leaves: 18 fraction digits.
    sqlx::query(
        "INSERT INTO credit_transactions (customer_id, grant_id, kind, amount, actor)
         SELECT customer_id, grant_id, 'void', -0.000000000000000001, 'test'
         FROM credit_grants WHERE customer_id = 'a-rounded'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    // Postgres refuses b-refused's entries (any cause: here a planted constraint).
    sqlx::query(
        "ALTER TABLE credit_transactions ADD CONSTRAINT test_refuses_b
         CHECK (customer_id <> 'b-refused' OR kind <> 'consume') NOT VALID",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let at = minute(Utc::now()) - TimeDelta::minutes(5);
    queue(&db.pool, "a-rounded", "", at, "100000000000000").await; // costs more than it holds
    queue(&db.pool, "b-refused", "", at, "1000").await;
    queue(&db.pool, "c-good", "", at, "1000").await;
    burn_all(&db.pool, &rates).await;

    let good = balance(&db.pool, "c-good", &rates, Utc::now())
        .await
        .unwrap();
    assert_eq!(good.available, d("99"));
    // a-rounded drew all but the dust below a decimal's last digit; the rest is uncovered.
    let (left, uncovered): (Decimal, Decimal) = sqlx::query_as(
        "SELECT (SELECT remaining FROM credit_grants WHERE customer_id = 'a-rounded'),
                (SELECT -sum(amount) FROM credit_transactions
                 WHERE customer_id = 'a-rounded' AND kind = 'consume' AND grant_id IS NULL)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(left, d("0.000000000000000009"));
    assert_eq!(uncovered, d("1.00000000000000001"));
    let set_aside: Vec<(String, String)> = sqlx::query_as(
        "SELECT customer_id, stuck FROM credit_usage_queue WHERE stuck IS NOT NULL ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        set_aside,
        [(
            "b-refused".to_owned(),
            "Postgres refused its ledger entries".to_owned()
        )]
    );
    let errors: Vec<String> =
        sqlx::query_scalar("SELECT customer_id FROM customer_errors ORDER BY 1")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(errors, ["b-refused"]);
    assert_ledger_matches_grants(&db.pool).await;
}

/// One customer whose grant holds more than a decimal can is set aside (its queued usage
/// kept, marked, and a `customer_errors` row); every other customer's usage is burned. Once
/// fixed, it is burned at its next try.
#[tokio::test]
async fn a_customer_whose_grant_cannot_be_read_is_set_aside_and_the_others_burn() {
    let db = fresh_database().await;
    let rates = rates(&db.pool).await;
    for customer in ["a-bad", "b-good"] {
        grant(
            &db.pool,
            &new_grant(customer, GrantKind::Purchased, "100", "top-up"),
            &actor(),
        )
        .await
        .unwrap();
    }
    let at = minute(Utc::now()) - TimeDelta::minutes(5);
    queue(&db.pool, "a-bad", "", at, "1000").await;
    queue(&db.pool, "b-good", "", at, "1000").await;
    // Planted through the ledger (remaining follows it): a grant entry beyond a decimal.
    sqlx::query("UPDATE credit_grants SET amount = 1e41 WHERE customer_id = 'a-bad'")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO credit_transactions (customer_id, grant_id, kind, amount, actor)
         SELECT customer_id, grant_id, 'grant', 1e40, 'test' FROM credit_grants WHERE customer_id = 'a-bad'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    burn_all(&db.pool, &rates).await;
    let good = balance(&db.pool, "b-good", &rates, Utc::now())
        .await
        .unwrap();
    assert_eq!(good.available, d("99"));
    let stuck: Vec<(String, String)> =
        sqlx::query_as("SELECT customer_id, stuck FROM credit_usage_queue WHERE stuck IS NOT NULL")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        stuck,
        [(
            "a-bad".to_owned(),
            "a grant's remaining credits are beyond a 28-digit decimal (or more digits than it keeps)".to_owned()
        )]
    );
    let set_aside: Vec<(String, String)> =
        sqlx::query_as("SELECT stage, customer_id FROM customer_errors")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(set_aside, [("credits".to_owned(), "a-bad".to_owned())]);
    // Fixed and due again: burned, and forgotten.
    sqlx::query(
        "INSERT INTO credit_transactions (customer_id, grant_id, kind, amount, actor)
         SELECT customer_id, grant_id, 'void', -1e40, 'test' FROM credit_grants WHERE customer_id = 'a-bad'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("UPDATE credit_grants SET amount = 100 WHERE customer_id = 'a-bad'")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE customer_errors SET retry_at = now() - interval '1 second'")
        .execute(&db.pool)
        .await
        .unwrap();
    burn_all(&db.pool, &rates).await;
    burn_all(&db.pool, &rates).await;
    let bad = balance(&db.pool, "a-bad", &rates, Utc::now())
        .await
        .unwrap();
    assert_eq!(bad.available, d("99"));
    let left: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM customer_errors), (SELECT count(*) FROM credit_usage_queue)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(left, (0, 0));
}

/// A grant's remaining is its ledger's sum by construction: it moves with each entry written,
/// and cannot be changed otherwise.
#[tokio::test]
async fn remaining_follows_the_ledger_and_nothing_else() {
    let db = fresh_database().await;
    let granted = grant(
        &db.pool,
        &new_grant("acme", GrantKind::Purchased, "100", "first"),
        &actor(),
    )
    .await
    .unwrap();
    assert_eq!(granted.grant.remaining, d("100"));
    let refused = sqlx::query("UPDATE credit_grants SET remaining = 5")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("follows the ledger"),
        "{refused}"
    );
    let refused = sqlx::query(
        "INSERT INTO credit_grants (customer_id, kind, amount, remaining, effective_at, idempotency_key, granted_by, reason)
         VALUES ('acme', 'purchased', 10, 10, now(), 'sneaky', 'x', 'y')",
    )
    .execute(&db.pool)
    .await
    .unwrap_err();
    assert!(
        refused.to_string().contains("starts at remaining = 0"),
        "{refused}"
    );
    // An entry moves it (here a correction an operator would record).
    sqlx::query(
        "INSERT INTO credit_transactions (customer_id, grant_id, kind, amount, actor, reason)
         VALUES ('acme', $1, 'void', -30, 'ops', 'a correction')",
    )
    .bind(granted.grant.grant_id)
    .execute(&db.pool)
    .await
    .unwrap();
    let left = balance(&db.pool, "acme", &RateCard::default(), Utc::now())
        .await
        .unwrap();
    assert_eq!(left.available, d("70"));
    let voided = void(&db.pool, "acme", granted.grant.grant_id, &actor())
        .await
        .unwrap();
    assert_eq!(voided.remaining, Decimal::ZERO);
    assert_ledger_matches_grants(&db.pool).await;
}

/// Before: a customer whose plan grant was set aside kept its `customer_errors` row for ever
/// once nothing was due any more (its subscription canceled, its plan without credits): only
/// a successful grant cleared it. Now a set-aside customer with no grant due is forgotten.
#[tokio::test]
async fn a_set_aside_plan_grant_with_nothing_left_to_grant_is_forgotten() {
    let db = fresh_database().await;
    let mut conn = db.pool.acquire().await.unwrap();
    tally_db::customer_errors::record(&mut conn, "plan_credits", "gone", "planted")
        .await
        .unwrap();
    drop(conn);
    settle(&db.pool, Utc::now()).await.unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM customer_errors")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
}
