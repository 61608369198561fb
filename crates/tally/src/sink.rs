//! `tally sink`, `tally reconcile`, `tally quarantine` and `tally submissions`.

use std::net::SocketAddr;

use anyhow::{bail, Context};
use chrono::{DateTime, NaiveDate, TimeDelta, Timelike, Utc};
use std::time::Duration;

use tally_runtime::Backoff;
use tally_sink::{RunMode, Sink, SinkError, StripeHttp, Verdict};
use tokio_util::sync::CancellationToken;

use crate::config::TallyConfig;
use crate::process::{
    cancel_on_signal, connect, lazy_pool, prepare_database, runtime, serve_admin, Patience,
};

#[derive(Debug, clap::Args)]
pub(crate) struct SinkArgs {
    /// One billing pass, then exit (for cron); exit 1 if Stripe refused a submission
    #[arg(long)]
    once: bool,
    /// Apply pending database migrations before starting
    #[arg(long)]
    migrate: bool,
    /// Create the Stripe meters that tally's meters bill under, where missing
    #[arg(long)]
    create_stripe_meters: bool,
    /// Serve /metrics (Prometheus), /healthz and /readyz on this address, e.g. 0.0.0.0:9188
    #[arg(long, value_name = "HOST:PORT")]
    metrics_listen: Option<SocketAddr>,
}

pub(crate) fn run(config: &TallyConfig, args: &SinkArgs) -> anyhow::Result<()> {
    config.stripe.validate().map_err(anyhow::Error::msg)?;
    let runtime = runtime()?;
    if let Some(listen) = args.metrics_listen {
        serve_admin(&runtime, listen)?;
    }
    let stop = CancellationToken::new();
    runtime.spawn(cancel_on_signal(stop.clone()));
    runtime.block_on(async {
        let pool = lazy_pool(config, 4)?;
        let patience = if args.once {
            Patience::Attempts(5)
        } else {
            Patience::UntilStopped(stop.clone())
        };
        if !prepare_database(&pool, config, args.migrate, patience).await? {
            return Ok(()); // stopped while waiting for Postgres
        }
        let stripe = StripeHttp::new(&config.stripe).map_err(anyhow::Error::msg)?;
        if !check_stripe_meters(&pool, &stripe, args, &stop).await? {
            return Ok(()); // stopped while waiting for Stripe
        }
        let sink = Sink::new(config.sink.clone(), &config.stripe, pool)?;
        let mode = if args.once { RunMode::Once } else { RunMode::Daemon };
        let summary = sink.run(mode, &stop).await?;
        if args.once {
            println!(
                "billed {} slots: {} submissions written, {} sent, {} retries ({} rate limited), {} refused, {} pending, {} waiting for review, {} slots waiting for a customer mapping, {} pairs quarantined",
                summary.accounted.slots,
                summary.accounted.submissions,
                summary.sent,
                summary.retried,
                summary.rate_limited,
                summary.failed,
                summary.pending,
                summary.needs_review,
                summary.unmapped_slots,
                summary.quarantined_pairs
            );
        }
        if summary.failed > 0 {
            bail!(
                "Stripe refused {} submission(s); see `SELECT * FROM stripe_submissions WHERE status = 'failed'`, fix the cause, then set their status back to 'pending'",
                summary.failed
            );
        }
        Ok(())
    })
}

/// Before anything is sent, whatever ran before: every meter tally bills (tally.toml's, just
/// recorded) has a Stripe meter, creating the missing ones with `--create-stripe-meters`.
/// Stripe would accept events for a missing meter and never bill them, so a missing meter
/// stops the sink. Stripe unreachable: the daemon waits (`Ok(false)`: stopped meanwhile);
/// `--once` fails.
async fn check_stripe_meters(
    pool: &sqlx::PgPool,
    stripe: &StripeHttp,
    args: &SinkArgs,
    stop: &CancellationToken,
) -> anyhow::Result<bool> {
    let dependency = tally_runtime::dependency("stripe");
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        let attempt = async {
            let created = if args.create_stripe_meters {
                tally_sink::create_stripe_meters(pool, stripe).await?
            } else {
                Vec::new()
            };
            let missing = tally_sink::missing_stripe_meters(pool, stripe).await?;
            Ok::<_, SinkError>((created, missing))
        }
        .await;
        let error = match attempt {
            Ok((created, missing)) => {
                dependency.up();
                for event_name in created {
                    println!("created Stripe meter {event_name:?}");
                }
                if !missing.is_empty() {
                    bail!(
                        "Stripe has no meter for event name(s) {}; Stripe would accept those events and never bill them. Create the meters in the Stripe dashboard, or run `tally sink --create-stripe-meters`",
                        missing.join(", ")
                    );
                }
                return Ok(true);
            }
            Err(error) => error,
        };
        let transient = match &error {
            SinkError::Stripe(e) => e.is_retryable(),
            SinkError::Store(e) => e.is_retryable(),
            _ => false,
        };
        if args.once || !transient {
            return Err(anyhow::Error::new(error).context(
                "cannot check the Stripe meters; check stripe.api_base and the secret key",
            ));
        }
        dependency.down(&error);
        if tally_runtime::sleep_unless_stopped(backoff.next_wait(), stop).await {
            return Ok(false);
        }
    }
}

