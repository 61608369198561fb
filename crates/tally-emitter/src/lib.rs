//! tally-emitter: how application services report usage.
//!
//! ```no_run
//! # use tally_emitter::{Emitter, EmitterConfig};
//! # use tally_core::{config::KafkaConfig, UsageEvent};
//! # use rust_decimal::Decimal;
//! let kafka = KafkaConfig { brokers: "localhost:9092".into(), ..KafkaConfig::default() };
//! let emitter = Emitter::start(&kafka, &EmitterConfig::default())?;
//! emitter.emit(UsageEvent::new("acme", "api_calls", Decimal::ONE))?;
//! emitter.shutdown(std::time::Duration::from_secs(5));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Durability boundary
//! - [`Emitter::emit`] validates, queues in memory and returns (no I/O on the caller's thread
//!   unless the queue is full, when it appends to the spool's buffer instead).
//! - An event still in the in-memory queue or in the producer's buffer **dies with the
//!   process**: that is the price of never blocking.
//! - An event is safe once the broker has acknowledged it (`acks=all`, idempotent producer) or
//!   once it is in the spool and fsynced (every `emitter.spool.fsync_interval`, 100 ms by
//!   default); spooled events survive a crash and are replayed by the next emitter that opens
//!   the same spool directory.
//! - [`Emitter::emit_durable`] returns only after one of those, for callers who prefer to wait.
//! - Redelivery after a crash or a lost acknowledgement can produce a duplicate with the
//!   **same id**; the aggregator counts each id once.
//! - Ordering is kept within the spool and within a partition; events that went through the
//!   spool may arrive after newer ones. Windows are keyed by event time, so counts do not depend
//!   on arrival order.

mod config;
mod emitter;
mod error;
mod kafka;
mod publisher;
mod spool;
mod state;
mod telemetry;

pub use config::{EmitterConfig, OverflowPolicy, SpoolConfig};
pub use emitter::Emitter;
pub use error::{Durability, EmitError, FlushTimeout, StartError};
pub use telemetry::EmitterStats;
