//! `tally serve`: the HTTP API.

use std::sync::Arc;

use anyhow::{bail, Context};
use tally_api::ApiState;
use tally_quota::Quota;
use tokio_util::sync::CancellationToken;

use crate::config::TallyConfig;
use crate::process::{cancel_on_signal, connect, runtime};

pub(crate) fn run(config: &TallyConfig) -> anyhow::Result<()> {
    let serve = &config.serve;
    if serve.tokens.is_empty() {
        bail!("no API tokens: every request would be refused; add [[serve.tokens]] (name, token, optional customer) to tally.toml");
    }
    let runtime = runtime()?;
    runtime.block_on(async {
        let pool = connect(config, 8).await?;
        tally_db::check_schema(&pool).await?;
        let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .context("installing the metrics recorder")?;
        let quota = Quota::new(pool.clone(), serve.refresh).await?;
        let state = Arc::new(ApiState {
            quota,
            pool,
            tokens: serve.tokens.clone(),
            metrics: Some(metrics),
        });
        let listener = tokio::net::TcpListener::bind(&serve.listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {}; pick a free serve.listen address",
                    serve.listen
                )
            })?;
        tracing::info!(listen = %serve.listen, tokens = serve.tokens.len(), "serving the HTTP API");
        let stop = CancellationToken::new();
        tokio::spawn(cancel_on_signal(stop.clone()));
        tally_api::serve(
            listener,
            tally_api::router(state, serve.max_body_bytes),
            stop,
        )
        .await?;
        Ok(())
    })
}