#[derive(Debug, clap::Args)]
pub(crate) struct QuarantineArgs {
    #[command(subcommand)]
    command: QuarantineCommand,
}

#[derive(Debug, clap::Subcommand)]
enum QuarantineCommand {
    /// The customer+meter pairs the sink has set aside, and why
    List,
    /// Bill a quarantined pair again from the next pass (fix the cause first)
    Release {
        /// The customer id events carry
        customer: String,
        /// The meter name
        meter: String,
    },
}

/// `tally quarantine`: pairs the sink set aside so that everybody else is billed.
pub(crate) fn quarantine(config: &TallyConfig, args: &QuarantineArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let pool = connect(config, 2).await?;
        tally_db::check_schema(&pool).await?;
        match &args.command {
            QuarantineCommand::List => {
                let pairs = tally_sink::store::quarantined_pairs(&pool).await?;
                for pair in &pairs {
                    println!(
                        "{:<32} {:<16} since {}  {}: {}",
                        tally_core::reject::printable(pair.customer_id.clone()),
                        pair.meter,
                        pair.since.to_rfc3339(),
                        pair.reason,
                        pair.detail
                    );
                }
                println!("{} pair(s) quarantined", pairs.len());
            }
            QuarantineCommand::Release { customer, meter } => {
                if !tally_sink::store::release_quarantine(&pool, customer, meter).await? {
                    bail!("{customer} / {meter} is not quarantined; see `tally quarantine list`");
                }
                println!("{customer} / {meter} is billed again from the next sink pass");
            }
        }
        Ok(())
    })
}

#[derive(Debug, clap::Args)]
pub(crate) struct SubmissionsArgs {
    #[command(subcommand)]
    command: SubmissionsCommand,
}

