//! What every long-running command needs: a runtime, a Postgres pool, the metrics endpoint,
//! and SIGINT/SIGTERM turned into a cancellation.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::TallyConfig;

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

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

/// Serves the Prometheus exporter on `listen`.
pub(crate) fn serve_metrics(
    runtime: &tokio::runtime::Runtime,
    listen: SocketAddr,
) -> anyhow::Result<()> {
    let _guard = runtime.enter();
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(listen)
        .install()
        .with_context(|| {
            format!("cannot serve metrics on {listen}; pick a free --metrics-listen address")
        })
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
