//! What the consumer loop and the watchdog share about one member: its assignment (kept by
//! the rebalance callbacks), what it is doing (the commit under way in each lane, messages
//! consumed per partition), and the watchdog's request that it join the group again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use crate::telemetry;

/// The lane a partition's batches are committed in: `partition % lanes`. A lane commits its
/// batches one at a time, in order, so each partition's stored offset only moves forward.
pub(crate) fn lane_of(partition: i32, lanes: usize) -> usize {
    partition.unsigned_abs() as usize % lanes.max(1)
}

/// What the consumer and the watchdog share.
#[derive(Debug)]
pub(crate) struct Membership {
    assignment: Mutex<Assignment>,
    rejoin: AtomicBool,
    /// What the loop is doing, published when the watchdog asks (once a look, so the loop
    /// takes no lock per message).
    progress: Mutex<Progress>,
    wants_progress: AtomicBool,
}

#[derive(Debug, Clone)]
pub(crate) struct Assignment {
    pub(crate) partitions: Vec<i32>,
    /// When the partitions last changed (to none, too).
    pub(crate) since: Instant,
}

/// What the loop is doing.
#[derive(Debug, Clone, Default)]
pub(crate) struct Progress {
    /// Messages consumed from each partition since the process started (a re-assignment does
    /// not reset it).
    pub(crate) consumed: HashMap<i32, u64>,
    /// Per lane (see [`lane_of`]): since when its batch under way has been committing (a
    /// retried batch counts from its first try).
    pub(crate) committing_since: Vec<Option<Instant>>,
}

impl Progress {
    /// Since when the batch under way in the partition's lane has been committing.
    pub(crate) fn committing_since(&self, partition: i32) -> Option<Instant> {
        let lanes = self.committing_since.len();
        if lanes == 0 {
            return None;
        }
        self.committing_since[lane_of(partition, lanes)]
    }
}

impl Default for Membership {
    fn default() -> Self {
        Membership {
            assignment: Mutex::new(Assignment {
                partitions: Vec::new(),
                since: Instant::now(),
            }),
            rejoin: AtomicBool::new(false),
            progress: Mutex::new(Progress::default()),
            wants_progress: AtomicBool::new(false),
        }
    }
}

impl Membership {
    fn lock(&self) -> MutexGuard<'_, Assignment> {
        self.assignment
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn set_assigned(&self, partitions: Vec<i32>) {
        let mut assignment = self.lock();
        assignment.partitions = partitions;
        assignment.since = Instant::now();
        telemetry::record_assigned(assignment.partitions.len());
    }

    pub(crate) fn assigned(&self) -> Vec<i32> {
        self.lock().partitions.clone()
    }

    pub(crate) fn snapshot(&self) -> Assignment {
        self.lock().clone()
    }

    /// The loop, each turn: publishes what it is doing if the watchdog asked (`progress` is
    /// only called then).
    pub(crate) fn report(&self, progress: impl FnOnce() -> Progress) {
        if self.wants_progress.swap(false, Ordering::AcqRel) {
            *self.progress.lock().unwrap_or_else(PoisonError::into_inner) = progress();
        }
    }

    /// The watchdog: what the loop last published, and a request for the next.
    pub(crate) fn progress(&self) -> Progress {
        let progress = self
            .progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        self.wants_progress.store(true, Ordering::Release);
        progress
    }

    /// The watchdog: leave the group and join again with a fresh consumer.
    pub(crate) fn ask_rejoin(&self) {
        self.rejoin.store(true, Ordering::Release);
    }

    /// True once after the watchdog asked the member to join again.
    pub(crate) fn take_rejoin(&self) -> bool {
        self.rejoin.swap(false, Ordering::AcqRel)
    }
}