#[derive(Debug, clap::Subcommand)]
enum SubmissionsCommand {
    /// The outbox, newest first: what was (or will be) sent to Stripe, and how it went
    List {
        /// pending, sent, failed or needs_review
        #[arg(long, value_parser = ["pending", "sent", "failed", "needs_review"])]
        status: Option<String>,
        #[arg(long)]
        customer: Option<String>,
        #[arg(long)]
        meter: Option<String>,
        /// At most this many rows
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Send failed submissions again (after fixing what Stripe refused), with the same
    /// identifiers; a submission whose slot has a later revision Stripe already has stays failed
    Retry {
        /// The submissions' identifiers (`tally:…`)
        #[arg(required_unless_present = "all_failed", conflicts_with = "all_failed")]
        identifiers: Vec<String>,
        /// Every failed submission (of --customer, if given)
        #[arg(long)]
        all_failed: bool,
        #[arg(long, requires = "all_failed")]
        customer: Option<String>,
    },
    /// Submissions parked because an earlier attempt may have reached Stripe over 23 hours ago
    Review,
    /// Resolve a parked submission after checking Stripe for its identifier
    Resolve {
        /// The submission's identifier (`tally:…`)
        identifier: String,
        /// Stripe has the event: record it as sent
        #[arg(long, conflicts_with = "resend", required_unless_present = "resend")]
        sent: bool,
        /// Stripe does not have the event: send it again
        #[arg(long)]
        resend: bool,
    },
}

/// `tally submissions`: the outbox as an operator sees it, and the rows they must decide on.
pub(crate) fn submissions(config: &TallyConfig, args: &SubmissionsArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let pool = connect(config, 2).await?;
        tally_db::check_schema(&pool).await?;
        match &args.command {
            SubmissionsCommand::List {
                status,
                customer,
                meter,
                limit,
            } => {
                let filter = tally_sink::store::SubmissionFilter {
                    status: status.clone(),
                    customer: customer.clone(),
                    meter: meter.clone(),
                    limit: *limit,
                };
                let rows = tally_sink::store::list_submissions(&pool, &filter).await?;
                for row in &rows {
                    println!(
                        "{}  {} {} slot {} r{} {} {}  {} after {} attempt(s), created {}{}",
                        row.identifier,
                        tally_core::reject::printable(row.customer_id.clone()),
                        row.meter,
                        row.slot_start.to_rfc3339(),
                        row.revision,
                        row.kind,
                        row.value,
                        row.status,
                        row.attempts,
                        row.created_at.to_rfc3339(),
                        row.last_error
                            .as_deref()
                            .map_or(String::new(), |e| format!("  last error: {e}")),
                    );
                }
                println!("{} submission(s)", rows.len());
            }
            SubmissionsCommand::Retry {
                identifiers,
                all_failed,
                customer,
            } => {
                let identifiers = if *all_failed {
                    tally_sink::store::failed_identifiers(&pool, customer.as_deref()).await?
                } else {
                    identifiers.clone()
                };
                let outcomes = tally_sink::store::retry_failed(&pool, &identifiers).await?;
                let mut refused = 0;
                for (identifier, outcome) in &outcomes {
                    match outcome {
                        tally_sink::store::RetryOutcome::Queued => {
                            println!("{identifier} queued: the sink sends it on its next pass")
                        }
                        tally_sink::store::RetryOutcome::NotFailed => {
                            refused += 1;
                            println!("{identifier} is not a failed submission; see `tally submissions list --status failed`")
                        }
                        tally_sink::store::RetryOutcome::Superseded { by_revision } => {
                            refused += 1;
                            println!("{identifier} stays failed: revision {by_revision} of the same slot reached Stripe after it, and sending this older one could undo it")
                        }
                    }
                }
                if refused > 0 {
                    bail!("{refused} of {} submission(s) not retried", outcomes.len());
                }
            }
            SubmissionsCommand::Review => {
                let rows = tally_sink::store::needs_review(&pool).await?;
                for row in &rows {
                    println!(
                        "{}  {} {} slot {} {} {}  first uncertain attempt {}",
                        row.identifier,
                        tally_core::reject::printable(row.customer_id.clone()),
                        row.meter,
                        row.slot_start.to_rfc3339(),
                        row.kind,
                        row.value,
                        row.first_uncertain_at
                            .map_or("-".to_owned(), |t| t.to_rfc3339())
                    );
                }
                println!("{} submission(s) wait for review: look each identifier up in Stripe (Billing > Meters > the meter's events), then `tally submissions resolve IDENTIFIER --sent` or `--resend`", rows.len());
            }
            SubmissionsCommand::Resolve {
                identifier,
                sent,
                resend: _,
            } => {
                let resolution = if *sent {
                    tally_sink::store::Resolution::Sent
                } else {
                    tally_sink::store::Resolution::Resend
                };
                if !tally_sink::store::resolve_review(&pool, identifier, resolution).await? {
                    bail!("no submission {identifier:?} waits for review; see `tally submissions review`");
                }
                println!("{identifier} resolved");
            }
        }
        Ok(())
    })
}

#[derive(Debug, clap::Args)]
pub(crate) struct ReconcileArgs {
    /// Start of the range: a date (2026-11-01, UTC midnight) or an RFC 3339 time, whole minutes
    #[arg(long, value_parser = parse_time, requires = "to", conflicts_with = "last")]
    from: Option<DateTime<Utc>>,
    /// End of the range (exclusive), same forms
    #[arg(long, value_parser = parse_time, requires = "from")]
    to: Option<DateTime<Utc>>,
    /// The range ending now (whole minutes), e.g. --last 48h: for cron and systemd timers
    #[arg(long, value_parser = humantime::parse_duration, required_unless_present = "from")]
    last: Option<Duration>,
    /// Also write the verdicts as Prometheus metrics to this file (written whole, then renamed
    /// into place), for node_exporter's textfile collector: tally_reconcile_pairs{verdict},
    /// tally_reconcile_meter_error_reports, tally_reconcile_last_run_timestamp_seconds
    #[arg(long, value_name = "FILE")]
    metrics_file: Option<std::path::PathBuf>,
    /// For drift tally can prove (Stripe accepted events it does not bill), show the repair:
    /// the missing units sent again through the outbox. Writes nothing without --apply
    #[arg(long)]
    repair: bool,
    /// With --repair: queue the proven repairs in the outbox (the sink sends them)
    #[arg(long, requires = "repair")]
    apply: bool,
}

