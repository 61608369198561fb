//! The publisher thread: the one place that decides where an event goes.
//!
//! ```text
//! queue ──► healthy and spool empty? ──yes──► producer ──ack──► done
//!                    │ no                        │ full / delivery failed
//!                    ▼                           ▼
//!                  spool ◄───────────────────────┘
//!                    │ replay, oldest segment first (one probe at a time while unhealthy)
//!                    ▼
//!                 producer ──ack──► segment deleted once every record is acked or re-spooled
//! ```
//!
//! While anything waits in the spool, new events go behind it, so the spool drains in order.
//! A delivery that fails goes back into the spool; nothing leaves tally's hands without the
//! broker's acknowledgement.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use rdkafka::producer::{BaseRecord, Producer as _, PurgeConfig};
use tally_core::config::KafkaConfig;
use tally_core::wire;

use crate::config::EmitterConfig;
use crate::error::{Durability, EmitError, StartError};
use crate::kafka::{self, Delivery, Producer, Source, Unsent};
use crate::spool::{AppendError, Read, Segment, SegmentReader};
use crate::state::{DurableReply, EmitterState, Queued, SegmentProgress};
use crate::telemetry::{Exporter, Stats};

/// How long the thread sleeps when it finds no work. The queue is polled rather than awaited
/// (see `EmitterState::queue`); 1 ms is small next to the producer's 5 ms linger.
const TICK: Duration = Duration::from_millis(1);
/// Events taken from the queue per wake-up.
const BATCH: usize = 4096;
/// How long shutdown waits for replayed records in flight before handing them back.
const REPLAY_GRACE: Duration = Duration::from_secs(2);

/// A segment being replayed; `reader` is `None` once every record has been sent.
struct Replaying {
    segment: Segment,
    reader: Option<SegmentReader>,
    progress: Arc<SegmentProgress>,
}

pub(crate) struct Publisher {
    shared: Arc<EmitterState>,
    failed: Receiver<Unsent>,
    producer: Producer,
    topic: String,
    fsync_interval: Duration,
    replay_window: u64,
    exporter: Exporter,
    /// Oldest first; only the last one can still be reading.
    replaying: VecDeque<Replaying>,
    /// Events the spool refused (full); retried before anything new is taken.
    held: VecDeque<Unsent>,
    /// Durable callers waiting for the next fsync.
    awaiting_sync: Vec<DurableReply>,
    /// The spool refused a write (I/O): logged once until it takes one again.
    spool_failing: bool,
    last_sync: Instant,
    encoded: Vec<u8>,
}

impl Publisher {
    pub(crate) fn new(
        kafka: &KafkaConfig,
        config: &EmitterConfig,
        shared: Arc<EmitterState>,
    ) -> Result<Publisher, StartError> {
        // Every message in flight can fail at most once, so this bound never blocks for long.
        let (unsent_tx, failed_rx) = crossbeam_channel::bounded(
            config.producer_queue_messages as usize + config.replay_window,
        );
        let producer = kafka::producer(kafka, config, Arc::clone(&shared), unsent_tx)?;
        Ok(Publisher {
            shared,
            failed: failed_rx,
            producer,
            topic: kafka.topic.clone(),
            fsync_interval: config.spool.fsync_interval,
            replay_window: config.replay_window as u64,
            exporter: Exporter::new(),
            replaying: VecDeque::new(),
            held: VecDeque::new(),
            awaiting_sync: Vec::new(),
            spool_failing: false,
            last_sync: Instant::now(),
            encoded: Vec::with_capacity(256),
        })
    }

    pub(crate) fn run(mut self) {
        loop {
            self.retry_held();
            let mut worked = false;
            // While the spool is full, take nothing: the queue fills and `emit` reports
            // Overloaded, rather than this thread holding an unbounded amount.
            if self.held.is_empty() {
                for _ in 0..BATCH {
                    let Some(queued) = self.shared.queue.pop() else {
                        break;
                    };
                    self.route(queued);
                    worked = true;
                }
            }
            while let Ok(failed) = self.failed.try_recv() {
                self.spool_or_hold(failed);
                worked = true;
            }
            self.replay_step();
            self.sync_if_due();
            // Stop once the queue is drained, or at once if the spool is full: nothing more can
            // be made durable then, and `finish` reports what is lost.
            if self.shared.stopping.load(Ordering::Acquire)
                && (self.shared.queue.is_empty() || !self.held.is_empty())
            {
                break;
            }
            if !worked {
                self.wait_for_failure(TICK);
            }
        }
        self.finish();
    }

    fn wait_for_failure(&mut self, timeout: Duration) {
        match self.failed.recv_timeout(timeout) {
            Ok(failed) => self.spool_or_hold(failed),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
        }
    }

