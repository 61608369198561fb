//! The API tried as an attacker would: every route of `/openapi.json` with no token, a bad
//! one, the wrong scope and another customer's; alert endpoints pointed inside the network;
//! trickling and idle connections; bodies too large to read; fuzzed JSON; floods past the rate
//! and in-flight limits. Every answer is checked against the response the OpenAPI document
//! describes for it. (The sender's side of alerts, an answer that never ends or a name that
//! resolves to loopback, is in `tally-alerts/tests/delivery.rs`; the quota middleware tried as
//! an attacker would, choosing whom to bill and which requests are the same, is in the
//! top-level `tests/middleware.rs`.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use chrono::{TimeDelta, Utc};
use serde_json::{json, Value};
use tally_api::{
    router, Access, ApiState, ApiToken, EdgeLimits, Rate, RateLimits, Scope, ServeConfig,
    StripeWebhook,
};
use tally_billing::testing::subscribe;
use tally_billing::{apply_plans, PlanDefinition};
use tally_core::config::Secret;
use tally_quota::Quota;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

mod common;
use common::{call, Answer};

const ADMIN: &str = "tly_admin_0123456789abcdef0123456789";
const INGEST: &str = "tly_ingest_0123456789abcdef0123456789";
const CHECK: &str = "tly_check_0123456789abcdef0123456789";
const ACME: &str = "tly_acme_0123456789abcdef0123456789";
const GLOBEX: &str = "tly_globex_0123456789abcdef0123456789";
const WEBHOOK_SECRET: &str = "whsec_attack0123456789";

fn tokens() -> Vec<ApiToken> {
    vec![
        ApiToken::new("ops", Scope::Admin, None, ADMIN),
        ApiToken::new("collector", Scope::Ingest, None, INGEST),
        ApiToken::new("gateway", Scope::Check, None, CHECK),
        ApiToken::new("acme", Scope::Customer, Some("acme"), ACME),
        ApiToken::new("globex", Scope::Customer, Some("globex"), GLOBEX),
    ]
}

