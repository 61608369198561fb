//! The Kafka side: a group consumer whose partition assignments start at the offsets stored in
//! Postgres (not Kafka's committed ones), and the DLQ producer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use sqlx::PgPool;
use tally_core::config::KafkaConfig;

use crate::membership::Membership;
use crate::telemetry;

/// Who this consumer is in its group.
#[derive(Debug, Clone)]
pub(crate) struct Group {
    pub(crate) id: String,
    /// Unique per process and run: recorded as the partitions' owner in Postgres.
    pub(crate) owner: String,
    /// Stable across restarts of the same process, with `aggregator.static_membership`;
    /// `None` for a dynamic member (the default), which leaves the group when it stops.
    pub(crate) instance_id: Option<String>,
    pub(crate) session_timeout: Duration,
}

/// Rebalance handling. librdkafka calls [`ConsumerContext::rebalance`] from inside `poll`, on
/// the aggregator's own thread, so a rebalance never races a batch: the loop sees it as a flag
/// after `poll` returns and throws away the batch it was building (all of it belonged to the
/// revoked assignment, because the protocol is eager).
///
/// The callback never touches Postgres: it assigns the partitions paused and records them.
/// The loop then takes them in Postgres (fencing their previous owner) and starts each at the
/// offset stored there. So a Postgres outage during a rebalance leaves the partitions paused,
/// not the consumer stuck in the callback, and the consumer stays in its group.
pub(crate) struct AggregatorContext {
    pub(crate) topic: String,
    /// The partitions of the latest assignment, shared with the watchdog (it outlives this
    /// consumer when the member joins again with a fresh one).
    membership: Arc<Membership>,
    rebalanced: AtomicBool,
}

impl AggregatorContext {
    pub(crate) fn new(topic: &str, membership: Arc<Membership>) -> Self {
        membership.set_assigned(Vec::new());
        AggregatorContext {
            topic: topic.to_owned(),
            membership,
            rebalanced: AtomicBool::new(false),
        }
    }

    /// True once per rebalance since the last call.
    pub(crate) fn take_rebalanced(&self) -> bool {
        self.rebalanced.swap(false, Ordering::AcqRel)
    }

    /// The partitions Kafka assigned this consumer last.
    pub(crate) fn assigned(&self) -> Vec<i32> {
        self.membership.assigned()
    }

    fn assign(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let partitions: Vec<i32> = tpl
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        tracing::info!(
            partitions = %list(&partitions),
            "partitions assigned; taking them in Postgres before consuming"
        );
        self.membership.set_assigned(partitions);
        if let Err(e) = consumer.assign(tpl) {
            tracing::error!(error = %e, "assign failed");
        }
        if let Err(e) = consumer.pause(tpl) {
            tracing::warn!(error = %e, "pausing newly assigned partitions failed");
        }
    }
}

/// Partitions as a log field: `0,1,2`.
pub(crate) fn list(partitions: &[i32]) -> String {
    let names: Vec<String> = partitions.iter().map(i32::to_string).collect();
    names.join(",")
}

impl ClientContext for AggregatorContext {
    /// librdkafka's statistics (every `statistics.interval.ms`) carry each partition's lag and
    /// whether any broker is connected.
    fn stats(&self, statistics: rdkafka::Statistics) {
        if let Some(topic) = statistics.topics.get(&self.topic) {
            for (&partition, stats) in &topic.partitions {
                if partition >= 0 && stats.consumer_lag >= 0 {
                    telemetry::record_lag(partition, stats.consumer_lag);
                }
            }
        }
        let kafka = tally_runtime::dependency("kafka");
        let connected = statistics
            .brokers
            .values()
            .any(|b| b.nodeid >= 0 && b.state == "UP");
        if connected {
            kafka.up();
        } else {
            kafka.down(&"no broker connected");
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown) {
            tally_runtime::dependency("kafka").down(&reason);
        } else {
            tracing::debug!(%error, reason, "librdkafka error");
        }
    }
}

