//! What the checks answer from: each customer's cached state ([`Cached`]), the meter →
//! aggregation map, and the [`CacheState`] the checks share with the background refresher.
//! In memory only; loading a customer from Postgres is in `load.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;
use tally_core::Aggregation;
use tokio::sync::Notify;

use super::QuotaError;
use crate::plan::Entitlements;
use crate::store::{QuotaStoreError, Subscription};

/// One customer's cached state.
pub(super) struct Cached {
    pub(super) loaded: Instant,
    /// A background reload is under way (only one per customer at a time).
    pub(super) reloading: AtomicBool,
    /// `None`: no live subscription (cached too, so a flood of checks for such a customer does
    /// not reach Postgres).
    pub(super) live: Option<Live>,
}

pub(super) struct Live {
    pub(super) subscription: Subscription,
    pub(super) entitlements: Entitlements,
    /// Per limited meter: usage in its current period, when that period ends, and what this
    /// process has allowed since loading.
    pub(super) meters: HashMap<String, MeterUsage>,
}

pub(super) struct MeterUsage {
    pub(super) committed: Decimal,
    pub(super) resets_at: Option<DateTime<Utc>>,
    pub(super) allowed_locally: Mutex<Decimal>,
}

impl Live {
    pub(super) fn period_ended(&self, now: DateTime<Utc>) -> bool {
        self.meters
            .values()
            .any(|m| m.resets_at.is_some_and(|at| now >= at))
    }
}

/// How often the meter list may be reloaded because a check named an unknown meter.
const METERS_RELOAD: Duration = Duration::from_secs(5);

#[derive(Default)]
pub(super) struct Aggregations {
    pub(super) by_meter: HashMap<String, Aggregation>,
    loaded: Option<Instant>,
}

/// The cache the checks and the background refresher share: cached customers, the customers
/// due for a reload, and the meter → aggregation map.
pub(super) struct CacheState {
    pub(super) pool: PgPool,
    /// Meter → aggregation, from the `meters` table (every command records tally.toml's
    /// meters there as it starts). Loaded on first use and again when a check names a meter
    /// it does not hold, at most every [`METERS_RELOAD`].
    pub(super) aggregations: RwLock<Aggregations>,
    /// Cached state by customer.
    pub(super) customers: RwLock<HashMap<String, Arc<Cached>>>,
    /// Customers whose cached state is stale, for the refresher's next batch.
    pub(super) due: Mutex<Vec<String>>,
    /// Wakes the refresher (also on drop, to let it end).
    pub(super) wake: Arc<Notify>,
}

impl CacheState {
    /// An empty cache. Touches no database.
    pub(super) fn new(pool: PgPool) -> CacheState {
        CacheState {
            pool,
            aggregations: RwLock::default(),
            customers: RwLock::new(HashMap::new()),
            due: Mutex::new(Vec::new()),
            wake: Arc::new(Notify::new()),
        }
    }

    /// The aggregation of `meter`, reloading the meter list when it is not known (yet).
    pub(super) async fn aggregation(&self, meter: &str) -> Result<Aggregation, QuotaError> {
        let known = |aggregations: &Aggregations| aggregations.by_meter.get(meter).copied();
        let (found, loaded) = {
            let aggregations = self.aggregations.read().unwrap_or_else(|e| e.into_inner());
            (known(&aggregations), aggregations.loaded)
        };
        if let Some(aggregation) = found {
            return Ok(aggregation);
        }
        if loaded.is_some_and(|at| at.elapsed() < METERS_RELOAD) {
            return Err(QuotaError::UnknownMeter(meter.to_owned()));
        }
        let recorded = tally_db::meters::all(&self.pool)
            .await
            .map_err(QuotaStoreError::from)?;
        let mut aggregations = self.aggregations.write().unwrap_or_else(|e| e.into_inner());
        aggregations.by_meter = recorded
            .into_iter()
            .map(|meter| (meter.name, meter.aggregation))
            .collect();
        aggregations.loaded = Some(Instant::now());
        known(&aggregations).ok_or_else(|| QuotaError::UnknownMeter(meter.to_owned()))
    }

    /// The customer's cached state, fresh or stale.
    pub(super) fn get(&self, customer: &str) -> Option<Arc<Cached>> {
        self.customers
            .read()
            .expect("quota cache poisoned")
            .get(customer)
            .cloned()
    }

    /// Queues the customer for the refresher's next batch and wakes it.
    pub(super) fn queue_reload(&self, customer: &str) {
        self.due
            .lock()
            .expect("quota due list poisoned")
            .push(customer.to_owned());
        self.wake.notify_one();
    }

    /// Takes the customers queued since the last batch.
    pub(super) fn take_due(&self) -> Vec<String> {
        std::mem::take(&mut *self.due.lock().expect("quota due list poisoned"))
    }

    pub(super) fn insert(&self, customer: &str, cached: Arc<Cached>) {
        self.customers
            .write()
            .expect("quota cache poisoned")
            .insert(customer.to_owned(), cached);
    }

    /// Drops a customer's cached state.
    pub(super) fn remove(&self, customer: &str) {
        self.customers
            .write()
            .expect("quota cache poisoned")
            .remove(customer);
    }

    /// Clears every "reload under way" mark, so stale customers are queued again.
    pub(super) fn reset_reloading(&self) {
        for cached in self
            .customers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            cached.reloading.store(false, Ordering::Release);
        }
    }

    /// A failed reload: the next stale check queues the customer again.
    pub(super) fn reload_failed(&self, customer: &str) {
        if let Some(cached) = self
            .customers
            .read()
            .expect("quota cache poisoned")
            .get(customer)
        {
            cached.reloading.store(false, Ordering::Release);
        }
    }
}
