//! What every command needs: a runtime, a Postgres pool, the database prepared (schema checked,
//! meters recorded), the admin endpoint (`/metrics`, `/healthz`, `/readyz`), and SIGINT/SIGTERM
//! turned into a cancellation.
//!
//! Long-running commands (daemons) wait out a Postgres outage at start as they do later: the
//! pool connects on use, and preparing the database is retried with capped backoff until it
//! works or a signal arrives. One-shot commands give up after a few attempts and say why.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::routing::get;
use tally_db::meters::CatalogError;
use tally_runtime::Backoff;
use tokio_util::sync::CancellationToken;

use crate::config::TallyConfig;

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// A pool for a one-shot command: connects now, or fails saying why.
pub(crate) async fn connect(
    config: &TallyConfig,
    connections: u32,
) -> anyhow::Result<sqlx::PgPool> {
    Ok(tally_db::connect(
        config.database.url.expose(),
        connections,
        Duration::from_secs(10),
    )
    .await?)
}

/// A pool for a daemon: connects on use, so the daemon starts (and waits) while Postgres is
/// away. Only a malformed `database.url` fails here.
pub(crate) fn lazy_pool(config: &TallyConfig, connections: u32) -> anyhow::Result<sqlx::PgPool> {
    Ok(tally_db::connect_lazy(
        config.database.url.expose(),
        connections,
        Duration::from_secs(5),
    )?)
}

/// How long preparing the database may wait for Postgres.
#[derive(Debug, Clone)]
pub(crate) enum Patience {
    /// A daemon: until Postgres answers, or `stop`.
    UntilStopped(CancellationToken),
    /// A one-shot command: this many attempts.
    Attempts(u32),
}

/// Applies the migrations (`migrate`) or checks that they are applied, then records
/// tally.toml's meters in the `meters` table and its credit rates in `credit_rates`: whichever command starts first (migrate,
/// aggregate, sink, serve) makes them the truth every stage reads. Postgres being away is
/// waited out as `patience` allows; a schema that is behind or a meter whose rules changed ends
/// the command with what to do. `Ok(false)`: stopped while waiting.
pub(crate) async fn prepare_database(
    pool: &sqlx::PgPool,
    config: &TallyConfig,
    migrate: bool,
    patience: Patience,
) -> anyhow::Result<bool> {
    let postgres = tally_runtime::dependency("postgres");
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut attempts = 0;
    loop {
        attempts += 1;
        let schema = if migrate {
            tally_db::migrate(pool).await.map(|applied| {
                if applied > 0 {
                    tracing::info!(applied, "migrations applied");
                }
            })
        } else {
            tally_db::check_schema(pool).await
        };
        let error: anyhow::Error = match schema {
            Err(error) if error.is_retryable() => error.into(),
            Err(error) => return Err(error.into()),
            Ok(()) => match record_catalog(pool, config).await {
                Ok(()) => {
                    postgres.up();
                    return Ok(true);
                }
                Err(CatalogError::Postgres(error)) if tally_db::is_retryable(&error) => {
                    error.into()
                }
                Err(error) => return Err(error.into()),
            },
        };
        postgres.down(&error);
        let wait = backoff.next_wait();
        match &patience {
            Patience::Attempts(most) if attempts >= *most => {
                return Err(error.context(format!(
                    "Postgres at {} did not answer after {attempts} attempts; check that it is running and that database.url is right",
                    tally_db::describe_url(config.database.url.expose())
                )))
            }
            Patience::Attempts(_) => tokio::time::sleep(wait).await,
            Patience::UntilStopped(stop) => {
                if tally_runtime::sleep_unless_stopped(wait, stop).await {
                    return Ok(false);
                }
            }
        }
    }
}

/// Records tally.toml's meters and credit rates, the catalog every stage reads.
async fn record_catalog(pool: &sqlx::PgPool, config: &TallyConfig) -> Result<(), CatalogError> {
    tally_db::meters::record(pool, &config.meters).await?;
    tally_credits::rates::record(pool, &config.credits.rates).await?;
    Ok(())
}

/// Serves `/metrics` (Prometheus), `/healthz` (the process is up) and `/readyz` (every
/// dependency it uses is reachable: 200, else 503 with which one is not and since when) on
/// `listen`, for the daemons without an HTTP API of their own.
pub(crate) fn serve_admin(
    runtime: &tokio::runtime::Runtime,
    listen: SocketAddr,
) -> anyhow::Result<()> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(listen))
        .with_context(|| {
            format!("cannot serve metrics on {listen}; pick a free --metrics-listen address")
        })?;
    let router = axum::Router::new()
        .route("/metrics", get(move || async move { handle.render() }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(tally_api::readiness));
    runtime.spawn(async move {
        if let Err(error) = axum::serve(listener, router).await {
            tracing::error!(%error, "the metrics endpoint stopped");
        }
    });
    Ok(())
}

/// SIGINT or SIGTERM: let the stage finish what it is doing, then exit.
pub(crate) async fn cancel_on_signal(stop: CancellationToken) {
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let terminated = async {
        match terminate.as_mut() {
            Some(signal) => {
                signal.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminated => {}
    }
    tracing::info!("stop requested; finishing the work in progress");
    stop.cancel();
}
