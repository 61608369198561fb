//! `tally demo`: the whole pipeline on embedded defaults.
//!
//! Emitters report usage for a few hundred customers into an in-process Kafka (librdkafka's
//! mock cluster, real protocol); the aggregator rolls it into one-minute windows in Postgres;
//! the sink bills closed slots to an in-process Stripe emulator every second; some events
//! arrive late, into slots already billed, and are billed as new revisions. The demo ends with
//! the reconciliation: emitted = windows = Stripe, for every customer and meter.

mod keep_running;
mod postgres;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, TimeDelta, Utc};
use rdkafka::mocking::MockCluster;
use rust_decimal::Decimal;
use stripe_emulator::{Emulator, EmulatorConfig};
use tally_aggregator::{Aggregator, AggregatorError, RunMode, RunSummary};
use tally_core::config::{KafkaConfig, Secret};
use tally_core::window::slot_start;
use tally_core::{Aggregation, MeterDefinition, UsageEvent};
use tally_emitter::{EmitError, Emitter};
use tally_sink::{
    ReconcileRow, Sink, SinkConfig, SinkError, SinkSummary, StripeConfig, StripeHttp, Verdict,
};
use tokio_util::sync::CancellationToken;

use crate::config::TallyConfig;
use crate::process::runtime;

/// The meters the demo uses when tally.toml defines none.
pub(crate) const DEMO_METERS: &str = r#"
[[meters]]
name = "api_calls"
aggregation = "sum"

[[meters]]
name = "tokens"
aggregation = "sum"
group_by = ["model"]

[[meters]]
name = "storage_gb"
aggregation = "max"
"#;

/// The configured meters, or the demo's own when the file defines none.
fn meters_or_demo(config: &TallyConfig) -> Vec<MeterDefinition> {
    if config.meters.is_empty() {
        tally_core::meter::meters_from_toml(DEMO_METERS).unwrap_or_default()
    } else {
        config.meters.clone()
    }
}

const PARTITIONS: i32 = 6;
const DEMO_KEY: &str = "sk_test_tally_demo";
/// Events are dated over this many minutes before the demo starts, so their slots have closed
/// and the sink bills them while the demo runs.
const SPREAD_MINUTES: i64 = 40;

#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Events to emit
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Distinct customers the events are spread over
    #[arg(long, default_value_t = 300)]
    customers: usize,
    /// Keep the demo's database (tally_demo_…) to explore it afterwards
    #[arg(long)]
    keep_database: bool,
    /// Print the reconciliation row of every customer and meter
    #[arg(long)]
    all_rows: bool,
    /// After the verdict, leave the stack up (broker, database, Stripe emulator, aggregator,
    /// sink, and the HTTP API with an admin token) and print how to reach each part; Ctrl-C
    /// stops it
    #[arg(long)]
    keep_running: bool,
}

