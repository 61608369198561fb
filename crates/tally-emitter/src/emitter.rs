//! The application-facing handle: `emit`, `emit_durable`, `flush`, `shutdown`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use crossbeam_queue::ArrayQueue;
use tally_core::config::KafkaConfig;
use tally_core::{wire, UsageEvent};
use tokio::sync::oneshot;

use crate::config::{EmitterConfig, OverflowPolicy};
use crate::error::{Durability, EmitError, FlushTimeout, StartError};
use crate::publisher::Publisher;
use crate::spool::{AppendError, Spool};
use crate::state::{DurableReply, EmitterState, Queued};
use crate::telemetry::{EmitterStats, Stats};

/// Reports usage to Kafka without ever blocking the caller.
///
/// Cheap to share: wrap it in an `Arc` and call [`Emitter::emit`] from any thread.
pub struct Emitter {
    shared: Arc<EmitterState>,
    overflow: OverflowPolicy,
    closed: AtomicBool,
    publisher: Mutex<Option<JoinHandle<()>>>,
}

impl Emitter {
    /// Opens the spool (replaying whatever a previous process left in it) and starts the
    /// publisher thread. Needs `kafka.brokers`; does not wait for the broker to answer.
    pub fn start(kafka: &KafkaConfig, config: &EmitterConfig) -> Result<Emitter, StartError> {
        config.validate().map_err(StartError::Config)?;
        if kafka.brokers.trim().is_empty() {
            return Err(StartError::Config(
                "kafka.brokers is not set; set TALLY_KAFKA_BROKERS, --kafka-brokers or [kafka] brokers in tally.toml".into(),
            ));
        }
        let spool = Spool::open(
            &config.spool.dir,
            config.spool.max_bytes,
            config.spool.segment_bytes,
        )
        .map_err(|cause| StartError::Spool {
            dir: config.spool.dir.display().to_string(),
            cause,
        })?;
        let shared = Arc::new(EmitterState {
            stats: Stats::default(),
            healthy: AtomicBool::new(true),
            queue: ArrayQueue::new(config.queue_capacity),
            spool,
            stopping: AtomicBool::new(false),
        });
        let publisher = Publisher::new(kafka, config, Arc::clone(&shared))?;
        let handle = std::thread::Builder::new()
            .name("tally-emitter".into())
            .spawn(move || publisher.run())
            .map_err(|cause| StartError::Spool {
                dir: config.spool.dir.display().to_string(),
                cause,
            })?;
        Ok(Emitter {
            shared,
            overflow: config.overflow,
            closed: AtomicBool::new(false),
            publisher: Mutex::new(Some(handle)),
        })
    }

    /// Validates the event, assigns a UUIDv7 id if it has none, and queues it. Never blocks on
    /// the network; when the queue is full the event is written to the spool instead.
    ///
    /// Durability: a queued event lives in memory until the broker acknowledges it or it is
    /// spooled and fsynced, so a process crash can lose the last moments of events. Use
    /// [`Emitter::emit_durable`] where that is not acceptable.
    pub fn emit(&self, event: UsageEvent) -> Result<(), EmitError> {
        self.submit(event, None)
    }

