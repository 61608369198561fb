//! The Kafka producer and its delivery callback.

use chrono::{DateTime, Utc};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crossbeam_channel::Sender;
use metrics::Histogram;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use tally_core::config::KafkaConfig;

use crate::config::EmitterConfig;
use crate::error::Durability;
use crate::state::{DurableReply, EmitterState, SegmentProgress};
use crate::telemetry::Stats;

pub(crate) type Producer = ThreadedProducer<DeliveryContext>;

/// Travels with each message through librdkafka and comes back in the delivery callback.
pub(crate) struct Delivery {
    pub(crate) source: Source,
    pub(crate) emitted_at: DateTime<Utc>,
    pub(crate) durable: Option<DurableReply>,
}

pub(crate) enum Source {
    /// Straight from the in-memory queue; counted in `EmitterState::pending` until resolved.
    Direct,
    /// Replayed from a spool segment.
    Replay(Arc<SegmentProgress>),
}

/// An event the broker does not have (delivery failed, or routed to the spool); the publisher
/// writes it to the spool.
pub(crate) struct Unsent {
    pub(crate) key: Vec<u8>,
    pub(crate) payload: Vec<u8>,
    pub(crate) delivery: Box<Delivery>,
}

pub(crate) struct DeliveryContext {
    shared: Arc<EmitterState>,
    failed: Sender<Unsent>,
    latency: Histogram,
}

impl ClientContext for DeliveryContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            // New events go to the spool at once instead of piling up in librdkafka's memory.
            self.shared.healthy.store(false, Ordering::Release);
            tracing::warn!(%reason, "all Kafka brokers are down; spooling events to disk");
        } else {
            tracing::warn!(%error, %reason, "Kafka client error");
        }
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Box<Delivery>;

    fn delivery(&self, result: &DeliveryResult<'_>, delivery: Box<Delivery>) {
        match result {
            Ok(_) => {
                self.shared.healthy.store(true, Ordering::Release);
                match &delivery.source {
                    Source::Direct => {
                        let latency = Utc::now() - delivery.emitted_at;
                        self.latency.record(latency.as_seconds_f64().max(0.0));
                        Stats::add(&self.shared.stats.published, 1);
                        self.shared.resolve_one();
                    }
                    Source::Replay(progress) => {
                        Stats::add(&self.shared.stats.replayed, 1);
                        progress.outstanding.fetch_sub(1, Ordering::AcqRel);
                    }
                }
                if let Some(durable) = delivery.durable {
                    let _ = durable.send(Ok(Durability::Published));
                }
            }
            Err((error, message)) => {
                self.shared.healthy.store(false, Ordering::Release);
                Stats::add(&self.shared.stats.delivery_failures, 1);
                tracing::debug!(%error, "delivery failed; the event goes back to the spool");
                let failed = Unsent {
                    key: message.key().unwrap_or_default().to_vec(),
                    payload: message.payload().unwrap_or_default().to_vec(),
                    delivery,
                };
                // Bounded by the messages in flight; blocks (never drops) if the publisher lags.
                if self.failed.send(failed).is_err() {
                    tracing::error!(
                        "a failed delivery arrived after the emitter stopped; that event was not spooled"
                    );
                }
            }
        }
    }
}

pub(crate) fn producer(
    kafka: &KafkaConfig,
    config: &EmitterConfig,
    shared: Arc<EmitterState>,
    failed: Sender<Unsent>,
) -> Result<Producer, KafkaError> {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &kafka.brokers)
        // Idempotence implies acks=all and ordered, de-duplicated retries within a session.
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", &config.compression)
        .set("linger.ms", config.linger.as_millis().to_string())
        .set(
            "message.timeout.ms",
            config.delivery_timeout.as_millis().to_string(),
        )
        .set(
            "queue.buffering.max.messages",
            config.producer_queue_messages.to_string(),
        )
        .set("batch.num.messages", "10000")
        // Same key → same partition as the Java client, so any producer of a customer agrees.
        .set("partitioner", "murmur2_random");
    for (key, value) in &kafka.options {
        client.set(key, value);
    }
    let context = DeliveryContext {
        shared,
        failed,
        latency: crate::telemetry::publish_latency(),
    };
    client
        .create_with_context(context)
        .map_err(|error| redact(error, kafka))
}

/// `error` without the value of a secret option: librdkafka's refusal of an option (an
/// unsupported or invalid value) quotes the value, which may be a password.
fn redact(error: KafkaError, kafka: &KafkaConfig) -> KafkaError {
    let options = &kafka.options;
    match error {
        KafkaError::ClientConfig(code, description, name, value) => KafkaError::ClientConfig(
            code,
            options.redact(&description),
            name,
            options.redact(&value),
        ),
        KafkaError::ClientCreation(message) => KafkaError::ClientCreation(options.redact(&message)),
        other => other,
    }
}
