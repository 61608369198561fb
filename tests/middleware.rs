//! The quota middleware (`tally_quota::layer::QuotaLayer`) in an axum service, against the real
//! ingest path: a fresh database, Kafka (mock cluster), an aggregator on its own thread. It
//! lets requests through within the limit with `RateLimit-*` headers, denies at the limit with
//! tally-api's body and headers, refuses a disabled feature and a request without a customer,
//! and emits usage once per request: a retry under a trusted gateway's id is counted once, a
//! quantity the handler reports is what is counted, a 5xx emits nothing, and an emit failure
//! does not fail the response. And as an attacker would: a client cannot choose whom to bill,
//! nor make its requests count once by repeating an id, nor pre-empt another customer's ids.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::HeaderName;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use chrono::{DateTime, TimeDelta, Utc};
use http_body_util::BodyExt;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use tally_billing::testing::subscribe;
use tally_billing::{apply_plans, PlanDefinition};
use tally_emitter::Emitter;
use tally_quota::layer::{
    event_id, AuthenticatedCustomer, MeteredRequestId, QuotaLayer, UsageQuantity,
};
use tally_quota::Quota;
use tally_tests::IngestPipeline;
use tower::ServiceExt;

/// The gateway's request id header the service trusts (the gateway keeps it on its retries).
const GATEWAY_ID: &str = "x-gateway-request-id";

/// The service's own authentication: `Authorization: Bearer key-<customer>` is that customer.
async fn authenticate(
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let customer = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer key-"))
        .map(str::to_owned);
    if let Some(customer) = customer {
        request
            .extensions_mut()
            .insert(AuthenticatedCustomer(customer));
    }
    next.run(request).await
}

/// The service under test: `/search` (one `api_calls`, feature `api`), `/sso` (feature `sso`,
/// off on the plan), `/complete` (the `tokens` its handler reports in `x-tokens`, 100
/// estimated), `/broken` (7 `tokens`, answers 500). Customers come from its authentication;
/// request ids from its gateway's header when `trusted_ids`, else from the layer. Handlers
/// count their calls and echo the request id they were metered under.
fn service(
    quota: &Arc<Quota>,
    emitter: &Arc<Emitter>,
    handled: &Arc<AtomicUsize>,
    trusted_ids: bool,
) -> Router {
    let layer = |meter: &str| {
        let layer = QuotaLayer::new(quota.clone(), emitter.clone(), meter);
        if trusted_ids {
            layer.request_id_from_trusted_header(HeaderName::from_static(GATEWAY_ID))
        } else {
            layer
        }
    };
    let counted = |handled: &Arc<AtomicUsize>| {
        let handled = handled.clone();
        move |id: Extension<MeteredRequestId>| {
            handled.fetch_add(1, Ordering::SeqCst);
            async move { Json(json!({ "request_id": id.0 .0 })) }
        }
    };
    let complete = {
        let handled = handled.clone();
        move |headers: HeaderMap, id: Extension<MeteredRequestId>| {
            handled.fetch_add(1, Ordering::SeqCst);
            // Read as text, never through f64.
            let tokens: Decimal = headers["x-tokens"].to_str().unwrap().parse().unwrap();
            async move {
                (
                    Extension(UsageQuantity(tokens)),
                    Json(json!({ "request_id": id.0 .0 })),
                )
            }
        }
    };
    Router::new()
        .route(
            "/search",
            get(counted(handled)).layer(layer("api_calls").require_feature("api")),
        )
        .route(
            "/sso",
            get(counted(handled)).layer(layer("api_calls").require_feature("sso")),
        )
        .route(
            "/complete",
            post(complete).layer(
                layer("tokens")
                    .quantity(Decimal::from(100))
                    .quantity_from_response(),
            ),
        )
        .route(
            "/broken",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "boom") })
                .layer(layer("tokens").quantity(Decimal::from(7))),
        )
        .layer(axum::middleware::from_fn(authenticate))
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    fn seconds(&self, name: &str) -> u64 {
        self.header(name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .parse()
            .unwrap()
    }
}