async fn database() -> tally_db::testing::TestDatabase {
    let db = tally_db::testing::fresh_database().await;
    sqlx::query("INSERT INTO meters (name, aggregation, stripe_event_name) VALUES ('api_calls', 'sum', 'api_calls')")
        .execute(&db.pool)
        .await
        .unwrap();
    let plan: PlanDefinition = serde_json::from_value(json!({
        "name": "FREE", "features": { "api": true },
        "limits": { "api_calls": { "limit": "100", "period": "day", "unit_price": "0.01" } }
    }))
    .unwrap();
    apply_plans(&db.pool, &[plan], "test").await.unwrap();
    for customer in ["acme", "globex"] {
        subscribe(&db.pool, customer, "FREE", Utc::now() - TimeDelta::days(1)).await;
    }
    sqlx::query(
        "INSERT INTO usage_daily (customer_id, meter, day, group_key, value, event_count, first_updated, last_updated)
         VALUES ('globex', 'api_calls', (now() AT TIME ZONE 'UTC')::date, '', 95, 95, now(), now())",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    db
}

async fn state(db: &tally_db::testing::TestDatabase, rates: &RateLimits) -> Arc<ApiState> {
    Arc::new(ApiState {
        fallback_plan: None,
        alert_destinations: Default::default(),
        billing: Default::default(),
        pipeline: Default::default(),
        quota: Quota::new(db.pool.clone(), Duration::from_secs(60))
            .await
            .unwrap(),
        pool: db.pool.clone(),
        reader_pool: db.pool.clone(),
        access: Access::new(&tokens(), rates),
        metrics: None,
        emitter: None,
        stripe_webhook: Some(StripeWebhook {
            secret: Secret::new(WEBHOOK_SECRET),
            livemode: false,
            stripe: None,
        }),
    })
}

/// The answer is one `/openapi.json` describes, and an error's request id is the header's.
fn assert_described(document: &Value, template: &str, method: &str, answer: &Answer) {
    if let Err(problem) = tally_api::openapi::check_answer(
        document,
        template,
        method,
        answer.status.as_u16(),
        &answer.body,
    ) {
        panic!("{problem}");
    }
    if answer.body.get("request_id").is_some() {
        assert_eq!(
            answer.body["request_id"].as_str(),
            answer.request_id.as_deref(),
            "the error's request id is the x-request-id header"
        );
    }
}

/// Who may call what: the contract, written down apart from the code that enforces it.
fn allowed(method: &str, template: &str) -> &'static [&'static str] {
    match (method, template) {
        // A customer reads its own alerts, and edits them on a self-serve plan (refused
        // NOT_SELF_SERVE otherwise).
        ("GET" | "POST", "/v1/customers/{id}/alerts") => return &[ADMIN, ACME],
        ("DELETE", "/v1/customers/{id}/alerts/{rule_id}") => return &[ADMIN, ACME],
        // Any customer token passes the gate; another customer's invoice is answered as not
        // found (404), the same as no invoice, so ids are not confirmed.
        ("GET", "/v1/invoices/{id}") => return &[ADMIN, ACME, GLOBEX],
        _ => {}
    }
    match template {
        "/v1/quota/check" | "/v1/customers/{id}/entitlements" => &[ADMIN, CHECK, ACME],
        "/v1/customers/{id}/usage" | "/v1/customers/{id}/invoice-preview" => &[ADMIN, ACME],
        "/v1/events" => &[ADMIN, INGEST],
        "/readyz" | "/metrics" => &[ADMIN],
        // Plans are the product's price list: any token may read them.
        "/v1/plans" | "/v1/plans/{name}" => &[ADMIN, CHECK, ACME, GLOBEX],
        "/v1/customers/{id}" | "/v1/customers/{id}/subscriptions" => &[ADMIN, ACME],
        // Self-serve billing: the customer's own, and the admin's.
        "/v1/customers/{id}/checkout"
        | "/v1/customers/{id}/credits/checkout"
        | "/v1/customers/{id}/billing-portal"
        | "/v1/customers/{id}/invoices" => &[ADMIN, ACME],
        // A gateway may show a customer's balance where it checks them; the ledger is the
        // customer's own and the admin's.
        "/v1/customers/{id}/credits" => &[ADMIN, CHECK, ACME],
        "/v1/customers/{id}/credits/ledger" => &[ADMIN, ACME],
        "/v1/subscriptions"
        | "/v1/subscriptions/{id}"
        | "/v1/subscriptions/{id}/change"
        | "/v1/subscriptions/{id}/cancel"
        | "/v1/subscriptions/{id}/reactivate"
        | "/v1/subscriptions/{id}/payment-method"
        | "/v1/customers"
        | "/v1/customers/{id}/overrides"
        | "/v1/customers/{id}/credits/grants"
        | "/v1/customers/{id}/credits/grants/{grant_id}/void"
        | "/v1/customers/{id}/alerts/{rule_id}"
        // Endpoints and deliveries span every customer.
        | "/v1/alerts/endpoints"
        | "/v1/alerts/endpoints/{endpoint_id}"
        | "/v1/alerts/endpoints/{endpoint_id}/rotate-secret"
        | "/v1/alerts/deliveries"
        // A portal session is an admin's to give.
        | "/v1/customers/{id}/portal-sessions"
        | "/v1/portal-sessions/{id}" => &[ADMIN],
        other => panic!("no access rule for {other}: add one to this test"),
    }
}

fn example(template: &str) -> (String, Option<String>) {
    let now = Utc::now();
    let path = match template {
        "/v1/customers/{id}/usage" => format!(
            "/v1/customers/acme/usage?meter=api_calls&from={}&to={}",
            (now - TimeDelta::hours(1)).format("%Y-%m-%dT%H:%M:%SZ"),
            now.format("%Y-%m-%dT%H:%M:%SZ")
        ),
        other => other
            .replace("{id}", "acme")
            .replace("{grant_id}", "1")
            .replace("{rule_id}", "1")
            .replace("{endpoint_id}", "1"),
    };
    let body = match template {
        "/v1/quota/check" => Some(json!({ "customer": "acme", "meter": "api_calls" }).to_string()),
        "/v1/events" => Some(
            json!({ "events": [{ "customer": "acme", "meter": "api_calls", "quantity": 1 }] })
                .to_string(),
        ),
        "/v1/customers/{id}/credits/grants" => Some(
            json!({ "kind": "purchased", "amount": "1", "idempotency_key": "attack", "reason": "attack test" })
                .to_string(),
        ),
        "/v1/customers/{id}/credits/grants/{grant_id}/void" => {
            Some(json!({ "reason": "attack test" }).to_string())
        }
        // Sent with GET too, where it is not read.
        "/v1/customers/{id}/alerts" => {
            Some(json!({ "meter": "api_calls", "percent": 80 }).to_string())
        }
        "/v1/alerts/endpoints" => {
            Some(json!({ "url": "https://example.com/attack" }).to_string())
        }
        "/v1/customers/{id}/checkout" => Some(
            json!({ "plan": "PRO", "success_url": "https://example.com/ok", "cancel_url": "https://example.com/back" })
                .to_string(),
        ),
        "/v1/customers/{id}/credits/checkout" => Some(
            json!({ "pack": "small", "success_url": "https://example.com/ok", "cancel_url": "https://example.com/back" })
                .to_string(),
        ),
        "/v1/customers/{id}/billing-portal" => {
            Some(json!({ "return_url": "https://example.com/account" }).to_string())
        }
        _ => None,
    };
    (path, body)
}

