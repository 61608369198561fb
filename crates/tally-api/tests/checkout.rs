//! Self-serve billing end to end against the stripe-emulator: prices created and checked
//! (`tally plans sync --create`), Checkout for a plan and for a credit pack through the API,
//! paid on the emulator's page the way a customer pays, Stripe's signed events delivered to
//! `/v1/webhooks/stripe` (in order, twice, and in reverse), refunds, the billing portal and
//! invoices.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use stripe_emulator::testing::{call, control};
use stripe_emulator::{signature_header, Emulator, EmulatorConfig};
use tally_api::{
    router, Access, ApiState, ApiToken, RateLimits, Scope, SelfServe, ServeConfig, StripeWebhook,
};
use tally_billing::catalog;
use tally_billing::PlanDefinition;
use tally_core::config::Secret;
use tally_core::MeterDefinition;
use tally_credits::CreditPack;
use tally_quota::Quota;
use tower::ServiceExt;

const KEY: &str = "sk_test_tally";
const SECRET: &str = "whsec_checkout_test";
const ADMIN: &str = "admin-token-0123456789abcdef";
const ACME: &str = "acme-token-0123456789abcdef0";
const BETA: &str = "beta-token-0123456789abcdef0";

struct Harness {
    db: tally_db::testing::TestDatabase,
    emulator: Emulator,
    app: axum::Router,
    state: Arc<ApiState>,
    stripe: tally_sink::StripeHttp,
    stripe_customer: String,
}

fn meters() -> Vec<MeterDefinition> {
    tally_core::meter::meters_from_toml(
        r#"
        [[meters]]
        name = "api_calls"
        aggregation = "sum"
        "#,
    )
    .unwrap()
}

fn plans() -> Vec<PlanDefinition> {
    serde_json::from_value(json!([
        { "name": "FREE", "limits": { "api_calls": { "limit": "100", "period": "day" } } },
        { "name": "PRO", "self_serve": true,
          "price": { "amount": "49.00", "currency": "usd", "interval": "month" },
          "limits": { "api_calls": { "limit": "10000", "period": "billing_period", "unit_price": "0.002" } } },
        { "name": "ENTERPRISE",
          "price": { "amount": "999.00", "currency": "usd", "interval": "month" } },
    ]))
    .unwrap()
}

fn packs() -> Vec<CreditPack> {
    serde_json::from_value(json!([
        { "name": "small", "credits": "1000", "price": { "amount": "10.00", "currency": "usd" } },
        { "name": "unsold", "credits": "5", "price": { "amount": "1.00", "currency": "usd" }, "stripe_price": "price_nonexistent" },
    ]))
    .unwrap()
}

impl Harness {
    /// tally's API over a fresh database, an emulator with the plans' and packs' prices made by
    /// `create_missing` and recorded, the customer `acme` mapped, and (when `deliver`) the
    /// emulator's webhook endpoint pointing at tally.
    async fn start(deliver: bool) -> Harness {
        let db = tally_db::testing::fresh_database().await;
        tally_db::meters::record(&db.pool, &meters()).await.unwrap();
        // Stripe's test mode takes 25 calls a second; these tests make more.
        let config = EmulatorConfig {
            test_rate_per_second: 1000,
            ..EmulatorConfig::default()
        };
        let emulator = Emulator::start("127.0.0.1:0".parse().unwrap(), config)
            .await
            .unwrap();
        let stripe = tally_sink::StripeHttp::new(&tally_sink::StripeConfig {
            api_base: emulator.url(),
            secret_key: Secret::new(KEY),
            ..Default::default()
        })
        .unwrap();
        post(
            &emulator,
            "/v1/billing/meters",
            &[
                ("display_name", "API calls".into()),
                ("event_name", "api_calls".into()),
                ("default_aggregation[formula]", "sum".into()),
            ],
        )
        .await;
        tally_billing::apply_plans(&db.pool, &plans(), "test")
            .await
            .unwrap();
        // Only the packs with no stripe_price of their own are created.
        let created = catalog::create_missing(&stripe, &plans(), &packs(), &meters())
            .await
            .unwrap();
        assert_eq!(
            created.prices,
            [
                "tally_plan_PRO",
                "tally_plan_PRO_api_calls",
                "tally_plan_ENTERPRISE",
                "tally_pack_small"
            ]
        );
        let again = catalog::create_missing(&stripe, &plans(), &packs(), &meters())
            .await
            .unwrap();
        assert!(again.prices.is_empty(), "idempotent: {:?}", again.prices);
        let checked = catalog::check(&stripe, &plans(), &packs()[..1], &meters())
            .await
            .unwrap();
        assert!(checked.problems.is_empty(), "{:?}", checked.problems);
        assert_eq!(checked.not_for_sale, ["plan \"FREE\""]);
        catalog::record(&db.pool, &checked.prices).await.unwrap();

        let stripe_customer = post(&emulator, "/v1/customers", &[("name", "acme".into())]).await
            ["id"]
            .as_str()
            .unwrap()
            .to_owned();
        sqlx::query(
            "INSERT INTO stripe_customers (customer_id, stripe_customer_id) VALUES ('acme', $1)",
        )
        .bind(&stripe_customer)
        .execute(&db.pool)
        .await
        .unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let webhook_url = format!(
            "http://{}/v1/webhooks/stripe",
            listener.local_addr().unwrap()
        );
        let secret = if deliver {
            let endpoint = post(&emulator, "/v1/webhook_endpoints", &[("url", webhook_url)]).await;
            endpoint["secret"].as_str().unwrap().to_owned()
        } else {
            SECRET.to_owned()
        };
        let tokens = [
            ApiToken::new("ops", Scope::Admin, None, ADMIN),
            ApiToken::new("acme", Scope::Customer, Some("acme"), ACME),
            ApiToken::new("beta", Scope::Customer, Some("beta"), BETA),
        ];
        let state = Arc::new(ApiState {
            fallback_plan: None,
            alert_destinations: Default::default(),
            billing: SelfServe {
                stripe: Some(stripe.clone()),
                packs: packs(),
                return_origins: Vec::new(),
                livemode: false,
                page_origins: Vec::new(),
            },
            pipeline: Default::default(),
            quota: Quota::new(db.pool.clone(), Duration::from_secs(3600))
                .await
                .unwrap(),
            pool: db.pool.clone(),
            reader_pool: db.pool.clone(),
            access: Access::new(&tokens, &RateLimits::default()),
            metrics: None,
            emitter: None,
            stripe_webhook: Some(StripeWebhook {
                secret: Secret::new(secret),
                livemode: false,
                stripe: Some(stripe.clone()),
            }),
        });
        let app = router(state.clone(), &ServeConfig::default());
        let served = app.clone();
        tokio::spawn(async move { axum::serve(listener, served).await });
        Harness {
            db,
            emulator,
            app,
            state,
            stripe,
            stripe_customer,
        }
    }