    /// Like [`Emitter::emit`], but resolves only once the broker has acknowledged the event or
    /// it is fsynced in the spool, or with [`EmitError::Timeout`] after `deadline`, or with
    /// [`EmitError::NotDurable`] when the spool cannot take it. Only `Ok` means durable.
    pub async fn emit_durable(
        &self,
        event: UsageEvent,
        deadline: Duration,
    ) -> Result<Durability, EmitError> {
        let (tx, rx) = oneshot::channel();
        self.submit(event, Some(tx))?;
        match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(EmitError::Closed),
            Err(_) => Err(EmitError::Timeout(deadline)),
        }
    }

    fn submit(
        &self,
        mut event: UsageEvent,
        durable: Option<DurableReply>,
    ) -> Result<(), EmitError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(EmitError::Closed);
        }
        let now = Utc::now();
        if event.id.is_empty() {
            event.id = new_event_id(now);
        }
        if let Err(rejection) = event.validate(now) {
            self.shared.stats.reject(rejection.reason);
            return Err(EmitError::Invalid(rejection));
        }
        // Counted before the push, so the publisher can never resolve more than was emitted.
        Stats::add(&self.shared.stats.emitted, 1);
        let queued = Queued {
            event,
            emitted_at: now,
            durable,
        };
        match self.shared.queue.push(queued) {
            Ok(()) => Ok(()),
            Err(queued) => self.spill(queued),
        }
    }

    /// The queue is full: write the event to the spool on the caller's thread (a buffered
    /// file append, no network).
    fn spill(&self, queued: Queued) -> Result<(), EmitError> {
        let stats = &self.shared.stats;
        let payload = wire::encode(&queued.event);
        let appended = self
            .shared
            .spool
            .append(queued.event.customer.as_bytes(), &payload);
        match appended {
            Ok(()) => {
                Stats::add(&stats.spooled, 1);
                self.shared.resolve_one();
                if let Some(durable) = queued.durable {
                    let answer = match self.shared.spool.sync() {
                        Ok(()) => Ok(Durability::Spooled),
                        Err(error) => {
                            Stats::add(&stats.spool_errors, 1);
                            tracing::error!(%error, "spool fsync failed; the event is not known to be durable");
                            Err(EmitError::NotDurable(format!(
                                "spool fsync failed: {error}"
                            )))
                        }
                    };
                    let _ = durable.send(answer);
                }
                Ok(())
            }
            Err(error) => {
                stats.emitted.fetch_sub(1, Ordering::AcqRel);
                if let AppendError::Io(io) = &error {
                    Stats::add(&stats.spool_errors, 1);
                    tracing::error!(error = %io, "cannot write the spool (is the disk full?); event not accepted");
                } else {
                    tracing::warn!(%error, "event not accepted: queue and spool are full");
                }
                if self.overflow == OverflowPolicy::DropNewest && queued.durable.is_none() {
                    Stats::add(&stats.dropped, 1);
                    Ok(())
                } else {
                    Stats::add(&stats.overloaded, 1);
                    Err(EmitError::Overloaded)
                }
            }
        }
    }

    /// Waits until every event accepted so far is acknowledged by the broker or fsynced in the
    /// spool. Blocks the calling thread (call it from `spawn_blocking` in async code).
    pub fn flush(&self, timeout: Duration) -> Result<(), FlushTimeout> {
        let deadline = Instant::now() + timeout;
        loop {
            let pending = self.shared.pending();
            if pending == 0 {
                if let Err(error) = self.shared.spool.sync() {
                    tracing::error!(%error, "spool fsync failed during flush");
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(FlushTimeout { pending });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Stops accepting events, flushes for up to `grace`, then spools whatever the broker has
    /// not acknowledged and stops the publisher. Spooled events are replayed by the next
    /// emitter that opens the same spool directory.
    pub fn shutdown(&self, grace: Duration) {
        self.closed.store(true, Ordering::Release);
        let handle = self
            .publisher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(handle) = handle else { return };
        if let Err(timeout) = self.flush(grace) {
            tracing::warn!(
                pending = timeout.pending,
                "shutdown grace ran out; spooling the rest"
            );
        }
        self.shared.stopping.store(true, Ordering::Release);
        if handle.join().is_err() {
            tracing::error!("the emitter's publisher thread panicked; unsent events may be lost");
        }
    }

    /// Counts since start.
    pub fn stats(&self) -> EmitterStats {
        self.shared.stats.snapshot()
    }

    /// Events in the in-memory queue.
    pub fn queue_depth(&self) -> usize {
        self.shared.queue.len()
    }

    /// Bytes waiting in the spool for replay.
    pub fn spool_bytes(&self) -> u64 {
        self.shared.spool.bytes()
    }
}

/// A UUIDv7 from the clock reading `emit` already made, with thread-local randomness: no lock
/// and no syscall, unlike `Uuid::now_v7()`. Uniqueness rests on its 74 random bits.
fn new_event_id(now: DateTime<Utc>) -> String {
    let timestamp = uuid::Timestamp::from_unix(
        uuid::NoContext,
        now.timestamp() as u64,
        now.timestamp_subsec_nanos(),
    );
    let mut buf = uuid::Uuid::encode_buffer();
    uuid::Uuid::new_v7(timestamp)
        .hyphenated()
        .encode_lower(&mut buf)
        .to_owned()
}

impl Drop for Emitter {
    fn drop(&mut self) {
        self.shutdown(Duration::from_secs(5));
    }
}
