//! Metric names of the HTTP API, in one place, and the layer that counts requests.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;

/// Requests answered, by `route` (the path pattern, never the raw path) and `status`.
pub const REQUESTS: &str = "tally_api_requests_total";
/// Time from the request's arrival to its answer, by `route`.
pub const REQUEST_SECONDS: &str = "tally_api_request_seconds";
/// Quota decisions, by `decision` (allow, warn, deny).
pub const QUOTA_DECISIONS: &str = "tally_api_quota_decisions_total";
/// Events through `POST /v1/events`, by `result` (accepted, rejected, unavailable).
pub const INGESTED_EVENTS: &str = "tally_api_ingested_events_total";
/// Stripe webhook events, by `type` and `outcome` (applied, stale, ignored, replay, refused,
/// failed).
pub const STRIPE_WEBHOOKS: &str = "tally_api_stripe_webhooks_total";
/// Time from Stripe creating an event to tally receiving it verified: Stripe's delivery delay,
/// retries included.
pub const STRIPE_WEBHOOK_DELAY_SECONDS: &str = "tally_api_stripe_webhook_delay_seconds";
/// Requests refused by a token's rate limit (429 `RATE_LIMITED`), by `scope`.
pub const RATE_LIMITED: &str = "tally_api_rate_limited_total";
/// Requests and connections shed, by `reason` (in_flight, connections, request_timeout).
pub const SHED: &str = "tally_api_shed_total";
/// Connections open on the public listener.
pub const OPEN_CONNECTIONS: &str = "tally_api_open_connections";

pub fn describe() {
    use metrics::{describe_counter, describe_histogram, Unit};
    describe_counter!(REQUESTS, "HTTP requests answered, by route and status");
    describe_histogram!(
        REQUEST_SECONDS,
        Unit::Seconds,
        "HTTP request time, by route"
    );
    describe_counter!(QUOTA_DECISIONS, "Quota decisions, by decision");
    describe_counter!(INGESTED_EVENTS, "Events posted to /v1/events, by result");
    describe_counter!(
        STRIPE_WEBHOOKS,
        "Stripe webhook events, by type and outcome"
    );
    describe_counter!(
        RATE_LIMITED,
        "Requests refused by a token's rate limit, by scope"
    );
    describe_counter!(SHED, "Requests and connections shed (503/408), by reason");
    metrics::describe_gauge!(OPEN_CONNECTIONS, "Connections open on the public listener");
}

/// Counts and times every request under its route pattern.
pub(crate) async fn track(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(REQUESTS, "route" => route.clone(), "status" => status).increment(1);
    metrics::histogram!(REQUEST_SECONDS, "route" => route).record(started.elapsed().as_secs_f64());
    response
}

pub(crate) fn quota_decision(decision: &'static str) {
    metrics::counter!(QUOTA_DECISIONS, "decision" => decision).increment(1);
}

pub(crate) fn ingested(result: &'static str, count: u64) {
    if count > 0 {
        metrics::counter!(INGESTED_EVENTS, "result" => result).increment(count);
    }
}

pub(crate) fn webhook(event_type: &str, outcome: &'static str) {
    metrics::counter!(STRIPE_WEBHOOKS, "type" => event_type.to_owned(), "outcome" => outcome)
        .increment(1);
}

pub(crate) fn webhook_delay(created: chrono::DateTime<chrono::Utc>) {
    let delay = (chrono::Utc::now() - created).num_milliseconds().max(0) as f64 / 1000.0;
    metrics::histogram!(STRIPE_WEBHOOK_DELAY_SECONDS).record(delay);
}

pub(crate) fn rate_limited(scope: crate::config::Scope) {
    metrics::counter!(RATE_LIMITED, "scope" => scope.as_str()).increment(1);
}

pub(crate) fn shed(reason: &'static str) {
    metrics::counter!(SHED, "reason" => reason).increment(1);
}

/// Counts a connection in [`OPEN_CONNECTIONS`] while it lives.
pub(crate) struct OpenConnection;

impl OpenConnection {
    pub(crate) fn new() -> OpenConnection {
        metrics::gauge!(OPEN_CONNECTIONS).increment(1.0);
        OpenConnection
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::gauge!(OPEN_CONNECTIONS).decrement(1.0);
    }
}