    async fn api(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {token}"));
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        let request = request
            .body(body.map_or(Body::empty(), |b| Body::from(b.to_string())))
            .unwrap();
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// Waits until every event so far reached tally and was answered 2xx.
    async fn delivered(&self) {
        for _ in 0..400 {
            if self.emulator.events().iter().all(|e| e.delivered) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("not delivered: {:?}", self.emulator.events());
    }

    /// Sends an event's body to tally signed with [`SECRET`], as Stripe would.
    async fn deliver(&self, body: &str) -> (StatusCode, Value) {
        let now = chrono::Utc::now().timestamp();
        let request = Request::post("/v1/webhooks/stripe")
            .header("stripe-signature", signature_header(SECRET, now, body))
            .header("content-type", "application/json")
            .body(Body::from(body.to_owned()))
            .unwrap();
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn balance(&self) -> Decimal {
        let rates = tally_credits::RateCard::load(&self.db.pool).await.unwrap();
        tally_credits::balance(&self.db.pool, "acme", &rates, chrono::Utc::now())
            .await
            .unwrap()
            .available
    }

    async fn grants(&self) -> Vec<(String, Decimal, Option<String>)> {
        sqlx::query_as(
            "SELECT idempotency_key, amount, closed_as FROM credit_grants WHERE customer_id = 'acme' ORDER BY grant_id",
        )
        .fetch_all(&self.db.pool)
        .await
        .unwrap()
    }

    async fn pack_checkout(&self) -> String {
        let (status, opened) = self
            .api(
                "POST",
                "/v1/customers/acme/credits/checkout",
                ACME,
                Some(json!({ "pack": "small", "success_url": "https://app.example.com/ok", "cancel_url": "https://app.example.com/back" })),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{opened}");
        opened["id"].as_str().unwrap().to_owned()
    }
}

async fn post(emulator: &Emulator, path: &str, form: &[(&str, String)]) -> Value {
    let answer = call(emulator.addr(), "POST", path, Some(KEY), form, None)
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{path}: {}", answer.body);
    answer.body
}

async fn pay(emulator: &Emulator, session: &str, payment: &str) -> Value {
    let paid = control(
        emulator.addr(),
        &format!("checkout/{session}/complete"),
        &json!({ "payment": payment }),
    )
    .await
    .unwrap();
    assert_eq!(paid.status, 200, "{}", paid.body);
    paid.body
}

#[tokio::test]
async fn a_credit_pack_is_bought_granted_once_and_refunded() {
    let h = Harness::start(true).await;
    let session = h.pack_checkout().await;
    let (page_status, page) = {
        let answer = call(
            h.emulator.addr(),
            "GET",
            &format!("/_emulator/checkout/{session}"),
            None,
            &[],
            None,
        )
        .await
        .unwrap();
        (answer.status, answer.headers["content-type"].clone())
    };
    assert_eq!(page_status, 200, "the Checkout page answers");
    assert!(page.to_str().unwrap().starts_with("text/html"));
    assert_eq!(h.balance().await, Decimal::ZERO, "nothing before payment");

    let paid = pay(&h.emulator, &session, "card").await;
    h.delivered().await;
    assert_eq!(h.balance().await, Decimal::from(1000));
    let grants = h.grants().await;
    assert_eq!(
        grants,
        [(format!("checkout:{session}"), Decimal::from(1000), None)]
    );
    // The ledger names the session and the payment.
    let reason: String = sqlx::query_scalar(
        "SELECT reason FROM credit_transactions WHERE customer_id = 'acme' AND kind = 'grant'",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    let intent = paid["payment_intent"].as_str().unwrap();
    assert!(
        reason.contains(&session) && reason.contains(intent),
        "{reason}"
    );

    // Every event delivered again: nothing granted twice.
    h.redeliver_all().await;
    assert_eq!(h.grants().await.len(), 1);
    assert_eq!(h.balance().await, Decimal::from(1000));

    // 300 of the credits used (usage priced at a credit a call, burned as the burner does).
    tally_credits::rates::record(
        &h.db.pool,
        &[tally_credits::RateDefinition {
            meter: "api_calls".into(),
            credits_per_unit: Decimal::ONE,
            dimensions: Default::default(),
        }],
    )
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO credit_usage_queue (customer_id, meter, group_key, window_start, quantity)
         VALUES ('acme', 'api_calls', '', date_trunc('minute', now()), 300)",
    )
    .execute(&h.db.pool)
    .await
    .unwrap();
    let rates = tally_credits::RateCard::load(&h.db.pool).await.unwrap();
    tally_credits::burn_once(&h.db.pool, &rates).await.unwrap();
    assert_eq!(h.balance().await, Decimal::from(700));

    // A refund voids what is left, with the reason; what was used stays used.
    post(
        &h.emulator,
        "/v1/refunds",
        &[("payment_intent", intent.to_owned())],
    )
    .await;
    h.delivered().await;
    assert_eq!(h.balance().await, Decimal::ZERO);
    let (consumed, voided): (Decimal, Decimal) = sqlx::query_as(
        "SELECT -sum(amount) FILTER (WHERE kind = 'consume'), -sum(amount) FILTER (WHERE kind = 'void')
         FROM credit_transactions WHERE customer_id = 'acme'",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert_eq!((consumed, voided), (Decimal::from(300), Decimal::from(700)));
    assert_eq!(h.grants().await[0].2.as_deref(), Some("voided"));
    let void_reason: String = sqlx::query_scalar(
        "SELECT reason FROM credit_transactions WHERE customer_id = 'acme' AND kind = 'void'",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert!(void_reason.contains("refunded in Stripe"), "{void_reason}");
}

impl Harness {
    /// Every event so far delivered once more, and answered, before this returns.
    async fn redeliver_all(&self) {
        let before = self.emulator.events();
        for event in &before {
            self.emulator_resend(&event.id).await;
        }
        for _ in 0..400 {
            let now = self.emulator.events();
            if before
                .iter()
                .zip(&now)
                .all(|(b, n)| n.attempts > b.attempts && n.last_status == 200)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("not delivered again: {:?}", self.emulator.events());
    }

    async fn emulator_resend(&self, event: &str) {
        let answer = control(
            self.emulator.addr(),
            &format!("events/{event}/resend"),
            &json!({}),
        )
        .await
        .unwrap();
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
}

#[tokio::test]
async fn pack_events_in_reverse_order_twice_grant_nothing_that_was_refunded() {
    // No endpoint: the test delivers the emulator's events itself, last first, twice.
    let h = Harness::start(false).await;
    let session = h.pack_checkout().await;
    let paid = pay(&h.emulator, &session, "card").await;
    let intent = paid["payment_intent"].as_str().unwrap().to_owned();
    post(&h.emulator, "/v1/refunds", &[("payment_intent", intent)]).await;
    let events = h.emulator.events();
    for _ in 0..2 {
        for event in events.iter().rev() {
            let (status, answer) = h.deliver(&event.body).await;
            assert_eq!(status, StatusCode::OK, "{}: {answer}", event.event_type);
        }
    }
    assert_eq!(
        h.balance().await,
        Decimal::ZERO,
        "refunded before it was seen paid"
    );
    assert!(h.grants().await.is_empty(), "{:?}", h.grants().await);
    let status: String = sqlx::query_scalar("SELECT status FROM checkout_sessions")
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
    assert_eq!(status, "refunded");

    // In order, the same payment grants (a second session, paid, not refunded).
    let second = h.pack_checkout().await;
    pay(&h.emulator, &second, "async").await;
    control(
        h.emulator.addr(),
        &format!("checkout/{second}/async_payment"),
        &json!({ "succeeded": true }),
    )
    .await
    .unwrap();
    let fresh: Vec<_> = h.emulator.events().into_iter().skip(events.len()).collect();
    // The completion (unpaid) and the success, in either order and twice: one grant.
    for event in fresh.iter().rev().chain(fresh.iter()) {
        let (status, answer) = h.deliver(&event.body).await;
        assert_eq!(status, StatusCode::OK, "{}: {answer}", event.event_type);
    }
    assert_eq!(h.balance().await, Decimal::from(1000));
    assert_eq!(h.grants().await.len(), 1);
}

#[tokio::test]
async fn sessions_tally_did_not_open_grant_nothing() {
    let h = Harness::start(false).await;
    // A payment session opened in Stripe directly (another product of the merchant's, or a
    // forged metadata): paid, and delivered to tally.
    let price = catalog::prices_of(&h.db.pool, None, Some("small"))
        .await
        .unwrap()[0]
        .price_id
        .clone();
    let foreign = post(
        &h.emulator,
        "/v1/checkout/sessions",
        &[
            ("mode", "payment".into()),
            ("customer", h.stripe_customer.clone()),
            ("line_items[0][price]", price),
            ("line_items[0][quantity]", "1".into()),
            ("success_url", "https://example.com/".into()),
            ("metadata[tally_checkout_id]", "not-a-checkout-id".into()),
            ("metadata[tally_pack]", "small".into()),
        ],
    )
    .await;
    pay(&h.emulator, foreign["id"].as_str().unwrap(), "card").await;
    for event in h.emulator.events() {
        let (status, answer) = h.deliver(&event.body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
    }
    assert!(h.grants().await.is_empty());
    let outcome: String = sqlx::query_scalar(
        "SELECT outcome FROM stripe_webhook_events WHERE type = 'checkout.session.completed'",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert_eq!(outcome, "not_tallys");

    // A session of tally's paid by another Stripe customer than the one recorded.
    let session = h.pack_checkout().await;
    let other = post(&h.emulator, "/v1/customers", &[("name", "mallory".into())]).await;
    let mut forged: Value = serde_json::from_str(
        &h.emulator
            .events()
            .iter()
            .find(|e| e.event_type == "checkout.session.completed")
            .unwrap()
            .body,
    )
    .unwrap();
    forged["id"] = json!("evt_forged_1");
    forged["data"]["object"]["id"] = json!(session);
    forged["data"]["object"]["customer"] = other["id"].clone();
    let (status, answer) = h.deliver(&forged.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["outcome"], "refused");
    assert!(h.grants().await.is_empty());
}

#[tokio::test]
async fn checkout_refuses_what_it_cannot_sell_and_who_may_not_buy() {
    let h = Harness::start(false).await;
    let urls = json!({ "success_url": "https://app.example.com/ok", "cancel_url": "https://app.example.com/back" });
    let with = |extra: Value| {
        let mut body = urls.clone();
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        Some(body)
    };
    for (path, token, body, status, code) in [
        (
            "/v1/customers/acme/credits/checkout",
            ACME,
            with(json!({ "pack": "huge" })),
            404,
            "UNKNOWN_PACK",
        ),
        (
            "/v1/customers/acme/credits/checkout",
            ACME,
            with(json!({ "pack": "unsold" })),
            409,
            "PACK_NOT_FOR_SALE",
        ),
        (
            "/v1/customers/acme/checkout",
            ACME,
            with(json!({ "plan": "NOPE" })),
            404,
            "UNKNOWN_PLAN",
        ),
        (
            "/v1/customers/acme/checkout",
            ADMIN,
            with(json!({ "plan": "FREE" })),
            409,
            "PLAN_NOT_FOR_SALE",
        ),
        (
            "/v1/customers/acme/checkout",
            ACME,
            with(json!({ "plan": "ENTERPRISE" })),
            403,
            "NOT_SELF_SERVE",
        ),
        (
            "/v1/customers/acme/checkout",
            BETA,
            with(json!({ "plan": "PRO" })),
            403,
            "FORBIDDEN",
        ),
        (
            "/v1/customers/beta/checkout",
            BETA,
            with(json!({ "plan": "PRO" })),
            409,
            "NO_STRIPE_CUSTOMER",
        ),
        (
            "/v1/customers/acme/credits/checkout",
            ACME,
            Some(
                json!({ "pack": "small", "success_url": "http://app.example.com/ok", "cancel_url": "https://app.example.com/" }),
            ),
            400,
            "INVALID_RETURN_URL",
        ),
        (
            "/v1/customers/acme/billing-portal",
            ACME,
            Some(json!({ "return_url": "javascript:alert(1)" })),
            400,
            "INVALID_RETURN_URL",
        ),
    ] {
        let (got, answer) = h.api("POST", path, token, body).await;
        assert_eq!(
            (got.as_u16(), answer["code"].as_str()),
            (status, Some(code)),
            "{path}: {answer}"
        );
    }
    // Nothing was opened in Stripe for any of them.
    let sessions: i64 = sqlx::query_scalar("SELECT count(*) FROM checkout_sessions")
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
    assert_eq!(sessions, 0);
    let _ = &h.stripe;
}

#[tokio::test]
async fn a_customer_moves_from_a_tally_plan_through_checkout_and_leaves_through_the_portal() {
    let h = Harness::start(true).await;
    // On FREE, managed by tally.
    tally_billing::testing::subscribe(
        &h.db.pool,
        "acme",
        "FREE",
        chrono::Utc::now() - chrono::TimeDelta::days(3),
    )
    .await;
    let (status, opened) = h
        .api(
            "POST",
            "/v1/customers/acme/checkout",
            ACME,
            Some(json!({ "plan": "PRO", "success_url": "https://app.example.com/ok", "cancel_url": "https://app.example.com/back" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{opened}");
    let session = opened["id"].as_str().unwrap();
    let paid = pay(&h.emulator, session, "card").await;
    h.delivered().await;
    let subscription = paid["subscription"].as_str().unwrap();
    // One live subscription: PRO from Stripe; FREE ended when PRO started.
    let live: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT plan, source, stripe_subscription_id FROM subscriptions
         WHERE customer_id = 'acme' AND status IN ('active', 'trialing')",
    )
    .fetch_all(&h.db.pool)
    .await
    .unwrap();
    assert_eq!(
        live,
        [(
            "PRO".to_owned(),
            "stripe".to_owned(),
            Some(subscription.to_owned())
        )]
    );
    let (free_end, pro_start): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as(
            "SELECT (SELECT ended_at FROM subscriptions WHERE plan = 'FREE'),
                (SELECT started_at FROM subscriptions WHERE plan = 'PRO')",
        )
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
    assert_eq!(free_end, pro_start, "no gap and no overlap of limits");
    let (_, entitlements) = h.state.quota.entitlements("acme").await.unwrap();
    assert_eq!(entitlements.plan, "PRO");

    // Usage in the period, billed on the same subscription at the period's end.
    let now = chrono::Utc::now().timestamp();
    post(
        &h.emulator,
        "/v1/billing/meter_events",
        &[
            ("event_name", "api_calls".into()),
            ("payload[stripe_customer_id]", h.stripe_customer.clone()),
            ("payload[value]", "2500".into()),
            ("timestamp", now.to_string()),
        ],
    )
    .await;

    // The customer cancels in Stripe's portal, at the period's end.
    let (status, portal) = h
        .api(
            "POST",
            "/v1/customers/acme/billing-portal",
            ACME,
            Some(json!({ "return_url": "https://app.example.com/account" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{portal}");
    let portal_id = portal["url"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    let canceled = control(
        h.emulator.addr(),
        &format!("portal/{portal_id}/cancel"),
        &json!({}),
    )
    .await
    .unwrap();
    assert_eq!(canceled.status, 200, "{}", canceled.body);
    h.delivered().await;
    let cancel_at_end: bool = sqlx::query_scalar(
        "SELECT cancel_at_period_end FROM subscriptions WHERE stripe_subscription_id = $1",
    )
    .bind(subscription)
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert!(cancel_at_end);
    control(
        h.emulator.addr(),
        &format!("subscriptions/{subscription}/advance_period"),
        &json!({}),
    )
    .await
    .unwrap();
    h.delivered().await;
    let status: String =
        sqlx::query_scalar("SELECT status FROM subscriptions WHERE stripe_subscription_id = $1")
            .bind(subscription)
            .fetch_one(&h.db.pool)
            .await
            .unwrap();
    assert_eq!(status, "canceled");

    // Two invoices: the first fee, and the last period's usage; with links that answer.
    let (status, page) = h
        .api("GET", "/v1/customers/acme/invoices", ACME, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let invoices = page["data"].as_array().unwrap();
    assert_eq!(invoices.len(), 2, "{page:#}");
    let last = &invoices[0];
    assert_eq!(last["status"], "paid");
    assert_eq!(last["total"], 500, "2,500 calls at 0.2 cents");
    assert_eq!(last["lines"][0]["meter"], "api_calls");
    assert_eq!(last["lines"][0]["quantity"], "2500");
    assert_eq!(invoices[1]["total"], 4900);
    let pdf = last["invoice_pdf"].as_str().unwrap();
    let path = &pdf[pdf.find("/_emulator/").unwrap()..];
    let answer = call(h.emulator.addr(), "GET", path, None, &[], None)
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.headers["content-type"], "application/pdf");
    // Paged, and one at a time by id; another customer's token sees none of it.
    let (_, first) = h
        .api("GET", "/v1/customers/acme/invoices?limit=1", ACME, None)
        .await;
    assert_eq!(first["has_more"], true);
    let after = first["data"][0]["id"].as_str().unwrap();
    let (_, second) = h
        .api(
            "GET",
            &format!("/v1/customers/acme/invoices?limit=1&starting_after={after}"),
            ACME,
            None,
        )
        .await;
    assert_eq!(second["data"][0]["id"], invoices[1]["id"]);
    assert_eq!(second["has_more"], false);
    let id = last["id"].as_str().unwrap();
    let (status, _) = h
        .api("GET", &format!("/v1/invoices/{id}"), ACME, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, answer) = h
        .api("GET", &format!("/v1/invoices/{id}"), BETA, None)
        .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("NO_SUCH_INVOICE"))
    );
    let (status, _) = h
        .api("GET", "/v1/customers/acme/invoices", BETA, None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

/// Review findings, each a test that failed on the first cut.
#[tokio::test]
async fn a_second_plan_checkout_is_refused_while_one_is_open_or_a_stripe_subscription_is_live() {
    let h = Harness::start(true).await;
    let body = Some(
        json!({ "plan": "PRO", "success_url": "https://app.example.com/ok", "cancel_url": "https://app.example.com/back" }),
    );
    let (status, first) = h
        .api("POST", "/v1/customers/acme/checkout", ACME, body.clone())
        .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    // Two open at once would make two subscriptions billing the same usage twice.
    let (status, answer) = h
        .api("POST", "/v1/customers/acme/checkout", ACME, body.clone())
        .await;
    assert_eq!(
        (status.as_u16(), answer["code"].as_str()),
        (409, Some("CHECKOUT_IN_PROGRESS")),
        "{answer}"
    );
    pay(&h.emulator, first["id"].as_str().unwrap(), "card").await;
    h.delivered().await;
    // Subscribed: a plan change goes through the portal, not a second subscription.
    let (status, answer) = h
        .api("POST", "/v1/customers/acme/checkout", ADMIN, body)
        .await;
    assert_eq!(
        (status.as_u16(), answer["code"].as_str()),
        (409, Some("ALREADY_SUBSCRIBED")),
        "{answer}"
    );
}

#[tokio::test]
async fn a_customer_token_cannot_replace_an_operator_assigned_plan_nor_open_sessions_without_end() {
    let h = Harness::start(false).await;
    tally_billing::testing::subscribe(&h.db.pool, "acme", "ENTERPRISE", chrono::Utc::now()).await;
    let body = Some(
        json!({ "plan": "PRO", "success_url": "https://app.example.com/ok", "cancel_url": "https://app.example.com/back" }),
    );
    let (status, answer) = h
        .api("POST", "/v1/customers/acme/checkout", ACME, body.clone())
        .await;
    assert_eq!(
        (status.as_u16(), answer["code"].as_str()),
        (403, Some("NOT_SELF_SERVE")),
        "{answer}"
    );
    let (status, answer) = h
        .api("POST", "/v1/customers/acme/checkout", ADMIN, body)
        .await;
    assert_eq!(status, StatusCode::OK, "an operator may: {answer}");
    // At most MAX_OPEN_SESSIONS a day per customer (the plan session counts).
    for _ in 1..tally_billing::checkout::MAX_OPEN_SESSIONS {
        h.pack_checkout().await;
    }
    let (status, answer) = h
        .api(
            "POST",
            "/v1/customers/acme/credits/checkout",
            ACME,
            Some(json!({ "pack": "small", "success_url": "https://app.example.com/ok", "cancel_url": "https://app.example.com/back" })),
        )
        .await;
    assert_eq!(
        (status.as_u16(), answer["code"].as_str()),
        (429, Some("TOO_MANY_OPEN_SESSIONS")),
        "{answer}"
    );
}

#[tokio::test]
async fn a_disputed_pack_is_voided_and_a_pack_changed_since_sync_is_not_sold() {
    let h = Harness::start(true).await;
    let session = h.pack_checkout().await;
    let paid = pay(&h.emulator, &session, "card").await;
    h.delivered().await;
    assert_eq!(h.balance().await, Decimal::from(1000));
    let intent = paid["payment_intent"].as_str().unwrap();
    let disputed = control(
        h.emulator.addr(),
        &format!("payments/{intent}/dispute"),
        &json!({}),
    )
    .await
    .unwrap();
    assert_eq!(disputed.status, 200, "{}", disputed.body);
    h.delivered().await;
    let outcomes: Vec<(String, String)> =
        sqlx::query_as("SELECT type, outcome FROM stripe_webhook_events ORDER BY received_at")
            .fetch_all(&h.db.pool)
            .await
            .unwrap();
    assert_eq!(
        h.balance().await,
        Decimal::ZERO,
        "a chargeback takes the credits back: {outcomes:?} {:?}",
        h.emulator.events()
    );
    let reason: String = sqlx::query_scalar(
        "SELECT reason FROM credit_transactions WHERE customer_id = 'acme' AND kind = 'void'",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert!(reason.starts_with("disputed in Stripe"), "{reason}");

    // tally.toml now sells the pack dearer, but Stripe was checked at the old price.
    let mut changed = packs()[0].clone();
    changed.credits = Decimal::from(5000);
    changed.price.amount = Decimal::from(40);
    let request = tally_billing::checkout::CheckoutRequest {
        customer: "acme",
        success_url: "https://app.example.com/ok",
        cancel_url: "https://app.example.com/back",
        requested_by: "test".into(),
        operator: true,
    };
    let error = tally_billing::checkout::checkout_pack(&h.db.pool, &h.stripe, &changed, &request)
        .await
        .unwrap_err();
    assert_eq!(error.code(), "PACK_NOT_FOR_SALE", "{error}");
}

#[tokio::test]
async fn a_refund_and_the_payments_completion_at_once_never_leave_the_pack_granted() {
    // No endpoint: the test delivers each pair at the same moment, many times over.
    let h = Harness::start(false).await;
    for _ in 0..8 {
        let session = h.pack_checkout().await;
        let paid = pay(&h.emulator, &session, "card").await;
        let intent = paid["payment_intent"].as_str().unwrap().to_owned();
        post(&h.emulator, "/v1/refunds", &[("payment_intent", intent)]).await;
    }
    let events = h.emulator.events();
    let completed: Vec<_> = events
        .iter()
        .filter(|e| e.event_type == "checkout.session.completed")
        .collect();
    let refunded: Vec<_> = events
        .iter()
        .filter(|e| e.event_type == "charge.refunded")
        .collect();
    assert_eq!(completed.len(), 8);
    for (completion, refund) in completed.iter().zip(&refunded) {
        let (a, b) = tokio::join!(h.deliver(&completion.body), h.deliver(&refund.body));
        assert_eq!(
            (a.0, b.0),
            (StatusCode::OK, StatusCode::OK),
            "{} {}",
            a.1,
            b.1
        );
    }
    assert_eq!(h.balance().await, Decimal::ZERO, "{:?}", h.grants().await);
}

#[tokio::test]
async fn a_plan_paid_whose_subscription_tally_has_not_seen_yet_blocks_a_second_checkout() {
    // Stripe does not deliver in order: the session's completion first, the subscription later.
    let h = Harness::start(false).await;
    let body = Some(
        json!({ "plan": "PRO", "success_url": "https://app.example.com/ok", "cancel_url": "https://app.example.com/back" }),
    );
    let (status, first) = h
        .api("POST", "/v1/customers/acme/checkout", ACME, body.clone())
        .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    pay(&h.emulator, first["id"].as_str().unwrap(), "card").await;
    let completed = h
        .emulator
        .events()
        .into_iter()
        .find(|e| e.event_type == "checkout.session.completed")
        .unwrap();
    let (status, answer) = h.deliver(&completed.body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (status, answer) = h
        .api("POST", "/v1/customers/acme/checkout", ADMIN, body)
        .await;
    assert_eq!(
        (status.as_u16(), answer["code"].as_str()),
        (409, Some("ALREADY_SUBSCRIBED")),
        "{answer}"
    );
}

/// Third review: a double click while Stripe is slow. The second request asks under the first's
/// idempotency key and Stripe answers 409; the record of the session the first opens must stay,
/// or its payment is never recognised and the customer pays a plan tally never grants.
#[tokio::test]
async fn a_double_click_while_stripe_is_slow_keeps_the_session_the_customer_pays() {
    let h = Harness::start(true).await;
    tally_billing::testing::subscribe(
        &h.db.pool,
        "acme",
        "FREE",
        chrono::Utc::now() - chrono::TimeDelta::days(3),
    )
    .await;
    h.emulator
        .set_faults(stripe_emulator::Faults {
            delay: 1.0,
            delay_ms: 1500,
            ..Default::default()
        })
        .unwrap();
    let body = Some(
        json!({ "plan": "PRO", "success_url": "https://app.example.com/ok", "cancel_url": "https://app.example.com/back" }),
    );
    let first = h.api("POST", "/v1/customers/acme/checkout", ACME, body.clone());
    let second = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        h.api("POST", "/v1/customers/acme/checkout", ACME, body.clone())
            .await
    };
    let ((status, opened), (second_status, second_answer)) = tokio::join!(first, second);
    assert_eq!(status, StatusCode::OK, "{opened}");
    assert_eq!(
        (second_status.as_u16(), second_answer["code"].as_str()),
        (409, Some("CHECKOUT_IN_PROGRESS")),
        "{second_answer}"
    );
    h.emulator.set_faults(Default::default()).unwrap();
    let session = opened["id"].as_str().unwrap();
    let recorded: Option<String> =
        sqlx::query_scalar("SELECT status FROM checkout_sessions WHERE session_id = $1")
            .bind(session)
            .fetch_optional(&h.db.pool)
            .await
            .unwrap();
    assert_eq!(recorded.as_deref(), Some("open"));
    let paid = pay(&h.emulator, session, "card").await;
    h.delivered().await;
    let outcome: String = sqlx::query_scalar(
        "SELECT outcome FROM stripe_webhook_events WHERE type = 'checkout.session.completed'",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert_eq!(outcome, "applied");
    let live: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT plan, source, stripe_subscription_id FROM subscriptions
         WHERE customer_id = 'acme' AND status IN ('active', 'trialing')",
    )
    .fetch_all(&h.db.pool)
    .await
    .unwrap();
    assert_eq!(
        live,
        [(
            "PRO".to_owned(),
            "stripe".to_owned(),
            paid["subscription"].as_str().map(str::to_owned)
        )]
    );
    let (status, answer) = h
        .api("POST", "/v1/customers/acme/checkout", ACME, body)
        .await;
    assert_eq!(
        (status.as_u16(), answer["code"].as_str()),
        (409, Some("ALREADY_SUBSCRIBED")),
        "{answer}"
    );
}

/// Third review: attempts Stripe answered with an error, or never answered (an outage), hold
/// nobody's url; once the outage is over they do not keep the customer out of Checkout.
#[tokio::test]
async fn sessions_lost_in_a_stripe_outage_do_not_lock_the_customer_out() {
    let h = Harness::start(false).await;
    let pack_body = || {
        Some(
            json!({ "pack": "small", "success_url": "https://app.example.com/ok", "cancel_url": "https://app.example.com/back" }),
        )
    };
    // Answered 500: Stripe keeps that answer under the key, so the attempt is closed at once.
    h.emulator
        .set_faults(stripe_emulator::Faults {
            error_500: 1.0,
            ..Default::default()
        })
        .unwrap();
    for _ in 0..tally_billing::checkout::MAX_OPEN_SESSIONS {
        let (status, answer) = h
            .api(
                "POST",
                "/v1/customers/acme/credits/checkout",
                ACME,
                pack_body(),
            )
            .await;
        assert_eq!(
            (status.as_u16(), answer["code"].as_str()),
            (503, Some("STRIPE_UNAVAILABLE")),
            "{answer}"
        );
    }
    h.emulator.set_faults(Default::default()).unwrap();
    h.pack_checkout().await;

    // Never answered (a timeout): Stripe may hold the session, so the attempt stays open and
    // counts, but only for a few minutes: nobody holds its url.
    let impatient = tally_sink::StripeHttp::new(&tally_sink::StripeConfig {
        api_base: h.emulator.url(),
        secret_key: Secret::new(KEY),
        request_timeout: Duration::from_millis(100),
        ..Default::default()
    })
    .unwrap();
    h.emulator
        .set_faults(stripe_emulator::Faults {
            delay: 1.0,
            delay_ms: 400,
            ..Default::default()
        })
        .unwrap();
    let request = tally_billing::checkout::CheckoutRequest {
        customer: "acme",
        success_url: "https://app.example.com/ok",
        cancel_url: "https://app.example.com/back",
        requested_by: "token:acme".into(),
        operator: false,
    };
    let pack = &packs()[0];
    let mut timed_out = 0;
    loop {
        match tally_billing::checkout::checkout_pack(&h.db.pool, &impatient, pack, &request).await {
            Err(tally_billing::checkout::CheckoutError::StripeUnavailable(_)) => timed_out += 1,
            Err(tally_billing::checkout::CheckoutError::TooManyOpenSessions(_)) => break,
            other => panic!("{other:?}"),
        }
        assert!(timed_out <= tally_billing::checkout::MAX_OPEN_SESSIONS);
    }
    assert_eq!(timed_out, tally_billing::checkout::MAX_OPEN_SESSIONS - 1);
    h.emulator.set_faults(Default::default()).unwrap();
    sqlx::query(
        "UPDATE checkout_sessions SET created_at = created_at - interval '6 minutes'
         WHERE session_id IS NULL",
    )
    .execute(&h.db.pool)
    .await
    .unwrap();
    h.pack_checkout().await;
}

/// Third review: a plan Checkout asked again after an error, with other return URLs (a page
/// that puts its state in them), was refused as "in progress" for half an hour.
#[tokio::test]
async fn a_plan_checkout_asked_again_after_an_error_opens() {
    let h = Harness::start(false).await;
    let body = |state: &str| {
        Some(
            json!({ "plan": "PRO", "success_url": format!("https://app.example.com/ok?state={state}"), "cancel_url": "https://app.example.com/back" }),
        )
    };
    h.emulator
        .set_faults(stripe_emulator::Faults {
            error_500: 1.0,
            ..Default::default()
        })
        .unwrap();
    let (status, answer) = h
        .api("POST", "/v1/customers/acme/checkout", ACME, body("a"))
        .await;
    assert_eq!(status.as_u16(), 503, "{answer}");
    h.emulator.set_faults(Default::default()).unwrap();
    let (status, answer) = h
        .api("POST", "/v1/customers/acme/checkout", ACME, body("a"))
        .await;
    assert_eq!(status, StatusCode::OK, "the same again: {answer}");

    // An attempt Stripe never answered, asked again with other URLs: Stripe will not answer
    // that key for them; the attempt is closed and a new one opens.
    let h = Harness::start(false).await;
    let checkout_id = uuid::Uuid::now_v7().to_string();
    sqlx::query(
        "INSERT INTO checkout_sessions (checkout_id, customer_id, stripe_customer_id, mode, plan,
                amount, currency, requested_by)
         VALUES ($1, 'acme', $2, 'subscription', 'PRO', 4900, 'usd', 'token:acme')",
    )
    .bind(&checkout_id)
    .bind(&h.stripe_customer)
    .execute(&h.db.pool)
    .await
    .unwrap();
    // Stripe got that attempt (other URLs) under its key.
    let answer = call(
        h.emulator.addr(),
        "POST",
        "/v1/checkout/sessions",
        Some(KEY),
        &[
            ("mode", "payment".into()),
            ("customer", h.stripe_customer.clone()),
            (
                "line_items[0][price]",
                catalog::prices_of(&h.db.pool, None, Some("small"))
                    .await
                    .unwrap()[0]
                    .price_id
                    .clone(),
            ),
            ("line_items[0][quantity]", "1".into()),
            ("success_url", "https://app.example.com/other".into()),
        ],
        Some(&format!("tally-checkout:{checkout_id}")),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body);
    let (status, opened) = h
        .api("POST", "/v1/customers/acme/checkout", ACME, body("b"))
        .await;
    assert_eq!(status, StatusCode::OK, "{opened}");
    let statuses: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT status, session_id FROM checkout_sessions ORDER BY created_at")
            .fetch_all(&h.db.pool)
            .await
            .unwrap();
    assert_eq!(statuses.len(), 2, "{statuses:?}");
    assert_eq!(statuses[0], ("expired".to_owned(), None));
    assert_eq!(statuses[1].1.as_deref(), opened["id"].as_str());
}

/// Third review: a partial refund (a goodwill gesture) took back every credit left. It takes
/// back the same share of the pack as of the money, once, whatever the order of the events.
#[tokio::test]
async fn a_partial_refund_takes_back_its_share_of_the_pack_once() {
    let h = Harness::start(true).await;
    let session = h.pack_checkout().await;
    let paid = pay(&h.emulator, &session, "card").await;
    let intent = paid["payment_intent"].as_str().unwrap().to_owned();
    h.delivered().await;
    assert_eq!(h.balance().await, Decimal::from(1000));
    // $2.50 of $10.00 back: 250 of the 1,000 credits.
    let refund = |amount: &'static str| {
        let intent = intent.clone();
        let h = &h;
        async move {
            post(
                &h.emulator,
                "/v1/refunds",
                &[("payment_intent", intent), ("amount", amount.into())],
            )
            .await;
            h.delivered().await;
        }
    };
    refund("250").await;
    assert_eq!(h.balance().await, Decimal::from(750));
    assert_eq!(h.grants().await[0].2, None, "still open");
    // Every event again: nothing taken twice.
    h.redeliver_all().await;
    assert_eq!(h.balance().await, Decimal::from(750));
    // The rest back: what is left goes.
    refund("750").await;
    assert_eq!(h.balance().await, Decimal::ZERO);
    assert_eq!(h.grants().await[0].2.as_deref(), Some("voided"));
    let reasons: Vec<String> = sqlx::query_scalar(
        "SELECT reason FROM credit_transactions WHERE customer_id = 'acme' AND kind = 'void'
         ORDER BY transaction_id",
    )
    .fetch_all(&h.db.pool)
    .await
    .unwrap();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[0].contains("250 refunded"), "{reasons:?}");

    // A partial refund delivered before the payment's completion: the completion grants the
    // pack less the refunded share.
    let h = Harness::start(false).await;
    let session = h.pack_checkout().await;
    let paid = pay(&h.emulator, &session, "card").await;
    let intent = paid["payment_intent"].as_str().unwrap().to_owned();
    post(
        &h.emulator,
        "/v1/refunds",
        &[("payment_intent", intent), ("amount", "100".into())],
    )
    .await;
    for _ in 0..2 {
        for event in h.emulator.events().iter().rev() {
            let (status, answer) = h.deliver(&event.body).await;
            assert_eq!(status, StatusCode::OK, "{}: {answer}", event.event_type);
        }
    }
    assert_eq!(h.balance().await, Decimal::from(900));
    assert_eq!(h.grants().await.len(), 1);
}

/// Sessions that end unpaid: one that expires, one whose delayed payment fails. Nothing is
/// granted, however often the events come, and neither keeps the customer from buying again.
#[tokio::test]
async fn an_expired_session_and_a_failed_delayed_payment_grant_nothing() {
    let h = Harness::start(true).await;
    let status_of = |session: String| {
        let pool = h.db.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT status FROM checkout_sessions WHERE session_id = $1",
            )
            .bind(session)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    // A plan session left to expire (Stripe expires it, or the team does).
    let plan = Some(
        json!({ "plan": "PRO", "success_url": "https://app.example.com/ok", "cancel_url": "https://app.example.com/back" }),
    );
    let (status, opened) = h
        .api("POST", "/v1/customers/acme/checkout", ACME, plan.clone())
        .await;
    assert_eq!(status, StatusCode::OK, "{opened}");
    let plan_session = opened["id"].as_str().unwrap().to_owned();
    post(
        &h.emulator,
        &format!("/v1/checkout/sessions/{plan_session}/expire"),
        &[],
    )
    .await;
    // A pack paid by bank debit whose payment then fails.
    let pack_session = h.pack_checkout().await;
    pay(&h.emulator, &pack_session, "async").await;
    let failed = control(
        h.emulator.addr(),
        &format!("checkout/{pack_session}/async_payment"),
        &json!({ "succeeded": false }),
    )
    .await
    .unwrap();
    assert_eq!(failed.status, 200, "{}", failed.body);
    h.delivered().await;
    h.redeliver_all().await;
    assert_eq!(status_of(plan_session).await, "expired");
    assert_eq!(status_of(pack_session).await, "payment_failed");
    assert!(h.grants().await.is_empty(), "{:?}", h.grants().await);
    assert_eq!(h.balance().await, Decimal::ZERO);
    let types: Vec<String> = h
        .emulator
        .events()
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    for expected in [
        "checkout.session.expired",
        "checkout.session.completed",
        "checkout.session.async_payment_failed",
    ] {
        assert!(types.iter().any(|t| t == expected), "{types:?}");
    }
    // The customer may try again: a new plan session opens.
    let (status, again) = h
        .api("POST", "/v1/customers/acme/checkout", ACME, plan)
        .await;
    assert_eq!(status, StatusCode::OK, "{again}");
}

/// Third review: a plan's usage sold in packages ("$2 per 1,000 calls") or in tiers is valid
/// Stripe pricing; `plans apply` compares a package's price per unit with unit_price and leaves
/// tiers alone, instead of refusing either.
#[tokio::test]
async fn a_metered_price_sold_in_packages_agrees_with_its_unit_price() {
    let h = Harness::start(false).await;
    let stripe_meters = call(
        h.emulator.addr(),
        "GET",
        "/v1/billing/meters",
        Some(KEY),
        &[],
        None,
    )
    .await
    .unwrap();
    let meter = stripe_meters.body["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let fee = post(
        &h.emulator,
        "/v1/prices",
        &[
            ("currency", "usd".into()),
            ("unit_amount", "4900".into()),
            ("recurring[interval]", "month".into()),
            ("product_data[name]", "Team".into()),
        ],
    )
    .await;
    let package = post(
        &h.emulator,
        "/v1/prices",
        &[
            ("currency", "usd".into()),
            ("unit_amount", "200".into()),
            ("transform_quantity[divide_by]", "1000".into()),
            ("recurring[interval]", "month".into()),
            ("recurring[usage_type]", "metered".into()),
            ("recurring[meter]", meter),
            ("product_data[name]", "Team: API calls".into()),
        ],
    )
    .await;
    let team = |unit_price: &str| -> Vec<PlanDefinition> {
        serde_json::from_value(json!([{
            "name": "TEAM",
            "price": { "amount": "49.00", "currency": "usd", "interval": "month" },
            "stripe_prices": [fee["id"], package["id"]],
            "limits": { "api_calls": { "limit": "1000000", "period": "billing_period", "unit_price": unit_price } },
        }]))
        .unwrap()
    };
    let checked = catalog::check(&h.stripe, &team("0.002"), &[], &meters())
        .await
        .unwrap();
    assert!(checked.problems.is_empty(), "{:?}", checked.problems);
    assert_eq!(checked.prices.len(), 2);
    let checked = catalog::check(&h.stripe, &team("0.003"), &[], &meters())
        .await
        .unwrap();
    assert_eq!(checked.problems.len(), 1, "{:?}", checked.problems);
    assert!(
        checked.problems[0].contains("unit_price is 0.003"),
        "{:?}",
        checked.problems
    );
}