    fn has_backlog(&self) -> bool {
        self.shared.spool.bytes() > 0 || !self.replaying.is_empty() || !self.held.is_empty()
    }

    /// Sends one queued event to Kafka, or to the spool when Kafka is down or the spool is
    /// not empty.
    fn route(&mut self, queued: Queued) {
        self.encoded.clear();
        wire::encode_into(&queued.event, &mut self.encoded);
        let delivery = Box::new(Delivery {
            source: Source::Direct,
            emitted_at: queued.emitted_at,
            durable: queued.durable,
        });
        let key = queued.event.customer.as_bytes();
        if !self.shared.healthy.load(Ordering::Acquire) || self.has_backlog() {
            let failed = Unsent {
                key: key.to_vec(),
                payload: self.encoded.clone(),
                delivery,
            };
            self.spool_or_hold(failed);
            return;
        }
        let record = BaseRecord::with_opaque_to(&self.topic, delivery)
            .key(key)
            .payload(&self.encoded);
        if let Err((error, record)) = self.producer.send(record) {
            tracing::debug!(%error, "producer refused the event; spooling it");
            let failed = Unsent {
                key: key.to_vec(),
                payload: self.encoded.clone(),
                delivery: record.delivery_opaque,
            };
            self.spool_or_hold(failed);
        }
    }

    /// Writes an undelivered event to the spool, behind any it already holds.
    fn spool_or_hold(&mut self, unsent: Unsent) {
        self.held.push_back(unsent);
        self.retry_held();
    }

    /// The event is in the spool: it no longer counts as unresolved (or in flight).
    fn resolve(&mut self, delivery: Delivery) {
        match &delivery.source {
            Source::Direct => self.shared.resolve_one(),
            Source::Replay(progress) => {
                progress.outstanding.fetch_sub(1, Ordering::AcqRel);
            }
        }
        if let Some(durable) = delivery.durable {
            self.awaiting_sync.push(durable);
        }
    }

    /// Spools held events: replayed records whose delivery failed first (they go back over the
    /// spool's limit, or their old segment could never be deleted to make room), then new
    /// events in order, stopping at the first the spool refuses (full, or a write that failed
    /// and was cut off: it stays held and is tried again).
    fn retry_held(&mut self) {
        let (replayed, direct): (VecDeque<Unsent>, VecDeque<Unsent>) = self
            .held
            .drain(..)
            .partition(|u| matches!(u.delivery.source, Source::Replay(_)));
        let mut still_held = VecDeque::new();
        for unsent in replayed {
            if self.spool_one(&unsent, true) {
                self.resolve(*unsent.delivery);
            } else {
                still_held.push_back(unsent);
            }
        }
        let mut direct = direct.into_iter();
        while let Some(unsent) = direct.next() {
            if self.spool_one(&unsent, false) {
                self.resolve(*unsent.delivery);
            } else {
                still_held.push_back(unsent);
                still_held.extend(direct);
                break;
            }
        }
        self.held = still_held;
    }

    /// Appends one held event to the spool; false when the spool refused it.
    fn spool_one(&mut self, unsent: &Unsent, again: bool) -> bool {
        let appended = if again {
            self.shared.spool.append_again(&unsent.key, &unsent.payload)
        } else {
            self.shared.spool.append(&unsent.key, &unsent.payload)
        };
        match appended {
            Ok(()) => {
                if self.spool_failing {
                    tracing::info!("the spool takes events again");
                    self.spool_failing = false;
                }
                Stats::add(&self.shared.stats.spooled, 1);
                true
            }
            Err(error) => {
                if let AppendError::Io(io) = &error {
                    Stats::add(&self.shared.stats.spool_errors, 1);
                    if !self.spool_failing {
                        tracing::error!(error = %io, "cannot write the spool (is the disk full?); holding events in memory and retrying");
                    }
                    self.spool_failing = true;
                }
                false
            }
        }
    }

    fn replay_in_flight(&self) -> u64 {
        self.replaying
            .iter()
            .map(|r| r.progress.outstanding.load(Ordering::Acquire))
            .sum()
    }

