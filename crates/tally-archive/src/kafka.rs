//! The archiver's Kafka consumer: its own group, whose assignments start at the offsets
//! `archive_offsets` holds, as the aggregator's start at `kafka_offsets`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, TopicPartitionList};
use tally_core::config::KafkaConfig;

use crate::telemetry;

/// Rebalance handling, called by librdkafka from inside `poll` on the archiver's thread. It
/// never touches Postgres: it assigns the partitions paused and raises a flag; the loop drops
/// its buffer, takes the partitions in Postgres and starts each where its archive ends.
pub(crate) struct ArchiverContext {
    topic: String,
    rebalanced: AtomicBool,
}

impl ArchiverContext {
    pub(crate) fn new(topic: &str) -> Self {
        ArchiverContext {
            topic: topic.to_owned(),
            rebalanced: AtomicBool::new(false),
        }
    }

    /// True once per rebalance since the last call.
    pub(crate) fn take_rebalanced(&self) -> bool {
        self.rebalanced.swap(false, Ordering::AcqRel)
    }
}

impl ClientContext for ArchiverContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        if let Some(topic) = statistics.topics.get(&self.topic) {
            for (&partition, stats) in &topic.partitions {
                if partition >= 0 && stats.consumer_lag >= 0 {
                    telemetry::record_lag(partition, stats.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for ArchiverContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        self.rebalanced.store(true, Ordering::Release);
        if err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS {
            if let Err(e) = consumer.assign(tpl) {
                tracing::error!(error = %e, "assign failed");
            }
            if let Err(e) = consumer.pause(tpl) {
                tracing::warn!(error = %e, "pausing newly assigned partitions failed");
            }
        } else {
            if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS {
                let error = rdkafka::error::RDKafkaErrorCode::from(err);
                tracing::error!(%error, "rebalance error; dropping the assignment");
            }
            if let Err(e) = consumer.unassign() {
                tracing::error!(error = %e, "unassign failed");
            }
        }
    }
}

/// The group consumer. Correctness settings are applied after the user's `kafka.options`.
pub(crate) fn consumer(
    kafka: &KafkaConfig,
    group_id: &str,
    owner: &str,
) -> KafkaResult<BaseConsumer<ArchiverContext>> {
    let mut config = ClientConfig::new();
    // Defaults the user's `kafka.options` may override.
    config.set("session.timeout.ms", "10000");
    config.set("fetch.wait.max.ms", "100");
    for (key, value) in &kafka.options {
        config.set(key, value);
    }
    config
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", group_id)
        .set("client.id", format!("tally-archiver-{owner}"))
        // Offsets live in Postgres (archive_offsets), written with the files they cover.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // A partition never archived starts at the first record Kafka still has.
        .set("auto.offset.reset", "earliest")
        // The rebalance handler assigns explicit offsets, which needs the eager protocol.
        .set("partition.assignment.strategy", "range,roundrobin")
        .set("statistics.interval.ms", "5000");
    config.create_with_context(ArchiverContext::new(&kafka.topic))
}

/// The topic's partitions, once Kafka answers and has the topic.
pub(crate) fn partitions(
    consumer: &BaseConsumer<ArchiverContext>,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<i32>, String> {
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| e.to_string())?;
    let found = metadata.topics().iter().find(|t| t.name() == topic);
    match found {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
            Ok(t.partitions().iter().map(|p| p.id()).collect())
        }
        _ => Err(format!("Kafka has no topic {topic:?} (yet)")),
    }
}
