//! `tally demo`: the whole path so far on embedded defaults. Emits sample usage through the
//! emitter into an in-process Kafka (librdkafka's mock cluster, real protocol), reads every
//! message back and checks that what arrived is exactly what was emitted.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use rust_decimal::Decimal;
use tally_core::config::KafkaConfig;
use tally_core::{wire, MeterDefinition, UsageEvent};
use tally_emitter::{EmitError, Emitter};

use crate::config::TallyConfig;

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

const PARTITIONS: i32 = 6;

#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Events to emit
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Distinct customers the events are spread over
    #[arg(long, default_value_t = 300)]
    customers: usize,
}

#[derive(Debug, Default, Clone, PartialEq)]
struct Totals {
    events: u64,
    quantity: Decimal,
}

pub(crate) fn run(config: &TallyConfig, args: &DemoArgs) -> anyhow::Result<()> {
    if args.events == 0 || args.customers == 0 {
        bail!("--events and --customers must be at least 1");
    }
    let meters = config.meters_or_demo();
    println!(
        "tally demo: embedded Kafka (librdkafka mock cluster, 3 brokers), topic {:?}, {} customers, {} meters, {} events",
        config.kafka.topic,
        args.customers,
        meters.len(),
        args.events
    );
    let cluster = MockCluster::new(3).context("starting the embedded Kafka cluster")?;
    cluster
        .create_topic(&config.kafka.topic, PARTITIONS, 3)
        .context("creating the usage topic")?;
    let kafka = KafkaConfig {
        brokers: cluster.bootstrap_servers(),
        ..config.kafka.clone()
    };
    let spool = tempfile::tempdir().context("creating a spool directory")?;
    let mut emitter_config = config.emitter.clone();
    emitter_config.spool.dir = spool.path().to_owned();
    let emitter = Emitter::start(&kafka, &emitter_config)?;

    let started = Instant::now();
    let mut emitted: BTreeMap<String, Totals> = BTreeMap::new();
    for i in 0..args.events {
        let meter = &meters[i % meters.len()];
        let event = sample_event(i, meter, args.customers);
        let totals = emitted.entry(meter.name.clone()).or_default();
        totals.events += 1;
        totals.quantity += event.quantity;
        loop {
            match emitter.emit(event.clone()) {
                Ok(()) => break,
                // Kafka slower than this loop and the spool full: back off, as a service would.
                Err(EmitError::Overloaded) => std::thread::sleep(Duration::from_millis(5)),
                Err(other) => return Err(other.into()),
            }
        }
        if (i + 1) % (args.events / 4).max(1) == 0 {
            println!("  emitted {:>8} events", i + 1);
        }
    }
    emitter
        .flush(Duration::from_secs(120))
        .context("waiting for Kafka to acknowledge the demo events")?;
    let emit_seconds = started.elapsed().as_secs_f64();
    println!(
        "  all {} events acknowledged by Kafka in {emit_seconds:.2}s ({:.0} events/s)",
        args.events,
        args.events as f64 / emit_seconds
    );

    let consumed = consume(&kafka, args.events)?;
    println!();
    println!(
        "{:<14} {:>10} {:>16} {:>10} {:>16}  check",
        "meter", "emitted", "quantity", "in kafka", "quantity"
    );
    let mut all_match = true;
    for (meter, sent) in &emitted {
        let got = consumed.get(meter).cloned().unwrap_or_default();
        let ok = *sent == got;
        all_match &= ok;
        println!(
            "{:<14} {:>10} {:>16} {:>10} {:>16}  {}",
            meter,
            sent.events,
            sent.quantity,
            got.events,
            got.quantity,
            if ok { "ok" } else { "MISMATCH" }
        );
    }
    let stats = emitter.stats();
    println!(
        "\nemitter: {} emitted, {} published, {} spooled, {} replayed, {} rejected",
        stats.emitted, stats.published, stats.spooled, stats.replayed, stats.rejected
    );
    emitter.shutdown(Duration::from_secs(5));
    if !all_match {
        bail!("what arrived in Kafka differs from what was emitted");
    }
    println!("emitted = in Kafka, for every meter, to the unit.");
    Ok(())
}

fn sample_event(i: usize, meter: &MeterDefinition, customers: usize) -> UsageEvent {
    // Deterministic spread over customers; a quarter of the quantities have a fraction.
    let customer = format!("cus-{:04}", (i * 7919) % customers);
    let quantity = Decimal::new(
        (i % 40 + 1) as i64 * 25,
        if i.is_multiple_of(4) { 2 } else { 0 },
    );
    let mut event = UsageEvent::new(customer, &meter.name, quantity).with_source("tally-demo");
    for key in &meter.group_by {
        event = event.with_dimension(key, ["small", "large"][i % 2]);
    }
    if let Some(key) = &meter.unique_dimension {
        event = event.with_dimension(key, format!("user-{}", i % 37));
    }
    event
}

/// Reads the topic from the beginning until `expected` distinct events arrived.
fn consume(kafka: &KafkaConfig, expected: usize) -> anyhow::Result<BTreeMap<String, Totals>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", "tally-demo-reader")
        .set("enable.auto.commit", "false")
        .create()
        .context("creating the demo consumer")?;
    let mut assignment = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        assignment.add_partition_offset(&kafka.topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let mut totals: BTreeMap<String, Totals> = BTreeMap::new();
    let mut ids = HashSet::with_capacity(expected);
    let deadline = Instant::now() + Duration::from_secs(120);
    while ids.len() < expected {
        if Instant::now() > deadline {
            bail!(
                "only {} of {expected} events arrived within 120s",
                ids.len()
            );
        }
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message.context("reading the usage topic")?;
        let event = wire::decode(message.payload().unwrap_or_default(), chrono::Utc::now())
            .context("an event in the topic does not decode")?;
        // The same id twice is a redelivery; count it once, as the aggregator will.
        if ids.insert(event.id.clone()) {
            let t = totals.entry(event.meter).or_default();
            t.events += 1;
            t.quantity += event.quantity;
        }
    }
    Ok(totals)
}