    /// Sends spooled records while the window allows, then deletes finished segments.
    fn replay_step(&mut self) {
        let window = if self.shared.healthy.load(Ordering::Acquire) {
            self.replay_window
        } else {
            // Broker down: one probe at a time; its acknowledgement reopens the window.
            1
        };
        let mut in_flight = self.replay_in_flight();
        while in_flight < window {
            if self.replaying.back().is_none_or(|r| r.reader.is_none()) && !self.open_next() {
                break;
            }
            let Some(current) = self.replaying.back_mut() else {
                break;
            };
            let Some(reader) = current.reader.as_mut() else {
                break;
            };
            let mark = reader.position();
            match reader.next_record() {
                Read::Record(record) => {
                    let delivery = Box::new(Delivery {
                        source: Source::Replay(Arc::clone(&current.progress)),
                        emitted_at: chrono::Utc::now(),
                        durable: None,
                    });
                    current.progress.outstanding.fetch_add(1, Ordering::AcqRel);
                    let sent = self.producer.send(
                        BaseRecord::with_opaque_to(&self.topic, delivery)
                            .key(record.key)
                            .payload(record.payload),
                    );
                    if let Err((error, _)) = sent {
                        current.progress.outstanding.fetch_sub(1, Ordering::AcqRel);
                        reader.seek(mark);
                        tracing::debug!(%error, "producer refused a replayed record; retrying later");
                        break;
                    }
                    in_flight += 1;
                }
                Read::Torn => {
                    Stats::add(&self.shared.stats.torn_records, 1);
                    tracing::warn!(
                        segment = %current.segment.path.display(),
                        "torn or corrupt spool record (a crash mid-write); skipping the rest of the segment"
                    );
                    current.reader = None;
                }
                Read::End => current.reader = None,
            }
        }
        self.remove_finished();
    }

    /// Starts reading the oldest spooled segment; false when the spool is empty.
    fn open_next(&mut self) -> bool {
        let segment = match self.shared.spool.take_oldest() {
            Ok(Some(segment)) => segment,
            Ok(None) => return false,
            Err(error) => {
                tracing::error!(%error, "cannot seal the spool segment for replay");
                return false;
            }
        };
        match SegmentReader::open(&segment.path) {
            Ok(reader) => {
                self.replaying.push_back(Replaying {
                    segment,
                    reader: Some(reader),
                    progress: Arc::default(),
                });
                true
            }
            Err(error) => {
                // Keep the file for an operator; it stays counted in the spool's bytes.
                tracing::error!(%error, segment = %segment.path.display(), "cannot read spool segment; leaving it in place");
                false
            }
        }
    }

    fn remove_finished(&mut self) {
        while self.replaying.front().is_some_and(|r| {
            r.reader.is_none() && r.progress.outstanding.load(Ordering::Acquire) == 0
        }) {
            // Records of this segment that failed were spooled again: make them durable before
            // the segment that also holds them disappears (and keep it while fsync fails).
            if !self.sync() {
                return;
            }
            let Some(done) = self.replaying.pop_front() else {
                break;
            };
            if let Err(error) = self.shared.spool.remove(&done.segment) {
                tracing::error!(%error, segment = %done.segment.path.display(), "cannot delete replayed spool segment; its events may be replayed again (the aggregator dedupes them)");
            }
        }
    }

    fn sync_if_due(&mut self) {
        if !self.awaiting_sync.is_empty() || self.last_sync.elapsed() >= self.fsync_interval {
            let _ = self.sync();
        }
    }

    /// Fsyncs the spool; durable callers hear `Spooled` only when that succeeded.
    fn sync(&mut self) -> bool {
        let synced = self.shared.spool.sync();
        if let Err(error) = &synced {
            Stats::add(&self.shared.stats.spool_errors, 1);
            tracing::error!(%error, "spool fsync failed; events spooled since the last sync may not survive a crash");
        }
        for durable in self.awaiting_sync.drain(..) {
            let answer = match &synced {
                Ok(()) => Ok(Durability::Spooled),
                Err(error) => Err(EmitError::NotDurable(format!(
                    "spool fsync failed: {error}"
                ))),
            };
            let _ = durable.send(answer);
        }
        self.last_sync = Instant::now();
        self.exporter.export(
            &self.shared.stats,
            self.shared.queue.len(),
            self.shared.spool.bytes(),
        );
        synced.is_ok()
    }

    /// Shutdown: give replayed records a moment, hand back everything still in the producer
    /// (it returns as failed deliveries), spool it, fsync.
    fn finish(mut self) {
        let deadline = Instant::now() + REPLAY_GRACE;
        while self.replay_in_flight() > 0 && Instant::now() < deadline {
            self.wait_for_failure(TICK);
            self.remove_finished();
        }
        self.producer
            .purge(PurgeConfig::default().queue().inflight());
        let deadline = Instant::now() + REPLAY_GRACE;
        while (self.shared.pending() > 0 || self.replay_in_flight() > 0)
            && Instant::now() < deadline
        {
            self.retry_held();
            self.wait_for_failure(TICK);
        }
        self.remove_finished();
        let _ = self.sync();
        let lost = self.shared.pending();
        if lost > 0 {
            tracing::error!(
                events = lost,
                "emitter stopped with events neither acknowledged nor spooled (spool full); they are lost"
            );
        }
    }
}
