//! `tally archive` (the archiver daemon, or `--once`) and `tally archive verify`.

use std::net::SocketAddr;

use anyhow::bail;
use chrono::{DateTime, TimeDelta, Utc};
use tally_archive::{ArchiveStore, Archiver};
use tally_runtime::RunMode;
use tokio_util::sync::CancellationToken;

use crate::cli::{parse_time, print_json, time};
use crate::config::TallyConfig;
use crate::process::{
    cancel_on_signal, connect, lazy_pool, prepare_database, runtime, serve_admin, Patience,
};

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct ArchiveArgs {
    #[command(subcommand)]
    command: Option<ArchiveCommand>,
    /// Archive up to the end offsets seen at start, then exit 0 (for cron)
    #[arg(long)]
    once: bool,
    /// Apply pending database migrations before starting
    #[arg(long)]
    migrate: bool,
    /// Serve /metrics (Prometheus), /healthz and /readyz on this address, e.g. 0.0.0.0:9190
    #[arg(long, value_name = "HOST:PORT")]
    metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, clap::Subcommand)]
enum ArchiveCommand {
    /// Count the archive's events as the aggregator counts them, per hour, customer and
    /// meter, against the windows; exit 1 on a difference
    ///
    /// An event counts once (by id), and not when the aggregator refused it (its record in
    /// rejected_events). Run it once the archive has caught up with the aggregator: events
    /// between the two positions (printed) are in one and not yet in the other.
    Verify(VerifyArgs),
}

#[derive(Debug, clap::Args)]
struct VerifyArgs {
    /// From this time (RFC 3339; the hour holding it) [default: 24 hours before --to]
    #[arg(long, value_parser = parse_time)]
    from: Option<DateTime<Utc>>,
    /// Up to this time (RFC 3339; exclusive, rounded up to the hour) [default: the start of
    /// the last hour the archive has whole: now, less archive.flush_every and a minute,
    /// rounded down]
    #[arg(long, value_parser = parse_time)]
    to: Option<DateTime<Utc>>,
    /// Print the result as JSON
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(config: &TallyConfig, args: &ArchiveArgs) -> anyhow::Result<()> {
    match &args.command {
        Some(ArchiveCommand::Verify(verify_args)) => verify(config, verify_args),
        None => archive(config, args),
    }
}

fn archive(config: &TallyConfig, args: &ArchiveArgs) -> anyhow::Result<()> {
    config.require_brokers()?;
    let runtime = runtime()?;
    // The loop's flushes and takes, and the maintenance task beside it.
    let pool = {
        let _runtime = runtime.enter();
        lazy_pool(config, 3)?
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
    let archiver = Archiver::new(
        config.archive.clone(),
        config.kafka.clone(),
        config.aggregator.lateness_horizon,
        pool,
        runtime.handle().clone(),
    )?;
    let mode = if args.once {
        RunMode::Once
    } else {
        RunMode::Daemon
    };
    // The loop blocks; it runs here, on the main thread, not on a runtime worker.
    let summary = archiver.run(mode, &stop)?;
    if args.once {
        println!(
            "archived {} records in {} files ({} flushes) to {}",
            summary.archived, summary.files, summary.flushes, config.archive.url
        );
    }
    Ok(())
}

fn verify(config: &TallyConfig, args: &VerifyArgs) -> anyhow::Result<()> {
    let to = args.to.unwrap_or_else(|| {
        let flushed = TimeDelta::from_std(config.archive.flush_every).unwrap_or_default();
        tally_core::window::hour_start(Utc::now() - flushed - TimeDelta::minutes(1))
    });
    let from = args.from.unwrap_or(to - TimeDelta::hours(24));
    if from >= to {
        bail!("--from ({}) must be before --to ({})", time(from), time(to));
    }
    let store = ArchiveStore::open(&config.archive.url)?;
    let verification = runtime()?.block_on(async {
        let pool = connect(config, 2).await?;
        tally_db::check_schema(&pool).await?;
        anyhow::Ok(
            tally_archive::verify::verify(
                &pool,
                &store,
                &config.kafka.topic,
                &config.aggregator.group_id,
                from,
                to,
            )
            .await?,
        )
    })?;
    if args.json {
        print_json(&verification)?;
    } else {
        let range = |v: Option<DateTime<Utc>>| v.map(time).unwrap_or_default();
        println!(
            "{} to {}: {} hours, {} files, {} records read; {} events archived and counted, {} in the windows",
            range(verification.from),
            range(verification.to),
            verification.hours,
            verification.files,
            verification.records,
            verification.archived,
            verification.windows
        );
        for d in &verification.differences {
            println!(
                "differs  {}  customer {:?} meter {:?}: archive {}, windows {}",
                time(d.hour),
                d.customer,
                d.meter,
                d.archived,
                d.windows
            );
        }
        for file in &verification.unreadable {
            println!(
                "unread   {}  {}: {} (the hour is not compared)",
                time(file.hour),
                file.path,
                file.why
            );
        }
        for path in &verification.lost {
            println!("lost     {path}: recorded, but the store lost it (its hour differs)");
        }
        for hour in &verification.expired_hours {
            println!(
                "expired  {}  (archive.retention deleted its files; not compared)",
                time(*hour)
            );
        }
        for p in &verification.positions {
            println!(
                "position partition {}: archived up to offset {}, aggregated up to {} (events between are in one only)",
                p.partition, p.archived_to, p.aggregated_to
            );
        }
    }
    if !verification.unreadable.is_empty() {
        bail!(
            "{} archive file(s) could not be read whole (listed above); restore them from a backup, or find what changed them",
            verification.unreadable.len()
        );
    }
    if !verification.differences.is_empty() {
        bail!(
            "the archive and the windows differ on {} customer-meter hour(s); if the positions above differ, run again once `tally archive` and `tally aggregate` have caught up",
            verification.differences.len()
        );
    }
    Ok(())
}