impl ConsumerContext for AggregatorContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        self.rebalanced.store(true, Ordering::Release);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.assign(consumer, tpl),
            other => {
                if other != RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS {
                    let error = rdkafka::error::RDKafkaErrorCode::from(other);
                    tracing::error!(%error, "rebalance error; dropping the assignment");
                }
                self.membership.set_assigned(Vec::new());
                if let Err(e) = consumer.unassign() {
                    tracing::error!(error = %e, "unassign failed");
                }
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        // Kafka's committed offsets are for lag tooling only; Postgres holds the truth.
        if let Err(e) = result {
            tracing::debug!(error = %e, "offset commit to Kafka failed (informational only)");
        }
    }
}

/// The group consumer. Correctness settings are applied after the user's `kafka.options`.
pub(crate) fn consumer(
    kafka: &KafkaConfig,
    group: &Group,
    context: AggregatorContext,
) -> KafkaResult<BaseConsumer<AggregatorContext>> {
    let mut config = ClientConfig::new();
    // A default the user's `kafka.options` may override; the settings after them may not be.
    config.set(
        "session.timeout.ms",
        group.session_timeout.as_millis().to_string(),
    );
    // How long a broker may hold a fetch that found nothing new. Apache Kafka answers as soon
    // as data arrives, but not every broker does (librdkafka's mock cluster holds it for the
    // whole wait: at the default 500 ms that alone was 455 ms of the median event's latency at
    // 1k events/s). 50 ms costs an idle broker 20 small requests a second per connection.
    config.set("fetch.wait.max.ms", "50");
    for (key, value) in &kafka.options {
        config.set(key, value);
    }
    config
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", &group.id)
        .set("client.id", format!("tally-aggregator-{}", group.owner))
        // Offsets live in Postgres; Kafka gets an informational commit after each batch.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // A partition this group never consumed starts at its first event, not its last.
        .set("auto.offset.reset", "earliest")
        // The rebalance handler assigns explicit offsets, which needs the eager protocol.
        .set("partition.assignment.strategy", "range,roundrobin")
        .set("statistics.interval.ms", "5000");
    // Static membership (KIP-345): a restarted process with the same instance id gets its
    // partitions back at once instead of after the old session times out.
    if let Some(instance_id) = &group.instance_id {
        config.set("group.instance.id", instance_id);
    }
    config.create_with_context(context)
}

/// The end offset (high watermark) of every partition of `kafka.topic`, for `tally status`'s
/// lag. Errors are redacted (librdkafka may quote an option's value).
pub fn end_offsets(
    kafka: &KafkaConfig,
    timeout: Duration,
) -> Result<std::collections::BTreeMap<i32, i64>, String> {
    let client = Watermarks::new(kafka, "tally-status")?;
    Ok(client
        .read(timeout)?
        .into_iter()
        .map(|(partition, (_, high))| (partition, high))
        .collect())
}

/// A client outside the group that reads where each partition of the topic begins and ends.
pub(crate) struct Watermarks {
    consumer: BaseConsumer,
    kafka: KafkaConfig,
}

impl Watermarks {
    pub(crate) fn new(kafka: &KafkaConfig, client_id: &str) -> Result<Watermarks, String> {
        let mut config = ClientConfig::new();
        for (key, value) in &kafka.options {
            config.set(key, value);
        }
        let consumer: BaseConsumer = config
            .set("bootstrap.servers", &kafka.brokers)
            .set("client.id", client_id)
            .create()
            .map_err(|e| kafka.options.redact(&e.to_string()))?;
        Ok(Watermarks {
            consumer,
            kafka: kafka.clone(),
        })
    }

    /// Each partition's (first, end) offsets: two requests per leader whatever the number of
    /// partitions, each bounded by `timeout`. Blocks: call it off the runtime's workers.
    pub(crate) fn read(
        &self,
        timeout: Duration,
    ) -> Result<std::collections::BTreeMap<i32, (i64, i64)>, String> {
        let redact = |e: rdkafka::error::KafkaError| self.kafka.options.redact(&e.to_string());
        let topic = &self.kafka.topic;
        let metadata = self
            .consumer
            .fetch_metadata(Some(topic), timeout)
            .map_err(redact)?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        // ListOffsets with the special times "earliest" and "latest", for all at once.
        let ask = |at: Offset| -> Result<TopicPartitionList, String> {
            let mut list = TopicPartitionList::new();
            for &partition in &partitions {
                list.add_partition_offset(topic, partition, at)
                    .map_err(redact)?;
            }
            self.consumer
                .offsets_for_times(list, timeout)
                .map_err(redact)
        };
        let (first, end) = (ask(Offset::Beginning)?, ask(Offset::End)?);
        let mut offsets = std::collections::BTreeMap::new();
        for element in end.elements_for_topic(topic) {
            let Offset::Offset(high) = element.offset() else {
                return Err(format!(
                    "no end offset for partition {} of {topic}",
                    element.partition()
                ));
            };
            let low = first
                .find_partition(topic, element.partition())
                .and_then(|e| match e.offset() {
                    Offset::Offset(low) => Some(low),
                    _ => None,
                })
                .unwrap_or(0);
            offsets.insert(element.partition(), (low, high));
        }
        Ok(offsets)
    }
}

