//! Request-level protection, on every route: a request id on every answer (and on every error
//! body and its log line), a panic answered 500 instead of a dropped connection, load shedding
//! (503 with `Retry-After` once `max_in_flight` requests are being handled, instead of queueing
//! without end), and a deadline per request (408). Connection-level limits are in `server.rs`;
//! tokens, scopes, rate limits and body sizes in `auth.rs`.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;

use crate::error::{ApiError, ErrorReport};
use crate::telemetry;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The id of the request being handled (also in the `x-request-id` answer header).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// A caller's own `x-request-id` is kept when it is short and plain (so a gateway's id follows
/// the request into tally's log); anything else gets a fresh UUIDv7.
fn request_id_of(request: &Request) -> String {
    request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|id| {
            (1..=64).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map_or_else(|| uuid::Uuid::now_v7().to_string(), str::to_owned)
}

/// Outermost layer: gives the request its id, turns a panic into 500 INTERNAL, adds the id to
/// every error body, and logs what the client is not told.
pub(crate) async fn request_id(mut request: Request, next: Next) -> Response {
    let id = request_id_of(&request);
    request.extensions_mut().insert(RequestId(id.clone()));
    // Kept for the log line of an error; the path is cut short only if one is written.
    let method = request.method().clone();
    let uri = request.uri().clone();
    let response = match AssertUnwindSafe(next.run(request)).catch_unwind().await {
        Ok(response) => response,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            ApiError::internal("handler panicked", what).into_response()
        }
    };
    let mut response = match response.extensions().get::<ErrorReport>().cloned() {
        None => response,
        Some(report) => {
            let status = response.status();
            let detail = report.detail.as_deref().unwrap_or("");
            let path: String = redacted(uri.path()).chars().take(200).collect();
            if status.is_server_error() {
                tracing::error!(request_id = %id, %method, path = %path.escape_debug(), %status, code = report.code, detail, "request failed");
            } else if report.detail.is_some() {
                tracing::warn!(request_id = %id, %method, path = %path.escape_debug(), %status, code = report.code, detail, "request refused");
            } else {
                tracing::debug!(request_id = %id, %method, path = %path.escape_debug(), %status, code = report.code, "request refused");
            }
            if report.keep_body {
                response
            } else {
                let body = serde_json::json!({
                    "code": report.code, "message": report.message, "request_id": id,
                });
                let (mut parts, _) = response.into_parts();
                parts.headers.remove(header::CONTENT_LENGTH);
                Response::from_parts(parts, Body::from(body.to_string()))
            }
        }
    };
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

/// A path as logged: a session link's secret (`/portal/session/…`, `/console/session/…`) is
/// left out, in case the link is still good.
fn redacted(path: &str) -> String {
    for prefix in ["/portal/session/", "/console/session/"] {
        if path.starts_with(prefix) {
            return format!("{prefix}…");
        }
    }
    path.to_owned()
}

/// Requests being handled, and the limits on them.
#[derive(Clone)]
pub(crate) struct InFlight {
    count: Arc<AtomicUsize>,
    max: usize,
    timeout: Duration,
}

impl InFlight {
    pub(crate) fn new(max: usize, timeout: Duration) -> InFlight {
        InFlight {
            count: Arc::new(AtomicUsize::new(0)),
            max,
            timeout,
        }
    }
}

struct Leaving(Arc<AtomicUsize>);

impl Drop for Leaving {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sheds a request beyond `max_in_flight` (503 `OVERLOADED`, `Retry-After: 1`) and cuts one
/// that takes longer than `request_timeout`, its body's upload included (408, and the
/// connection is closed: the rest of a slow body is not waited for).
pub(crate) async fn shed_and_deadline(
    State(in_flight): State<InFlight>,
    request: Request,
    next: Next,
) -> Response {
    let _leaving = Leaving(in_flight.count.clone());
    if in_flight.count.fetch_add(1, Ordering::AcqRel) >= in_flight.max {
        telemetry::shed("in_flight");
        let mut response = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "OVERLOADED",
            "the server is handling as many requests as it may; retry after 1 s",
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    }
    match tokio::time::timeout(in_flight.timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            telemetry::shed("request_timeout");
            let mut response = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "REQUEST_TIMEOUT",
                format!(
                    "the request took longer than {} s (serve.limits.request_timeout)",
                    in_flight.timeout.as_secs_f64()
                ),
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::redacted;

    #[test]
    fn a_session_links_secret_is_never_logged() {
        assert_eq!(redacted("/portal/session/0123abcd"), "/portal/session/…");
        assert_eq!(redacted("/console/session/0123abcd"), "/console/session/…");
        assert_eq!(redacted("/v1/customers/acme"), "/v1/customers/acme");
    }
}