async fn send(app: &Router, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut request = Request::builder().method(method).uri(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

/// `acme`, authenticated, with the gateway's request id `id` (none when empty).
fn acme(id: &str) -> Vec<(&str, &str)> {
    let mut headers = vec![("authorization", "Bearer key-acme")];
    if !id.is_empty() {
        headers.push((GATEWAY_ID, id));
    }
    headers
}

async fn usage(pool: &sqlx::PgPool, meter: &str) -> Decimal {
    sqlx::query_scalar(
        "SELECT COALESCE(sum(value), 0) FROM usage_minute WHERE customer_id = 'acme' AND meter = $1",
    )
    .bind(meter)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Polls until the windows hold `expected` of each meter (the aggregator committed them).
async fn wait_for_usage(pool: &sqlx::PgPool, expected: &[(&str, Decimal)]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut seen = Vec::new();
        for (meter, _) in expected {
            seen.push((*meter, usage(pool, meter).await));
        }
        if seen == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "usage {seen:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_before_the_handler_and_emits_once_per_request_id_after_it() {
    let pipeline = IngestPipeline::start(Duration::from_millis(50)).await;
    let pool = pipeline.db.pool.clone();
    let plan: PlanDefinition = serde_json::from_value(json!({
        "name": "FREE", "features": { "api": true, "sso": false },
        "limits": {
            "api_calls": { "limit": "3", "period": "day", "enforcement": "hard" },
            "tokens": { "limit": "10000", "period": "day", "enforcement": "hard" },
        }
    }))
    .unwrap();
    apply_plans(&pool, &[plan], "test").await.unwrap();
    subscribe(&pool, "acme", "FREE", Utc::now() - TimeDelta::days(1)).await;
    // A refresh far away: the cache reloads only when the test says so (`invalidate`), so what
    // each check counts locally is exact.
    let quota = Arc::new(
        Quota::new(pool.clone(), Duration::from_secs(3600))
            .await
            .unwrap(),
    );
    let emitter = pipeline.emitter.emitter.clone();
    let handled = Arc::new(AtomicUsize::new(0));
    let app = service(&quota, &emitter, &handled, true);
    let midnight = (Utc::now().date_naive() + TimeDelta::days(1))
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    let until_midnight = u64::try_from((midnight - Utc::now()).num_seconds()).unwrap() + 1;

    // Refused before the handler: no customer (a header naming one is not authentication),
    // a feature off.
    let answer = send(
        &app,
        "GET",
        "/search",
        &[("x-customer-id", "acme"), (GATEWAY_ID, "n1")],
    )
    .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.body["code"], "UNAUTHORIZED");
    let answer = send(&app, "GET", "/sso", &acme("s1")).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert_eq!(answer.body["code"], "FEATURE_DISABLED", "{}", answer.body);
    assert!(answer.header("ratelimit-limit").is_none());
    assert_eq!(handled.load(Ordering::SeqCst), 0);

    // Allowed, with the limit, what is left after the request, and the seconds until midnight.
    let answer = send(&app, "GET", "/search", &acme("r1")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body["request_id"], "r1");
    assert_eq!(answer.header("ratelimit-limit"), Some("3"));
    assert_eq!(answer.header("ratelimit-remaining"), Some("2"));
    let reset = answer.seconds("ratelimit-reset");
    assert!((1..=until_midnight).contains(&reset), "{reset}");
    // The retry is checked (and counted in this process until the cache reloads) but its
    // usage is the same event again.
    let answer = send(&app, "GET", "/search", &acme("r1")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.header("ratelimit-remaining"), Some("1"));
    let answer = send(&app, "GET", "/search", &acme("r2")).await;
    assert_eq!(answer.header("ratelimit-remaining"), Some("0"));

    // At the limit: 429, tally-api's body, the headers; the handler does not run.
    let answer = send(&app, "GET", "/search", &acme("r3")).await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(handled.load(Ordering::SeqCst), 3);
    let resets_at: DateTime<Utc> = answer.body["resets_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(resets_at, midnight);
    assert_eq!(
        answer.body,
        json!({
            "code": "LIMIT_EXCEEDED", "metric": "api_calls", "limit": "3", "current": "3",
            "resets_at": answer.body["resets_at"], "upgrade_hint": true,
        })
    );
    assert_eq!(answer.header("ratelimit-limit"), Some("3"));
    assert_eq!(answer.header("ratelimit-remaining"), Some("0"));
    let retry_after = answer.seconds("retry-after");
    assert_eq!(answer.seconds("ratelimit-reset"), retry_after);
    assert!((1..=until_midnight).contains(&retry_after), "{retry_after}");

    // A 5xx emits nothing (its check counted 7 tokens locally; the reload forgets them).
    let answer = send(&app, "GET", "/broken", &acme("b1")).await;
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(answer.header("ratelimit-remaining"), Some("9993"));
    // The tokens the handler reports are what is emitted; the check counted the estimate.
    let answer = send(
        &app,
        "POST",
        "/complete",
        &[
            ("authorization", "Bearer key-acme"),
            (GATEWAY_ID, "c1"),
            ("x-tokens", "1234.5"),
        ],
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.header("ratelimit-remaining"), Some("9893"));
    // Without the gateway's id one is made, and the handler sees it.
    let answer = send(
        &app,
        "POST",
        "/complete",
        &[("authorization", "Bearer key-acme"), ("x-tokens", "0.25")],
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let generated = answer.body["request_id"].as_str().unwrap().to_owned();
    assert_eq!(
        uuid::Uuid::parse_str(&generated).unwrap().get_version_num(),
        7
    );
    // A quantity outside tally's domain cannot be emitted: logged and counted, and the
    // response still goes out.
    let rejected_before = emitter.stats().rejected;
    let answer = send(
        &app,
        "POST",
        "/complete",
        &[
            ("authorization", "Bearer key-acme"),
            (GATEWAY_ID, "c-bad"),
            ("x-tokens", "-5"),
        ],
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(emitter.stats().rejected, rejected_before + 1);

    // One customer's events share a partition, in order: once r2 and the last tokens are in
    // the windows, the copy of r1 and the 5xx (sent before them) were seen too.
    wait_for_usage(
        &pool,
        &[
            ("api_calls", Decimal::from(2)),
            ("tokens", Decimal::new(123_475, 2)),
        ],
    )
    .await;
    let ids: BTreeSet<String> = sqlx::query_scalar("SELECT id FROM event_ids")
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let expected: BTreeSet<String> = [
        event_id("acme", b"r1", "api_calls"),
        event_id("acme", b"r2", "api_calls"),
        event_id("acme", b"c1", "tokens"),
        event_id("acme", generated.as_bytes(), "tokens"),
    ]
    .into();
    assert_eq!(
        ids, expected,
        "one event per request id and meter; none for b1"
    );
    // The copy of r1 is a plain duplicate, or (sent in the next minute) a conflicting one:
    // never counted, and nothing else is refused.
    let rejected: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT reason, event_id FROM rejected_events")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(
        rejected
            .iter()
            .all(|(reason, id)| reason == "conflicting_duplicate"
                && id.as_deref() == Some(event_id("acme", b"r1", "api_calls").as_str())),
        "{rejected:?}"
    );

    // Reloaded from what the aggregator committed (the retry counted once): room for one more.
    quota.invalidate("acme");
    let answer = send(&app, "GET", "/search", &acme("r3")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.header("ratelimit-remaining"), Some("0"));
    let answer = send(&app, "GET", "/search", &acme("r4")).await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    wait_for_usage(&pool, &[("api_calls", Decimal::from(3))]).await;
}

/// As an attacker would: with the layer's defaults a client cannot bill another customer (a
/// customer header is not authentication), cannot make its requests count once by sending
/// the same request id every time, and cannot pre-empt another customer's request ids; a
/// trusted gateway's ids are scoped to the customer too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_chooses_neither_whom_to_bill_nor_which_requests_are_the_same() {
    let pipeline = IngestPipeline::start(Duration::from_millis(50)).await;
    let pool = pipeline.db.pool.clone();
    let plan: PlanDefinition = serde_json::from_value(json!({
        "name": "FREE", "features": { "api": true, "sso": true },
        "limits": {
            "api_calls": { "limit": "1000", "period": "day", "enforcement": "hard" },
            "tokens": { "limit": "10000", "period": "day", "enforcement": "hard" },
        }
    }))
    .unwrap();
    apply_plans(&pool, &[plan], "test").await.unwrap();
    for customer in ["acme", "globex"] {
        subscribe(&pool, customer, "FREE", Utc::now() - TimeDelta::days(1)).await;
    }
    let quota = Arc::new(
        Quota::new(pool.clone(), Duration::from_secs(3600))
            .await
            .unwrap(),
    );
    let emitter = pipeline.emitter.emitter.clone();
    let handled = Arc::new(AtomicUsize::new(0));
    let defaults = service(&quota, &emitter, &handled, false);
    let gateway = service(&quota, &emitter, &handled, true);

    // Authenticated as acme, naming globex in every header a client could try: acme is billed.
    for _ in 0..5 {
        let answer = send(
            &defaults,
            "GET",
            "/search",
            &[
                ("authorization", "Bearer key-acme"),
                ("x-customer-id", "globex"),
                ("x-request-id", "same-every-time"),
                (GATEWAY_ID, "same-every-time"),
            ],
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_ne!(answer.body["request_id"], "same-every-time");
    }
    // Unauthenticated, a customer header is not enough.
    let answer = send(&defaults, "GET", "/search", &[("x-customer-id", "acme")]).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    // Behind the trusted gateway, both customers use request id "g1": each is counted; the
    // gateway's retry of acme's is counted once.
    for customer in ["key-acme", "key-globex", "key-acme"] {
        let bearer = format!("Bearer {customer}");
        let answer = send(
            &gateway,
            "GET",
            "/search",
            &[("authorization", bearer.as_str()), (GATEWAY_ID, "g1")],
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    let counted = |customer: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, Decimal>(
                "SELECT COALESCE(sum(value), 0) FROM usage_minute WHERE customer_id = $1 AND meter = 'api_calls'",
            )
            .bind(customer)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while (counted("acme").await, counted("globex").await) != (Decimal::from(6), Decimal::ONE) {
        assert!(
            Instant::now() < deadline,
            "acme {} (expected 6: five requests and g1 once), globex {} (expected 1)",
            counted("acme").await,
            counted("globex").await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let conflicts: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM rejected_events WHERE reason = 'conflicting_duplicate'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        conflicts <= 1,
        "only acme's own retry of g1 may be a duplicate: {conflicts}"
    );
}