pub(crate) fn run(config: &TallyConfig, args: &DemoArgs) -> anyhow::Result<()> {
    if args.events == 0 || args.customers == 0 {
        bail!("--events and --customers must be at least 1");
    }
    let meters = meters_or_demo(config);
    let runtime = runtime()?;
    println!(
        "tally demo: {} events from {} customers on {} meters, through Kafka, Postgres and Stripe (all embedded)",
        args.events,
        args.customers,
        meters.len()
    );

    // Postgres, Kafka, Stripe.
    let database = runtime.block_on(postgres::DemoDatabase::open(config.database.url.expose()))?;
    println!(
        "  postgres: database {} on {}",
        database.name,
        tally_db::describe_url(&database.server_url)
    );
    let cluster = MockCluster::new(3).context("starting the embedded Kafka cluster")?;
    cluster
        .create_topic(&config.kafka.topic, PARTITIONS, 3)
        .context("creating the usage topic")?;
    cluster
        .create_topic(&config.kafka.dlq_topic, 1, 3)
        .context("creating the DLQ topic")?;
    let kafka = KafkaConfig {
        brokers: cluster.bootstrap_servers(),
        ..config.kafka.clone()
    };
    println!(
        "  kafka: librdkafka mock cluster, 3 brokers, topic {:?} with {PARTITIONS} partitions",
        kafka.topic
    );
    let emulator = runtime.block_on(Emulator::start(
        "127.0.0.1:0".parse().expect("valid address"),
        EmulatorConfig {
            test_rate_per_second: 1000,
            ..EmulatorConfig::default()
        },
    ))?;
    let stripe = StripeConfig {
        api_base: emulator.url(),
        secret_key: Secret::new(DEMO_KEY),
        max_requests_per_second: 900,
        ..StripeConfig::default()
    };
    println!("  stripe: emulator at {}", emulator.url());

    let pool = database.pool.clone();
    let customers: Vec<String> = (0..args.customers).map(|i| format!("cus-{i:04}")).collect();
    runtime.block_on(prepare_billing(&pool, &stripe, &meters, &customers))?;
    println!(
        "  created {} Stripe customers and the Stripe meters, mapped every customer",
        customers.len()
    );

    // The aggregator and the sink, until `stop`.
    let stop = CancellationToken::new();
    let daemons = Daemons::start(
        config,
        &kafka,
        &meters,
        &pool,
        &stripe,
        runtime.handle(),
        &stop,
    )?;

    // Emit: most events first, then a late wave into slots the sink has already billed.
    let spool = tempfile::tempdir().context("creating a spool directory")?;
    let mut emitter_config = config.emitter.clone();
    emitter_config.spool.dir = spool.path().to_owned();
    let emitter = Emitter::start(&kafka, &emitter_config)?;
    let started = Instant::now();
    let now = Utc::now();
    let mut emitted = Emitted::default();
    let on_time = args.events * 4 / 5;
    let progress = Progress::new(&pool, &emulator, args.events as u64);
    for i in 0..args.events {
        if i == on_time {
            emitter
                .flush(Duration::from_secs(120))
                .context("waiting for Kafka")?;
            // Let the sink bill what is there, so the rest arrives late.
            runtime.block_on(progress.wait_until_billed(
                i as u64,
                &stop,
                Duration::from_secs(120),
            ))?;
            println!(
                "  late wave: {} more events dated into slots already billed",
                args.events - on_time
            );
        }
        let meter = &meters[i % meters.len()];
        let event = sample_event(i, meter, &customers, now);
        emitted.add(&event, meter.aggregation);
        loop {
            match emitter.emit(event.clone()) {
                Ok(()) => break,
                // Kafka slower than this loop and the spool full: back off, as a service would.
                Err(EmitError::Overloaded) => std::thread::sleep(Duration::from_millis(5)),
                Err(other) => return Err(other.into()),
            }
        }
        if i % 2000 == 0 {
            runtime.block_on(progress.print(i as u64));
        }
    }
    emitter
        .flush(Duration::from_secs(120))
        .context("waiting for Kafka to acknowledge the demo events")?;
    runtime.block_on(progress.wait_until_billed(
        args.events as u64,
        &stop,
        Duration::from_secs(300),
    ))?;
    let elapsed = started.elapsed();
    stop.cancel();
    emitter.shutdown(Duration::from_secs(5));
    let sink_summary = runtime.block_on(daemons.join())?;
    let (counted, ..) = runtime.block_on(progress.state())?;
    println!(
        "  done in {:.1}s: {counted} events counted; {} slots billed in {} submissions ({} retried)",
        elapsed.as_secs_f64(),
        sink_summary.accounted.slots,
        sink_summary.sent,
        sink_summary.retried
    );

    // Reconcile: emitted vs windows vs outbox vs Stripe, per customer and meter.
    let from = slot_start(now - TimeDelta::minutes(SPREAD_MINUTES + 5));
    let to = slot_start(now) + TimeDelta::minutes(5);
    let client = StripeHttp::new(&stripe).map_err(anyhow::Error::msg)?;
    let rows = runtime.block_on(tally_sink::reconcile(&pool, &client, 900, from, to))?;
    let agrees = print_reconciliation(&rows, &emitted, &meters, args.all_rows);
    if agrees {
        println!("\nemitted = windows = Stripe, for every customer and meter, to the unit.");
    }
    let database_url = tally_db::with_database(&database.server_url, &database.name);
    if args.keep_running {
        let stack = keep_running::Stack {
            config,
            kafka: &kafka,
            meters: &meters,
            pool: &pool,
            database_url: &database_url,
            stripe: &stripe,
            from,
            to,
            customer: &customers[0],
        };
        keep_running::serve_until_stopped(&runtime, &stack)?;
    }
    runtime.block_on(async {
        emulator.shutdown().await;
        database.close(args.keep_database).await
    })?;
    if args.keep_database {
        println!(
            "\nthe demo's database is kept: {} (a throwaway server is gone with the demo)",
            tally_db::describe_url(&database_url)
        );
    }
    if !agrees {
        bail!("emitted, windows and Stripe disagree (see the rows marked above)");
    }
    Ok(())
}

