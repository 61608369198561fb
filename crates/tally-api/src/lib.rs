//! `tally serve`: the HTTP API.
//!
//! - `config.rs`: `[serve]`: listeners, tokens, edge limits, rate limits.
//! - `server.rs`: the listener: connection limit, head deadline, bounded graceful shutdown.
//! - `edge.rs`: request ids, panics, load shedding and the request deadline.
//! - `auth.rs`: hashed tokens with scopes, rate limits per token, and the gate each route
//!   passes before its body is read.
//! - `routes.rs`: quota check, entitlements, health, metrics.
//! - `usage.rs`: usage series and the invoice preview.
//! - `admin.rs`: plans, subscriptions, overrides, customers, their prepaid credits and usage
//!   alerts (rules, webhook endpoints, deliveries) for admin tokens, every change audited; its
//!   parts are in `admin/`.
//! - `ingest.rs`: `POST /v1/events`, batches through the emitter.
//! - `webhooks.rs`: `POST /v1/webhooks/stripe`, signed Stripe events.
//! - `telemetry.rs`: metric names and the request-counting layer.
//! - `error.rs`: JSON errors with a stable `code` and the request id; details only in the log.
//! - `openapi.rs`: the OpenAPI document served at `/openapi.json`.
//! - `web.rs`: tally's pages (the customer portal, `/pricing`, the paywall script, the
//!   operator console), server-rendered from the API's own answers; its parts are in `web/`.

mod admin;
mod auth;
mod config;
pub mod edge;
mod error;
mod ingest;
pub mod openapi;
mod routes;
mod server;
pub mod telemetry;
mod usage;
mod web;
mod webhooks;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::middleware::{from_fn, from_fn_with_state};
use axum::routing::{delete, get, post, put, MethodRouter};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tally_core::config::Secret;
use tally_emitter::Emitter;
use tally_quota::Quota;

use auth::Policy;
pub use auth::{Access, Caller};
pub use config::token_hash;
pub use config::{ApiToken, EdgeLimits, Rate, RateLimits, Scope, ServeConfig, Theme, WebConfig};
pub use error::ApiError;
pub use ingest::MAX_BATCH;
pub use routes::readiness;
pub use server::serve;
pub use web::html::url_part;
pub use web::{console_link, portal_link};

/// What the handlers share.
pub struct ApiState {
    pub quota: Quota,
    /// Quota loads, ingest's rejects, webhooks.
    pub pool: PgPool,
    /// Usage series and invoice previews: a pool of their own, with a `statement_timeout`, so
    /// a heavy reader can never make quota checks wait for a connection.
    pub reader_pool: PgPool,
    /// The tokens, their scopes and rate buckets.
    pub access: Access,
    pub metrics: Option<PrometheusHandle>,
    /// Where `POST /v1/events` sends events; `None` answers 503 INGEST_DISABLED.
    pub emitter: Option<Arc<Emitter>>,
    /// The Stripe webhook endpoint; `None` answers 503 WEBHOOKS_DISABLED.
    pub stripe_webhook: Option<StripeWebhook>,
    /// `[subscriptions] fallback_plan`: where a subscription canceled now leaves its customer.
    pub fallback_plan: Option<String>,
    /// `[alerts]`: where alert endpoints may point (https and public addresses by default).
    pub alert_destinations: tally_alerts::Destinations,
    /// Self-serve billing: Checkout, the billing portal, credit packs.
    pub billing: SelfServe,
    /// Where the console's pipeline page reads Kafka's end offsets (lag).
    pub pipeline: PipelineSource,
}

/// The topic and consumer group the console shows, and the brokers to ask for end offsets.
#[derive(Default)]
pub struct PipelineSource {
    /// `None`: lag is shown as unknown.
    pub kafka: Option<tally_core::config::KafkaConfig>,
    pub group_id: String,
    pub topic: String,
}

/// What self-serve billing needs: Stripe, the credit packs on sale, where customers may be sent
/// back to.
#[derive(Default)]
pub struct SelfServe {
    /// Stripe's API (`STRIPE_SECRET_KEY`); `None` answers 503 STRIPE_NOT_CONFIGURED.
    pub stripe: Option<tally_sink::StripeHttp>,
    /// `[[credits.packs]]`.
    pub packs: Vec<tally_credits::CreditPack>,
    /// `serve.checkout_return_origins`: the origins `success_url`, `cancel_url` and
    /// `return_url` may point at; empty: any https origin (or http on localhost).
    pub return_origins: Vec<String>,
    /// A live Stripe key: return URLs may not point at loopback addresses.
    pub livemode: bool,
    /// Origins of Stripe's hosted pages (Checkout, the billing portal) the portal's forms may
    /// send a browser to (`form-action`).
    pub page_origins: Vec<String>,
}

