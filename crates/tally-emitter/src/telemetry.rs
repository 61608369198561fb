//! The emitter's counters and their Prometheus names, in one place.
//!
//! The hot path increments plain atomics in [`Stats`]; the publisher thread copies them into the
//! `metrics` recorder on every tick, so `emit()` never touches a metrics registry.

use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;
use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use tally_core::RejectReason;

pub(crate) const EVENTS_EMITTED: &str = "tally_emitter_events_emitted_total";
pub(crate) const EVENTS_PUBLISHED: &str = "tally_emitter_events_published_total";
pub(crate) const EVENTS_SPOOLED: &str = "tally_emitter_events_spooled_total";
pub(crate) const EVENTS_REPLAYED: &str = "tally_emitter_events_replayed_total";
pub(crate) const EVENTS_REJECTED: &str = "tally_emitter_events_rejected_total";
pub(crate) const EVENTS_DROPPED: &str = "tally_emitter_events_dropped_total";
pub(crate) const OVERLOADED: &str = "tally_emitter_overloaded_total";
pub(crate) const DELIVERY_FAILURES: &str = "tally_emitter_delivery_failures_total";
pub(crate) const SPOOL_TORN_RECORDS: &str = "tally_emitter_spool_torn_records_total";
/// Spool writes or fsyncs that failed (a full or failing disk).
pub(crate) const SPOOL_ERRORS: &str = "tally_emitter_spool_errors_total";
pub(crate) const QUEUE_DEPTH: &str = "tally_emitter_queue_depth";
pub(crate) const SPOOL_BYTES: &str = "tally_emitter_spool_bytes";
pub(crate) const PUBLISH_LATENCY: &str = "tally_emitter_publish_latency_seconds";

/// Counts since the emitter started. Read them with [`crate::Emitter::stats`].
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Written by every `emit` caller; on its own cache line so that the delivery thread's
    /// counters do not bounce it between cores.
    pub(crate) emitted: CachePadded<AtomicU64>,
    /// Accepted events that reached the broker or the spool (see `EmitterState::pending`).
    pub(crate) resolved: CachePadded<AtomicU64>,
    pub(crate) published: AtomicU64,
    pub(crate) spooled: AtomicU64,
    pub(crate) replayed: AtomicU64,
    pub(crate) rejected: [AtomicU64; RejectReason::ALL.len()],
    pub(crate) dropped: AtomicU64,
    pub(crate) overloaded: AtomicU64,
    pub(crate) delivery_failures: AtomicU64,
    pub(crate) torn_records: AtomicU64,
    pub(crate) spool_errors: AtomicU64,
}

/// A snapshot of the emitter's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EmitterStats {
    /// Events `emit` accepted.
    pub emitted: u64,
    /// Events the broker acknowledged on the direct path.
    pub published: u64,
    /// Events written to the spool (first time or after a failed delivery).
    pub spooled: u64,
    /// Spooled events the broker acknowledged.
    pub replayed: u64,
    /// Events `emit` refused as invalid.
    pub rejected: u64,
    /// Events dropped under the `drop_newest` policy.
    pub dropped: u64,
    /// `emit` calls answered `Overloaded`.
    pub overloaded: u64,
    /// Deliveries that failed and went (back) to the spool.
    pub delivery_failures: u64,
    /// Torn or corrupt spool records skipped on replay.
    pub torn_records: u64,
    /// Spool writes or fsyncs that failed (a full or failing disk).
    pub spool_errors: u64,
}

impl Stats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn reject(&self, reason: RejectReason) {
        let index = RejectReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        Self::add(&self.rejected[index], 1);
    }

    pub(crate) fn snapshot(&self) -> EmitterStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        EmitterStats {
            emitted: get(&self.emitted),
            published: get(&self.published),
            spooled: get(&self.spooled),
            replayed: get(&self.replayed),
            rejected: self.rejected.iter().map(get).sum(),
            dropped: get(&self.dropped),
            overloaded: get(&self.overloaded),
            delivery_failures: get(&self.delivery_failures),
            torn_records: get(&self.torn_records),
            spool_errors: get(&self.spool_errors),
        }
    }
}

/// Handles into the global `metrics` recorder, registered once at start.
pub(crate) struct Exporter {
    emitted: Counter,
    published: Counter,
    spooled: Counter,
    replayed: Counter,
    rejected: Vec<Counter>,
    dropped: Counter,
    overloaded: Counter,
    delivery_failures: Counter,
    torn_records: Counter,
    spool_errors: Counter,
    queue_depth: Gauge,
    spool_bytes: Gauge,
}

impl Exporter {
    pub(crate) fn new() -> Self {
        Exporter {
            emitted: counter!(EVENTS_EMITTED),
            published: counter!(EVENTS_PUBLISHED),
            spooled: counter!(EVENTS_SPOOLED),
            replayed: counter!(EVENTS_REPLAYED),
            rejected: RejectReason::ALL
                .iter()
                .map(|r| counter!(EVENTS_REJECTED, "reason" => r.code()))
                .collect(),
            dropped: counter!(EVENTS_DROPPED),
            overloaded: counter!(OVERLOADED),
            delivery_failures: counter!(DELIVERY_FAILURES),
            torn_records: counter!(SPOOL_TORN_RECORDS),
            spool_errors: counter!(SPOOL_ERRORS),
            queue_depth: gauge!(QUEUE_DEPTH),
            spool_bytes: gauge!(SPOOL_BYTES),
        }
    }

    pub(crate) fn export(&self, stats: &Stats, queue_depth: usize, spool_bytes: u64) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        self.emitted.absolute(get(&stats.emitted));
        self.published.absolute(get(&stats.published));
        self.spooled.absolute(get(&stats.spooled));
        self.replayed.absolute(get(&stats.replayed));
        for (counter, value) in self.rejected.iter().zip(&stats.rejected) {
            counter.absolute(get(value));
        }
        self.dropped.absolute(get(&stats.dropped));
        self.overloaded.absolute(get(&stats.overloaded));
        self.delivery_failures
            .absolute(get(&stats.delivery_failures));
        self.torn_records.absolute(get(&stats.torn_records));
        self.spool_errors.absolute(get(&stats.spool_errors));
        self.queue_depth.set(queue_depth as f64);
        self.spool_bytes.set(spool_bytes as f64);
    }
}

pub(crate) fn publish_latency() -> Histogram {
    histogram!(PUBLISH_LATENCY)
}
