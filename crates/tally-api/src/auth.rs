//! Bearer tokens: admin tokens read everything, customer tokens only their own customer.
//! Every configured token is compared, in constant time, on every request, so the time taken
//! says nothing about which token (or how much of one) matched.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use subtle::ConstantTimeEq;

use crate::config::ApiToken;
use crate::error::ApiError;
use crate::ApiState;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Admin,
    Customer(String),
}

impl Caller {
    /// Refuses a customer token reading another customer.
    pub fn may_read(&self, customer: &str) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Customer(own) if own == customer => Ok(()),
            Caller::Customer(_) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "FORBIDDEN",
                "this token may only read its own customer",
            )),
        }
    }
}

pub(crate) fn authenticate(headers: &HeaderMap, tokens: &[ApiToken]) -> Result<Caller, ApiError> {
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                "send an API token as `Authorization: Bearer <token>`",
            )
        })?;
    let mut found: Option<&ApiToken> = None;
    for token in tokens {
        let matches: bool = token
            .token
            .expose()
            .as_bytes()
            .ct_eq(presented.as_bytes())
            .into();
        if matches {
            found = Some(token);
        }
    }
    match found {
        Some(token) => Ok(match &token.customer {
            Some(customer) => Caller::Customer(customer.clone()),
            None => Caller::Admin,
        }),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "unknown API token",
        )),
    }
}

/// The `{id}` of a `/v1/customers/{id}/…` route, once the caller is known to be allowed to
/// read that customer.
pub(crate) struct ReadableCustomer(pub(crate) String);

impl FromRequestParts<Arc<ApiState>> for ReadableCustomer {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, ApiError> {
        let Path(customer) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::invalid(e.body_text()))?;
        authenticate(&parts.headers, &state.tokens)?.may_read(&customer)?;
        Ok(ReadableCustomer(customer))
    }
}
