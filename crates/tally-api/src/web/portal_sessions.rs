//! `POST /v1/customers/{id}/portal-sessions` (admin): a short-lived portal session for one
//! customer, answered as a link that opens it once; `DELETE /v1/portal-sessions/{id}`
//! (admin): revokes one. A new session does not end older ones: each tab the team's app
//! opened keeps working until it expires or is revoked.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use serde::Deserialize;
use serde_json::json;

use super::{sessions, Web};
use crate::admin::valid_customer;
use crate::auth::{Caller, ReadableCustomer};
use crate::error::{json_body, ApiError};

/// The shortest session a request may ask for.
const MIN_SECONDS: u64 = 60;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PortalSessionRequest {
    /// Seconds; default `serve.web.portal_session_ttl`, at most `portal_session_max_ttl`.
    #[serde(default)]
    expires_in: Option<u64>,
    /// Where the portal's "back" link leads (the same rules as Checkout's return URLs).
    #[serde(default)]
    return_url: Option<String>,
}

/// `POST /v1/customers/{id}/portal-sessions`: `{id, url, expires_at}`.
pub(crate) async fn create(
    State(web): State<Arc<Web>>,
    caller: Caller,
    ReadableCustomer(customer): ReadableCustomer,
    body: Result<Json<PortalSessionRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    // An empty body asks for the defaults.
    let request = match body {
        Err(JsonRejection::MissingJsonContentType(_)) => PortalSessionRequest::default(),
        body => json_body(body)?.0,
    };
    valid_customer(&customer)?;
    let max = web.config.portal_session_max_ttl.as_secs();
    let seconds = request
        .expires_in
        .unwrap_or(web.config.portal_session_ttl.as_secs());
    if !(MIN_SECONDS..=max).contains(&seconds) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "INVALID_EXPIRY",
            format!("expires_in {seconds}: between {MIN_SECONDS} and {max} seconds (serve.web.portal_session_max_ttl)"),
        ));
    }
    if let Some(url) = &request.return_url {
        let billing = &web.state.billing;
        tally_billing::checkout::check_return_url(
            "return_url",
            url,
            &billing.return_origins,
            billing.livemode,
        )
        .map_err(|error| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "INVALID_RETURN_URL",
                error.to_string(),
            )
        })?;
    }
    let expires_at = Utc::now() + chrono::TimeDelta::seconds(seconds as i64);
    let store = |e: sqlx::Error| ApiError::unavailable("STORE_UNAVAILABLE", e);
    let pool = &web.state.pool;
    if rand::random::<u8>() == 0 {
        // Housekeeping: a failure is logged, and the session is made all the same.
        if let Err(error) = sessions::forget_ended(pool).await {
            tracing::warn!(%error, "deleting ended web sessions failed; tried again later");
        }
    }
    let (id, link) = sessions::create_portal(
        pool,
        &customer,
        expires_at,
        request.return_url.as_deref(),
        &format!("token:{}", caller.name()),
    )
    .await
    .map_err(store)?;
    Ok(Json(json!({
        "id": id, "customer": customer,
        "url": format!("{}/portal/session/{link}", web.public_url),
        "expires_at": expires_at,
    }))
    .into_response())
}

/// `DELETE /v1/portal-sessions/{id}`: 204, or 404 when no live session has that id.
pub(crate) async fn revoke(
    State(web): State<Arc<Web>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "NO_SUCH_SESSION",
            format!("no live portal session {id:?}"),
        )
    };
    let id: uuid::Uuid = id.parse().map_err(|_| not_found())?;
    let revoked = sessions::revoke(&web.state.pool, sessions::Kind::Portal, &id.to_string())
        .await
        .map_err(|e| ApiError::unavailable("STORE_UNAVAILABLE", e))?;
    if !revoked {
        return Err(not_found());
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}
