//! API errors: JSON `{"code", "message", "request_id"}` with a stable `code`, a message written
//! for the client, and the status that goes with it. What went wrong inside (a Postgres message,
//! a pool timeout) is never sent: it is logged under the request id the client sees
//! (`edge::request_id` adds the id and writes the log line).

use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tally_quota::QuotaError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    /// For the client.
    pub message: String,
    /// For the log only.
    pub detail: Option<String>,
}

/// The error a response carries, for `edge::request_id` to add the id and log the detail.
#[derive(Debug, Clone)]
pub(crate) struct ErrorReport {
    pub(crate) code: &'static str,
    pub(crate) message: String,
    pub(crate) detail: Option<String>,
    /// A page's own body (HTML) stays: the error is only logged, not written as JSON.
    pub(crate) keep_body: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            detail: None,
        }
    }

    /// Adds what the log should say and the client must not see.
    pub fn with_detail(mut self, detail: impl std::fmt::Display) -> ApiError {
        self.detail = Some(detail.to_string());
        self
    }

    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "INVALID_REQUEST", message)
    }

    pub fn invalid_quantity(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "INVALID_QUANTITY", message)
    }

    /// A dependency this request needs (Postgres) is away: retry later.
    pub fn unavailable(code: &'static str, detail: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            code,
            "a store this request needs is unavailable; retry later",
        )
        .with_detail(detail)
    }

    /// A bug: the client is told only that, and the request id.
    pub fn internal(what: &str, detail: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL",
            "internal error; report the request id",
        )
        .with_detail(format!("{what}: {detail}"))
    }

    pub fn too_large(max_body_bytes: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            format!("the request body is larger than this route accepts ({max_body_bytes} bytes)"),
        )
    }
}

/// A JSON body, or the error that says what is wrong with it.
pub(crate) fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<Json<T>, ApiError> {
    body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            "the request body is larger than this route accepts",
        ),
        _ => ApiError::invalid(rejection.body_text()),
    })
}

impl From<QuotaError> for ApiError {
    fn from(error: QuotaError) -> ApiError {
        let status =
            StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            return ApiError::unavailable("STORE_UNAVAILABLE", &error);
        }
        ApiError::new(status, error.code(), error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let report = ErrorReport {
            code: self.code,
            message: self.message,
            detail: self.detail,
            keep_body: false,
        };
        let body = json!({ "code": report.code, "message": report.message });
        let mut response = (self.status, Json(body)).into_response();
        response.extensions_mut().insert(report);
        response
    }
}