impl ReconcileArgs {
    /// The range to compare: --from/--to, or the --last whole minutes before now.
    fn range(&self) -> anyhow::Result<(DateTime<Utc>, DateTime<Utc>)> {
        match (self.from, self.to, self.last) {
            (Some(from), Some(to), _) => Ok((from, to)),
            (_, _, Some(last)) => {
                let now = Utc::now();
                let to = now
                    - TimeDelta::seconds(i64::from(now.second()))
                    - TimeDelta::nanoseconds(i64::from(now.nanosecond()));
                let last =
                    TimeDelta::from_std(last).map_err(|_| anyhow::anyhow!("--last is too long"))?;
                Ok((to - last, to))
            }
            _ => bail!("give the range: --from and --to, or --last (e.g. --last 48h)"),
        }
    }
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(date
            .and_hms_opt(0, 0, 0)
            .expect("midnight exists")
            .and_utc());
    }
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| format!("{text:?} is neither a date (2026-11-01) nor an RFC 3339 time (2026-11-01T12:00:00Z)"))
}

/// Prints the comparison; exit 1 if Stripe and tally disagree anywhere.
pub(crate) fn reconcile(config: &TallyConfig, args: &ReconcileArgs) -> anyhow::Result<()> {
    config.stripe.validate().map_err(anyhow::Error::msg)?;
    runtime()?.block_on(async {
        let pool = connect(config, 2).await?;
        tally_db::check_schema(&pool).await?;
        let stripe = StripeHttp::new(&config.stripe).map_err(anyhow::Error::msg)?;
        let (from, to) = args.range()?;
        let stripe_read_at = Utc::now();
        let rows = tally_sink::reconcile(
            &pool,
            &stripe,
            config.stripe.requests_per_second(),
            from,
            to,
        )
        .await?;
        print!("{}", tally_sink::render_table(&rows));
        if args.repair {
            repair(&pool, &rows, (from, to), stripe_read_at, args.apply).await?;
        }
        let reports = tally_sink::meter_error_reports(&pool, &stripe, from, to).await?;
        let count = |verdict| rows.iter().filter(|r| r.verdict == verdict).count() as i32;
        tally_sink::store::record_reconcile_run(
            &pool,
            &tally_sink::store::ReconcileRun {
                ran_at: Utc::now(),
                range_from: from,
                range_to: to,
                ok: count(Verdict::Ok),
                unbilled: count(Verdict::Unbilled),
                unmapped: count(Verdict::Unmapped),
                drift: count(Verdict::Drift),
                quarantined: count(Verdict::Quarantined),
                review: count(Verdict::Review),
                meter_error_reports: reports.len() as i32,
            },
        )
        .await?;
        if let Some(path) = &args.metrics_file {
            write_reconcile_metrics(path, &rows, reports.len())?;
        }
        for report in &reports {
            let errors: Vec<String> = report
                .errors
                .iter()
                .map(|(code, n)| format!("{code} ×{n}"))
                .collect();
            println!(
                "Stripe reported {} at {}: {} [{}] identifiers: {}",
                report.event_type,
                report.created.to_rfc3339(),
                report.summary,
                errors.join(", "),
                report.identifiers.join(", ")
            );
        }
        let verdicts = report_verdicts(&rows);
        if !reports.is_empty() {
            bail!(
                "Stripe reported {} meter event error report(s) in this range: it accepted those events and will not bill them; fix the cause (a missing meter: `tally sink --create-stripe-meters`), then resend the usage",
                reports.len()
            );
        }
        verdicts
    })
}

/// `--repair`: what each drifting pair's repair is, or why there is none; with `apply`, the
/// proven ones queued in the outbox.
async fn repair(
    pool: &sqlx::PgPool,
    rows: &[tally_sink::ReconcileRow],
    (from, to): (DateTime<Utc>, DateTime<Utc>),
    stripe_read_at: DateTime<Utc>,
    apply: bool,
) -> anyhow::Result<()> {
    use tally_sink::{Applied, RepairAction};
    let plans = tally_sink::plan_repairs(pool, rows, from, to, Utc::now()).await?;
    if plans.is_empty() {
        println!("repair: no drift, nothing to repair");
        return Ok(());
    }
    let meters = tally_sink::store::billed_meters(pool).await?;
    let mut proven = 0;
    for plan in &plans {
        let pair = format!(
            "{} / {}",
            tally_core::reject::printable(plan.customer.clone()),
            plan.meter
        );
        let RepairAction::Send {
            units,
            stripe_customer_id,
            event_timestamp,
            ..
        } = &plan.action
        else {
            if let RepairAction::Skip(why) = &plan.action {
                println!("repair {pair}: not repaired: {why}");
            }
            continue;
        };
        proven += 1;
        let what = match plan.kind {
            tally_sink::owed::BillingKind::Delta => format!(
                "{} units Stripe lacks (Stripe {}, sent {})",
                units.normalize(),
                plan.stripe.normalize(),
                plan.sent.normalize()
            ),
            tally_sink::owed::BillingKind::Last => format!(
                "the value {} again (Stripe holds {})",
                units.normalize(),
                plan.stripe.normalize()
            ),
        };
        let target = format!(
            "to {stripe_customer_id} at {}",
            event_timestamp.to_rfc3339()
        );
        if !apply {
            println!("repair {pair}: would send {what} {target}");
            continue;
        }
        let Some(meter) = meters.get(&plan.meter) else {
            println!("repair {pair}: not repaired: the meter is not in the meters table");
            continue;
        };
        match tally_sink::apply_repair(pool, plan, meter, from, to, stripe_read_at).await? {
            Applied::Queued { identifier } => {
                println!("repair {pair}: queued {identifier}: {what} {target}; the sink sends it")
            }
            Applied::Skipped(why) => println!("repair {pair}: not repaired: {why}"),
        }
    }
    if !apply && proven > 0 {
        println!("repair: dry run, nothing written; add --apply to queue {proven} repair(s)");
    }
    Ok(())
}

