//! `tally`: the command operators run. Each subcommand is one stage or tool; `--help` on any of
//! them says what it needs and what it does.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod aggregate;
mod archive;
mod backfill;
mod cli;
mod config;
mod credits;
mod customers;
mod demo;
mod emit;
mod finance;
mod invoices;
mod kafka;
mod plans;
mod process;
mod rebuild;
mod serve;
mod sink;
mod status;
mod stripe_emulator;
mod subscriptions;
mod telemetry;
mod tokens;

#[derive(Debug, Parser)]
#[command(
    name = "tally",
    version,
    about = "Usage metering: events in through Kafka, exact per-minute usage in Postgres, billed to Stripe exactly once.",
    long_about = "Usage metering: events in through Kafka, exact per-minute usage in Postgres, billed to Stripe exactly once.\n\n\
        Settings come from tally.toml (--config, TALLY_CONFIG, or ./tally.toml), then TALLY_* environment \
        variables named after each key (kafka.brokers -> TALLY_KAFKA_BROKERS), then flags. \
        See tally.example.toml for every key with its default.\n\n\
        Start with `tally demo`: it runs on embedded defaults and needs nothing else."
)]
struct Cli {
    /// Configuration file [default: ./tally.toml when present]
    #[arg(long, global = true, env = "TALLY_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    // --kafka-brokers and --database-url: added by `command_line` to the commands that use
    // Kafka or Postgres (before or after the command's name), and only to them.
    #[command(subcommand)]
    command: Command,
}

/// Commands that use neither Kafka nor Postgres: the connection flags are not theirs.
const WITHOUT_CONNECTIONS: [&str; 2] = ["tokens", "stripe-emulator"];

/// `--kafka-brokers` and `--database-url`.
fn connection_args() -> [clap::Arg; 2] {
    [
        clap::Arg::new("kafka_brokers")
            .long("kafka-brokers")
            .value_name("HOST:PORT,...")
            .help("Kafka bootstrap servers, e.g. localhost:9092 (overrides kafka.brokers)"),
        clap::Arg::new("database_url")
            .long("database-url")
            .value_name("URL")
            .help("Postgres URL (overrides database.url, TALLY_DATABASE_URL and DATABASE_URL)"),
    ]
}

/// The command line: `Cli`, with the connection flags on the top level and on every command
/// that uses Kafka or Postgres, at every level.
fn command_line() -> clap::Command {
    use clap::CommandFactory;
    fn with_connections(command: clap::Command) -> clap::Command {
        let names: Vec<String> = command
            .get_subcommands()
            .map(|c| c.get_name().to_owned())
            .filter(|name| !WITHOUT_CONNECTIONS.contains(&name.as_str()))
            .collect();
        names
            .iter()
            .fold(command.args(connection_args()), |command, name| {
                command.mut_subcommand(name, with_connections)
            })
    }
    with_connections(Cli::command())
}