/// The demo's aggregator (its loop blocks: a thread of its own) and sink (a task), billing
/// every second with no settle delay so that the demo's closed slots are billed at once.
struct Daemons {
    aggregator: std::thread::JoinHandle<Result<RunSummary, AggregatorError>>,
    sink: tokio::task::JoinHandle<Result<SinkSummary, SinkError>>,
}

impl Daemons {
    fn start(
        config: &TallyConfig,
        kafka: &KafkaConfig,
        meters: &[MeterDefinition],
        pool: &sqlx::PgPool,
        stripe: &StripeConfig,
        runtime: &tokio::runtime::Handle,
        stop: &CancellationToken,
    ) -> anyhow::Result<Daemons> {
        let mut aggregator_config = config.aggregator.clone();
        aggregator_config.group_id = "tally-demo".into();
        let aggregator = Aggregator::new(
            aggregator_config,
            kafka.clone(),
            meters.to_vec(),
            pool.clone(),
            runtime.clone(),
        )?;
        let sink = Sink::new(
            SinkConfig {
                interval: Duration::from_secs(1),
                settle_delay: Duration::ZERO,
                ..config.sink.clone()
            },
            stripe,
            pool.clone(),
        )?;
        let aggregator = {
            let stop = stop.clone();
            std::thread::spawn(move || aggregator.run(RunMode::Daemon, &stop))
        };
        let sink = {
            let stop = stop.clone();
            runtime.spawn(async move { sink.run(RunMode::Daemon, &stop).await })
        };
        Ok(Daemons { aggregator, sink })
    }

