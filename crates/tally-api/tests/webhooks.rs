//! Stripe webhooks end to end: the stripe-emulator holds prices and subscriptions and sends its
//! signed events to `tally serve`'s `/v1/webhooks/stripe` over HTTP, the way Stripe would.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use stripe_emulator::testing::call;
use stripe_emulator::{signature_header, Emulator, EmulatorConfig};
use tally_api::{router, Access, ApiState, RateLimits, ServeConfig, StripeWebhook};
use tally_billing::{apply_plans, PlanDefinition};
use tally_core::config::Secret;
use tally_quota::{Quota, QuotaError};
use tower::ServiceExt;

const KEY: &str = "sk_test_tally";

/// Where tally asks Stripe for a subscription whose events tie.
#[derive(Clone, Copy)]
enum AskStripe {
    Emulator,
    /// A Stripe that does not answer (connection refused).
    Unreachable,
    /// No secret key: ties are decided by status.
    NoKey,
}

struct Harness {
    db: tally_db::testing::TestDatabase,
    emulator: Emulator,
    state: Arc<ApiState>,
    customer: String,
    free_price: String,
    pro_price: String,
}

impl Harness {
    /// tally serving on a real port, an emulator whose webhook endpoint points at it, FREE
    /// selected by a price's `metadata.tally_plan` and PRO by the plan's `stripe_prices`, and
    /// tally customer `acme` mapped to a Stripe customer.
    async fn start() -> Harness {
        Harness::asking(AskStripe::Emulator).await
    }

    /// `ask`: the Stripe tally asks about same-second ties.
    async fn asking(ask: AskStripe) -> Harness {
        let db = tally_db::testing::fresh_database().await;
        sqlx::query("INSERT INTO meters (name, aggregation, stripe_event_name) VALUES ('api_calls', 'sum', 'api_calls')")
            .execute(&db.pool)
            .await
            .unwrap();
        let emulator = Emulator::start("127.0.0.1:0".parse().unwrap(), EmulatorConfig::default())
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/v1/webhooks/stripe",
            listener.local_addr().unwrap()
        );
        let endpoint = post(&emulator, "/v1/webhook_endpoints", &[("url", url)]).await;
        let secret = endpoint["secret"].as_str().unwrap().to_owned();

        let price = |amount: &str, plan: Option<&str>| {
            let mut form = vec![
                ("currency", "usd".to_owned()),
                ("unit_amount", amount.to_owned()),
                ("recurring[interval]", "month".to_owned()),
            ];
            form.extend(plan.map(|plan| ("metadata[tally_plan]", plan.to_owned())));
            form
        };
        let free_price = post(&emulator, "/v1/prices", &price("0", Some("FREE"))).await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let pro_price = post(&emulator, "/v1/prices", &price("4900", None)).await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let plans: Vec<PlanDefinition> = serde_json::from_value(json!([
            { "name": "FREE", "limits": { "api_calls": { "limit": "100", "period": "day" } } },
            { "name": "PRO", "stripe_prices": [pro_price],
              "limits": { "api_calls": { "limit": "10000", "period": "billing_period" } } },
        ]))
        .unwrap();
        apply_plans(&db.pool, &plans, "test").await.unwrap();
        let customer = post(&emulator, "/v1/customers", &[("name", "Acme".into())]).await["id"]
            .as_str()
            .unwrap()
            .to_owned();

