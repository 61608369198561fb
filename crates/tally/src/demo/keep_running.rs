//! `tally demo --keep-running`: after the verdict the demo's stack stays up (the broker, the
//! database, the Stripe emulator), the aggregator and the sink run again, and the HTTP API
//! serves with a fresh admin token, until SIGINT or SIGTERM. The demo prints how to reach each
//! part, so a newcomer can try `tally emit`, `tally reconcile` and the API against real data.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use tally_api::{Access, ApiState, ApiToken, PipelineSource, Scope, SelfServe};
use tally_core::config::KafkaConfig;
use tally_core::MeterDefinition;
use tally_emitter::Emitter;
use tally_quota::Quota;
use tally_sink::StripeConfig;
use tokio_util::sync::CancellationToken;

use super::Daemons;
use crate::config::TallyConfig;
use crate::process::cancel_on_signal;

/// The parts of the demo that stay up.
pub(super) struct Stack<'a> {
    pub(super) config: &'a TallyConfig,
    pub(super) kafka: &'a KafkaConfig,
    pub(super) meters: &'a [MeterDefinition],
    pub(super) pool: &'a sqlx::PgPool,
    pub(super) database_url: &'a str,
    pub(super) stripe: &'a StripeConfig,
    /// The range the demo's events fall in, for the `tally reconcile` it suggests.
    pub(super) from: DateTime<Utc>,
    pub(super) to: DateTime<Utc>,
    /// A customer with usage, for the example API call.
    pub(super) customer: &'a str,
}

/// Runs the aggregator, the sink and the API over the demo's stack until a signal arrives.
pub(super) fn serve_until_stopped(
    runtime: &tokio::runtime::Runtime,
    stack: &Stack<'_>,
) -> anyhow::Result<()> {
    let token = format!("demo_{}", uuid::Uuid::new_v4().simple());
    runtime.block_on(async {
        let stop = CancellationToken::new();
        tokio::spawn(cancel_on_signal(stop.clone()));

        let daemons = Daemons::start(
            stack.config,
            stack.kafka,
            stack.meters,
            stack.pool,
            stack.stripe,
            &tokio::runtime::Handle::current(),
            &stop,
        )?;

        // The API, with POST /v1/events through an emitter of its own.
        let spool = tempfile::tempdir().context("creating a spool directory")?;
        let mut emitter_config = stack.config.emitter.clone();
        emitter_config.spool.dir = spool.path().to_owned();
        let emitter = Arc::new(Emitter::start(stack.kafka, &emitter_config)?);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("listening for the demo's API")?;
        let api = format!("http://{}", listener.local_addr()?);
        // The pages' links point where the demo listens.
        let mut serve = stack.config.serve.clone();
        serve.listen = listener.local_addr()?.to_string();
        serve.web.console = true;
        let state = Arc::new(ApiState {
            fallback_plan: None,
            alert_destinations: Default::default(),
            // Checkout and the billing portal against the emulator.
            billing: SelfServe {
                stripe: tally_sink::StripeHttp::new(stack.stripe).ok(),
                packs: stack.config.credits.packs.clone(),
                return_origins: Vec::new(),
                livemode: false,
                page_origins: crate::serve::stripe_page_origins(stack.stripe),
            },
            pipeline: PipelineSource {
                kafka: Some(stack.kafka.clone()),
                group_id: stack.config.aggregator.group_id.clone(),
                topic: stack.kafka.topic.clone(),
            },
            quota: Quota::new(stack.pool.clone(), stack.config.serve.refresh).await?,
            pool: stack.pool.clone(),
            reader_pool: stack.pool.clone(),
            access: Access::new(
                &[ApiToken::new("demo", Scope::Admin, None, &token)],
                &stack.config.serve.rate_limits,
            ),
            metrics: None,
            emitter: Some(emitter.clone()),
            stripe_webhook: None,
        });
        let server = tokio::spawn(tally_api::serve(
            listener,
            tally_api::router(state, &serve),
            serve.limits.clone(),
            stop.clone(),
        ));
        // Links that open the console (as the demo's admin token) and one customer's portal,
        // each once, for the next hour.
        let hour = Duration::from_secs(3600);
        let console = tally_api::console_link(stack.pool, &api, "demo", &token, hour).await?;
        let portal = tally_api::portal_link(stack.pool, &api, stack.customer, hour).await?;
        print_access(stack, &api, &token, &console, &portal);

        stop.cancelled().await;
        println!("stopping the demo");
        server.await??;
        tokio::task::spawn_blocking(move || emitter.shutdown(Duration::from_secs(5))).await?;
        daemons.join().await?;
        Ok(())
    })
}

fn print_access(stack: &Stack<'_>, api: &str, token: &str, console: &str, portal: &str) {
    let stripe_key = stack.stripe.secret_key.expose();
    let database = tally_db::redact_url(stack.database_url);
    let (from, to) = (
        stack.from.format("%Y-%m-%dT%H:%M:%SZ"),
        stack.to.format("%Y-%m-%dT%H:%M:%SZ"),
    );
    println!(
        "
the demo keeps running: the aggregator and the sink work on, and the HTTP API serves.
  kafka      {brokers}  topic {topic}  (librdkafka's mock cluster: in memory, gone with the demo)
  postgres   {database}
  api        {api}  admin token {token}
  console    {console}
             (opens once; then log in at {api}/console/login with the admin token)
  portal     {portal}
             (customer {customer}'s billing page; opens once, for an hour)
  pricing    {api}/pricing
  stripe     {stripe}  (the emulator; key {stripe_key})

In another terminal:
  export TALLY_DATABASE_URL='{database}' TALLY_KAFKA_BROKERS={brokers} \\
         TALLY_KAFKA_TOPIC={topic} TALLY_STRIPE_API_BASE={stripe} STRIPE_SECRET_KEY={stripe_key}
  tally reconcile --from {from} --to {to}
  tally emit --customer {customer} --meter {meter} --quantity 3
  curl -s -H 'Authorization: Bearer {token}' '{api}/v1/customers/{customer}/usage?meter={meter}&from={from}&to={to}'
  curl -s {stripe}_emulator/state

Ctrl-C stops it and drops the demo's database (unless --keep-database).",
        brokers = stack.kafka.brokers,
        topic = stack.kafka.topic,
        stripe = stack.stripe.api_base,
        customer = stack.customer,
        meter = stack
            .meters
            .first()
            .map_or("api_calls", |m| m.name.as_str()),
    );
}
