//! A service metered by tally-quota's middleware: `GET /search` counts one `api_calls` per
//! request, `POST /complete` counts the `tokens` its handler reports (here: one per word of
//! the body). Both need the `api` feature of the customer's plan.
//!
//! Run it against a local tally, each in its own terminal, with a `tally.toml` copied from
//! `tally.example.toml` (its meters and plans) with `kafka.brokers = "127.0.0.1:9092"` and
//! `database.url` set:
//!
//! ```text
//! tally kafka --port 9092                  # an in-memory Kafka (librdkafka's mock cluster)
//! tally migrate && tally plans apply       # the schema, and the plans FREE, PRO, ENTERPRISE
//! tally aggregate                          # usage events into usage_minute
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres TALLY_KAFKA_BROKERS=127.0.0.1:9092 \
//!   cargo run -p tally-quota --features layer --example quota_service
//! ```
//!
//! It puts customer `acme` on plan `FREE` when acme has no subscription (in production
//! subscriptions come from Stripe webhooks), then listens on `QUOTA_SERVICE_ADDR`
//! (127.0.0.1:3000 by default). Its authentication is a toy (the API key `key-acme` is
//! customer acme; yours checks real keys or sessions): what matters is that the customer the
//! middleware bills is the one the authentication established, never a header the client sets.
//!
//! ```text
//! curl -i localhost:3000/search -H 'authorization: Bearer key-acme'
//! curl -i localhost:3000/complete -H 'authorization: Bearer key-acme' -d 'four words of prompt'
//! curl -i localhost:3000/search -H 'x-customer-id: acme'   # 401: a header is not authentication
//! ```
//!
//! Answers carry `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`; past FREE's 100
//! calls a day, `/search` answers 429 `LIMIT_EXCEEDED`. Usage is in Postgres a moment later:
//! `SELECT meter, sum(value) FROM usage_minute WHERE customer_id = 'acme' GROUP BY meter`.
//! Optional: `TALLY_KAFKA_TOPIC` (default `usage-events`), `TALLY_EMITTER_SPOOL_DIR` (default
//! `tally-spool`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use tally_billing::subscriptions::{self, Actor, NewSubscription, SubscriptionError, Term};
use tally_billing::BillingStoreError;
use tally_core::config::KafkaConfig;
use tally_emitter::{Emitter, EmitterConfig};
use tally_quota::layer::{AuthenticatedCustomer, QuotaLayer, UsageQuantity};
use tally_quota::Quota;

/// The customer the example subscribes, and its plan (from tally.example.toml).
const CUSTOMER: &str = "acme";
const PLAN: &str = "FREE";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let database_url = std::env::var("DATABASE_URL").context("set DATABASE_URL")?;
    let kafka = KafkaConfig {
        brokers: std::env::var("TALLY_KAFKA_BROKERS")
            .context("set TALLY_KAFKA_BROKERS (e.g. 127.0.0.1:9092 for `tally kafka`)")?,
        topic: std::env::var("TALLY_KAFKA_TOPIC").unwrap_or_else(|_| "usage-events".into()),
        ..KafkaConfig::default()
    };
    let address = std::env::var("QUOTA_SERVICE_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());

    let pool = sqlx::PgPool::connect(&database_url)
        .await
        .context("connecting to DATABASE_URL")?;
    subscribe_once(&pool).await?;
    let quota = Arc::new(Quota::new(pool, Duration::from_millis(250)).await?);
    let mut emitter_config = EmitterConfig::default();
    if let Ok(dir) = std::env::var("TALLY_EMITTER_SPOOL_DIR") {
        emitter_config.spool.dir = dir.into();
    }
    let emitter = Arc::new(Emitter::start(&kafka, &emitter_config)?);

    let app = Router::new()
        .route(
            "/search",
            get(search).layer(
                QuotaLayer::new(quota.clone(), emitter.clone(), "api_calls").require_feature("api"),
            ),
        )
        .route(
            "/complete",
            post(complete).layer(
                QuotaLayer::new(quota, emitter.clone(), "tokens")
                    // What the check counts before the handler knows the real figure.
                    .quantity(Decimal::from(50))
                    .quantity_from_response()
                    .require_feature("api"),
            ),
        )
        // In front of the metered routes: who the caller is.
        .layer(axum::middleware::from_fn(authenticate));
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .with_context(|| format!("listening on {address}"))?;
    tracing::info!(%address, "quota_service listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    // Whatever Kafka has not acknowledged yet goes to the spool, replayed by the next start.
    emitter.shutdown(Duration::from_secs(5));
    Ok(())
}

/// The service's own authentication (a toy: API key `key-<customer>`), which tells the quota
/// middleware whom to bill. A request it cannot place has no customer: the middleware
/// answers 401.
async fn authenticate(
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let customer = request
        .headers()
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer key-"))
        .map(str::to_owned);
    if let Some(customer) = customer {
        request
            .extensions_mut()
            .insert(AuthenticatedCustomer(customer));
    }
    next.run(request).await
}

/// One `api_calls` per request (the route's default quantity).
async fn search() -> Json<Value> {
    Json(json!({ "results": ["tally", "quota"] }))
}

/// Counts the words of the prompt as the tokens used, and reports them to the middleware.
async fn complete(prompt: String) -> (Extension<UsageQuantity>, Json<Value>) {
    let tokens = Decimal::from(prompt.split_whitespace().count());
    (
        Extension(UsageQuantity(tokens)),
        Json(json!({ "completion": "...", "tokens": tokens })),
    )
}

/// Puts `acme` on `FREE` unless it already has a live subscription (what `tally subscriptions
/// create acme FREE --reason …` or `POST /v1/subscriptions` does).
async fn subscribe_once(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    let new = NewSubscription {
        customer: CUSTOMER.into(),
        plan: PLAN.into(),
        start: None,
        trial_end: None,
        term: Term::Month,
        payment_method: false,
    };
    let actor = Actor::new("quota_service example", "the example's customer")?;
    match subscriptions::create(pool, &new, &actor).await {
        Ok(_) => tracing::info!(customer = CUSTOMER, plan = PLAN, "subscribed"),
        Err(SubscriptionError::Store(BillingStoreError::SecondLiveSubscription { .. })) => {}
        Err(error) => {
            return Err(error)
                .context("subscribing acme to FREE (did you run `tally plans apply`?)")
        }
    }
    Ok(())
}