        let state = Arc::new(ApiState {
            fallback_plan: None,
            alert_destinations: Default::default(),
            billing: Default::default(),
            pipeline: Default::default(),
            quota: Quota::new(db.pool.clone(), Duration::from_secs(60))
                .await
                .unwrap(),
            pool: db.pool.clone(),
            reader_pool: db.pool.clone(),
            access: Access::new(&[], &RateLimits::default()),
            metrics: None,
            emitter: None,
            stripe_webhook: Some(StripeWebhook {
                secret: Secret::new(secret),
                livemode: false,
                stripe: {
                    let api_base = match ask {
                        AskStripe::Emulator => Some(emulator.url()),
                        AskStripe::Unreachable => Some("http://127.0.0.1:1/".to_owned()),
                        AskStripe::NoKey => None,
                    };
                    api_base.map(|api_base| {
                        tally_sink::StripeHttp::new(&tally_sink::StripeConfig {
                            api_base,
                            secret_key: Secret::new(KEY),
                            ..Default::default()
                        })
                        .unwrap()
                    })
                },
            }),
        });
        let app = router(state.clone(), &ServeConfig::default());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Harness {
            db,
            emulator,
            state,
            customer,
            free_price,
            pro_price,
        }
    }

    async fn map_customer(&self) {
        sqlx::query(
            "INSERT INTO stripe_customers (customer_id, stripe_customer_id) VALUES ('acme', $1)",
        )
        .bind(&self.customer)
        .execute(&self.db.pool)
        .await
        .unwrap();
    }

    async fn subscribe(&self, price: &str) -> String {
        let subscription = post(
            &self.emulator,
            "/v1/subscriptions",
            &[
                ("customer", self.customer.clone()),
                ("items[0][price]", price.to_owned()),
            ],
        )
        .await;
        subscription["id"].as_str().unwrap().to_owned()
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

    async fn plan(&self) -> Result<(String, String), QuotaError> {
        let (subscription, entitlements) = self.state.quota.entitlements("acme").await?;
        Ok((entitlements.plan, subscription.status))
    }

    async fn outcomes(&self) -> Vec<(String, String)> {
        sqlx::query_as(
            "SELECT type, outcome FROM stripe_webhook_events ORDER BY received_at, event_id",
        )
        .fetch_all(&self.db.pool)
        .await
        .unwrap()
    }
}

async fn post(emulator: &Emulator, path: &str, form: &[(&str, String)]) -> Value {
    let answer = call(emulator.addr(), "POST", path, Some(KEY), form, None)
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{path}: {}", answer.body);
    answer.body
}

async fn control(emulator: &Emulator, path: &str, body: Value) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let request = Request::post(format!("http://{}/_emulator/{path}", emulator.addr()))
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200, "{path}");
}