/// A connection flag's value: the one given last, at the deepest command level.
fn connection_flag(matches: &clap::ArgMatches, id: &str) -> Option<String> {
    let here = matches.try_get_one::<String>(id).ok().flatten().cloned();
    let deeper = matches
        .subcommand()
        .and_then(|(_, sub)| connection_flag(sub, id));
    deeper.or(here)
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole pipeline on embedded parts and reconcile: emitted = windows = Stripe
    ///
    /// Starts librdkafka's mock cluster (a real Kafka-protocol broker inside this process), a
    /// Postgres database of its own (on database.url's server, else 127.0.0.1:5432, else a
    /// throwaway server) and the Stripe emulator; emits sample usage for --customers customers,
    /// with a late wave into slots already billed; runs the aggregator and the sink; and prints
    /// the reconciliation of every customer and meter. --keep-running leaves it all up, with the
    /// HTTP API, and prints how to reach each part.
    Demo(demo::DemoArgs),
    /// Report one usage event to Kafka and wait until the broker (or the spool) has it
    ///
    /// For scripts and smoke tests. Needs kafka.brokers. If Kafka is unreachable the event is
    /// kept in emitter.spool.dir and sent by the next emitter that uses that directory.
    Emit(emit::EmitArgs),
    /// Roll usage events from Kafka into exact one-minute windows in Postgres
    ///
    /// Consumes kafka.topic in consumer group aggregator.group_id and commits one Postgres
    /// transaction per batch: event ids (dedup), windows, daily rollups, rejects and Kafka
    /// offsets together. Runs until SIGTERM/SIGINT (finishing the current batch), or with
    /// --once drains what is there and exits. Needs kafka.brokers, database.url and `[[meters]]`.
    Aggregate(aggregate::AggregateArgs),
    /// Keep every event of the topic as Parquet files in archive.url, exactly once; or verify
    /// the archive against the windows
    ///
    /// Reads kafka.topic in its own consumer group (archive.group_id), accepted and rejected
    /// records alike, and writes them under events/date=…/hour=… by their event's hour. Each
    /// file and the offsets it covers are recorded in Postgres in one transaction, so a crash
    /// never loses or repeats one. Runs until SIGTERM/SIGINT (flushing what it read), or with
    /// --once archives what is there and exits. See docs/archive.md.
    Archive(archive::ArchiveArgs),
    /// Send historical events from files through Kafka, under the live contract, dedup and
    /// late-event rules
    ///
    /// Reads .jsonl (one event a line, as on the topic), .csv (a header naming the event's
    /// fields) or .parquet files, or a directory of them. Each file is sent at most --rate
    /// events a second, with progress on stderr; a run killed midway goes on where it stopped
    /// when started again (`backfill_progress`), and a file sent whole is not sent again.
    /// --dry-run decides every record and counts them by reason without sending anything.
    /// Events older than aggregator.lateness_horizon are archived, not counted. See
    /// docs/archive.md.
    Backfill(backfill::BackfillArgs),
    /// Recompute a meter's windows from the event archive under its definition in tally.toml
    ///
    /// Reads the events the aggregator counted in [--from, --to) from the archive (and from
    /// Kafka what the archive does not have yet), folds them into shadow tables under the
    /// meter's current aggregation, group_by and unique dimension, and swaps them in, in one
    /// transaction, beside the running aggregator. The sink bills what changed as new
    /// revisions where Stripe still takes them (35 days); older changes are listed.
    /// --dry-run prints the differences per customer and day and changes nothing. A new
    /// definition must cover every customer from the lateness horizon through today. See
    /// docs/rebuild.md.
    Rebuild(rebuild::RebuildArgs),
    /// Bill closed five-minute slots to Stripe meter events, exactly once
    ///
    /// Every sink.interval (or once, with --once): accounts for each slot that changed and has
    /// settled, writing what Stripe is owed to the stripe_submissions outbox with a deterministic
    /// identifier, then sends the outbox under Stripe's rate limits, retrying with the same
    /// identifier. Needs database.url, stripe.secret_key (or STRIPE_SECRET_KEY) and customer
    /// mappings (`tally customers map`).
    Sink(sink::SinkArgs),
    /// Map tally customers to Stripe customers, and list those whose usage waits for a mapping
    Customers(customers::CustomersArgs),
    /// Compare tally's windows, what the sink sent, and what Stripe reports; exit 1 on drift
    Reconcile(sink::ReconcileArgs),
    /// List or release the customer+meter pairs the sink set aside (quarantined)
    Quarantine(sink::QuarantineArgs),
    /// Review and resolve outbox submissions parked for an operator (needs_review)
    Submissions(sink::SubmissionsArgs),
    /// Apply `[[plans]]` from tally.toml to Postgres (audited), or list them
    Plans(plans::PlansArgs),
    /// Create, change, cancel and reactivate the subscriptions tally manages (audited), or
    /// list them
    ///
    /// Writes Postgres directly through the same functions as the admin API (/v1/subscriptions),
    /// each change in one transaction with its entitlement_audit row (--actor, --reason); needs
    /// database.url. Period ends (renewals, trial ends, changes and cancellations scheduled for
    /// the period's end, fixed terms) are applied by the scheduler in `tally serve`. A running
    /// `tally serve` is not told of a change made here: it answers a customer's quota checks
    /// from its cache, and the first check at least serve.refresh (250 ms by default) after it
    /// last loaded the customer reloads them in the background, so that check, and those until
    /// the reload lands, still get the old answer; a customer nobody checks is not reloaded
    /// until checked. (A change through the admin API also drops the customer from the cache of
    /// the `tally serve` that took it.)
    Subscriptions(subscriptions::SubscriptionsArgs),
    /// Grant and void prepaid credits (written to the credit ledger), or show a customer's
    /// balance and ledger
    ///
    /// Writes Postgres directly through the same functions as the admin API
    /// (/v1/customers/{id}/credits…), each grant or void in one transaction with its ledger
    /// entry (--actor, --reason); needs database.url. Usage is drawn down from grants by the
    /// burner in `tally aggregate`. A running `tally serve` is not told of a grant or void made
    /// here: its quota checks see the new balance when they next reload the customer (at
    /// least serve.refresh after the last load); a grant through the admin API is seen at once
    /// by the `tally serve` that took it.
    Credits(credits::CreditsArgs),
    /// The Stripe invoices tally keeps: a customer's, newest first, or one with its lines and
    /// links (amounts in the currency's smallest unit)
    Invoices(invoices::InvoicesArgs),
    /// Serve the HTTP API: quota checks, entitlements, usage, invoice preview, event ingest,
    /// Stripe webhooks, /healthz, /readyz, /metrics
    ///
    /// Listens on serve.listen. POST /v1/events needs kafka.brokers (it emits like the
    /// emitter); POST /v1/webhooks/stripe needs STRIPE_WEBHOOK_SECRET. Needs database.url and
    /// `[[serve.tokens]]`. SIGTERM/SIGINT lets requests in flight finish.
    Serve,
    /// Run a local Stripe Billing API for development and tests, with fault switches
    ///
    /// Customers, billing meters, meter events (identifier dedup for 24 h, live/test rate
    /// limits), adjustments (cancel), summaries, v2 meter error reports, prices, subscriptions,
    /// invoices and signed webhooks, in memory. Faults (500s, responses dropped after commit,
    /// 429s, latency) are switched on through flags or POST /_emulator/faults;
    /// GET /_emulator/state shows the totals. Not for production.
    StripeEmulator(stripe_emulator::EmulatorArgs),
    /// Run an in-memory Kafka (librdkafka's mock cluster) for development and tests
    ///
    /// Serves kafka.topic and kafka.dlq_topic on 127.0.0.1:--port until SIGINT/SIGTERM, so that
    /// `tally aggregate`, `tally sink`, `tally serve` and `tally emit` run as separate processes
    /// with nothing else installed. It keeps everything in memory: not for production.
    Kafka(kafka::KafkaArgs),
    /// One screen for an operator: partitions (lag, last commit), the outbox, unmapped
    /// customers, the last hour's rejects, the last reconcile; exit 1 when something needs a person
    Status(status::StatusArgs),
    /// Make API tokens for `tally serve` (stored in tally.toml as hashes)
    Tokens(tokens::TokensArgs),
    /// Let a read-only Postgres role read the finance_* views (grant), or take it back (revoke)
    Finance(finance::FinanceArgs),
    /// Write a month's usage, units billed to Stripe and corrections, per customer and meter,
    /// as CSV or JSON (UTC days or the whole month)
    ///
    /// Reads the finance_statement_daily or finance_statement_monthly view in one consistent
    /// snapshot, so a finance role (`tally finance grant`) can run it. Decimals are exact.
    /// See docs/finance.md for every column.
    Export(finance::ExportArgs),
    /// Apply the database migrations (idempotent)
    Migrate,
    /// Check the configuration and print the effective settings (secrets hidden)
    Config,
}

