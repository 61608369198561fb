//! `tally aggregate` and `tally migrate`.

use std::net::SocketAddr;

use anyhow::Context;
use tally_aggregator::{Aggregator, RunMode};
use tokio_util::sync::CancellationToken;

use crate::config::TallyConfig;
use crate::process::{
    cancel_on_signal, connect, lazy_pool, prepare_database, runtime, serve_admin, Patience,
};

#[derive(Debug, clap::Args)]
pub(crate) struct AggregateArgs {
    /// Drain up to the end offsets seen at start, commit, and exit 0 (for cron)
    #[arg(long)]
    once: bool,
    /// Apply pending database migrations before starting
    #[arg(long)]
    migrate: bool,
    /// Serve /metrics (Prometheus), /healthz and /readyz on this address, e.g. 0.0.0.0:9187
    #[arg(long, value_name = "HOST:PORT")]
    metrics_listen: Option<SocketAddr>,
}

/// Applies the migrations and records tally.toml's meters.
pub(crate) fn migrate(config: &TallyConfig) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let pool = connect(config, 2).await?;
        let applied = tally_db::migrate(&pool).await?;
        prepare_database(&pool, config, false, Patience::Attempts(3)).await?;
        let count = tally_db::MIGRATOR.iter().count();
        let schema = match applied {
            0 => {
                format!("the database schema was up to date ({count} migrations): nothing to apply")
            }
            n => format!(
                "applied {n} migration(s); the database schema is up to date ({count} migrations)"
            ),
        };
        println!("{schema}; {} meter(s) recorded", config.meters.len());
        Ok(())
    })
}

/// `--once`: burns everything queued, closes expired grants and makes the plan grants due.
async fn burn_all(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    let rates = tally_credits::RateCard::load(pool)
        .await
        .context("loading the credit rate card")?;
    loop {
        let (_, more) = tally_credits::burn_once(pool, &rates)
            .await
            .context("burning credits")?;
        if !more {
            tally_credits::settle(pool, chrono::Utc::now())
                .await
                .context("closing expired credit grants and granting plan credits")?;
            return Ok(());
        }
    }
}

/// `--once`: evaluates every change queued and makes one round of the deliveries due (retries
/// come due later: the next run sends them).
async fn alert_all(pool: &sqlx::PgPool, config: &tally_alerts::AlertsConfig) -> anyhow::Result<()> {
    let rates = tally_credits::RateCard::load(pool)
        .await
        .context("loading the credit rate card")?;
    while tally_alerts::evaluate_once(pool, &rates, chrono::Utc::now())
        .await
        .context("evaluating alert rules")?
        .more
    {}
    let sender = tally_alerts::Sender::new(config);
    while tally_alerts::deliver_due(pool, &sender)
        .await
        .context("delivering alerts")?
        .more
    {}
    Ok(())
}

pub(crate) fn run(config: &TallyConfig, args: &AggregateArgs) -> anyhow::Result<()> {
    config.require_brokers()?;
    let meters = config.require_meters()?.to_vec();
    let runtime = runtime()?;
    // One connection per commit lane, one for taking partitions, one for DLQ bookkeeping, and
    // one each for the tasks beside the loop: the credit burner, the alert evaluator, the
    // alert sender and the watchdog (none of them may wait for the lanes' connections).
    let connections = config.aggregator.parallel_commits as u32 + 2 + 4;
    let pool = {
        let _runtime = runtime.enter(); // the lazy pool's maintenance task needs a runtime
        lazy_pool(config, connections)?
    };
    if let Some(listen) = args.metrics_listen {
        serve_admin(&runtime, listen)?;
    }
    let stop = CancellationToken::new();
    runtime.spawn(cancel_on_signal(stop.clone()));
    let patience = if args.once {
        Patience::Attempts(5)
    } else {
        Patience::UntilStopped(stop.clone())
    };
    if !runtime.block_on(prepare_database(&pool, config, args.migrate, patience))? {
        return Ok(()); // stopped while waiting for Postgres
    }
    let mode = if args.once {
        RunMode::Once
    } else {
        RunMode::Daemon
    };
    let priced_meters = config
        .credits
        .rates
        .iter()
        .map(|r| r.meter.clone())
        .collect();
    let aggregator = Aggregator::new(
        config.aggregator.clone(),
        config.kafka.clone(),
        meters,
        pool.clone(),
        runtime.handle().clone(),
    )?
    .with_priced_meters(priced_meters);
    // The credit burner and the alerts follow the commits: in daemon mode beside the loop,
    // with --once after it, until what was queued is burned, evaluated and sent.
    let followers = (!args.once).then(|| {
        let _runtime = runtime.enter();
        let mut tasks =
            tally_alerts::start_alerts(pool.clone(), config.alerts.clone(), stop.clone());
        tasks.push(tally_credits::start_burner(
            pool.clone(),
            config.credits.burn_every,
            stop.clone(),
        ));
        tasks
    });
    // The loop blocks; it runs here, on the main thread, not on a runtime worker.
    let summary = aggregator.run(mode, &stop)?;
    stop.cancel();
    match followers {
        Some(tasks) => {
            for task in tasks {
                let _ = runtime.block_on(task);
            }
        }
        None => {
            runtime.block_on(burn_all(&pool))?;
            runtime.block_on(alert_all(&pool, &config.alerts))?;
        }
    }
    if args.once {
        println!(
            "aggregated {} events in {} batches: {} counted, {} duplicates, {} rejected",
            summary.consumed,
            summary.batches,
            summary.counted,
            summary.duplicates,
            summary.rejected
        );
    }
    Ok(())
}