#[tokio::test]
async fn subscriptions_follow_stripe_and_invoices_are_recorded() {
    let h = Harness::start().await;
    h.map_customer().await;
    assert!(matches!(
        h.plan().await,
        Err(QuotaError::NoActiveSubscription(_))
    ));

    let subscription = h.subscribe(&h.free_price).await;
    h.delivered().await;
    assert_eq!(h.plan().await.unwrap(), ("FREE".into(), "active".into()));
    let invoice: (String, String, i64, Option<String>) = sqlx::query_as(
        "SELECT status, last_event_type, amount_paid, customer_id FROM stripe_invoices",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert_eq!(
        invoice,
        ("paid".into(), "invoice.paid".into(), 0, Some("acme".into()))
    );

    // An upgrade: the new price selects PRO through the plan's stripe_prices.
    control(&h.emulator, "clock", json!({ "advance_seconds": 5 })).await;
    post(
        &h.emulator,
        &format!("/v1/subscriptions/{subscription}"),
        &[("items[0][price]", h.pro_price.clone())],
    )
    .await;
    h.delivered().await;
    assert_eq!(h.plan().await.unwrap(), ("PRO".into(), "active".into()));

    // The period ends: the next one starts (and is invoiced at 49.00).
    let before = h.state.quota.entitlements("acme").await.unwrap().0;
    control(&h.emulator, "clock", json!({ "advance_seconds": 5 })).await;
    control(
        &h.emulator,
        &format!("subscriptions/{subscription}/advance_period"),
        json!({}),
    )
    .await;
    h.delivered().await;
    let after = h.state.quota.entitlements("acme").await.unwrap().0;
    assert_eq!(after.current_period_start, before.current_period_end);
    let paid: i64 = sqlx::query_scalar("SELECT sum(amount_paid)::bigint FROM stripe_invoices")
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
    assert_eq!(paid, 4900);

    // Canceled in Stripe: no entitlements, explicitly.
    control(&h.emulator, "clock", json!({ "advance_seconds": 5 })).await;
    let deleted = call(
        h.emulator.addr(),
        "DELETE",
        &format!("/v1/subscriptions/{subscription}"),
        Some(KEY),
        &[],
        None,
    )
    .await
    .unwrap();
    assert_eq!(deleted.status, 200);
    h.delivered().await;
    assert!(matches!(
        h.plan().await,
        Err(QuotaError::NoActiveSubscription(_))
    ));
    let audit: Vec<(String, String)> = sqlx::query_as(
        "SELECT action, actor FROM entitlement_audit WHERE entity = 'subscription' ORDER BY audit_id",
    )
    .fetch_all(&h.db.pool)
    .await
    .unwrap();
    assert_eq!(audit.len(), 4, "{audit:?}");
    assert_eq!(audit[0].0, "create");
    assert!(audit
        .iter()
        .all(|(_, actor)| actor.starts_with("stripe:evt_")));
    h.emulator.shutdown().await;
}

#[tokio::test]
async fn replays_change_nothing_and_an_older_event_never_wins() {
    let h = Harness::start().await;
    h.map_customer().await;
    let subscription = h.subscribe(&h.free_price).await;
    h.delivered().await;
    control(&h.emulator, "clock", json!({ "advance_seconds": 60 })).await;
    post(
        &h.emulator,
        &format!("/v1/subscriptions/{subscription}"),
        &[("items[0][price]", h.pro_price.clone())],
    )
    .await;
    h.delivered().await;
    assert_eq!(h.plan().await.unwrap().0, "PRO");

    let events = h.emulator.events();
    let created = events
        .iter()
        .find(|e| e.event_type == "customer.subscription.created")
        .unwrap();
    let updated = events
        .iter()
        .find(|e| e.event_type == "customer.subscription.updated")
        .unwrap();
    // The older creation arrives again (as after a lost answer): stale, the plan stays PRO.
    control(
        &h.emulator,
        &format!("events/{}/resend", created.id),
        json!({}),
    )
    .await;
    // The update arrives twice: the second is a no-op.
    control(
        &h.emulator,
        &format!("events/{}/resend", updated.id),
        json!({}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.delivered().await;
    h.state.quota.invalidate("acme");
    assert_eq!(h.plan().await.unwrap().0, "PRO");
    let outcomes = h.outcomes().await;
    let subscription_outcomes: Vec<&str> = outcomes
        .iter()
        .filter(|(t, _)| t.starts_with("customer.subscription"))
        .map(|(_, o)| o.as_str())
        .collect();
    assert_eq!(subscription_outcomes, ["applied", "applied"]);
    for resent in [&created.id, &updated.id] {
        let event = h
            .emulator
            .events()
            .into_iter()
            .find(|e| &e.id == resent)
            .unwrap();
        assert_eq!((event.attempts, event.delivered), (2, true), "{event:?}");
    }

    // A stale event that was never seen before is stored as stale and not applied: send the
    // creation under a new id, signed properly.
    let body: Value = serde_json::from_str(&created.body).unwrap();
    let mut older = body.clone();
    older["id"] = json!("evt_older_copy");
    let (status, answer) = webhook(&h, &older.to_string(), None).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["outcome"], "stale");
    assert_eq!(h.plan().await.unwrap().0, "PRO");
    let (_, answer) = webhook(&h, &older.to_string(), None).await;
    assert_eq!(answer["outcome"], "replay");
    h.emulator.shutdown().await;
}

/// Posts `body` to the webhook endpoint in process, signed with the endpoint's secret at
/// `timestamp` (now when `None`).
async fn webhook(h: &Harness, body: &str, timestamp: Option<i64>) -> (StatusCode, Value) {
    let secret = h.state.stripe_webhook.as_ref().unwrap().secret.expose();
    let timestamp = timestamp.unwrap_or_else(|| chrono::Utc::now().timestamp());
    signed(
        h.state.clone(),
        body,
        Some(signature_header(secret, timestamp, body)),
    )
    .await
}

async fn signed(
    state: Arc<ApiState>,
    body: &str,
    signature: Option<String>,
) -> (StatusCode, Value) {
    let mut request =
        Request::post("/v1/webhooks/stripe").header("content-type", "application/json");
    if let Some(signature) = signature {
        request = request.header("stripe-signature", signature);
    }
    let response = router(state, &ServeConfig::default())
        .oneshot(request.body(Body::from(body.to_owned())).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn forged_stale_unsigned_and_wrong_mode_events_are_refused_and_not_stored() {
    let h = Harness::start().await;
    h.map_customer().await;
    h.subscribe(&h.free_price).await;
    h.delivered().await;
    let event = h.emulator.events()[0].body.clone();
    let mut fresh: Value = serde_json::from_str(&event).unwrap();
    fresh["id"] = json!("evt_never_applied");
    let body = fresh.to_string();
    let now = chrono::Utc::now().timestamp();

    let (status, answer) = signed(h.state.clone(), &body, None).await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("MISSING_SIGNATURE"))
    );
    let forged = signature_header("whsec_not_the_secret", now, &body);
    let (status, answer) = signed(h.state.clone(), &body, Some(forged)).await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("BAD_SIGNATURE"))
    );
    // A body changed after signing.
    let secret = h.state.stripe_webhook.as_ref().unwrap().secret.expose();
    let tampered = signature_header(secret, now, &body.replace("FREE", "PRO"));
    let (status, answer) = signed(h.state.clone(), &body, Some(tampered)).await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("BAD_SIGNATURE"))
    );
    // Correctly signed, but 301 s ago: outside the 300 s tolerance.
    let (status, answer) = webhook(&h, &body, Some(now - 301)).await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("STALE_SIGNATURE"))
    );
    // Without a secret configured, nothing is accepted.
    let unconfigured = Arc::new(ApiState {
        fallback_plan: None,
        alert_destinations: Default::default(),
        billing: Default::default(),
        pipeline: Default::default(),
        quota: Quota::new(h.db.pool.clone(), Duration::from_secs(1))
            .await
            .unwrap(),
        pool: h.db.pool.clone(),
        reader_pool: h.db.pool.clone(),
        access: Access::new(&[], &RateLimits::default()),
        metrics: None,
        emitter: None,
        stripe_webhook: None,
    });
    let (status, answer) = signed(
        unconfigured,
        &body,
        Some(signature_header(secret, now, &body)),
    )
    .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("WEBHOOKS_DISABLED"))
    );

    // Correctly signed, but a live-mode event at a deployment that bills with a test key.
    let mut live = fresh.clone();
    live["livemode"] = json!(true);
    let live = live.to_string();
    let (status, answer) = signed(
        h.state.clone(),
        &live,
        Some(signature_header(secret, now, &live)),
    )
    .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("WRONG_MODE"))
    );

    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM stripe_webhook_events WHERE event_id = 'evt_never_applied'",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert_eq!(stored, 0);
    // Within the tolerance, the same body is accepted.
    let (status, answer) = webhook(&h, &body, Some(now - 250)).await;
    assert_eq!(
        (status, answer["outcome"].as_str()),
        (StatusCode::OK, Some("applied"))
    );
    h.emulator.shutdown().await;
}

