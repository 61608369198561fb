//! `[emitter]` settings. Defaults live here and only here.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What `emit` does when the in-memory queue and the spool are both full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverflowPolicy {
    /// Return [`crate::EmitError::Overloaded`]: the caller decides (the default).
    Error,
    /// Accept and drop the event, counting it in `tally_emitter_events_dropped_total`.
    DropNewest,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmitterConfig {
    /// Events the in-memory queue between `emit()` and the publisher holds.
    pub queue_capacity: usize,
    /// What `emit` does when the queue and the spool are both full: "error" or "drop_newest".
    pub overflow: OverflowPolicy,
    /// How long the producer keeps trying to deliver a message before it is spooled instead.
    #[serde(with = "tally_core::duration")]
    pub delivery_timeout: Duration,
    /// How long the producer waits to fill a batch (librdkafka `linger.ms`).
    #[serde(with = "tally_core::duration")]
    pub linger: Duration,
    /// Compression codec: none, gzip, snappy or lz4.
    pub compression: String,
    /// Messages the producer buffers before new events go to the spool.
    pub producer_queue_messages: u32,
    /// Spooled records replayed to Kafka at once (a single probe while the broker is down).
    pub replay_window: usize,
    pub spool: SpoolConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Directory of the spool; one per emitter process.
    pub dir: PathBuf,
    /// Most bytes the spool may hold; beyond it `emit` reports `Overloaded`.
    pub max_bytes: u64,
    /// Size at which a segment file is sealed and a new one started.
    pub segment_bytes: u64,
    /// How often buffered spool writes are fsynced (the crash-safety horizon).
    #[serde(with = "tally_core::duration")]
    pub fsync_interval: Duration,
}

impl Default for EmitterConfig {
    fn default() -> Self {
        EmitterConfig {
            queue_capacity: 65_536,
            overflow: OverflowPolicy::Error,
            delivery_timeout: Duration::from_secs(30),
            linger: Duration::from_millis(5),
            compression: "lz4".into(),
            producer_queue_messages: 100_000,
            replay_window: 10_000,
            spool: SpoolConfig::default(),
        }
    }
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            dir: PathBuf::from("tally-spool"),
            max_bytes: 1 << 30,
            segment_bytes: 16 << 20,
            fsync_interval: Duration::from_millis(100),
        }
    }
}

impl EmitterConfig {
    /// Checks the settings; the error names the key and the fix.
    pub fn validate(&self) -> Result<(), String> {
        if self.queue_capacity == 0 {
            return Err("emitter.queue_capacity must be at least 1".into());
        }
        if !["none", "gzip", "snappy", "lz4"].contains(&self.compression.as_str()) {
            return Err(format!(
                "emitter.compression = {:?}: use none, gzip, snappy or lz4",
                self.compression
            ));
        }
        if self.delivery_timeout < Duration::from_millis(100) {
            return Err("emitter.delivery_timeout must be at least 100ms".into());
        }
        if self.replay_window == 0 || self.producer_queue_messages == 0 {
            return Err(
                "emitter.replay_window and emitter.producer_queue_messages must be at least 1"
                    .into(),
            );
        }
        if self.spool.segment_bytes == 0 || self.spool.max_bytes < self.spool.segment_bytes {
            return Err(
                "emitter.spool.max_bytes must be at least emitter.spool.segment_bytes (> 0)".into(),
            );
        }
        if self.spool.fsync_interval.is_zero() {
            return Err("emitter.spool.fsync_interval must be positive, e.g. \"100ms\"".into());
        }
        Ok(())
    }
}
