//! What the emitter answers its callers: where a durable event went, and why an event or the
//! emitter itself was refused.

use std::time::Duration;

use rdkafka::error::KafkaError;
use tally_core::Rejection;

/// Where a durable event is when `emit_durable` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// The broker acknowledged it (acks=all).
    Published,
    /// It is in the spool and fsynced; it will be replayed when the broker is reachable.
    Spooled,
}

/// Why `emit` did not accept an event.
#[derive(Debug, thiserror::Error)]
pub enum EmitError {
    /// The event breaks a rule of the event contract; fix the event, do not retry it.
    #[error("event refused ({}): {}", .0.reason.code(), .0.detail)]
    Invalid(#[from] Rejection),
    /// Queue and spool are full: Kafka has been unreachable, or slower than the event rate,
    /// for longer than the spool can absorb. Retry later, shed load, or raise
    /// `emitter.spool.max_bytes`.
    #[error("emitter overloaded: in-memory queue and disk spool are full; retry later or raise emitter.spool.max_bytes")]
    Overloaded,
    /// The emitter was shut down.
    #[error("the emitter has shut down")]
    Closed,
    /// `emit_durable`: the event could not be made durable, because writing or fsyncing the
    /// spool failed (a full or failing disk). It may still reach Kafka; retry with the same id
    /// (a copy counts once).
    #[error("the event could not be made durable: {0}; retry with the same id")]
    NotDurable(String),
    /// `emit_durable`: neither the broker nor the spool had it within the deadline. It may
    /// still get there; retry with the same id (a copy counts once).
    #[error("the event was not durable within {0:?}; retry with the same id")]
    Timeout(Duration),
}

/// Why the emitter could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid emitter setting: {0}")]
    Config(String),
    #[error("cannot create the Kafka producer: {0}; check kafka.brokers and kafka.options")]
    Kafka(#[from] KafkaError),
    /// (`cause`, not `source`: the message says it once, and a chain would repeat it.)
    #[error("cannot use the spool directory {dir}: {cause}; give each emitting process its own emitter.spool.dir (TALLY_EMITTER_SPOOL_DIR)")]
    Spool { dir: String, cause: std::io::Error },
}

/// `flush` ran out of time.
#[derive(Debug, thiserror::Error)]
#[error("flush timed out: {pending} events are neither acknowledged by Kafka nor in the spool")]
pub struct FlushTimeout {
    pub pending: u64,
}