#[tokio::test]
async fn an_unmapped_customer_is_refused_until_mapped_then_stripe_retries_apply_it() {
    let h = Harness::start().await;
    h.subscribe(&h.free_price).await;
    // tally answers 422 UNMAPPED_STRIPE_CUSTOMER and stores nothing; Stripe retries.
    for _ in 0..200 {
        if h.emulator.events()[0].attempts >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first = h.emulator.events()[0].clone();
    assert_eq!((first.last_status, first.delivered), (422, false));
    h.map_customer().await;
    h.delivered().await;
    assert_eq!(h.plan().await.unwrap(), ("FREE".into(), "active".into()));
    assert!(h.emulator.events()[0].attempts >= 2);
    h.emulator.shutdown().await;
}

/// Sends `event` (an emulator event's JSON) under a new id with `changes` applied, signed.
async fn variant(h: &Harness, event: &Value, id: &str, changes: &[(&str, &str)]) -> Value {
    let mut copy = event.clone();
    copy["id"] = json!(id);
    for (pointer, value) in changes {
        *copy.pointer_mut(pointer).unwrap() = json!(value);
    }
    let (status, answer) = webhook(h, &copy.to_string(), None).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer
}

/// Before: of two events created in the same second, the one delivered last won, so an
/// `invoice.finalized` arriving after `invoice.paid` set a paid invoice back to open, and a
/// `subscription.created` (incomplete) after `.updated` (active) took a paying customer's
/// entitlements away. Now, without a Stripe key to ask with, a same-second event never moves
/// the status backwards, in either delivery order.
#[tokio::test]
async fn same_second_events_never_move_state_backwards() {
    let h = Harness::asking(AskStripe::NoKey).await;
    h.map_customer().await;
    h.subscribe(&h.free_price).await;
    h.delivered().await;
    let events = h.emulator.events();
    let body = |kind: &str| -> Value {
        let event = events.iter().find(|e| e.event_type == kind).unwrap();
        serde_json::from_str(&event.body).unwrap()
    };
    let created = body("customer.subscription.created");
    let paid = body("invoice.paid");
    let pool = h.db.pool.clone();
    let invoice_status = || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT status FROM stripe_invoices")
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };

    // Subscription, same second: active delivered first, then the incomplete creation.
    let later = created["created"].as_i64().unwrap() + 100;
    let at = |event: &Value| {
        let mut event = event.clone();
        event["created"] = json!(later);
        event
    };
    let active = at(&created);
    variant(
        &h,
        &active,
        "evt_sub_active",
        &[
            ("/type", "customer.subscription.updated"),
            ("/data/object/status", "active"),
        ],
    )
    .await;
    let answer = variant(
        &h,
        &active,
        "evt_sub_incomplete",
        &[("/data/object/status", "incomplete")],
    )
    .await;
    assert_eq!(answer["outcome"], "stale");
    h.state.quota.invalidate("acme");
    assert_eq!(h.plan().await.unwrap(), ("FREE".into(), "active".into()));
    // The other order, a second later: incomplete, then active; active wins.
    let next = {
        let mut event = created.clone();
        event["created"] = json!(later + 1);
        event
    };
    variant(
        &h,
        &next,
        "evt_sub_incomplete_2",
        &[("/data/object/status", "incomplete")],
    )
    .await;
    let answer = variant(
        &h,
        &next,
        "evt_sub_active_2",
        &[
            ("/type", "customer.subscription.updated"),
            ("/data/object/status", "active"),
        ],
    )
    .await;
    assert_eq!(answer["outcome"], "applied");
    h.state.quota.invalidate("acme");
    assert_eq!(h.plan().await.unwrap(), ("FREE".into(), "active".into()));

    // Invoice, same second: paid, then finalized (open): it stays paid.
    let invoice_at = paid["created"].as_i64().unwrap() + 100;
    let mut paid_now = paid.clone();
    paid_now["created"] = json!(invoice_at);
    variant(
        &h,
        &paid_now,
        "evt_inv_paid",
        &[("/data/object/status", "paid")],
    )
    .await;
    let answer = variant(
        &h,
        &paid_now,
        "evt_inv_finalized",
        &[
            ("/type", "invoice.finalized"),
            ("/data/object/status", "open"),
        ],
    )
    .await;
    assert_eq!(answer["outcome"], "stale");
    assert_eq!(invoice_status().await, "paid");
    // The other order, a second later: finalized then paid ends paid.
    paid_now["created"] = json!(invoice_at + 1);
    variant(
        &h,
        &paid_now,
        "evt_inv_finalized_2",
        &[
            ("/type", "invoice.finalized"),
            ("/data/object/status", "open"),
        ],
    )
    .await;
    variant(
        &h,
        &paid_now,
        "evt_inv_paid_2",
        &[("/data/object/status", "paid")],
    )
    .await;
    assert_eq!(invoice_status().await, "paid");
    h.emulator.shutdown().await;
}

