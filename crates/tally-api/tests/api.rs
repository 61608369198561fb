//! The HTTP API, driven in process through the router.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use chrono::{TimeDelta, Utc};
use serde_json::{json, Value};
use tally_api::{router, Access, ApiState, ApiToken, RateLimits, Scope, ServeConfig};
use tally_billing::testing::subscribe;
use tally_billing::{apply_plans, PlanDefinition};
use tally_quota::Quota;
mod common;

const ADMIN: &str = "admin-token-0123456789abcdef";
const ACME: &str = "acme-token-0123456789abcdef0";

async fn app() -> (tally_db::testing::TestDatabase, axum::Router) {
    let db = tally_db::testing::fresh_database().await;
    sqlx::query("INSERT INTO meters (name, aggregation, stripe_event_name) VALUES ('api_calls', 'sum', 'api_calls'), ('tokens', 'sum', 'tokens')")
        .execute(&db.pool)
        .await
        .unwrap();
    let plan: PlanDefinition = serde_json::from_value(json!({
        "name": "FREE", "features": { "api": true },
        "limits": {
            "api_calls": { "limit": "100", "period": "day" },
            "tokens": { "limit": "-1", "period": "billing_period", "unit_price": "0.002" }
        }
    }))
    .unwrap();
    apply_plans(&db.pool, &[plan], "test").await.unwrap();
    subscribe(&db.pool, "acme", "FREE", Utc::now() - TimeDelta::days(1)).await;
    sqlx::query(
        "INSERT INTO usage_daily (customer_id, meter, day, group_key, value, event_count, first_updated, last_updated)
         VALUES ('acme', 'api_calls', (now() AT TIME ZONE 'UTC')::date, '', 95, 95, now(), now())",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let state = ApiState {
        fallback_plan: None,
        alert_destinations: Default::default(),
        billing: Default::default(),
        pipeline: Default::default(),
        quota: Quota::new(db.pool.clone(), Duration::from_secs(60))
            .await
            .unwrap(),
        pool: db.pool.clone(),
        reader_pool: db.pool.clone(),
        access: Access::new(
            &[
                ApiToken::new("ops", Scope::Admin, None, ADMIN),
                ApiToken::new("acme", Scope::Customer, Some("acme"), ACME),
            ],
            &RateLimits::default(),
        ),
        metrics: None,
        emitter: None,
        stripe_webhook: None,
    };
    let app = router(Arc::new(state), &ServeConfig::default());
    (db, app)
}

async fn call(
    app: &axum::Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<String>,
) -> (StatusCode, Value) {
    let answer = common::call(app, method, path, token, body).await;
    (answer.status, answer.body)
}

fn check(customer: &str, quantity: i64) -> Option<String> {
    Some(json!({ "customer": customer, "meter": "api_calls", "quantity": quantity }).to_string())
}