#[tokio::test]
async fn every_route_refuses_no_token_a_bad_token_the_wrong_scope_and_another_customer() {
    let db = database().await;
    let app = router(
        state(&db, &RateLimits::default()).await,
        &ServeConfig::default(),
    );
    let document = tally_api::openapi::document();
    let mut checked = 0;
    for (template, operations) in document["paths"].as_object().unwrap() {
        for (method, operation) in operations.as_object().unwrap() {
            let method = method.to_uppercase();
            let public = operation["security"] == json!([]);
            let (path, body) = example(template);
            if public {
                let answer = call(&app, &method, &path, None, body.clone()).await;
                assert_described(&document, template, &method, &answer);
                continue;
            }
            for token in [None, Some("tly_not_a_token"), Some("")] {
                let answer = call(&app, &method, &path, token, body.clone()).await;
                assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{method} {path}");
                assert_eq!(answer.body["code"], "UNAUTHORIZED");
                assert_described(&document, template, &method, &answer);
            }
            for token in [ADMIN, INGEST, CHECK, ACME, GLOBEX] {
                let answer = call(&app, &method, &path, Some(token), body.clone()).await;
                assert_described(&document, template, &method, &answer);
                // GLOBEX is a customer token for another customer: refused wherever ACME is let in.
                let may = allowed(&method, template).contains(&token);
                if may {
                    assert!(
                        ![StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN].contains(&answer.status)
                            || answer.body["code"] == "FEATURE_DISABLED"
                            || answer.body["code"] == "NOT_SELF_SERVE",
                        "{method} {path} refused a token that may call it: {}",
                        answer.body
                    );
                } else {
                    assert_eq!(
                        (answer.status, answer.body["code"].as_str()),
                        (StatusCode::FORBIDDEN, Some("FORBIDDEN")),
                        "{method} {path} let a token in that may not call it"
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(
        checked >= 35,
        "only {checked} route × token pairs were tried"
    );
}

/// An alert endpoint is a URL tally posts to from inside its network: an admin token (or one
/// that leaked) must not make it a way to reach loopback, private ranges, the cloud's
/// metadata service or internal names, nor a port scanner through the delivery statuses. Each
/// address class is registered and refused, and nothing is stored. (No request is sent: the
/// refusal is at registration; `tally-alerts`' tests check the connect-time refusal.)
#[tokio::test]
async fn alert_endpoints_cannot_point_inside_the_network() {
    let db = database().await;
    let app = router(
        state(&db, &RateLimits::default()).await,
        &ServeConfig::default(),
    );
    let document = tally_api::openapi::document();
    let refused = [
        "https://127.0.0.1/hook",
        "https://127.0.0.1:5432/",
        "https://localhost:8080/admin",
        "https://10.0.0.5/hook",
        "https://172.20.1.1/hook",
        "https://192.168.0.10/hook",
        "https://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "https://100.100.100.200/latest/meta-data/",
        "https://[::1]:9187/metrics",
        "https://[fd12:3456::1]/hook",
        "https://[fe80::1]/hook",
        "https://[::ffff:169.254.169.254]/hook",
        "https://[::ffff:7f00:1]/hook",
        "https://0.0.0.0/hook",
        "https://2130706433/hook",
        "https://0x7f.0.0.1/hook",
        "https://017700000001/hook",
        "https://127.1/hook",
        "https://metadata.google.internal/computeMetadata/v1/",
        "https://kubernetes.default.svc.cluster.local/api",
        "https://postgres/",
        "https://db.localhost/",
        // Plain http carries the signed payload in clear.
        "http://hooks.example.com/tally",
        // Credentials in the URL end up in logs.
        "https://user:secret@hooks.example.com/tally",
    ];
    for url in refused {
        let body = json!({ "url": url }).to_string();
        let answer = call(
            &app,
            "POST",
            "/v1/alerts/endpoints",
            Some(ADMIN),
            Some(body),
        )
        .await;
        assert_described(&document, "/v1/alerts/endpoints", "POST", &answer);
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{url}: {}",
            answer.body
        );
        assert_eq!(answer.body["code"], "INVALID_ALERT", "{url}");
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM alert_endpoints")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0);
    // A public https receiver is taken; a customer token may not register one at all.
    let body = json!({ "url": "https://hooks.example.com/tally" }).to_string();
    let answer = call(
        &app,
        "POST",
        "/v1/alerts/endpoints",
        Some(ADMIN),
        Some(body.clone()),
    )
    .await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    let answer = call(&app, "POST", "/v1/alerts/endpoints", Some(ACME), Some(body)).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    // Endpoints are bounded: every firing is queued for each.
    for i in 1..tally_alerts::store::MAX_ENDPOINTS {
        let body = json!({ "url": format!("https://hooks.example.com/{i}") }).to_string();
        let answer = call(
            &app,
            "POST",
            "/v1/alerts/endpoints",
            Some(ADMIN),
            Some(body),
        )
        .await;
        assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    }
    let body = json!({ "url": "https://hooks.example.com/one-too-many" }).to_string();
    let answer = call(
        &app,
        "POST",
        "/v1/alerts/endpoints",
        Some(ADMIN),
        Some(body),
    )
    .await;
    assert_described(&document, "/v1/alerts/endpoints", "POST", &answer);
    assert_eq!(answer.status, StatusCode::CONFLICT);
    assert_eq!(answer.body["code"], "TOO_MANY_ENDPOINTS");
}

#[tokio::test]
async fn usage_reads_are_bounded_in_points() {
    let db = database().await;
    // 10,001 group keys in one minute: one bucket, too many points.
    sqlx::query(
        "INSERT INTO usage_minute (customer_id, meter, window_start, group_key, value, event_count, first_updated, last_updated)
         SELECT 'acme', 'api_calls', date_trunc('minute', now()) - interval '5 minutes', 'k' || g, 1, 1, now(), now()
         FROM generate_series(1, 10001) AS g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let app = router(
        state(&db, &RateLimits::default()).await,
        &ServeConfig::default(),
    );
    let (path, _) = example("/v1/customers/{id}/usage");
    let answer = call(
        &app,
        "GET",
        &format!("{path}&group_by=true"),
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(
        (answer.status, answer.body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("RESULT_TOO_LARGE")),
        "{}",
        answer.body
    );
    assert_described(
        &tally_api::openapi::document(),
        "/v1/customers/{id}/usage",
        "GET",
        &answer,
    );
    // Summed, the same minute is one point.
    let answer = call(&app, "GET", &path, Some(ADMIN), None).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.body["series"][0]["points"][0]["value"], "10001");
}

#[tokio::test]
async fn a_usage_readers_statements_are_cut_by_postgres() {
    let db = database().await;
    let readers = tally_db::connect_lazy_bounded(
        &db.url,
        1,
        Duration::from_secs(5),
        Duration::from_millis(100),
    )
    .unwrap();
    let started = Instant::now();
    let error = sqlx::query("SELECT pg_sleep(5)")
        .execute(&readers)
        .await
        .unwrap_err();
    assert!(tally_db::is_statement_timeout(&error), "{error}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn the_admin_listener_serves_metrics_and_readiness_without_a_token() {
    let db = database().await;
    let admin = tally_api::admin_router(state(&db, &RateLimits::default()).await);
    for path in ["/readyz", "/healthz"] {
        let answer = call(&admin, "GET", path, None, None).await;
        assert_eq!(answer.status, StatusCode::OK, "{path}: {}", answer.body);
    }
    // This state has no metrics recorder: the route is there and says so.
    let answer = call(&admin, "GET", "/metrics", None, None).await;
    assert_eq!(answer.body["code"], "NO_METRICS");
    // The public listener wants an admin token for the same routes, and says how to send one.
    let public = router(
        state(&db, &RateLimits::default()).await,
        &ServeConfig::default(),
    );
    let request = Request::get("/readyz").body(Body::empty()).unwrap();
    let response = public.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
}

#[tokio::test]
async fn a_customer_tokens_checks_count_nothing() {
    let db = database().await;
    let app = router(
        state(&db, &RateLimits::default()).await,
        &ServeConfig::default(),
    );
    let check = |quantity: i64| {
        Some(json!({ "customer": "acme", "meter": "api_calls", "quantity": quantity }).to_string())
    };
    for _ in 0..10 {
        let answer = call(&app, "POST", "/v1/quota/check", Some(ACME), check(60)).await;
        assert_eq!(answer.body["decision"], "allow", "{}", answer.body);
        assert_eq!(answer.body["current"], "0");
    }
    // Had they counted, 600 of 100 would be used.
    let answer = call(&app, "POST", "/v1/quota/check", Some(CHECK), check(60)).await;
    assert_eq!(answer.body["decision"], "allow", "{}", answer.body);
    let answer = call(&app, "POST", "/v1/quota/check", Some(CHECK), check(60)).await;
    assert_eq!(answer.body["code"], "LIMIT_EXCEEDED", "{}", answer.body);
}

#[tokio::test]
async fn a_token_past_its_rate_is_answered_429_rate_limited_not_limit_exceeded() {
    let db = database().await;
    let rates = RateLimits {
        check: Rate::new(1, 3),
        ..RateLimits::default()
    };
    let app = router(state(&db, &rates).await, &ServeConfig::default());
    let body = Some(json!({ "customer": "acme", "meter": "api_calls", "quantity": 0 }).to_string());
    for _ in 0..3 {
        let answer = call(&app, "POST", "/v1/quota/check", Some(CHECK), body.clone()).await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    let answer = call(&app, "POST", "/v1/quota/check", Some(CHECK), body.clone()).await;
    assert_eq!(
        (answer.status, answer.body["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("RATE_LIMITED"))
    );
    assert_eq!(answer.retry_after.as_deref(), Some("1"));
    assert_described(
        &tally_api::openapi::document(),
        "/v1/quota/check",
        "POST",
        &answer,
    );
    // Another token has a bucket of its own.
    let answer = call(&app, "POST", "/v1/quota/check", Some(ADMIN), body).await;
    assert_eq!(answer.status, StatusCode::OK);
}

#[tokio::test]
async fn quantities_out_of_range_are_400_invalid_quantity() {
    let db = database().await;
    let app = router(
        state(&db, &RateLimits::default()).await,
        &ServeConfig::default(),
    );
    for quantity in [
        "\"1e400\"",
        "1e300",
        "\"79228162514264337593543950336\"",
        "\"1e-40\"",
        "\"-1\"",
        "\"NaN\"",
        "\"inf\"",
        "\"1e99999999999\"",
        "true",
        "[1]",
        "\"0x10\"",
    ] {
        let body = format!(
            "{{\"customer\": \"acme\", \"meter\": \"api_calls\", \"quantity\": {quantity}}}"
        );
        let answer = call(&app, "POST", "/v1/quota/check", Some(ADMIN), Some(body)).await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{quantity}: {}",
            answer.body
        );
        assert!(
            ["INVALID_QUANTITY", "INVALID_REQUEST"]
                .contains(&answer.body["code"].as_str().unwrap()),
            "{quantity}: {}",
            answer.body
        );
    }
    let body = json!({ "customer": "globex", "meter": "api_calls", "quantity": "79228162514264337593543950335" });
    let answer = call(
        &app,
        "POST",
        "/v1/quota/check",
        Some(ADMIN),
        Some(body.to_string()),
    )
    .await;
    assert_eq!(
        (answer.status, answer.body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("INVALID_QUANTITY")),
        "usage plus the largest decimal overflows: {}",
        answer.body
    );
    let body = json!({ "customer": "acme", "meter": "api_calls", "quantity": "1.5e1" });
    let answer = call(
        &app,
        "POST",
        "/v1/quota/check",
        Some(ADMIN),
        Some(body.to_string()),
    )
    .await;
    assert_eq!(answer.body["decision"], "allow", "{}", answer.body);
}

/// A small deterministic generator: the same fuzz cases on every run.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn mutate(random: &mut Random, seed: &str) -> String {
    const PIECES: [&str; 24] = [
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        "\"",
        "\\",
        "\\u0000",
        "\\ud800",
        "null",
        "true",
        "-",
        "1e309",
        "99999999999999999999999999999999",
        "0.0000000000000000000000000000001",
        "\"quantity\"",
        "\"customer\"",
        "\"events\"",
        "\"meter\"",
        "[[[[[[[[",
        "\u{feff}",
        "é",
        "\"\u{0}\"",
    ];
    let mut text: Vec<char> = seed.chars().collect();
    for _ in 0..1 + random.below(4) {
        let at = random.below(text.len() + 1);
        match random.below(3) {
            0 if !text.is_empty() => {
                let end = (at + 1 + random.below(8)).min(text.len());
                text.drain(at.min(end)..end);
            }
            _ => {
                let piece = PIECES[random.below(PIECES.len())];
                for (i, c) in piece.chars().enumerate() {
                    text.insert(at + i, c);
                }
            }
        }
    }
    text.into_iter().collect()
}

#[tokio::test]
async fn fuzzed_json_bodies_never_answer_500() {
    let db = database().await;
    let app = router(
        state(&db, &RateLimits::default()).await,
        &ServeConfig::default(),
    );
    let document = tally_api::openapi::document();
    let seeds = [
        (
            "/v1/quota/check",
            "/v1/quota/check",
            ADMIN,
            json!({ "customer": "acme", "meter": "api_calls", "quantity": "1.5", "feature": "api" }),
        ),
        (
            "/v1/quota/check",
            "/v1/quota/check",
            ACME,
            json!({ "customer": "acme", "meter": "api_calls", "quantity": 2 }),
        ),
        (
            "/v1/events",
            "/v1/events",
            INGEST,
            json!({ "events": [{ "id": "e1", "customer": "acme", "meter": "api_calls", "quantity": 1, "dimensions": { "model": "m" } }] }),
        ),
        (
            "/v1/webhooks/stripe",
            "/v1/webhooks/stripe",
            ADMIN,
            json!({ "id": "evt_1", "object": "event", "type": "customer.subscription.updated", "livemode": false, "created": 1, "data": { "object": {} } }),
        ),
        (
            "/v1/customers/{id}/credits/grants",
            "/v1/customers/acme/credits/grants",
            ADMIN,
            json!({ "kind": "promotional", "amount": 12.5, "priority": 5, "expires_at": "2999-01-01T00:00:00Z", "idempotency_key": "fuzz", "description": "d", "reason": "r" }),
        ),
        (
            "/v1/customers/{id}/alerts",
            "/v1/customers/acme/alerts",
            ADMIN,
            json!({ "meter": "api_calls", "percent": 80.5, "credit_balance_below": null }),
        ),
        (
            "/v1/alerts/endpoints",
            "/v1/alerts/endpoints",
            ADMIN,
            json!({ "url": "https://example.com/hook?customer=acme", "description": "d" }),
        ),
    ];
    let mut random = Random(0x5eed_1234_abcd_ef01);
    let mut tried = 0;
    for (route, path, token, seed) in seeds {
        let seed = seed.to_string();
        for _ in 0..400 {
            let body = mutate(&mut random, &seed);
            let answer = call(&app, "POST", path, Some(token), Some(body.clone())).await;
            assert!(
                !answer.status.is_server_error()
                    || answer.status == StatusCode::SERVICE_UNAVAILABLE,
                "POST {route} with {body:?} answered {}: {}",
                answer.status,
                answer.body
            );
            assert_described(&document, route, "POST", &answer);
            tried += 1;
        }
    }
    assert_eq!(tried, 2800);
}

#[tokio::test]
async fn internal_detail_goes_to_the_log_and_the_client_gets_a_code_and_a_request_id() {
    let db = database().await;
    let mut state = state(&db, &RateLimits::default()).await;
    // A reader pool whose Postgres is not there.
    Arc::get_mut(&mut state).unwrap().reader_pool = tally_db::connect_lazy(
        "postgres://tally:pw@127.0.0.1:1/nowhere",
        1,
        Duration::from_millis(300),
    )
    .unwrap();
    let app = router(state, &ServeConfig::default());
    let (path, _) = example("/v1/customers/{id}/usage");
    let answer = call(&app, "GET", &path, Some(ADMIN), None).await;
    assert_eq!(
        (answer.status, answer.body["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("STORE_UNAVAILABLE"))
    );
    let message = answer.body["message"].as_str().unwrap();
    for inside in ["127.0.0.1", "pool", "refused", "timed out", "nowhere", "pw"] {
        assert!(!message.contains(inside), "the client was told {message:?}");
    }
    assert_described(
        &tally_api::openapi::document(),
        "/v1/customers/{id}/usage",
        "GET",
        &answer,
    );

    // A caller's own plain request id is kept; a hostile one is replaced.
    for (sent, kept) in [("gw-123.abc", true), ("<script>alert(1)</script>", false)] {
        let request = Request::get("/nope")
            .header(
                "x-request-id",
                axum::http::HeaderValue::from_bytes(sent.as_bytes()).unwrap(),
            )
            .body(Body::empty())
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let id = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(id == sent, kept, "{sent:?} -> {id:?}");
    }
}

/// A real listener with tight limits, for the connection-level attacks.
struct Server {
    address: String,
    stop: CancellationToken,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
    _db: tally_db::testing::TestDatabase,
}

async fn server(limits: EdgeLimits) -> Server {
    let db = database().await;
    let config = ServeConfig {
        limits: limits.clone(),
        ..ServeConfig::default()
    };
    let app = router(state(&db, &RateLimits::default()).await, &config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let stop = CancellationToken::new();
    let served = tokio::spawn(tally_api::serve(listener, app, limits, stop.clone()));
    Server {
        address,
        stop,
        served,
        _db: db,
    }
}

fn tight() -> EdgeLimits {
    EdgeLimits {
        header_read_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(2),
        max_connections: 200,
        max_in_flight: 2,
        shutdown_timeout: Duration::from_secs(1),
        ..EdgeLimits::default()
    }
}

/// Sends `head` and reads one answer: its head and a body of its `content-length`, or up to the
/// server closing, or `within`.
async fn raw(address: &str, head: &str, within: Duration) -> String {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(within, async {
        let mut buffer = [0u8; 4096];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buffer[..n]),
            }
            if complete(&answer) {
                break;
            }
        }
    })
    .await;
    String::from_utf8_lossy(&answer).into_owned()
}

fn complete(answer: &[u8]) -> bool {
    let text = String::from_utf8_lossy(answer);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    head.lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())
                .flatten()
        })
        .is_some_and(|length| body.len() >= length)
}

async fn healthz(address: &str) -> Duration {
    let started = Instant::now();
    let answer = raw(
        address,
        "GET /healthz HTTP/1.1\r\nHost: tally\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_connections_are_cut_while_a_normal_client_is_served() {
    let server = server(tight()).await;
    let mut tricklers = Vec::new();
    for _ in 0..50 {
        let mut stream = TcpStream::connect(&server.address).await.unwrap();
        tricklers.push(tokio::spawn(async move {
            let started = Instant::now();
            let _ = stream.write_all(b"POST /v1/quota/check HTTP/1.1\r\n").await;
            // One header byte every 100 ms, for as long as the server lets us.
            let mut buffer = [0u8; 1024];
            loop {
                if stream.write_all(b"X").await.is_err() {
                    break;
                }
                match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buffer))
                    .await
                {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(_)) | Err(_) => {}
                }
                if started.elapsed() > Duration::from_secs(10) {
                    return None;
                }
            }
            Some(started.elapsed())
        }));
    }
    // A normal client is served all along.
    let mut slowest = Duration::ZERO;
    for _ in 0..15 {
        slowest = slowest.max(healthz(&server.address).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        slowest < Duration::from_millis(500),
        "a normal request took {slowest:?}"
    );
    for trickler in tricklers {
        let cut_after = trickler
            .await
            .unwrap()
            .expect("a trickling connection was never cut");
        assert!(
            cut_after < Duration::from_secs(3),
            "cut only after {cut_after:?}"
        );
    }
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let server = server(tight()).await;
    let mut stream = TcpStream::connect(&server.address).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: tally\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = [0u8; 1024];
    let n = stream.read(&mut buffer).await.unwrap();
    assert!(buffer[..n].starts_with(b"HTTP/1.1 200"));
    let started = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "an idle connection stayed open for 5 s");
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[tokio::test]
async fn large_bodies_are_refused_without_being_read() {
    let server = server(tight()).await;
    let started = Instant::now();
    // A gigabyte announced, nothing sent: refused on the headers alone.
    let unauthenticated = raw(
        &server.address,
        "POST /v1/events HTTP/1.1\r\nHost: tally\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(
        unauthenticated.starts_with("HTTP/1.1 401"),
        "{unauthenticated}"
    );
    let authenticated = raw(
        &server.address,
        &format!("POST /v1/events HTTP/1.1\r\nHost: tally\r\nAuthorization: Bearer {INGEST}\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n"),
        Duration::from_secs(3),
    )
    .await;
    assert!(authenticated.starts_with("HTTP/1.1 413"), "{authenticated}");
    let check = raw(
        &server.address,
        &format!("POST /v1/quota/check HTTP/1.1\r\nHost: tally\r\nAuthorization: Bearer {CHECK}\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"),
        Duration::from_secs(3),
    )
    .await;
    assert!(
        check.starts_with("HTTP/1.1 413"),
        "a check body is small: {check}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // Without a Content-Length, the body is cut off at the limit while it is read.
    let mut stream = TcpStream::connect(&server.address).await.unwrap();
    stream
        .write_all(format!("POST /v1/quota/check HTTP/1.1\r\nHost: tally\r\nAuthorization: Bearer {CHECK}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 8192, "a".repeat(8192));
    let mut answer = String::new();
    for _ in 0..8 {
        if stream.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let mut buffer = [0u8; 4096];
    if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buffer)).await
    {
        answer.push_str(&String::from_utf8_lossy(&buffer[..n]));
    }
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_max_in_flight_are_shed_and_slow_ones_cut_at_the_deadline() {
    let server = server(tight()).await;
    // Two requests whose bodies trickle hold both in-flight places.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(&server.address).await.unwrap();
        stream
            .write_all(format!("POST /v1/quota/check HTTP/1.1\r\nHost: tally\r\nAuthorization: Bearer {CHECK}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{").as_bytes())
            .await
            .unwrap();
        slow.push(tokio::spawn(async move {
            let started = Instant::now();
            let mut answer = Vec::new();
            let mut buffer = [0u8; 1024];
            loop {
                let _ = stream.write_all(b" ").await;
                match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buffer))
                    .await
                {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => answer.extend_from_slice(&buffer[..n]),
                    Err(_) => {}
                }
                if started.elapsed() > Duration::from_secs(10) {
                    break;
                }
            }
            (
                started.elapsed(),
                String::from_utf8_lossy(&answer).into_owned(),
            )
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let shed = raw(
        &server.address,
        &format!("GET /v1/customers/acme/entitlements HTTP/1.1\r\nHost: tally\r\nAuthorization: Bearer {ADMIN}\r\nConnection: close\r\n\r\n"),
        Duration::from_secs(3),
    )
    .await;
    assert!(shed.starts_with("HTTP/1.1 503"), "{shed}");
    assert!(shed.to_lowercase().contains("retry-after: 1"), "{shed}");
    assert!(shed.contains("OVERLOADED"), "{shed}");
    for slow in slow {
        let (took, answer) = slow.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(took < Duration::from_secs(4), "cut after {took:?}");
    }
    // Places are free again.
    let answer = raw(
        &server.address,
        &format!("GET /v1/customers/acme/entitlements HTTP/1.1\r\nHost: tally\r\nAuthorization: Bearer {ADMIN}\r\nConnection: close\r\n\r\n"),
        Duration::from_secs(3),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn connections_past_max_connections_are_answered_503() {
    let server = server(EdgeLimits {
        max_connections: 5,
        ..tight()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(TcpStream::connect(&server.address).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = raw(
        &server.address,
        "GET /healthz HTTP/1.1\r\nHost: tally\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("OVERLOADED"), "{refused}");
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    healthz(&server.address).await;
}

#[tokio::test]
async fn shutdown_waits_for_requests_in_flight_no_longer_than_its_timeout() {
    let server = server(EdgeLimits {
        request_timeout: Duration::from_secs(30),
        ..tight()
    })
    .await;
    let mut stream = TcpStream::connect(&server.address).await.unwrap();
    stream
        .write_all(format!("POST /v1/quota/check HTTP/1.1\r\nHost: tally\r\nAuthorization: Bearer {CHECK}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{").as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    server.stop.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(5), server.served).await;
    assert!(ended.is_ok(), "serve did not end within 5 s of the stop");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "shutdown took {took:?} with a 1 s shutdown_timeout"
    );
}