fn main() -> ExitCode {
    use clap::FromArgMatches;
    let arguments = command_line().get_matches();
    let cli = match Cli::from_arg_matches(&arguments) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    let quiet = matches!(cli.command, Command::Demo(_));
    telemetry::init_logging(if quiet { "warn" } else { "info" });
    let overrides = config::Overrides {
        kafka_brokers: connection_flag(&arguments, "kafka_brokers"),
        database_url: connection_flag(&arguments, "database_url"),
    };
    let config = match config::load(cli.config.as_deref(), overrides) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: configuration: {error:#}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Demo(args) => demo::run(&config, &args),
        Command::Emit(args) => emit::run(&config, &args),
        Command::Aggregate(args) => aggregate::run(&config, &args),
        Command::Archive(args) => archive::run(&config, &args),
        Command::Backfill(args) => backfill::run(&config, &args),
        Command::Rebuild(args) => rebuild::run(&config, &args),
        Command::Sink(args) => sink::run(&config, &args),
        Command::Customers(args) => customers::run(&config, &args),
        Command::Reconcile(args) => sink::reconcile(&config, &args),
        Command::Quarantine(args) => sink::quarantine(&config, &args),
        Command::Submissions(args) => sink::submissions(&config, &args),
        Command::StripeEmulator(args) => stripe_emulator::run(&args),
        Command::Kafka(args) => kafka::run(&config, &args),
        Command::Plans(args) => plans::run(&config, &args),
        Command::Subscriptions(args) => subscriptions::run(&config, &args),
        Command::Credits(args) => credits::run(&config, &args),
        Command::Invoices(args) => invoices::run(&config, &args),
        Command::Serve => serve::run(&config),
        Command::Tokens(args) => tokens::run(&args),
        Command::Finance(args) => finance::run(&config, &args),
        Command::Export(args) => finance::export(&config, &args),
        Command::Status(args) => status::run(&config, &args),
        Command::Migrate => aggregate::migrate(&config),
        Command::Config => print_config(&config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The effective settings as TOML. Showing a configuration hides its secrets by construction:
/// every secret setting (`database.url`, `stripe.secret_key`, `serve.stripe_webhook_secret`,
/// API tokens) is a `Secret`, which serializes as `<redacted>`; `kafka.options` hides the value
/// of every option whose name names a secret; and `database.url` shows its password as `****`.
/// A secret typed into a setting that is not one (a Stripe key in `stripe.api_base`, a tally
/// token in a description) is hidden too, by its look, and named on stderr.
fn print_config(config: &config::TallyConfig) -> anyhow::Result<()> {
    let mut settings = toml::Value::try_from(config)?;
    let mut misplaced = Vec::new();
    hide_secret_looking(&mut settings, "", &mut misplaced);
    print!("{}", toml::to_string(&settings)?);
    for setting in misplaced {
        eprintln!("warning: setting {setting} holds what looks like a secret (hidden above); secrets belong in their own settings or the environment (STRIPE_SECRET_KEY, …), where they are never shown");
    }
    Ok(())
}

/// Replaces every string value that looks like a secret (a Stripe key, a webhook signing
/// secret, a tally API token, a password in a URL) with `<redacted>`, collecting where.
fn hide_secret_looking(value: &mut toml::Value, path: &str, found: &mut Vec<String>) {
    const PREFIXES: [&str; 6] = [
        "sk_live_", "sk_test_", "rk_live_", "rk_test_", "whsec_", "tly_",
    ];
    match value {
        toml::Value::String(text) if text != "<redacted>" => {
            // `user:password@host`, with or without a scheme, in any item of a list.
            let password_in = |item: &str| {
                let item = item.split_once("://").map_or(item, |(_, rest)| rest);
                item.split('/')
                    .next()
                    .and_then(|authority| authority.rsplit_once('@'))
                    .is_some_and(|(userinfo, _)| {
                        userinfo
                            .split_once(':')
                            .is_some_and(|(_, pw)| !pw.is_empty() && pw != "****")
                    })
            };
            let looks_secret = PREFIXES.iter().any(|p| text.contains(p))
                || text.split([',', ' ']).any(password_in);
            if looks_secret {
                *text = "<redacted>".into();
                found.push(path.to_owned());
            }
        }
        toml::Value::Table(table) => {
            for (key, inner) in table.iter_mut() {
                let inner_path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                hide_secret_looking(inner, &inner_path, found);
            }
        }
        toml::Value::Array(items) => {
            for (i, inner) in items.iter_mut().enumerate() {
                hide_secret_looking(inner, &format!("{path}[{i}]"), found);
            }
        }
        _ => {}
    }
}
