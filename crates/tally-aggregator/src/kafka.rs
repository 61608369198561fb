//! The Kafka side: a group consumer whose partition assignments start at the offsets stored in
//! Postgres (not Kafka's committed ones), and the DLQ producer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
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

use crate::store::{self, Epochs, StoreError};
use crate::telemetry;

/// How long a rebalance may wait for Postgres before giving the assignment up.
const TAKE_PARTITIONS_TIMEOUT: Duration = Duration::from_secs(30);

/// Rebalance handling. librdkafka calls [`ConsumerContext::rebalance`] from inside `poll`, on
/// the aggregator's own thread, so a rebalance never races a batch: the loop sees it as a flag
/// after `poll` returns and throws away the batch it was building (all of it belonged to the
/// revoked assignment, because the protocol is eager).
pub(crate) struct AggregatorContext {
    pub(crate) pool: PgPool,
    pub(crate) runtime: tokio::runtime::Handle,
    pub(crate) group: String,
    pub(crate) topic: String,
    pub(crate) owner: String,
    /// Partitions owned now, with the epoch each was taken at (see `kafka_offsets`).
    pub(crate) epochs: Mutex<Epochs>,
    /// Where each newly assigned partition starts (`None`: from the beginning).
    pub(crate) starts: Mutex<HashMap<i32, Option<i64>>>,
    pub(crate) rebalanced: AtomicBool,
    pub(crate) failure: Mutex<Option<StoreError>>,
}

impl AggregatorContext {
    /// True once per rebalance since the last call.
    pub(crate) fn take_rebalanced(&self) -> bool {
        self.rebalanced.swap(false, Ordering::AcqRel)
    }

    pub(crate) fn take_failure(&self) -> Option<StoreError> {
        lock(&self.failure).take()
    }

    pub(crate) fn epochs(&self) -> Epochs {
        lock(&self.epochs).clone()
    }

    pub(crate) fn disown(&self, partition: i32) {
        lock(&self.epochs).remove(&partition);
    }

    fn assign(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let partitions: Vec<i32> = tpl
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        let taken = self.runtime.block_on(async {
            let deadline = tokio::time::Instant::now() + TAKE_PARTITIONS_TIMEOUT;
            let mut backoff = Duration::from_millis(100);
            loop {
                let attempt = store::take_partitions(
                    &self.pool,
                    &self.group,
                    &self.topic,
                    &partitions,
                    &self.owner,
                )
                .await;
                match attempt {
                    Err(StoreError::Retryable(e)) if tokio::time::Instant::now() < deadline => {
                        tracing::warn!(error = %e, "cannot read stored offsets yet; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                    other => return other,
                }
            }
        });
        let mut assignment = TopicPartitionList::new();
        let mut epochs = lock(&self.epochs);
        let mut starts = lock(&self.starts);
        epochs.clear();
        starts.clear();
        match taken {
            Ok(rows) => {
                for (partition, next, epoch) in rows {
                    let offset = next.map_or(Offset::Beginning, Offset::Offset);
                    if let Err(e) = assignment.add_partition_offset(&self.topic, partition, offset)
                    {
                        tracing::error!(partition, error = %e, "cannot set a start offset");
                        continue;
                    }
                    epochs.insert(partition, epoch);
                    starts.insert(partition, next);
                }
                tracing::info!(partitions = ?partitions, "partitions assigned; resuming at the offsets stored in Postgres");
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot take the assigned partitions; consuming nothing");
                *lock(&self.failure) = Some(e);
            }
        }
        if let Err(e) = consumer.assign(&assignment) {
            tracing::error!(error = %e, "assign failed");
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ClientContext for AggregatorContext {
    /// librdkafka's statistics (every `statistics.interval.ms`) carry each partition's lag.
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
                    tracing::error!(error = ?other, "rebalance error; dropping the assignment");
                }
                lock(&self.epochs).clear();
                lock(&self.starts).clear();
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
    context: AggregatorContext,
) -> KafkaResult<BaseConsumer<AggregatorContext>> {
    let mut config = ClientConfig::new();
    for (key, value) in &kafka.options {
        config.set(key, value);
    }
    config
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", &context.group)
        .set("client.id", format!("tally-aggregator-{}", context.owner))
        // Offsets live in Postgres; Kafka gets an informational commit after each batch.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // A partition this group never consumed starts at its first event, not its last.
        .set("auto.offset.reset", "earliest")
        // The rebalance handler assigns explicit offsets, which needs the eager protocol.
        .set("partition.assignment.strategy", "range,roundrobin")
        .set("statistics.interval.ms", "5000");
    config.create_with_context(context)
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

/// Copies rejected events to the DLQ topic: pending rows are locked, sent, acknowledged, then
/// marked, so each reaches the topic at least once however the process dies. Returns how many
/// were published; a failure leaves them pending for the next call.
pub(crate) async fn publish_dlq(
    pool: &PgPool,
    producer: &FutureProducer,
    dlq_topic: &str,
) -> Result<u64, String> {
    let mut published = 0;
    loop {
        let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
        let pending = store::lock_pending_dlq(&mut tx, 5_000)
            .await
            .map_err(|e| e.to_string())?;
        if pending.is_empty() {
            return Ok(published);
        }
        let mut deliveries = Vec::with_capacity(pending.len());
        for row in &pending {
            let headers = OwnedHeaders::new()
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
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(dlq_topic)
                .payload(row.raw.as_slice())
                .headers(headers);
            if let Some(key) = &row.kafka_key {
                record = record.key(key.as_slice());
            }
            deliveries.push(
                producer
                    .send_result(record)
                    .map_err(|(e, _)| e.to_string())?,
            );
        }
        for delivery in deliveries {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(e.to_string()),
                Err(_) => return Err("DLQ producer closed".into()),
            }
        }
        let ids: Vec<i64> = pending.iter().map(|row| row.rejection_id).collect();
        store::mark_dlq_published(&mut tx, &ids)
            .await
            .map_err(|e| e.to_string())?;
        tx.commit().await.map_err(|e| e.to_string())?;
        published += ids.len() as u64;
    }
}
