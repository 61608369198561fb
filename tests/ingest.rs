//! `POST /v1/events` through the real path: HTTP → emitter → Kafka (mock cluster) →
//! aggregator → windows, and the quota check sees the usage once committed. Refused events are
//! in `rejected_events`, never lost.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use chrono::{TimeDelta, Utc};
use http_body_util::BodyExt;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use tally_api::{router, Access, ApiState, ApiToken, RateLimits, Scope, ServeConfig};
use tally_billing::testing::subscribe;
use tally_billing::{apply_plans, PlanDefinition};
use tally_quota::{Decision, Quota};
use tally_tests::IngestPipeline;
use tower::ServiceExt;

const ADMIN: &str = "admin-token-0123456789abcdef";
const ACME: &str = "acme-token-0123456789abcdef0";

async fn post(state: &Arc<ApiState>, token: &str, body: Value) -> (StatusCode, Value) {
    post_text(state, token, body.to_string()).await
}

/// Posts a body as written (a `Value` would pass numbers through `f64` on the way).
async fn post_text(state: &Arc<ApiState>, token: &str, body: String) -> (StatusCode, Value) {
    let request = Request::post("/v1/events")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {token}"))
        .body(Body::from(body))
        .unwrap();
    let response = router(state.clone(), &ServeConfig::default())
        .oneshot(request)
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn api_state(pipeline: &IngestPipeline, quota: Quota) -> Arc<ApiState> {
    let pool = pipeline.db.pool.clone();
    Arc::new(ApiState {
        fallback_plan: None,
        alert_destinations: Default::default(),
        billing: Default::default(),
        pipeline: Default::default(),
        quota,
        pool: pool.clone(),
        reader_pool: pool,
        access: Access::new(
            &[
                ApiToken::new("ops", Scope::Admin, None, ADMIN),
                ApiToken::new("acme", Scope::Customer, Some("acme"), ACME),
            ],
            &RateLimits::default(),
        ),
        metrics: None,
        emitter: Some(pipeline.emitter.emitter.clone()),
        stripe_webhook: None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posted_events_reach_the_windows_and_refused_ones_are_stored() {
    let pipeline = IngestPipeline::start(Duration::from_millis(50)).await;
    let pool = pipeline.db.pool.clone();
    let plan: PlanDefinition = serde_json::from_value(json!({
        "name": "FREE", "limits": { "api_calls": { "limit": "100", "period": "day" } }
    }))
    .unwrap();
    apply_plans(&pool, &[plan], "test").await.unwrap();
    subscribe(&pool, "acme", "FREE", Utc::now() - TimeDelta::days(1)).await;
    let quota = Quota::new(pool.clone(), Duration::from_millis(100))
        .await
        .unwrap();
    let state = api_state(&pipeline, quota);

    let now = Utc::now();
    let batch = json!({ "events": [
        { "customer": "acme", "meter": "api_calls", "quantity": 10 },
        { "id": "e-2", "customer": "acme", "meter": "api_calls", "quantity": "2.5",
          "timestamp": (now - TimeDelta::minutes(3)).to_rfc3339(), "dimensions": { "region": "eu" } },
        { "specversion": "1.0", "id": "ce-1", "source": "billing-svc", "type": "api_calls",
          "subject": "acme", "time": now.to_rfc3339(), "data": { "value": 7 } },
        { "id": "bad-1", "customer": "acme", "meter": "api_calls", "quantity": -1 },
        { "id": "bad-2", "customer": "acme", "meter": "API Calls", "quantity": 1 },
        { "id": "unknown-1", "customer": "acme", "meter": "gpu_seconds", "quantity": 1 },
    ]});
    let (status, body) = post(&state, ADMIN, batch.clone()).await;
    assert_eq!(status, StatusCode::MULTI_STATUS, "{body}");
    assert_eq!(
        (body["accepted"].as_u64(), body["rejected"].as_u64()),
        (Some(4), Some(2))
    );
    let results = body["results"].as_array().unwrap();
    let statuses: Vec<&str> = results
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["accepted", "accepted", "accepted", "rejected", "rejected", "accepted"]
    );
    assert_eq!(results[0]["durability"], "published");
    assert!(
        results[0]["id"].as_str().unwrap().len() == 36,
        "an id was assigned"
    );
    assert_eq!(results[3]["code"], "invalid_quantity");
    assert_eq!(results[4]["code"], "invalid_meter");

    // Refused at the API: stored, with the event as sent.
    let http_rejects: Vec<(String, Option<String>, String)> = sqlx::query_as(
        "SELECT reason, event_id, convert_from(raw, 'UTF8') FROM rejected_events
         WHERE received_via = 'http' ORDER BY event_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(http_rejects.len(), 2);
    assert_eq!(http_rejects[0].0, "invalid_quantity");
    assert_eq!(http_rejects[0].1.as_deref(), Some("bad-1"));
    assert!(http_rejects[1].2.contains("API Calls"));

    // Through Kafka and the aggregator: 10 + 2.5 + 7 in the windows; the unknown meter is
    // refused there, into the same table.
    let mut total = Decimal::ZERO;
    for _ in 0..400 {
        total = sqlx::query_scalar(
            "SELECT COALESCE(sum(value), 0) FROM usage_minute WHERE customer_id = 'acme'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if total == Decimal::new(195, 1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(total, Decimal::new(195, 1));
    let unknown: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM rejected_events WHERE received_via = 'kafka' AND reason = 'unknown_meter'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(unknown, 1);

    // The quota check sees the committed usage after its refresh.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let _ = state.quota.check("acme", "api_calls", Decimal::ZERO).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    match state
        .quota
        .check("acme", "api_calls", Decimal::ZERO)
        .await
        .unwrap()
    {
        Decision::Allow { used, .. } => assert_eq!(used, Decimal::new(195, 1)),
        other => panic!("{other:?}"),
    }

    // Sending the same ids again counts nothing twice.
    let (status, _) = post(
        &state,
        ADMIN,
        json!({ "events": [batch["events"][1], batch["events"][2]] }),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let total: Decimal =
        sqlx::query_scalar("SELECT sum(value) FROM usage_minute WHERE customer_id = 'acme'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(total, Decimal::new(195, 1));

    // Before: the API parsed events into `serde_json::Value`, so a number went through `f64`
    // (12345678901234567890.123 arrived changed), and a NUL in an id was answered 200 and then
    // stopped the aggregator. Now quantities arrive exactly as written, and the NUL is refused
    // here, stored printable.
    let t = (Utc::now() - TimeDelta::minutes(2)).to_rfc3339();
    let raw = format!(
        r#"{{"events":[
            {{"id":"exact-1","customer":"exact","meter":"api_calls","quantity":123456789012345.123456789,"timestamp":"{t}"}},
            {{"id":"exact-2","customer":"exact","meter":"api_calls","quantity":12345678901234567890.123,"timestamp":"{t}"}},
            {{"id":"nul\u0000id","customer":"acme","meter":"api_calls","quantity":1}}
        ]}}"#
    );
    let (status, body) = post_text(&state, ADMIN, raw).await;
    assert_eq!(status, StatusCode::MULTI_STATUS, "{body}");
    let codes: Vec<&str> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_str().unwrap_or("accepted"))
        .collect();
    assert_eq!(codes, ["accepted", "quantity_out_of_range", "invalid_id"]);
    let stored_id: String = sqlx::query_scalar(
        "SELECT event_id FROM rejected_events WHERE reason = 'invalid_id' AND received_via = 'http'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(stored_id, "nul\\u{0}id");
    let mut exact = Decimal::ZERO;
    for _ in 0..400 {
        exact = sqlx::query_scalar(
            "SELECT COALESCE(sum(value), 0) FROM usage_minute WHERE customer_id = 'exact'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if !exact.is_zero() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(exact.to_string(), "123456789012345.123456789");

    // Customer tokens may not report usage; a batch has at most 1,000 events.
    let (status, body) = post(&state, ACME, json!({ "events": [] })).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("FORBIDDEN"))
    );
    let many: Vec<Value> = (0..1001)
        .map(|i| json!({ "customer": "acme", "meter": "api_calls", "quantity": i }))
        .collect();
    let (status, body) = post(&state, ADMIN, json!({ "events": many })).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("INVALID_REQUEST"))
    );
    let (status, body) = post(&state, ADMIN, json!({ "event": [] })).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("INVALID_REQUEST"))
    );
}

/// Hostile values for an event's fields: wrong types, control characters, huge and tiny
/// numbers, deep nesting, long strings.
const HOSTILE: [&str; 22] = [
    "null",
    "true",
    "[]",
    "{}",
    "\"\"",
    "\"\\u0000\"",
    "\"\\u001b[31m\"",
    "\"\\ud800\"",
    "-1",
    "0",
    "1e308",
    "-0.0",
    "1e-30",
    "123456789012345678901234567890",
    "0.0000000001",
    "\"1e5\"",
    "\"NaN\"",
    "[[[[[[[[[[1]]]]]]]]]]",
    "{\"a\":{\"b\":{\"c\":1}}}",
    "\"2026-13-45T99:99:99Z\"",
    "\"x\"",
    "\"é\"",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzed_events_never_answer_500_and_every_refused_one_is_stored() {
    let pipeline = IngestPipeline::start(Duration::from_millis(50)).await;
    let pool = pipeline.db.pool.clone();
    let quota = Quota::new(pool.clone(), Duration::from_secs(60))
        .await
        .unwrap();
    let state = api_state(&pipeline, quota);
    let document = tally_api::openapi::document();
    let fields = [
        "id",
        "customer",
        "meter",
        "quantity",
        "timestamp",
        "dimensions",
        "source",
        "specversion",
        "subject",
        "type",
        "data",
    ];
    let mut seed: u64 = 0x1234_5678_9abc_def1;
    let mut next = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let mut refused_total = 0;
    for batch in 0..60 {
        let mut events = Vec::new();
        for i in 0..1 + next(20) {
            let mut event = format!(
                r#"{{"id":"fuzz-{batch}-{i}","customer":"acme","meter":"api_calls","quantity":1"#
            );
            for _ in 0..next(4) {
                let field = fields[next(fields.len())];
                let value = if next(10) == 0 {
                    format!("\"{}\"", "y".repeat(next(3000)))
                } else {
                    HOSTILE[next(HOSTILE.len())].to_owned()
                };
                event.push_str(&format!(",\"{field}\":{value}"));
            }
            event.push('}');
            events.push(event);
        }
        let body = format!("{{\"events\":[{}]}}", events.join(","));
        let (status, answer) = post_text(&state, ADMIN, body.clone()).await;
        assert!(
            [
                StatusCode::OK,
                StatusCode::MULTI_STATUS,
                StatusCode::BAD_REQUEST
            ]
            .contains(&status),
            "{body} answered {status}: {answer}"
        );
        if let Err(problem) = tally_api::openapi::check_answer(
            &document,
            "/v1/events",
            "POST",
            status.as_u16(),
            &answer,
        ) {
            panic!("{problem}");
        }
        if status != StatusCode::BAD_REQUEST {
            let results = answer["results"].as_array().unwrap();
            assert_eq!(
                results.len(),
                events.len(),
                "one result per event: {answer}"
            );
            assert_eq!(answer["unavailable"], 0, "{answer}");
            refused_total += answer["rejected"].as_u64().unwrap();
        }
    }
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM rejected_events WHERE received_via = 'http'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        stored as u64, refused_total,
        "every refused event is in rejected_events"
    );
    assert!(
        refused_total > 20,
        "the fuzz refused only {refused_total} events"
    );
}