/// How Stripe's webhook deliveries are checked.
pub struct StripeWebhook {
    /// The endpoint's signing secret (`whsec_…`).
    pub secret: Secret,
    /// The mode of the Stripe key this deployment bills with: an event of the other mode is
    /// refused (a test-mode event must not change a live customer's plan).
    pub livemode: bool,
    /// Stripe's API, to fetch a subscription as it is now when two of its events have the same
    /// second and the later delivered would move it backwards; `None` (no secret key) decides
    /// such a tie by status.
    pub stripe: Option<tally_sink::StripeHttp>,
}

/// Who may call which route.
mod scopes {
    use crate::config::Scope::{self, Admin, Check, Customer, Ingest};

    pub(crate) const ADMIN: &[Scope] = &[Admin];
    pub(crate) const INGEST: &[Scope] = &[Admin, Ingest];
    /// Customer tokens check their own customer, and count nothing.
    pub(crate) const CHECK: &[Scope] = &[Admin, Check, Customer];
    pub(crate) const READ_USAGE: &[Scope] = &[Admin, Customer];
}

/// The public API. Every request passes, outermost first: `edge::request_id` (id, panics,
/// error bodies), `edge::shed_and_deadline` (in-flight limit, request deadline), request
/// metrics, then each route's `auth::gate` (token, scope, rate limit, declared body size)
/// before its handler reads a byte of the body.
pub fn router(state: Arc<ApiState>, config: &ServeConfig) -> Router {
    let limits = &config.limits;
    let api = api_routes(&state, config);
    let web = Arc::new(web::Web::new(
        state.clone(),
        api.clone().with_state(state.clone()),
        config,
    ));
    let small = limits.max_body_bytes;
    let portal_sessions = Router::new()
        .route(
            "/v1/customers/{id}/portal-sessions",
            gated(
                &state,
                post(web::portal_sessions::create),
                Some(scopes::ADMIN),
                small,
            ),
        )
        .route(
            "/v1/portal-sessions/{id}",
            gated(
                &state,
                delete(web::portal_sessions::revoke),
                Some(scopes::ADMIN),
                small,
            ),
        )
        .route_layer(from_fn(telemetry::track))
        .with_state(web.clone());
    api.with_state(state)
        .merge(portal_sessions)
        .merge(web::router(web))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                "no such route; see /openapi.json",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "METHOD_NOT_ALLOWED",
                "this route does not take that method; see /openapi.json",
            )
        })
        .layer(from_fn_with_state(
            edge::InFlight::new(limits.max_in_flight, limits.request_timeout),
            edge::shed_and_deadline,
        ))
        .layer(DefaultBodyLimit::max(small))
        .layer(from_fn(edge::request_id))
}

/// A route behind the gate (`auth::gate`): token, scope, rate limit, declared body size.
fn gated<S: Clone + Send + Sync + 'static>(
    state: &Arc<ApiState>,
    route: MethodRouter<S>,
    scopes: Option<&'static [Scope]>,
    max_body_bytes: usize,
) -> MethodRouter<S> {
    let policy = Policy {
        scopes,
        max_body_bytes,
    };
    route
        .route_layer(from_fn_with_state((state.clone(), policy), auth::gate))
        .layer(DefaultBodyLimit::max(max_body_bytes))
}

