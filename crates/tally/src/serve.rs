//! `tally serve`: the HTTP API.

use std::sync::Arc;

use anyhow::{bail, Context};
use tally_api::{Access, ApiState, PipelineSource, SelfServe, StripeWebhook};
use tally_emitter::Emitter;
use tally_quota::{Quota, QuotaOptions};
use tokio_util::sync::CancellationToken;

use crate::config::TallyConfig;
use crate::process::{cancel_on_signal, lazy_pool, prepare_database, runtime, Patience};

/// Stripe's API for the webhook endpoint's same-second ties, when there is a secret key.
fn stripe_api(config: &TallyConfig) -> Option<tally_sink::StripeHttp> {
    if config.stripe.secret_key.expose().is_empty() {
        tracing::warn!("STRIPE_SECRET_KEY is not set: Checkout and the billing portal answer 503, and two webhook events of one second are ordered by status, not by asking Stripe");
        return None;
    }
    tally_sink::StripeHttp::new(&config.stripe)
        .inspect_err(|error| tracing::warn!(%error, "Stripe's API cannot be used: Checkout and the billing portal answer 503, and two webhook events of one second are ordered by status"))
        .ok()
}

/// Where Checkout and the billing portal may send customers back: the configured origins, and
/// the portal's own (`serve.web.public_url`) when origins are configured, so the portal's
/// buttons come back to it.
pub(crate) fn return_origins(config: &TallyConfig) -> Vec<String> {
    let mut origins = config.serve.checkout_return_origins.clone();
    let public = config.serve.web.public_url.trim_end_matches('/');
    if !origins.is_empty() && !public.is_empty() && !origins.iter().any(|o| o == public) {
        origins.push(public.to_owned());
    }
    origins
}

/// Origins of Stripe's hosted pages (Checkout, the billing portal), and the emulator's when
/// `stripe.api_base` points at one: the portal's forms send browsers there.
pub(crate) fn stripe_page_origins(stripe: &tally_sink::StripeConfig) -> Vec<String> {
    let mut origins = vec![
        "https://checkout.stripe.com".to_owned(),
        "https://billing.stripe.com".to_owned(),
    ];
    let base: Option<axum::http::Uri> = stripe.api_base.parse().ok();
    if let Some((scheme, authority)) = base
        .as_ref()
        .and_then(|u| Some((u.scheme_str()?, u.authority()?)))
    {
        if authority.host() != "api.stripe.com" {
            origins.push(format!("{scheme}://{authority}"));
        }
    }
    origins
}