#[tokio::test]
async fn quota_check_answers_allow_limit_exceeded_and_stable_errors() {
    let (_db, app) = app().await;
    let (status, body) = call(
        &app,
        "POST",
        "/v1/quota/check",
        Some(ADMIN),
        check("acme", 5),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["decision"].as_str(), body["remaining"].as_str()),
        (Some("allow"), Some("0"))
    );

    let (status, body) = call(
        &app,
        "POST",
        "/v1/quota/check",
        Some(ADMIN),
        check("acme", 1),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body["code"], "LIMIT_EXCEEDED");
    assert_eq!(
        (
            body["metric"].as_str(),
            body["limit"].as_str(),
            body["current"].as_str()
        ),
        (Some("api_calls"), Some("100"), Some("100"))
    );
    assert_eq!(body["upgrade_hint"], true);
    assert!(body["resets_at"].is_string());

    let feature = Some(
        json!({ "customer": "acme", "meter": "api_calls", "quantity": 0, "feature": "sso" })
            .to_string(),
    );
    let (status, body) = call(&app, "POST", "/v1/quota/check", Some(ADMIN), feature).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("FEATURE_DISABLED"))
    );

    let (status, body) = call(
        &app,
        "POST",
        "/v1/quota/check",
        Some(ADMIN),
        check("nobody", 1),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("NO_ACTIVE_SUBSCRIPTION"))
    );

    let unknown = Some(json!({ "customer": "acme", "meter": "nope" }).to_string());
    let (status, body) = call(&app, "POST", "/v1/quota/check", Some(ADMIN), unknown).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("UNKNOWN_METER"))
    );

    let (status, body) = call(
        &app,
        "POST",
        "/v1/quota/check",
        Some(ADMIN),
        Some("{\"customer\": 1}".into()),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("INVALID_REQUEST"))
    );

    let (status, _) = call(
        &app,
        "POST",
        "/v1/quota/check",
        Some(ADMIN),
        Some(format!("{{\"customer\": \"{}\"}}", "x".repeat(20_000))),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn tokens_are_required_and_customer_tokens_read_only_their_customer() {
    let (_db, app) = app().await;
    let (status, body) = call(&app, "POST", "/v1/quota/check", None, check("acme", 1)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("UNAUTHORIZED"))
    );
    let (status, _) = call(
        &app,
        "POST",
        "/v1/quota/check",
        Some("acme-token-0123456789abcdef1"),
        check("acme", 1),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = call(
        &app,
        "POST",
        "/v1/quota/check",
        Some(ACME),
        check("zeta", 1),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("FORBIDDEN"))
    );

    let (status, body) = call(
        &app,
        "GET",
        "/v1/customers/acme/entitlements",
        Some(ACME),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["plan"].as_str(), body["status"].as_str()),
        (Some("FREE"), Some("active"))
    );
    assert_eq!(body["limits"]["api_calls"]["limit"], "100");
    assert_eq!(body["features"]["api"], true);
    let (status, _) = call(
        &app,
        "GET",
        "/v1/customers/zeta/entitlements",
        Some(ACME),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    assert_eq!(
        call(&app, "GET", "/healthz", None, None).await.0,
        StatusCode::OK
    );
    assert_eq!(
        call(&app, "GET", "/readyz", None, None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&app, "GET", "/readyz", Some(ADMIN), None).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn usage_series_and_invoice_preview() {
    let (db, app) = app().await;
    let hour = (Utc::now() - TimeDelta::hours(3))
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc()
        + TimeDelta::hours(1);
    for (minute, model, value) in [(0, "small", 10), (1, "large", 5), (61, "small", 7)] {
        sqlx::query(
            "INSERT INTO usage_minute (customer_id, meter, window_start, group_key, value, event_count, first_updated, last_updated)
             VALUES ('acme', 'tokens', $1, $2, $3, 1, now(), now())",
        )
        .bind(hour + TimeDelta::minutes(minute))
        .bind(format!("{{\"model\":\"{model}\"}}"))
        .bind(rust_decimal::Decimal::from(value))
        .execute(&db.pool)
        .await
        .unwrap();
    }
    let range = format!(
        "from={}&to={}",
        (hour).to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        (hour + TimeDelta::hours(2)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    let (status, body) = call(
        &app,
        "GET",
        &format!("/v1/customers/acme/usage?meter=tokens&granularity=hour&{range}"),
        Some(ACME),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let points = &body["series"][0]["points"];
    assert_eq!(
        (points[0]["value"].as_str(), points[1]["value"].as_str()),
        (Some("15"), Some("7"))
    );
    let (_, grouped) = call(
        &app,
        "GET",
        &format!("/v1/customers/acme/usage?meter=tokens&granularity=minute&group_by=true&{range}"),
        Some(ACME),
        None,
    )
    .await;
    assert_eq!(grouped["series"].as_array().unwrap().len(), 2, "{grouped}");
    let (status, body) = call(
        &app,
        "GET",
        &format!("/v1/customers/acme/usage?meter=tokens&granularity=week&{range}"),
        Some(ACME),
        None,
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("INVALID_REQUEST"))
    );

    sqlx::query(
        "INSERT INTO usage_daily (customer_id, meter, day, group_key, value, event_count, first_updated, last_updated)
         VALUES ('acme', 'tokens', (now() AT TIME ZONE 'UTC')::date, '', 5000, 1, now(), now())",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let (status, body) = call(
        &app,
        "GET",
        "/v1/customers/acme/invoice-preview",
        Some(ACME),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["lines"][0]["meter"].as_str(), body["total"].as_str()),
        (Some("tokens"), Some("10.000"))
    );
}

#[tokio::test]
async fn the_openapi_document_describes_every_route() {
    let (_db, app) = app().await;
    let (status, document) = call(&app, "GET", "/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(document["openapi"], "3.1.0");
    let described: Vec<&str> = document["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut expected = tally_api::openapi::PATHS.to_vec();
    expected.sort();
    let mut described = described;
    described.sort();
    assert_eq!(described, expected);
    // Every described path is served (a concrete customer id for the templated ones).
    for path in tally_api::openapi::PATHS {
        let concrete = path.replace("{id}", "acme");
        let method = if concrete == "/v1/quota/check" {
            "POST"
        } else {
            "GET"
        };
        let (status, body) = call(&app, method, &concrete, Some(ADMIN), None).await;
        // An unrouted path is the fallback's NOT_FOUND.
        let unrouted = status == StatusCode::NOT_FOUND && body["code"] == "NOT_FOUND";
        assert!(!unrouted, "{method} {concrete} is not routed");
    }
}

#[tokio::test]
async fn without_kafka_ingest_answers_503() {
    let (_db, app) = app().await;
    let (status, body) = call(
        &app,
        "POST",
        "/v1/events",
        Some(ADMIN),
        Some(json!({ "events": [] }).to_string()),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("INGEST_DISABLED"))
    );
}