/// The API's routes, each behind its gate, counted by `telemetry::track`. The pages ask these
/// in-process (`web::Web::call`).
fn api_routes(state: &Arc<ApiState>, config: &ServeConfig) -> Router<Arc<ApiState>> {
    let limits = &config.limits;
    let gated = |route: MethodRouter<Arc<ApiState>>, scopes, max_body_bytes| {
        gated(state, route, scopes, max_body_bytes)
    };
    let small = limits.max_body_bytes;
    Router::new()
        .route(
            "/v1/quota/check",
            gated(post(routes::quota_check), Some(scopes::CHECK), small),
        )
        .route(
            "/v1/customers/{id}/entitlements",
            gated(get(routes::entitlements), Some(scopes::CHECK), small),
        )
        .route(
            "/v1/plans",
            gated(get(admin::plans::list), Some(scopes::CHECK), small),
        )
        .route(
            "/v1/plans/{name}",
            gated(get(admin::plans::get), Some(scopes::CHECK), small),
        )
        .route(
            "/v1/subscriptions",
            gated(
                post(admin::subscriptions::create),
                Some(scopes::ADMIN),
                small,
            ),
        )
        .route(
            "/v1/subscriptions/{id}",
            gated(get(admin::subscriptions::get), Some(scopes::ADMIN), small),
        )
        .route(
            "/v1/subscriptions/{id}/change",
            gated(
                post(admin::subscriptions::change),
                Some(scopes::ADMIN),
                small,
            ),
        )
        .route(
            "/v1/subscriptions/{id}/cancel",
            gated(
                post(admin::subscriptions::cancel),
                Some(scopes::ADMIN),
                small,
            ),
        )
        .route(
            "/v1/subscriptions/{id}/reactivate",
            gated(
                post(admin::subscriptions::reactivate),
                Some(scopes::ADMIN),
                small,
            ),
        )
        .route(
            "/v1/subscriptions/{id}/payment-method",
            gated(
                put(admin::subscriptions::payment_method),
                Some(scopes::ADMIN),
                small,
            ),
        )
        .route(
            "/v1/customers",
            gated(get(admin::customers::list), Some(scopes::ADMIN), small),
        )
        .route(
            "/v1/customers/{id}",
            gated(get(admin::customers::get), Some(scopes::READ_USAGE), small),
        )
        .route(
            "/v1/customers/{id}/subscriptions",
            gated(
                get(admin::subscriptions::of_customer),
                Some(scopes::READ_USAGE),
                small,
            ),
        )
        .route(
            "/v1/customers/{id}/overrides",
            gated(
                put(admin::customers::put_override).delete(admin::customers::delete_override),
                Some(scopes::ADMIN),
                small,
            ),
        )
        .route(
            "/v1/customers/{id}/credits",
            // A gateway (check token) may show a customer's balance where it checks them.
            gated(get(admin::credits::balance), Some(scopes::CHECK), small),
        )
        .route(
            "/v1/customers/{id}/credits/ledger",
            gated(get(admin::credits::ledger), Some(scopes::READ_USAGE), small),
        )
        .route(
            "/v1/customers/{id}/credits/grants",
            gated(post(admin::credits::grant), Some(scopes::ADMIN), small),
        )
        .route(
            "/v1/customers/{id}/credits/grants/{grant_id}/void",
            gated(post(admin::credits::void), Some(scopes::ADMIN), small),
        )
        .route(
            "/v1/customers/{id}/checkout",
            gated(post(admin::billing::plan), Some(scopes::READ_USAGE), small),
        )
        .route(
            "/v1/customers/{id}/credits/checkout",
            gated(post(admin::billing::pack), Some(scopes::READ_USAGE), small),
        )
        .route(
            "/v1/customers/{id}/billing-portal",
            gated(
                post(admin::billing::portal),
                Some(scopes::READ_USAGE),
                small,
            ),
        )
        .route(
            "/v1/customers/{id}/invoices",
            gated(
                get(admin::billing::list_invoices),
                Some(scopes::READ_USAGE),
                small,
            ),
        )
        .route(
            "/v1/invoices/{id}",
            gated(
                get(admin::billing::get_invoice),
                Some(scopes::READ_USAGE),
                small,
            ),
        )
        .route(
            "/v1/customers/{id}/alerts",
            // The customer reads its own alerts; it adds and removes rules only on a
            // self-serve plan (checked by the handler).
            gated(
                get(admin::alerts::list).post(admin::alerts::create),
                Some(scopes::READ_USAGE),
                small,
            ),
        )
        .route(
            "/v1/customers/{id}/alerts/{rule_id}",
            gated(
                delete(admin::alerts::delete),
                Some(scopes::READ_USAGE),
                small,
            ),
        )
        .route(
            "/v1/alerts/endpoints",
            gated(
                get(admin::alerts::list_endpoints).post(admin::alerts::create_endpoint),
                Some(scopes::ADMIN),
                small,
            ),
        )
        .route(
            "/v1/alerts/endpoints/{endpoint_id}",
            gated(
                delete(admin::alerts::delete_endpoint),
                Some(scopes::ADMIN),
                small,
            ),
        )
        .route(
            "/v1/alerts/endpoints/{endpoint_id}/rotate-secret",
            gated(
                post(admin::alerts::rotate_secret),
                Some(scopes::ADMIN),
                small,
            ),
        )
        .route(
            "/v1/alerts/deliveries",
            gated(get(admin::alerts::deliveries), Some(scopes::ADMIN), small),
        )
        .route(
            "/v1/customers/{id}/usage",
            gated(get(usage::usage), Some(scopes::READ_USAGE), small),
        )
        .route(
            "/v1/customers/{id}/invoice-preview",
            gated(get(usage::invoice_preview), Some(scopes::READ_USAGE), small),
        )
        .route(
            "/v1/events",
            gated(
                post(ingest::ingest),
                Some(scopes::INGEST),
                limits.max_ingest_body_bytes,
            ),
        )
        .route(
            "/v1/webhooks/stripe",
            gated(
                post(webhooks::stripe_webhook),
                None,
                limits.max_webhook_body_bytes,
            ),
        )
        .route("/healthz", get(routes::healthz))
        .route(
            "/readyz",
            gated(get(routes::readyz), Some(scopes::ADMIN), small),
        )
        .route(
            "/metrics",
            gated(get(routes::metrics), Some(scopes::ADMIN), small),
        )
        .route(
            "/openapi.json",
            get(|| async { axum::Json(openapi::document()) }),
        )
        .route_layer(from_fn(telemetry::track))
}

/// The admin listener (`serve.admin_listen`): `/metrics`, the detailed `/readyz` and
/// `/healthz`, without a token. Keep it off the internet.
pub fn admin_router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/metrics", get(routes::metrics))
        .with_state(state)
}