    /// Waits for both to stop (cancel their `stop` first); the sink's summary.
    async fn join(self) -> anyhow::Result<SinkSummary> {
        let aggregator = self.aggregator;
        tokio::task::spawn_blocking(move || aggregator.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the aggregator thread panicked"))??;
        Ok(self.sink.await??)
    }
}

/// Stripe customers for the demo's customers, the mapping, and the Stripe meters.
async fn prepare_billing(
    pool: &sqlx::PgPool,
    stripe: &StripeConfig,
    meters: &[MeterDefinition],
    customers: &[String],
) -> anyhow::Result<()> {
    tally_db::meters::record(pool, meters).await?;
    let client = StripeHttp::new(stripe).map_err(anyhow::Error::msg)?;
    let mut mappings = Vec::with_capacity(customers.len());
    for customer in customers {
        let stripe_id = client
            .create_customer(customer)
            .await
            .with_context(|| format!("creating the Stripe customer for {customer}"))?;
        mappings.push((customer.clone(), stripe_id));
    }
    tally_sink::store::map_customers(pool, &mappings).await?;
    tally_sink::create_stripe_meters(pool, &client).await?;
    Ok(())
}

fn sample_event(
    i: usize,
    meter: &MeterDefinition,
    customers: &[String],
    now: DateTime<Utc>,
) -> UsageEvent {
    // Deterministic spread over customers and over the last SPREAD_MINUTES (ending 6 minutes
    // ago, so every slot has closed); a quarter of the quantities have a fraction.
    let customer = &customers[(i / 3 * 7919) % customers.len()];
    let quantity = Decimal::new(
        (i % 40 + 1) as i64 * 25,
        if i.is_multiple_of(4) { 2 } else { 0 },
    );
    let seconds_ago = 360 + (i * 104_729) as i64 % ((SPREAD_MINUTES - 6) * 60);
    let mut event =
        UsageEvent::new(customer.as_str(), &meter.name, quantity).with_source("tally-demo");
    event.timestamp = now - TimeDelta::seconds(seconds_ago);
    for key in &meter.group_by {
        event = event.with_dimension(key, ["small", "large"][i % 2]);
    }
    if let Some(key) = &meter.unique_dimension {
        event = event.with_dimension(key, format!("user-{}", i % 37));
    }
    event
}

/// For max/latest meters: (the latest slot with usage, its value, the latest event time in it).
type LastSlot = (DateTime<Utc>, Decimal, DateTime<Utc>);

/// What the demo emitted, per customer and meter, computed independently of tally: the exact
/// sum for sum/count meters; for max/latest meters, the value of the last slot with usage.
#[derive(Default)]
struct Emitted {
    sums: BTreeMap<(String, String), Decimal>,
    last_slot: BTreeMap<(String, String), LastSlot>,
}

impl Emitted {
    fn add(&mut self, event: &UsageEvent, aggregation: Aggregation) {
        let key = (event.customer.clone(), event.meter.clone());
        match aggregation {
            Aggregation::Sum => *self.sums.entry(key).or_default() += event.quantity,
            Aggregation::Count => *self.sums.entry(key).or_default() += Decimal::ONE,
            Aggregation::Max | Aggregation::Latest => {
                let slot = slot_start(event.timestamp);
                let entry =
                    self.last_slot
                        .entry(key)
                        .or_insert((slot, event.quantity, event.timestamp));
                if slot > entry.0 {
                    *entry = (slot, event.quantity, event.timestamp);
                } else if slot == entry.0 {
                    let newer = event.timestamp >= entry.2;
                    if aggregation == Aggregation::Max && event.quantity > entry.1
                        || aggregation == Aggregation::Latest && newer
                    {
                        entry.1 = event.quantity;
                    }
                    entry.2 = entry.2.max(event.timestamp);
                }
            }
            Aggregation::UniqueCount => {}
        }
    }

    /// The exact usage emitted: the sum, or the last slot's value.
    fn exact(&self, customer: &str, meter: &str) -> Option<Decimal> {
        let key = (customer.to_owned(), meter.to_owned());
        self.sums
            .get(&key)
            .copied()
            .or_else(|| self.last_slot.get(&key).map(|(_, value, _)| *value))
    }

