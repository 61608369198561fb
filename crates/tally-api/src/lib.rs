//! `tally serve`: the HTTP API.
//!
//! - `config.rs`: `[serve]`.
//! - `auth.rs`: bearer tokens (admin, customer-scoped), compared in constant time.
//! - `routes.rs`: quota check, entitlements, health, metrics.
//! - `usage.rs`: usage series and the invoice preview.
//! - `error.rs`: JSON errors with a stable `code`.
//! - `openapi.rs`: the OpenAPI document served at `/openapi.json`.

mod auth;
mod config;
mod error;
pub mod openapi;
mod routes;
mod usage;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tally_quota::Quota;
use tokio_util::sync::CancellationToken;

pub use auth::Caller;
pub use config::{ApiToken, ServeConfig};
pub use error::ApiError;

/// What the handlers share.
pub struct ApiState {
    pub quota: Quota,
    pub pool: PgPool,
    pub tokens: Vec<ApiToken>,
    pub metrics: Option<PrometheusHandle>,
}

pub fn router(state: Arc<ApiState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/quota/check", post(routes::quota_check))
        .route("/v1/customers/{id}/entitlements", get(routes::entitlements))
        .route("/v1/customers/{id}/usage", get(usage::usage))
        .route(
            "/v1/customers/{id}/invoice-preview",
            get(usage::invoice_preview),
        )
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/metrics", get(routes::metrics))
        .route(
            "/openapi.json",
            get(|| async { axum::Json(openapi::document()) }),
        )
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// Serves until `stop`, then lets requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    stop: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}
