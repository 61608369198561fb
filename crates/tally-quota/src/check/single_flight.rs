//! Loads a check has to wait for: a customer's first check, a failed load whose
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
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use tokio::sync::{OnceCell, Semaphore};

use super::cache::{CacheState, Cached, CustomerState};

type Flight = Arc<OnceCell<Arc<Cached>>>;

pub(super) struct SingleFlight {
    /// Loads under way, by customer. An entry lives only as long as its load (so the map is
    /// bounded by the checks waiting, which the server bounds).
    flights: Mutex<HashMap<String, Flight>>,
    permits: Semaphore,
}

impl SingleFlight {
    pub(super) fn new(max_concurrent_loads: usize) -> SingleFlight {
        SingleFlight {
            flights: Mutex::default(),
            permits: Semaphore::new(max_concurrent_loads.max(1)),
        }
    }

    fn flights(&self) -> MutexGuard<'_, HashMap<String, Flight>> {
        self.flights.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets the customer's load under way (it was invalidated): checks from now on start a
    /// new one instead of joining one that may read the state from before.
    /// Whether there was one.
    pub(super) fn forget(&self, customer: &str) -> bool {
        self.flights().remove(customer).is_some()
    }
}

impl CacheState {
    /// Loads the customer (or joins the load under way), caches the outcome, failed or not,
    /// and returns it. `seen` is the entry the check found unusable (`None`: none): an entry
    /// cached since then is answered from without loading again.
    pub(super) async fn load_for_check(
        &self,
        customer: &str,
        seen: Option<&Arc<Cached>>,
    ) -> Arc<Cached> {
        let flight = {
            let mut flights = self.single_flight.flights();
            // A load that landed between the check's look-up and here: use it. (A load
            // caches its outcome before it leaves `flights`, so one of the two is found.)
            if let Some(current) = self.get(customer) {
                if !seen.is_some_and(|seen| Arc::ptr_eq(seen, &current)) {
                    return current;
                }
            }
            flights.entry(customer.to_owned()).or_default().clone()
        };
        flight
            .get_or_init(|| self.load_one(customer, &flight))
            .await
            .clone()
    }

    /// The load itself, run by one of the checks waiting. Should that check go away (its
    /// request cancelled), another waiting check runs it again.
    async fn load_one(&self, customer: &str, flight: &Flight) -> Arc<Cached> {
        let _leave = Leave {
            cache: self,
            customer,
            flight,
        };
        let _permit = self
            .single_flight
            .permits
            .acquire()
            .await
            .expect("the load semaphore is never closed");
        let running = self.options.max_concurrent_loads.max(1)
            - self.single_flight.permits.available_permits();
        let counters = &self.counters;
        counters.waited_loads.fetch_add(1, Ordering::Relaxed);
        crate::telemetry::load("waited");
        counters
            .peak_running_loads
            .fetch_max(running as u64, Ordering::Relaxed);
        let loaded = match self.load(vec![customer.to_owned()]).await {
            Ok(mut batch) => batch.pop().expect("one result per customer").cached,
            Err(error) => Err(error),
        };
        let cached = Arc::new(loaded.unwrap_or_else(|error| {
            // Debug only: during an outage this is one line per customer per TTL, and the
            // API logs every answer's error under its request id already.
            tracing::debug!(customer, %error, "quota load failed; cached for failed_load_ttl");
            // The TTL runs from the failure, not from the start of a load that may have
            // waited long for a connection.
            let failed = Instant::now();
            Cached::new(CustomerState::LoadFailed(error), failed, self.tick(failed))
        }));
        self.insert(customer, cached.clone());
        cached
    }
}

/// Takes the load out of `flights` when it ends, landed or cancelled: after a landed load
/// has been cached, so a check finds one or the other.
struct Leave<'a> {
    cache: &'a CacheState,
    customer: &'a str,
    flight: &'a Flight,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        let mut flights = self.cache.single_flight.flights();
        if flights
            .get(self.customer)
            .is_some_and(|flight| Arc::ptr_eq(flight, self.flight))
        {
            flights.remove(self.customer);
        }
    }
}
