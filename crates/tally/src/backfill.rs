//! `tally backfill PATH`: events from files (JSON lines, CSV, Parquet, or a directory of them)
//! sent through Kafka under the same contract, dedup and late-event rules as live events.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use tally_archive::backfill::{Backfill, Counts, FileReport, Options};

use crate::cli::print_json;
use crate::config::TallyConfig;
use crate::process::{connect, runtime};

#[derive(Debug, clap::Args)]
pub(crate) struct BackfillArgs {
    /// A .jsonl (or .ndjson), .csv or .parquet file, or a directory of them (taken in name order)
    path: PathBuf,
    /// Decide every record by the contract and count them by reason; send and write nothing
    #[arg(long)]
    dry_run: bool,
    /// At most this many events a second, so the live pipeline keeps up (0: as fast as Kafka takes them)
    #[arg(long, default_value_t = 10_000, value_name = "EVENTS_PER_S")]
    rate: u64,
    /// Print the report as JSON
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(config: &TallyConfig, args: &BackfillArgs) -> anyhow::Result<()> {
    let files = tally_archive::input::files(&args.path)?;
    let meters = config
        .require_meters()?
        .iter()
        .map(|m| m.name.clone())
        .collect();
    if !args.dry_run {
        config.require_brokers()?;
    }
    let runtime = runtime()?;
    let pool = if args.dry_run {
        None
    } else {
        let pool = runtime.block_on(connect(config, 2))?;
        runtime
            .block_on(tally_db::check_schema(&pool))
            .context("the database schema")?;
        Some(pool)
    };
    let options = Options {
        dry_run: args.dry_run,
        rate: args.rate,
        lateness_horizon: config.aggregator.lateness_horizon,
        meters,
    };
    let backfill = Backfill::new(
        config.kafka.clone(),
        pool,
        runtime.handle().clone(),
        options,
    )?;
    let mut reports = Vec::new();
    for file in &files {
        let shown = file.display().to_string();
        let started = Instant::now();
        let mut last_shown = Instant::now();
        let terminal = std::io::stderr().is_terminal();
        let mut progress = |counts: &Counts| {
            if last_shown.elapsed() < Duration::from_secs(1) {
                return;
            }
            last_shown = Instant::now();
            let rate = counts.records as f64 / started.elapsed().as_secs_f64().max(0.001);
            let line = format!(
                "backfill {shown}: {} records ({rate:.0}/s), {} within the rules, {} too old, {} refused",
                counts.records,
                counts.countable,
                counts.too_old,
                counts.refused.values().sum::<u64>()
            );
            if terminal {
                eprint!("\r{line}");
            } else {
                eprintln!("{line}");
            }
        };
        let report = backfill.file(file, &mut progress)?;
        if terminal {
            eprintln!();
        }
        if !args.json {
            print_report(&report, started.elapsed(), args.dry_run);
        }
        reports.push(report);
    }
    if args.json {
        print_json(&reports)?;
    }
    Ok(())
}

fn print_report(report: &FileReport, took: Duration, dry_run: bool) {
    let counts = &report.counts;
    if report.already_done {
        println!(
            "{}: backfilled whole by an earlier run (SHA-256 {}); nothing sent again",
            report.path,
            &report.sha256[..12]
        );
        return;
    }
    let verb = if dry_run { "checked" } else { "sent" };
    let resumed = if report.started_at > 0 {
        format!(", resumed at record {}", report.started_at)
    } else {
        String::new()
    };
    println!(
        "{}: {} records {verb} in {:.1} s{resumed}: {} within the rules, {} older than the lateness horizon (archived, not counted), {} refused",
        report.path,
        counts.records,
        took.as_secs_f64(),
        counts.countable,
        counts.too_old,
        counts.refused.values().sum::<u64>()
    );
    if counts.repeated_ids > 0 {
        println!(
            "  {} events repeat an id that came before in the file: the aggregator counts each id once",
            counts.repeated_ids
        );
    }
    for (reason, n) in &counts.refused {
        println!("  refused {reason}: {n}");
    }
}
