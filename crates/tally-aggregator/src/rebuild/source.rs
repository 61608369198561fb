//! Where a rebuild's events come from: the events the aggregator counted, up to where it
//! stands. The archive's files hold most of them; what the archive does not have yet (it
//! flushes every few minutes) is read from Kafka. Each is decided as the aggregator decided
//! it: a record it refused (its position is in `rejected_events`) is left out, and each event
//! id counts once.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashSet};
use std::hash::BuildHasher;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgConnection;
use tally_archive::ArchivedRecord;
use tally_core::config::KafkaConfig;
use tally_core::UsageEvent;

/// Which events a rebuild recounts: one meter's (one customer's), in `[from, to)`.
#[derive(Debug, Clone)]
pub(crate) struct Filter {
    pub(crate) meter: String,
    pub(crate) customer: Option<String>,
    pub(crate) from: DateTime<Utc>,
    pub(crate) to: DateTime<Utc>,
}

impl Filter {
    pub(crate) fn wants(&self, event: &UsageEvent) -> bool {
        event.meter == self.meter
            && self.customer.as_ref().is_none_or(|c| *c == event.customer)
            && event.timestamp >= self.from
            && event.timestamp < self.to
    }
}

/// Per partition, the next offset: where the aggregator (`kafka_offsets`) or the archive
/// (`archive_offsets`) stands.
pub(crate) type Positions = BTreeMap<i32, i64>;

pub(crate) async fn aggregated(
    conn: &mut PgConnection,
    group: &str,
    topic: &str,
) -> Result<Positions, sqlx::Error> {
    let rows: Vec<(i32, Option<i64>)> = sqlx::query_as(
        "SELECT partition, next_offset FROM kafka_offsets WHERE consumer_group = $1 AND topic = $2",
    )
    .bind(group)
    .bind(topic)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(|(p, o)| (p, o.unwrap_or(0))).collect())
}

pub(crate) async fn archived(
    conn: &mut PgConnection,
    topic: &str,
) -> Result<Positions, sqlx::Error> {
    sqlx::query_as("SELECT partition, next_offset FROM archive_offsets WHERE topic = $1")
        .bind(topic)
        .fetch_all(&mut *conn)
        .await
        .map(|rows: Vec<(i32, i64)>| rows.into_iter().collect())
}

/// The offset ranges `[start, end)` of each partition lying between two positions.
pub(crate) fn between(from: &Positions, to: &Positions) -> BTreeMap<i32, (i64, i64)> {
    to.iter()
        .filter_map(|(&partition, &end)| {
            let start = from.get(&partition).copied().unwrap_or(0);
            (start < end).then_some((partition, (start, end)))
        })
        .collect()
}

/// The event ids already counted into the shadow, hashed with a key of this run's own (ids
/// chosen to collide cannot hide an event; an accidental 64-bit collision would, and the
/// swap's count check then refuses the rebuild). Eight bytes and change per event.
#[derive(Default)]
pub(crate) struct Seen {
    keyed: RandomState,
    ids: HashSet<u64>,
}

impl Seen {
    /// Whether the event is new (and now seen).
    pub(crate) fn first(&mut self, event: &UsageEvent) -> bool {
        self.ids.insert(self.keyed.hash_one(&event.id))
    }
}

/// The aggregator's refusals among `ranges`, by position.
pub(crate) async fn refused_in(
    conn: &mut PgConnection,
    topic: &str,
    ranges: &BTreeMap<i32, (i64, i64)>,
) -> Result<HashSet<(i32, i64)>, sqlx::Error> {
    let mut refused = HashSet::new();
    for (&partition, &(start, end)) in ranges {
        let rows: Vec<i64> = sqlx::query_scalar(
            "SELECT \"offset\" FROM rejected_events
             WHERE received_via = 'kafka' AND topic = $1 AND partition = $2
               AND \"offset\" >= $3 AND \"offset\" < $4",
        )
        .bind(topic)
        .bind(partition)
        .bind(start)
        .bind(end)
        .fetch_all(&mut *conn)
        .await?;
        refused.extend(rows.into_iter().map(|offset| (partition, offset)));
    }
    Ok(refused)
}

/// How long Kafka may go without delivering a wanted record before the read gives up.
const KAFKA_SILENCE: Duration = Duration::from_secs(60);

/// Reads the records of `ranges` from Kafka, outside any consumer group, and hands each to
/// `each` (which answers whether to go on). Blocking: run it off the runtime's workers. Fails when Kafka no longer holds the
/// start of a range (its retention passed: those records are in neither the archive nor
/// Kafka) or delivers nothing for a minute. Errors are redacted (librdkafka may quote an
/// option's value).
pub(crate) fn read_kafka(
    kafka: &KafkaConfig,
    ranges: &BTreeMap<i32, (i64, i64)>,
    mut each: impl FnMut(ArchivedRecord) -> bool,
) -> Result<u64, String> {
    if ranges.is_empty() {
        return Ok(0);
    }
    let redact = |e: rdkafka::error::KafkaError| kafka.options.redact(&e.to_string());
    let mut config = ClientConfig::new();
    for (key, value) in &kafka.options {
        config.set(key, value);
    }
    let consumer: BaseConsumer = config
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", "tally-rebuild")
        .set("client.id", "tally-rebuild")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // A range Kafka no longer holds is an error, never a silent jump.
        .set("auto.offset.reset", "error")
        .create()
        .map_err(redact)?;
    let mut assignment = TopicPartitionList::new();
    for (&partition, &(start, _)) in ranges {
        let (low, _) = consumer
            .fetch_watermarks(&kafka.topic, partition, Duration::from_secs(30))
            .map_err(redact)?;
        if low > start {
            return Err(format!(
                "Kafka no longer holds offsets {start}..{low} of partition {partition}, and the archive does not have them either (run `tally archive` so that it keeps up with the aggregator)"
            ));
        }
        assignment
            .add_partition_offset(&kafka.topic, partition, Offset::Offset(start))
            .map_err(redact)?;
    }
    consumer.assign(&assignment).map_err(redact)?;
    let mut left: BTreeMap<i32, i64> = ranges.iter().map(|(&p, &(_, end))| (p, end)).collect();
    let mut read = 0;
    let mut last = Instant::now();
    while !left.is_empty() {
        if last.elapsed() > KAFKA_SILENCE {
            return Err(format!(
                "Kafka delivered nothing for {}s while partitions {:?} still had records to read",
                KAFKA_SILENCE.as_secs(),
                left.keys().collect::<Vec<_>>()
            ));
        }
        let Some(polled) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = polled.map_err(redact)?;
        let partition = message.partition();
        let Some(&end) = left.get(&partition) else {
            continue;
        };
        if message.offset() >= end {
            continue;
        }
        last = Instant::now();
        if message.offset() + 1 >= end {
            left.remove(&partition);
        }
        // A record without a payload was refused by the aggregator; nothing to count.
        let Some(payload) = message.payload() else {
            continue;
        };
        let received_at = message
            .timestamp()
            .to_millis()
            .and_then(DateTime::from_timestamp_millis)
            .unwrap_or_else(Utc::now);
        read += 1;
        let go_on = each(ArchivedRecord::decode(
            payload,
            partition,
            message.offset(),
            received_at,
        ));
        if !go_on {
            return Err("stopped: the rebuild no longer reads".into());
        }
        // Silence is Kafka's: the time `each` took (the rebuild upserting a chunk) is not.
        last = Instant::now();
    }
    Ok(read)
}
