//! `tally sink`, `tally customers` and `tally reconcile`.

use std::net::SocketAddr;

use anyhow::{bail, Context};
use chrono::{DateTime, NaiveDate, Utc};
use tally_sink::{Mode, Sink, StripeHttp, Verdict};
use tokio_util::sync::CancellationToken;

use crate::config::TallyConfig;
use crate::process::{cancel_on_signal, connect, runtime, serve_metrics};

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
    /// Serve Prometheus metrics on this address, e.g. 0.0.0.0:9188
    #[arg(long, value_name = "HOST:PORT")]
    metrics_listen: Option<SocketAddr>,
}

pub(crate) fn run(config: &TallyConfig, args: &SinkArgs) -> anyhow::Result<()> {
    config.stripe.validate().map_err(anyhow::Error::msg)?;
    let runtime = runtime()?;
    if let Some(listen) = args.metrics_listen {
        serve_metrics(&runtime, listen)?;
    }
    runtime.block_on(async {
        let pool = connect(config, 4).await?;
        if args.migrate {
            tally_db::migrate(&pool).await?;
        } else {
            tally_db::check_schema(&pool).await?;
        }
        let stripe = StripeHttp::new(&config.stripe).map_err(anyhow::Error::msg)?;
        if args.create_stripe_meters {
            for event_name in tally_sink::create_stripe_meters(&pool, &stripe).await? {
                println!("created Stripe meter {event_name:?}");
            }
        }
        let missing = tally_sink::missing_stripe_meters(&pool, &stripe)
            .await
            .context("cannot list the Stripe meters; check stripe.api_base and the secret key")?;
        if !missing.is_empty() {
            bail!(
                "Stripe has no meter for event name(s) {}; Stripe would accept those events and never bill them. Create the meters in the Stripe dashboard, or run `tally sink --create-stripe-meters`",
                missing.join(", ")
            );
        }
        let stop = CancellationToken::new();
        tokio::spawn(cancel_on_signal(stop.clone()));
        let sink = Sink::new(config.sink.clone(), &config.stripe, pool)?;
        let mode = if args.once { Mode::Once } else { Mode::Daemon };
        let summary = sink.run(mode, &stop).await?;
        if args.once {
            println!(
                "billed {} slots: {} submissions written, {} sent, {} retries ({} rate limited), {} refused, {} pending, {} slots waiting for a customer mapping",
                summary.accounted.slots,
                summary.accounted.submissions,
                summary.sent,
                summary.retried,
                summary.rate_limited,
                summary.failed,
                summary.pending,
                summary.unmapped_slots
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

#[derive(Debug, clap::Args)]
pub(crate) struct CustomersArgs {
    #[command(subcommand)]
    command: CustomersCommand,
}

#[derive(Debug, clap::Subcommand)]
enum CustomersCommand {
    /// Bill a tally customer to a Stripe customer (usage that waited is billed on the next pass)
    Map {
        /// The customer id events carry
        customer: String,
        /// The Stripe customer id, `cus_…`
        stripe_customer_id: String,
    },
    /// List the mappings, and customers whose usage waits for one
    List,
}

pub(crate) fn customers(config: &TallyConfig, args: &CustomersArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let pool = connect(config, 2).await?;
        tally_db::check_schema(&pool).await?;
        match &args.command {
            CustomersCommand::Map {
                customer,
                stripe_customer_id,
            } => {
                if !stripe_customer_id.starts_with("cus_") {
                    bail!("{stripe_customer_id:?} is not a Stripe customer id; they start with cus_ (see the customer's page in the Stripe dashboard)");
                }
                tally_sink::store::map_customer(&pool, customer, stripe_customer_id).await?;
                println!("{customer} is billed to Stripe customer {stripe_customer_id}");
            }
            CustomersCommand::List => {
                let mapped: Vec<(String, String)> = sqlx::query_as(
                    "SELECT customer_id, stripe_customer_id FROM stripe_customers ORDER BY customer_id",
                )
                .fetch_all(&pool)
                .await?;
                for (customer, stripe_id) in &mapped {
                    println!("{customer:<32} {stripe_id}");
                }
                let waiting: Vec<(String, String, i64)> = sqlx::query_as(
                    "SELECT customer_id, meter, slots FROM stripe_unmapped_usage ORDER BY customer_id, meter",
                )
                .fetch_all(&pool)
                .await?;
                for (customer, meter, slots) in &waiting {
                    println!("{customer:<32} UNMAPPED: {slots} slot(s) of {meter} wait; run `tally customers map {customer} cus_…`");
                }
            }
        }
        Ok(())
    })
}

#[derive(Debug, clap::Args)]
pub(crate) struct ReconcileArgs {
    /// Start of the range: a date (2026-11-01, UTC midnight) or an RFC 3339 time, whole minutes
    #[arg(long, value_parser = parse_time)]
    from: DateTime<Utc>,
    /// End of the range (exclusive), same forms
    #[arg(long, value_parser = parse_time)]
    to: DateTime<Utc>,
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
        let rows = tally_sink::reconcile(
            &pool,
            &stripe,
            config.stripe.requests_per_second(),
            args.from,
            args.to,
        )
        .await?;
        print!("{}", tally_sink::render_table(&rows));
        report_verdicts(&rows)
    })
}

/// One line per kind of disagreement; an error (exit 1) on drift.
pub(crate) fn report_verdicts(rows: &[tally_sink::ReconcileRow]) -> anyhow::Result<()> {
    let count = |verdict| rows.iter().filter(|r| r.verdict == verdict).count();
    let (ok, unbilled, unmapped, drift) = (
        count(Verdict::Ok),
        count(Verdict::Unbilled),
        count(Verdict::Unmapped),
        count(Verdict::Drift),
    );
    println!("{ok} ok, {unbilled} not yet billed, {unmapped} unmapped, {drift} drift");
    if unbilled > 0 {
        println!("not yet billed: slots that have not settled, or outbox rows pending or failed; run `tally sink --once` and look at stripe_submissions");
    }
    if drift > 0 {
        bail!("Stripe disagrees with what tally sent for {drift} customer-meter pair(s) (or has no meter for them)");
    }
    Ok(())
}
