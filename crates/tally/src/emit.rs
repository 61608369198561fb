//! `tally emit`: one event from the command line.

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use tally_core::config::KafkaConfig;
use tally_core::wire::parse_quantity;
use tally_core::{Meters, UsageEvent};
use tally_emitter::{Durability, Emitter, EmitterConfig, SpoolConfig};

use crate::config::TallyConfig;

#[derive(Debug, clap::Args)]
pub(crate) struct EmitArgs {
    /// Customer the usage belongs to
    #[arg(long)]
    customer: String,
    /// Meter name, e.g. api_calls
    #[arg(long)]
    meter: String,
    /// Exact decimal quantity, e.g. 3 or 0.25
    #[arg(long)]
    quantity: String,
    /// Event id, for idempotent re-sends [default: a new UUIDv7]
    #[arg(long)]
    id: Option<String>,
    /// When the usage happened, RFC 3339 [default: now]
    #[arg(long, value_name = "RFC3339")]
    timestamp: Option<String>,
    /// A dimension, repeatable: --dimension model=large
    #[arg(long = "dimension", value_name = "KEY=VALUE")]
    dimensions: Vec<String>,
}

pub(crate) fn run(config: &TallyConfig, args: &EmitArgs) -> anyhow::Result<()> {
    let meters = Meters::new(&config.meters).map_err(anyhow::Error::msg)?;
    if !meters.is_empty() && meters.get(&args.meter).is_none() {
        let defined: Vec<&str> = config.meters.iter().map(|m| m.name.as_str()).collect();
        bail!(
            "meter {:?} is not defined in [[meters]] (defined: {}); the aggregator would reject it as unknown_meter. Use a defined meter, or add it to tally.toml",
            args.meter,
            defined.join(", ")
        );
    }
    let quantity = parse_quantity(&args.quantity).context("--quantity")?;
    let mut event = UsageEvent::new(&args.customer, &args.meter, quantity);
    if let Some(id) = &args.id {
        event = event.with_id(id);
    }
    if let Some(ts) = &args.timestamp {
        let ts = DateTime::parse_from_rfc3339(ts).with_context(|| {
            format!("--timestamp {ts:?} is not RFC 3339; use e.g. 2026-01-31T12:00:00Z")
        })?;
        event = event.at(ts.with_timezone(&Utc));
    }
    let mut dimensions = BTreeMap::new();
    for pair in &args.dimensions {
        let Some((key, value)) = pair.split_once('=') else {
            bail!("--dimension {pair:?} must be KEY=VALUE");
        };
        dimensions.insert(key.to_owned(), value.to_owned());
    }
    event.dimensions = dimensions;

    let kafka = KafkaConfig {
        brokers: config.require_brokers()?.to_owned(),
        ..config.kafka.clone()
    };
    let emitter_config = emitter_config(config);
    let emitter = Emitter::start(&kafka, &emitter_config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    // Kafka gets `delivery_timeout`; the spool (with its fsync) is quick after that.
    let deadline = config.emitter.delivery_timeout + std::time::Duration::from_secs(30);
    let durability = runtime.block_on(emitter.emit_durable(event, deadline))?;
    emitter.shutdown(std::time::Duration::from_secs(5));
    match durability {
        Durability::Published => println!("published to {}", kafka.topic),
        Durability::Spooled => println!(
            "spooled to {}: Kafka did not acknowledge in time; the next emitter using that directory sends it",
            emitter_config.spool.dir.display()
        ),
    }
    Ok(())
}

/// `tally emit`'s spool directory when `emitter.spool.dir` is left at its default: the default
/// is `tally serve`'s, and a directory serves one emitter at a time.
const EMIT_SPOOL_DIR: &str = "tally-emit-spool";

/// The emitter settings, with `tally emit`'s own spool directory unless one is set.
fn emitter_config(config: &TallyConfig) -> EmitterConfig {
    let mut emitter = config.emitter.clone();
    if emitter.spool.dir == SpoolConfig::default().dir {
        emitter.spool.dir = EMIT_SPOOL_DIR.into();
    }
    emitter
}