/// The verdicts in Prometheus's text format, for node_exporter's textfile collector: written to
/// a temporary file beside `path`, then renamed, so a scrape never reads half a file.
fn write_reconcile_metrics(
    path: &std::path::Path,
    rows: &[tally_sink::ReconcileRow],
    meter_error_reports: usize,
) -> anyhow::Result<()> {
    use tally_sink::telemetry::{
        RECONCILE_LAST_RUN, RECONCILE_METER_ERROR_REPORTS, RECONCILE_PAIRS,
    };
    let mut text = format!(
        "# HELP {RECONCILE_PAIRS} Customer-meter pairs by verdict at the last tally reconcile.\n\
         # TYPE {RECONCILE_PAIRS} gauge\n"
    );
    for verdict in Verdict::ALL {
        let count = rows.iter().filter(|r| r.verdict == verdict).count();
        let verdict = verdict.as_str().to_lowercase();
        text.push_str(&format!(
            "{RECONCILE_PAIRS}{{verdict=\"{verdict}\"}} {count}\n"
        ));
    }
    text.push_str(&format!(
        "# HELP {RECONCILE_METER_ERROR_REPORTS} Stripe meter event error reports in the last reconcile's range.\n\
         # TYPE {RECONCILE_METER_ERROR_REPORTS} gauge\n\
         {RECONCILE_METER_ERROR_REPORTS} {meter_error_reports}\n\
         # HELP {RECONCILE_LAST_RUN} When tally reconcile last compared tally with Stripe.\n\
         # TYPE {RECONCILE_LAST_RUN} gauge\n\
         {RECONCILE_LAST_RUN} {}\n",
        Utc::now().timestamp()
    ));
    let partial = path.with_extension("prom.partial");
    std::fs::write(&partial, text)
        .and_then(|()| std::fs::rename(&partial, path))
        .with_context(|| {
            format!(
                "cannot write {}; --metrics-file needs a writable directory (node_exporter's --collector.textfile.directory)",
                path.display()
            )
        })
}

/// One line per kind of disagreement; an error (exit 1) on drift.
pub(crate) fn report_verdicts(rows: &[tally_sink::ReconcileRow]) -> anyhow::Result<()> {
    let count = |verdict| rows.iter().filter(|r| r.verdict == verdict).count();
    let (ok, unbilled, unmapped, drift, quarantined, review) = (
        count(Verdict::Ok),
        count(Verdict::Unbilled),
        count(Verdict::Unmapped),
        count(Verdict::Drift),
        count(Verdict::Quarantined),
        count(Verdict::Review),
    );
    println!("{ok} ok, {unbilled} not yet billed, {unmapped} unmapped, {drift} drift, {quarantined} quarantined, {review} waiting for review");
    if unbilled > 0 {
        println!("not yet billed: slots that have not settled, or outbox rows pending or failed; run `tally sink --once` and look at stripe_submissions");
    }
    if quarantined > 0 {
        println!("quarantined: the sink set these pairs aside (see the reason under each); fix the cause, then `tally quarantine release CUSTOMER METER`");
    }
    if review > 0 {
        println!("waiting for review: an earlier attempt may have reached Stripe over 23 hours ago; `tally submissions review`");
    }
    if drift > 0 {
        bail!("Stripe disagrees with what tally sent for {drift} customer-meter pair(s) (or has no meter for them); `tally reconcile --repair` shows what tally can prove and send again");
    }
    if quarantined + review > 0 {
        bail!("{quarantined} pair(s) quarantined and {review} pair(s) with submissions waiting for review: an operator must act");
    }
    Ok(())
}
