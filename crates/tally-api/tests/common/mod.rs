//! What the API tests share: one request through the router, and its answer.

// Each test binary that includes this module reads only some of an answer.
#![allow(dead_code)]

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) request_id: Option<String>,
    pub(crate) retry_after: Option<String>,
    /// JSON, or the text of a body that is not.
    pub(crate) body: Value,
}

pub(crate) async fn call(
    app: &axum::Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<String>,
) -> Answer {
    call_with_headers(app, method, path, token, &[], body).await
}

/// [`call`] with more request headers.
pub(crate) async fn call_with_headers(
    app: &axum::Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> Answer {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = app
        .clone()
        .oneshot(
            request
                .body(body.map_or_else(Body::empty, Body::from))
                .unwrap(),
        )
        .await
        .unwrap();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let (status, request_id, retry_after) = (
        response.status(),
        header("x-request-id"),
        header("retry-after"),
    );
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        request_id,
        retry_after,
        body: serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned())),
    }
}

/// The tokens of [`AdminApi`]: an admin (`ops`), a check token (`gateway`), and the customer
/// tokens of `acme` and `beta`.
pub(crate) const ADMIN: &str = "admin-token-0123456789abcdef";
pub(crate) const GATEWAY: &str = "check-token-0123456789abcdef";
pub(crate) const ACME: &str = "acme-token-0123456789abcdef0";
pub(crate) const BETA: &str = "beta-token-0123456789abcdef0";

/// The admin API's test harness: the router over a database, with the tokens above, answers
/// checked against the OpenAPI document.
pub(crate) struct AdminApi {
    pub(crate) app: axum::Router,
    document: Value,
}

impl AdminApi {
    /// The quota cache refreshes once an hour, so what a check sees right after a change comes
    /// from the API's invalidation.
    pub(crate) async fn new(pool: &sqlx::PgPool, fallback_plan: Option<&str>) -> AdminApi {
        AdminApi::with_destinations(pool, fallback_plan, Default::default()).await
    }

    /// [`AdminApi::new`] with alert endpoints allowed where `destinations` says.
    pub(crate) async fn with_destinations(
        pool: &sqlx::PgPool,
        fallback_plan: Option<&str>,
        destinations: tally_alerts::Destinations,
    ) -> AdminApi {
        use tally_api::{ApiToken, Scope};
        let tokens = [
            ApiToken::new("ops", Scope::Admin, None, ADMIN),
            ApiToken::new("gateway", Scope::Check, None, GATEWAY),
            ApiToken::new("acme", Scope::Customer, Some("acme"), ACME),
            ApiToken::new("beta", Scope::Customer, Some("beta"), BETA),
        ];
        let state = tally_api::ApiState {
            quota: tally_quota::Quota::new(pool.clone(), std::time::Duration::from_secs(3600))
                .await
                .unwrap(),
            pool: pool.clone(),
            reader_pool: pool.clone(),
            access: tally_api::Access::new(&tokens, &tally_api::RateLimits::default()),
            metrics: None,
            emitter: None,
            stripe_webhook: None,
            fallback_plan: fallback_plan.map(str::to_owned),
            alert_destinations: destinations,
            billing: Default::default(),
            pipeline: Default::default(),
        };
        AdminApi {
            app: tally_api::router(std::sync::Arc::new(state), &{
                let mut config = tally_api::ServeConfig::default();
                config.web.console = true;
                config
            }),
            document: tally_api::openapi::document(),
        }
    }

    /// Calls `path` (an instance of the OpenAPI `template`) and checks the answer against the
    /// document.
    pub(crate) async fn call_with(
        &self,
        method: &str,
        template: &str,
        path: &str,
        token: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let answer = call_with_headers(
            &self.app,
            method,
            path,
            Some(token),
            headers,
            body.map(|b| b.to_string()),
        )
        .await;
        tally_api::openapi::check_answer(
            &self.document,
            template,
            method,
            answer.status.as_u16(),
            &answer.body,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        (answer.status, answer.body)
    }

    pub(crate) async fn call(
        &self,
        method: &str,
        template: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.call_with(method, template, path, token, &[], body)
            .await
    }
}
