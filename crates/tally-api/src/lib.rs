//! `tally serve`: the HTTP API.
//!
//! - `config.rs`: `[serve]`.
//! - `auth.rs`: bearer tokens (admin, customer-scoped), compared in constant time.
//! - `routes.rs`: quota check, entitlements, health, metrics.
//! - `usage.rs`: usage series and the invoice preview.
//! - `ingest.rs`: `POST /v1/events`, batches through the emitter.
//! - `webhooks.rs`: `POST /v1/webhooks/stripe`, signed Stripe events.
//! - `telemetry.rs`: metric names and the request-counting layer.
//! - `error.rs`: JSON errors with a stable `code`.
//! - `openapi.rs`: the OpenAPI document served at `/openapi.json`.

mod auth;
mod config;
mod error;
mod ingest;
pub mod openapi;
mod routes;
pub mod telemetry;
mod usage;
mod webhooks;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tally_core::config::Secret;
use tally_emitter::Emitter;
use tally_quota::Quota;
use tokio_util::sync::CancellationToken;

pub use auth::Caller;
pub use config::{ApiToken, ServeConfig};
pub use error::ApiError;
pub use ingest::MAX_BATCH;
pub use routes::readiness;

/// What the handlers share.
pub struct ApiState {
    pub quota: Quota,
    pub pool: PgPool,
    pub tokens: Vec<ApiToken>,
    pub metrics: Option<PrometheusHandle>,
    /// Where `POST /v1/events` sends events; `None` answers 503 INGEST_DISABLED.
    pub emitter: Option<Arc<Emitter>>,
    /// The webhook endpoint's signing secret (`whsec_…`); `None` answers 503 WEBHOOKS_DISABLED.
    pub stripe_webhook_secret: Option<Secret>,
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
        .route("/v1/events", post(ingest::ingest))
        .route("/v1/webhooks/stripe", post(webhooks::stripe_webhook))
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/metrics", get(routes::metrics))
        .route(
            "/openapi.json",
            get(|| async { axum::Json(openapi::document()) }),
        )
        .route_layer(axum::middleware::from_fn(telemetry::track))
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