/// Before: a payment that failed and then succeeded within one second (`past_due`, then
/// `active`) left the customer past_due for good whenever `active` was delivered second,
/// because a same-second event that moves the status "back" was stale. Now Stripe is asked for
/// the subscription as it is, and that decides; a Stripe that does not answer gets the event
/// 503 (nothing stored, Stripe redelivers it).
#[tokio::test]
async fn a_same_second_recovery_is_decided_by_asking_stripe() {
    let h = Harness::start().await;
    h.map_customer().await;
    h.subscribe(&h.pro_price).await;
    h.delivered().await;
    let created: Value = {
        let events = h.emulator.events();
        let event = events
            .iter()
            .find(|e| e.event_type == "customer.subscription.created")
            .unwrap();
        serde_json::from_str(&event.body).unwrap()
    };
    assert_eq!(created["data"]["object"]["status"], "active", "{created}");
    let mut tie = created.clone();
    tie["created"] = json!(created["created"].as_i64().unwrap() + 100);
    tie["type"] = json!("customer.subscription.updated");
    variant(
        &h,
        &tie,
        "evt_past_due",
        &[("/data/object/status", "past_due")],
    )
    .await;
    let status: String = sqlx::query_scalar(
        "SELECT status FROM subscriptions WHERE customer_id = 'acme' AND stripe_subscription_id IS NOT NULL",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert_eq!(status, "past_due");
    h.state.quota.invalidate("acme");
    assert!(h.plan().await.is_err(), "past_due entitles to nothing");

    // The recovery, same second, delivered second: Stripe says active.
    let answer = variant(
        &h,
        &tie,
        "evt_recovered",
        &[("/data/object/status", "active")],
    )
    .await;
    assert_eq!(answer["outcome"], "applied", "{answer}");
    h.state.quota.invalidate("acme");
    assert_eq!(h.plan().await.unwrap(), ("PRO".into(), "active".into()));

    // A same-second event saying otherwise than Stripe does not win either: Stripe decides.
    let answer = variant(
        &h,
        &tie,
        "evt_incomplete",
        &[("/data/object/status", "incomplete")],
    )
    .await;
    assert_eq!(answer["outcome"], "applied", "{answer}");
    h.state.quota.invalidate("acme");
    assert_eq!(h.plan().await.unwrap(), ("PRO".into(), "active".into()));

    // Stripe away: 503, and the event is not recorded, so Stripe's redelivery applies it.
    let away = Harness::asking(AskStripe::Unreachable).await;
    away.map_customer().await;
    away.subscribe(&away.pro_price).await;
    away.delivered().await;
    let mut tie = {
        let events = away.emulator.events();
        let event = events
            .iter()
            .find(|e| e.event_type == "customer.subscription.created")
            .unwrap();
        serde_json::from_str::<Value>(&event.body).unwrap()
    };
    tie["created"] = json!(tie["created"].as_i64().unwrap() + 100);
    tie["type"] = json!("customer.subscription.updated");
    variant(
        &away,
        &tie,
        "evt_away_past_due",
        &[("/data/object/status", "past_due")],
    )
    .await;
    let mut recovered = tie.clone();
    recovered["id"] = json!("evt_away_active");
    let (status, answer) = webhook(&away, &recovered.to_string(), None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(answer["code"], "STRIPE_UNAVAILABLE", "{answer}");
    let recorded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM stripe_webhook_events WHERE event_id = 'evt_away_active'",
    )
    .fetch_one(&away.db.pool)
    .await
    .unwrap();
    assert_eq!(recorded, 0, "an event not applied is not recorded");
    h.emulator.shutdown().await;
    away.emulator.shutdown().await;
}