    /// What Stripe should hold: whole units (the fraction is carried forward), or the last
    /// slot's value rounded up.
    fn expected(&self, customer: &str, meter: &str) -> Option<Decimal> {
        let key = (customer.to_owned(), meter.to_owned());
        self.sums
            .get(&key)
            .map(|sum| sum.floor())
            .or_else(|| self.last_slot.get(&key).map(|(_, value, _)| value.ceil()))
    }
}

fn print_reconciliation(
    rows: &[ReconcileRow],
    emitted: &Emitted,
    meters: &[MeterDefinition],
    all_rows: bool,
) -> bool {
    println!();
    println!(
        "{:<12} {:<12} {:>14} {:>14} {:>12} {:>12}  check",
        "customer", "meter", "emitted", "windows", "sent", "stripe"
    );
    let mut per_meter: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut agrees = true;
    let mut shown = 0;
    for row in rows {
        let exact = emitted.exact(&row.customer, &row.meter);
        let expected = emitted.expected(&row.customer, &row.meter);
        let windows_match = match row.kind {
            tally_sink::owed::BillingKind::Delta => exact == Some(row.windows),
            tally_sink::owed::BillingKind::Last => expected == Some(row.windows),
        };
        let ok = row.verdict == Verdict::Ok && windows_match && expected == row.stripe;
        agrees &= ok;
        let counts = per_meter
            .entry(
                meters
                    .iter()
                    .find(|m| m.name == row.meter)
                    .map_or("?", |m| m.name.as_str()),
            )
            .or_default();
        counts.0 += 1;
        counts.1 += usize::from(ok);
        if all_rows || !ok || shown < 8 {
            shown += 1;
            println!(
                "{:<12} {:<12} {:>14} {:>14} {:>12} {:>12}  {}",
                row.customer,
                row.meter,
                exact.map_or("-".into(), |e| e.normalize().to_string()),
                row.windows.normalize().to_string(),
                row.sent.normalize().to_string(),
                row.stripe.map_or("-".into(), |s| s.normalize().to_string()),
                if ok { "ok" } else { row.verdict.as_str() }
            );
        }
    }
    if !all_rows && rows.len() > shown {
        println!(
            "… {} more rows (--all-rows prints them all)",
            rows.len() - shown
        );
    }
    println!();
    for (meter, (pairs, ok)) in per_meter {
        println!("{meter:<12} {ok} of {pairs} customers: emitted = windows = Stripe");
    }
    println!("(sum meters: Stripe holds whole units, the fraction is carried forward; max meters: the last slot's value, rounded up)");
    agrees && !rows.is_empty()
}

/// Progress lines while the pipeline runs, and the wait for it to finish.
struct Progress<'a> {
    pool: &'a sqlx::PgPool,
    emulator: &'a Emulator,
    total: u64,
}

impl<'a> Progress<'a> {
    fn new(pool: &'a sqlx::PgPool, emulator: &'a Emulator, total: u64) -> Self {
        Progress {
            pool,
            emulator,
            total,
        }
    }

    /// (events counted, slots to bill, submissions pending, submissions sent), read from the
    /// database the demo made for itself: each counted event holds one dedup claim.
    async fn state(&self) -> anyhow::Result<(i64, i64, i64, i64)> {
        Ok(sqlx::query_as(
            "SELECT (SELECT count(*) FROM event_ids),
                    (SELECT count(*) FROM usage_slot_changes),
                    (SELECT count(*) FROM stripe_submissions WHERE status = 'pending'),
                    (SELECT count(*) FROM stripe_submissions WHERE status = 'sent')",
        )
        .fetch_one(self.pool)
        .await?)
    }

    async fn print(&self, emitted: u64) {
        let (counted, changed, pending, sent) = self.state().await.unwrap_or_default();
        println!(
            "  emitted {emitted:>7}/{} | aggregated {counted:>7} | slots to bill {changed:>5} | outbox: {sent:>6} sent, {pending:>5} pending | stripe events {:>6}",
            self.total,
            self.emulator.stats().meter_events_created
        );
    }

    /// Waits until `emitted` events are counted and every changed slot is billed and sent.
    async fn wait_until_billed(
        &self,
        emitted: u64,
        stop: &CancellationToken,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            self.print(emitted).await;
            let (counted, changed, pending, _) = self.state().await?;
            if counted as u64 >= emitted && changed == 0 && pending == 0 {
                return Ok(());
            }
            if Instant::now() > deadline || stop.is_cancelled() {
                bail!("the pipeline did not finish within {limit:?}");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_meters_parse() {
        let meters = meters_or_demo(&TallyConfig::default());
        assert!(tally_core::Meters::new(&meters).is_ok());
        assert!(meters.len() >= 3);
    }
}
