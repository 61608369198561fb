//! API errors: JSON `{"code", "message"}` with a stable `code`, and the status that goes with it.

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
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "INVALID_REQUEST", message)
    }
}

/// A JSON body, or the error that says what is wrong with it.
pub(crate) fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<Json<T>, ApiError> {
    body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            "the request body is larger than serve.max_body_bytes",
        ),
        _ => ApiError::invalid(rejection.body_text()),
    })
}

impl From<QuotaError> for ApiError {
    fn from(error: QuotaError) -> ApiError {
        let status = match &error {
            QuotaError::NoActiveSubscription(_) => StatusCode::NOT_FOUND,
            QuotaError::FeatureDisabled { .. } => StatusCode::FORBIDDEN,
            QuotaError::UnknownMeter(_)
            | QuotaError::Unsupported(_)
            | QuotaError::OutOfRange { .. } => StatusCode::BAD_REQUEST,
            QuotaError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        if status == StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!(%error, "quota check failed");
        }
        ApiError::new(status, error.code(), error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({ "code": self.code, "message": self.message })),
        )
            .into_response()
    }
}
