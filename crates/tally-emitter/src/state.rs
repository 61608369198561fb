//! The emitter's state, shared by the `Emitter` handle, the publisher thread and the delivery
//! callback.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use crossbeam_queue::ArrayQueue;
use tally_core::UsageEvent;
use tokio::sync::oneshot;

use crate::error::{Durability, EmitError};
use crate::spool::Spool;
use crate::telemetry::Stats;

/// Where `emit_durable` hears where its event ended up.
pub(crate) type DurableReply = oneshot::Sender<Result<Durability, EmitError>>;

/// An event on its way from `emit` to the publisher thread.
pub(crate) struct Queued {
    pub(crate) event: UsageEvent,
    /// The clock reading `emit` already took, reused for the publish-latency metric.
    pub(crate) emitted_at: DateTime<Utc>,
    pub(crate) durable: Option<DurableReply>,
}

/// State shared by the handle, the publisher thread and the delivery callback.
pub(crate) struct EmitterState {
    pub(crate) stats: Stats,
    /// False from a delivery failure or "all brokers down" until the next acknowledgement.
    pub(crate) healthy: AtomicBool,
    /// `emit` → publisher. Polled, not awaited: a wake-up syscall per event would cost more
    /// than the whole `emit` budget.
    pub(crate) queue: ArrayQueue<Queued>,
    pub(crate) spool: Spool,
    /// Set by `shutdown`: the publisher drains, hands back what is in flight, and exits.
    pub(crate) stopping: AtomicBool,
}

impl EmitterState {
    /// Events accepted by `emit` that are neither acknowledged nor in the spool yet.
    pub(crate) fn pending(&self) -> u64 {
        // Read `resolved` first: `emitted` can only have grown since, so this never underflows.
        let resolved = self.stats.resolved.load(Ordering::Acquire);
        self.stats
            .emitted
            .load(Ordering::Acquire)
            .saturating_sub(resolved)
    }

    /// One accepted event reached the broker or the spool.
    pub(crate) fn resolve_one(&self) {
        self.stats.resolved.fetch_add(1, Ordering::AcqRel);
    }
}

/// Replayed records of one segment still awaiting the broker's answer.
#[derive(Default)]
pub(crate) struct SegmentProgress {
    pub(crate) outstanding: AtomicU64,
}