/// The DLQ producer: idempotent, acks from all replicas.
pub(crate) fn dlq_producer(kafka: &KafkaConfig) -> KafkaResult<FutureProducer> {
    let mut config = ClientConfig::new();
    for (key, value) in &kafka.options {
        config.set(key, value);
    }
    config
        .set("bootstrap.servers", &kafka.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "30000");
    config.create()
}

/// The largest payload a DLQ copy carries; a larger raw event (HTTP ingest takes up to 1 MiB)
/// is cut to this, with header `tally-truncated` giving its length. The full bytes stay in
/// `rejected_events`.
const DLQ_MAX_PAYLOAD: usize = 512 * 1024;

/// Copies rejected events to the DLQ topic: pending rows are locked, sent, acknowledged, then
/// marked, so each reaches the topic at least once however the process dies. A row the broker
/// does not take stays pending for the next call, without holding back the others. Returns
/// how many were published; an error when none of a batch could be.
pub(crate) async fn publish_dlq(
    pool: &PgPool,
    producer: &FutureProducer,
    dlq_topic: &str,
) -> Result<u64, String> {
    let mut published = 0;
    loop {
        let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
        let pending = tally_db::rejects::lock_pending_dlq(&mut tx, 5_000)
            .await
            .map_err(|e| e.to_string())?;
        if pending.is_empty() {
            return Ok(published);
        }
        let mut deliveries = Vec::with_capacity(pending.len());
        let mut refused = None;
        for row in &pending {
            let length = row.raw.len().to_string();
            let truncated = row.raw.len() > DLQ_MAX_PAYLOAD;
            let mut headers = OwnedHeaders::new()
                .insert(Header {
                    key: "tally-reason",
                    value: Some(row.reason.as_str()),
                })
                .insert(Header {
                    key: "tally-detail",
                    value: Some(row.detail.as_str()),
                })
                .insert(Header {
                    key: "tally-source",
                    value: Some(row.source.as_str()),
                });
            if truncated {
                headers = headers.insert(Header {
                    key: "tally-truncated",
                    value: Some(length.as_str()),
                });
            }
            let payload = &row.raw[..row.raw.len().min(DLQ_MAX_PAYLOAD)];
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(dlq_topic)
                .payload(payload)
                .headers(headers);
            if let Some(key) = &row.kafka_key {
                record = record.key(key.as_slice());
            }
            match producer.send_result(record) {
                Ok(delivery) => deliveries.push((row.rejection_id, delivery)),
                Err((e, _)) => {
                    refused.get_or_insert(e.to_string());
                }
            }
        }
        let mut ids: Vec<i64> = Vec::with_capacity(deliveries.len());
        for (rejection_id, delivery) in deliveries {
            match delivery.await {
                Ok(Ok(_)) => ids.push(rejection_id),
                Ok(Err((e, _))) => {
                    refused.get_or_insert(e.to_string());
                }
                Err(_) => {
                    refused.get_or_insert("DLQ producer closed".into());
                }
            }
        }
        tally_db::rejects::mark_dlq_published(&mut tx, &ids)
            .await
            .map_err(|e| e.to_string())?;
        tx.commit().await.map_err(|e| e.to_string())?;
        published += ids.len() as u64;
        if let Some(error) = refused {
            // The rest waits for the next call (the broker away, or a row it refuses).
            return if ids.is_empty() {
                Err(error)
            } else {
                tracing::warn!(%error, "some rejected events could not be copied to the DLQ topic yet");
                Ok(published)
            };
        }
    }
}
