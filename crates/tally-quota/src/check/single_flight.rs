//! The bookkeeping of the loads a check has to wait for (`load.rs` runs them): a customer's first check, a failed load whose
//! `failed_load_ttl` has passed, or a billing period that ended.
//!
//! - One load per customer at a time, shared by every check waiting for it: a thousand
//!   concurrent first checks for a customer make one load, not a thousand.
//! - At most `max_concurrent_loads` of these loads at once (each holds a Postgres
//!   connection): a flood of checks for made-up ids waits its turn instead of taking every
//!   connection the refresher, webhooks and ingestion need.
//! - A failed load is cached as such (`LoadFailed`): the checks of the next
//!   `failed_load_ttl` get its error without asking Postgres again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{OnceCell, Semaphore};

use super::entry::Cached;

pub(super) type Flight = Arc<OnceCell<Arc<Cached>>>;

pub(super) struct SingleFlight {
    /// Loads under way, by customer. An entry lives only as long as its load (so the map is
    /// bounded by the checks waiting, which the server bounds).
    flights: Mutex<HashMap<String, Flight>>,
    pub(super) permits: Semaphore,
}

impl SingleFlight {
    pub(super) fn new(max_concurrent_loads: usize) -> SingleFlight {
        SingleFlight {
            flights: Mutex::default(),
            permits: Semaphore::new(max_concurrent_loads.max(1)),
        }
    }

    pub(super) fn flights(&self) -> MutexGuard<'_, HashMap<String, Flight>> {
        self.flights.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets the customer's load under way (it was invalidated): checks from now on start a
    /// new one instead of joining one that may read the state from before.
    /// Whether there was one.
    pub(super) fn forget(&self, customer: &str) -> bool {
        self.flights().remove(customer).is_some()
    }
}