pub(crate) fn run(config: &TallyConfig) -> anyhow::Result<()> {
    let serve = &config.serve;
    if serve.tokens.is_empty() {
        bail!("no API tokens: every request would be refused; make one with `tally tokens create --scope admin` and add the [[serve.tokens]] it prints to tally.toml");
    }
    let live = config.stripe.is_live();
    let customer_tokens = serve
        .tokens
        .iter()
        .any(|t| t.scope == tally_api::Scope::Customer);
    if live && customer_tokens && serve.checkout_return_origins.is_empty() {
        bail!("serve.checkout_return_origins is empty with a live Stripe key and customer tokens: a customer token could send customers from Stripe's Checkout and billing portal to any site; set it to your app's origins, e.g. checkout_return_origins = [\"https://app.example.com\"]");
    }
    let local = serve.listen.starts_with("127.")
        || serve.listen.starts_with("[::1]")
        || serve.listen.starts_with("localhost:");
    if serve.web.public_url.is_empty() && !local {
        tracing::warn!(listen = %serve.listen, "serve.web.public_url is not set: portal links point at http:// and serve.listen, and session cookies are not Secure; set it to the address people reach tally at, e.g. public_url = \"https://billing.example.com\"");
    }
    let runtime = runtime()?;
    runtime.block_on(async {
        // The addresses first: a server that cannot listen stops before it opens a spool or
        // starts a scheduler.
        let listener = tokio::net::TcpListener::bind(&serve.listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {}; pick a free serve.listen address",
                    serve.listen
                )
            })?;
        let admin_listen = &serve.admin_listen;
        let admin_listener = if admin_listen.is_empty() {
            None
        } else {
            Some(tokio::net::TcpListener::bind(admin_listen).await.with_context(|| {
                format!("cannot listen on {admin_listen}; pick a free serve.admin_listen address")
            })?)
        };
        // The server starts while Postgres is away: requests that need it answer 503, /readyz
        // says what is missing, and the schema check and meter recording wait in the
        // background.
        let pool = lazy_pool(config, 8)?;
        // Usage readers get connections of their own, each statement cut after 5 s, so no
        // usage query can hold the connections quota checks load with.
        let reader_pool = tally_db::connect_lazy_bounded(
            config.database.url.expose(),
            4,
            std::time::Duration::from_secs(5),
            std::time::Duration::from_secs(5),
        )?;
        let stop = CancellationToken::new();
        tokio::spawn(cancel_on_signal(stop.clone()));
        let prepared = {
            let (pool, config, stop) = (pool.clone(), config.clone(), stop.clone());
            tokio::spawn(async move {
                let patience = Patience::UntilStopped(stop.clone());
                let prepared = prepare_database(&pool, &config, false, patience).await;
                if prepared.is_err() {
                    stop.cancel(); // a schema that is behind or a changed meter: stop serving
                }
                prepared
            })
        };
        let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .context("installing the metrics recorder")?;
        tally_api::telemetry::describe();
        let quota = Quota::with_options(
            pool.clone(),
            QuotaOptions {
                max_customers: serve.max_cached_customers,
                max_staleness: serve.max_staleness,
                change_feed: serve.change_feed,
                feed_max_age: serve.feed_max_age,
                ..QuotaOptions::new(serve.refresh)
            },
        )
        .await?;
        // POST /v1/events needs Kafka; without brokers the rest of the API still serves.
        let emitter = if config.kafka.brokers.trim().is_empty() {
            tracing::warn!("kafka.brokers is not set: POST /v1/events answers 503 INGEST_DISABLED");
            None
        } else {
            Some(Arc::new(Emitter::start(&config.kafka, &config.emitter)?))
        };
        let webhook_secret = &serve.stripe_webhook_secret;
        if webhook_secret.is_empty() {
            tracing::warn!("STRIPE_WEBHOOK_SECRET is not set: POST /v1/webhooks/stripe answers 503 WEBHOOKS_DISABLED");
        }
        let stripe = stripe_api(config);
        let state = Arc::new(ApiState {
            fallback_plan: config.subscriptions.fallback_plan.clone(),
            alert_destinations: config.alerts.destinations(),
            quota,
            pool,
            reader_pool,
            access: Access::new(&serve.tokens, &serve.rate_limits),
            metrics: Some(metrics),
            emitter: emitter.clone(),
            stripe_webhook: (!webhook_secret.is_empty()).then(|| StripeWebhook {
                secret: webhook_secret.clone(),
                livemode: config.stripe.is_live(),
                stripe: stripe.clone(),
            }),
            billing: SelfServe {
                livemode: config.stripe.is_live(),
                stripe,
                packs: config.credits.packs.clone(),
                return_origins: return_origins(config),
                page_origins: stripe_page_origins(&config.stripe),
            },
            pipeline: PipelineSource {
                kafka: (!config.kafka.brokers.trim().is_empty()).then(|| config.kafka.clone()),
                group_id: config.aggregator.group_id.clone(),
                topic: config.kafka.topic.clone(),
            },
        });
        // Period ends, trials and the fallback plan of the subscriptions tally manages; with
        // several replicas, each subscription is advanced by one of them.
        let scheduler_state = state.clone();
        tally_billing::subscriptions::start_scheduler(
            state.pool.clone(),
            config.subscriptions.clone(),
            stop.clone(),
            Arc::new(move |customer: &str| scheduler_state.quota.invalidate(customer)),
        );
        tally_billing::stripe::start_webhook_retention(
            state.pool.clone(),
            serve.webhook_retention,
            stop.clone(),
        );
        if let Some(listener) = admin_listener {
            let admin = tally_api::admin_router(state.clone());
            tokio::spawn(async move {
                if let Err(error) = axum::serve(listener, admin).await {
                    tracing::error!(%error, "the admin listener stopped");
                }
            });
            tracing::info!(listen = %serve.admin_listen, "serving /metrics, /readyz and /healthz");
        }
        tracing::info!(listen = %serve.listen, tokens = serve.tokens.len(), "serving the HTTP API");
        tally_api::serve(
            listener,
            tally_api::router(state, serve),
            serve.limits.clone(),
            stop,
        )
        .await?;
        // Events accepted by POST /v1/events are acknowledged or spooled already; this only
        // waits for what is in flight for requests that were cut off.
        if let Some(emitter) = emitter {
            tokio::task::spawn_blocking(move || emitter.shutdown(std::time::Duration::from_secs(5)))
                .await?;
        }
        if prepared.is_finished() {
            prepared.await??;
        }
        Ok(())
    })
}
