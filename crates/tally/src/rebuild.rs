//! `tally rebuild`: a meter's windows recomputed from the event archive under its definition
//! in tally.toml, compared (`--dry-run`) or swapped in (docs/rebuild.md).

use anyhow::{anyhow, bail};
use chrono::NaiveDate;
use tally_aggregator::rebuild::{RebuildReport, RebuildRequest, RebuildSettings};
use tally_archive::ArchiveStore;

use crate::cli::{print_json, time};
use crate::config::TallyConfig;
use crate::process::{connect, runtime};

#[derive(Debug, clap::Args)]
pub(crate) struct RebuildArgs {
    /// The meter whose windows are recomputed, under its definition in tally.toml
    #[arg(long)]
    meter: String,
    /// Only this customer's windows (not when the meter's definition changes)
    #[arg(long)]
    customer: Option<String>,
    /// The first UTC day rebuilt: 2026-11-01 (or 2026-11-01T00:00:00Z)
    #[arg(long, value_parser = parse_day)]
    from: NaiveDate,
    /// The UTC day after the last one rebuilt (the range is [--from, --to))
    #[arg(long, value_parser = parse_day)]
    to: NaiveDate,
    /// Recompute and print the differences per customer and day; change nothing
    #[arg(long)]
    dry_run: bool,
    /// Print the report as JSON
    #[arg(long)]
    json: bool,
}

/// A UTC day, as a date or as the RFC 3339 time of its midnight (windows roll up into UTC
/// days, so a rebuild covers whole ones).
fn parse_day(text: &str) -> Result<NaiveDate, String> {
    if let Ok(day) = text.parse::<NaiveDate>() {
        return Ok(day);
    }
    let at = crate::cli::parse_time(text)?;
    if at.time() != chrono::NaiveTime::MIN {
        return Err(format!(
            "{text:?} is not midnight UTC: a rebuild covers whole UTC days (usage_daily rolls up days); write a date such as {}",
            at.date_naive()
        ));
    }
    Ok(at.date_naive())
}

pub(crate) fn run(config: &TallyConfig, args: &RebuildArgs) -> anyhow::Result<()> {
    let meter = config
        .require_meters()?
        .iter()
        .find(|m| m.name == args.meter)
        .cloned()
        .ok_or_else(|| {
            anyhow!(
                "meter {:?} is not in tally.toml's [[meters]]; a rebuild recomputes a meter under its definition there",
                args.meter
            )
        })?;
    config.require_brokers()?;
    let store = ArchiveStore::open(&config.archive.url)?;
    let request = RebuildRequest {
        meter,
        customer: args.customer.clone(),
        from: args.from,
        to: args.to,
        dry_run: args.dry_run,
    };
    let settings = RebuildSettings {
        kafka: config.kafka.clone(),
        aggregator_group: config.aggregator.group_id.clone(),
        lateness_horizon: chrono::TimeDelta::from_std(config.aggregator.lateness_horizon)?,
    };
    let quiet = args.json;
    let progress = move |line: &str| {
        if !quiet {
            eprintln!("{line}");
        }
    };
    let report = runtime()?.block_on(async {
        let pool = connect(config, 3).await?;
        tally_db::check_schema(&pool).await?;
        anyhow::Ok(
            tally_aggregator::rebuild::rebuild(&pool, &store, &settings, &request, &progress)
                .await?,
        )
    })?;
    if args.json {
        print_json(&report)?;
    } else {
        print_text(&report);
    }
    if !report.swapped && !report.dry_run {
        bail!("the rebuild did not swap its windows in");
    }
    Ok(())
}

/// Text rows shown at most; --json has them all.
const SHOWN: usize = 50;

fn print_text(report: &RebuildReport) {
    let who = report
        .customer
        .as_deref()
        .map_or("every customer".to_owned(), |c| format!("customer {c:?}"));
    println!(
        "rebuild {} of meter {:?}, {who}, {} to {} ({}){}",
        report.rebuild_id,
        report.meter,
        report.from,
        report.to,
        report.definition,
        if report.dry_run { ": dry run" } else { "" }
    );
    if let Some(before) = &report.redefined_from {
        println!("definition: {before} → {}", report.definition);
    }
    println!(
        "{} events recounted ({} from {} archive files, {} from Kafka); windows {} → {}",
        report.events,
        report.events - report.from_kafka,
        report.files,
        report.from_kafka,
        report.windows_before,
        report.windows_after
    );
    if report.days.is_empty() {
        println!("no customer's daily usage changes");
    } else {
        println!(
            "{:<12} {:<24} {:>10} {:>10} {:>20} {:>20}",
            "day", "customer", "events", "events'", "usage", "usage'"
        );
    }
    for d in report.days.iter().take(SHOWN) {
        println!(
            "{:<12} {:<24} {:>10} {:>10} {:>20} {:>20}",
            d.day.to_string(),
            d.customer,
            d.events_before,
            d.events_after,
            d.usage_before,
            d.usage_after
        );
    }
    if report.days.len() > SHOWN {
        println!(
            "… and {} more (--json lists them all)",
            report.days.len() - SHOWN
        );
    }
    let verb = if report.dry_run {
        "would hand"
    } else {
        "handed"
    };
    println!(
        "{verb} {} changed billing slots to the sink, which bills the differences as new revisions",
        report.slots_to_bill
    );
    if report.backdated_total > 0 {
        println!(
            "{} of them start more than 35 days back, older than Stripe takes: the sink bills them with the oldest timestamp Stripe takes, not in their own period{}:",
            report.backdated_total,
            if report.dry_run {
                ""
            } else {
                " (all listed in rebuild_backdated_slots)"
            }
        );
        for slot in report.backdated.iter().take(SHOWN) {
            println!(
                "  {}  {:<24} usage {} → {}",
                time(slot.slot_start),
                slot.customer,
                slot.usage_before,
                slot.usage_after
            );
        }
        if report.backdated_total > SHOWN as u64 {
            println!("  … and {} more", report.backdated_total - SHOWN as u64);
        }
    }
    if report.dry_run {
        println!("dry run: nothing was changed");
    } else if report.swapped {
        println!("the rebuilt windows are live");
    }
}
