//! What the checks answer from: the [`CacheState`] the checks share with the background
//! refresher, holding each customer's entry (`entry.rs`) and the meter → aggregation map. In
//! memory only; the bounded map of customers is in `customers.rs`, loading customers from
//! Postgres (and the loads a check waits for) in `load.rs`, the one-load-per-customer
//! bookkeeping in `single_flight.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tally_core::Aggregation;
use tally_credits::RateCard;
use tokio::sync::Notify;

use super::customers::Customers;
use super::entry::{Cached, CustomerState};
use super::feed::Feed;
use super::single_flight::SingleFlight;
use super::{QuotaError, QuotaOptions};
use tally_billing::plan::Entitlements;
use tally_billing::store::BillingStoreError;

/// How often the credit rate card is reloaded (with the customers' loads that need it).
const RATES_RELOAD: Duration = tally_credits::rates::FreshRates::MAX_AGE;

/// How often the meter list may be reloaded because a check named an unknown meter.
const METERS_RELOAD: Duration = Duration::from_secs(5);

#[derive(Default)]
pub(super) struct Aggregations {
    pub(super) by_meter: HashMap<String, Aggregation>,
    loaded: Option<Instant>,
}

/// What the cache did, for tests (the `testing` feature reads them); `telemetry.rs` exports
/// the same as metrics.
#[derive(Default)]
pub(super) struct Counters {
    /// Loads a check waited for (one per customer load, however many checks shared it).
    pub(super) waited_loads: AtomicU64,
    /// The refresher's batches.
    pub(super) background_loads: AtomicU64,
    /// Customers evicted to stay within `max_customers`.
    pub(super) evicted: AtomicU64,
    /// The most loads a check waits for that ever ran at once.
    pub(super) peak_running_loads: AtomicU64,
}

/// The cache the checks and the background refresher share: cached customers, the customers
/// due for a reload, and the meter → aggregation map.
pub(super) struct CacheState {
    pub(super) pool: PgPool,
    pub(super) options: QuotaOptions,
    /// Meter → aggregation, from the `meters` table (every command records tally.toml's
    /// meters there as it starts; `tally rebuild` may redefine one). Loaded on first use and
    /// again by the first check after it is [`METERS_RELOAD`] old.
    pub(super) aggregations: RwLock<Aggregations>,
    meters_reload: tokio::sync::Mutex<()>,
    /// The credit rate card (`credit_rates`), reloaded with the customers it prices at most
    /// every [`RATES_RELOAD`].
    pub(super) rates: RwLock<(Arc<RateCard>, Option<Instant>)>,
    /// Cached state by customer, at most `max_customers` entries.
    pub(super) customers: Customers,
    /// Each plan's entitlements, shared by its customers who have no override.
    plans: Mutex<HashMap<String, Arc<Entitlements>>>,
    /// Loads checks are waiting for, one per customer.
    pub(super) single_flight: SingleFlight,
    /// Customers whose cached state is stale, for the refresher's next batch.
    pub(super) due: Mutex<Vec<String>>,
    /// Wakes the refresher (also on drop, to let it end).
    pub(super) wake: Arc<Notify>,
    /// The change feed: which customers changed, and whether it can be trusted (`feed.rs`).
    pub(super) feed: Feed,
    /// The start of the cache's clock ([`CacheState::tick`]).
    epoch: Instant,
    pub(super) counters: Counters,
}

impl CacheState {
    /// An empty cache. Touches no database.
    pub(super) fn new(pool: PgPool, options: QuotaOptions) -> CacheState {
        CacheState {
            pool,
            aggregations: RwLock::default(),
            meters_reload: tokio::sync::Mutex::new(()),
            rates: RwLock::new((Arc::default(), None)),
            customers: Customers::new(options.max_customers),
            plans: Mutex::default(),
            single_flight: SingleFlight::new(options.max_concurrent_loads),
            due: Mutex::new(Vec::new()),
            wake: Arc::new(Notify::new()),
            feed: Feed::new(),
            epoch: Instant::now(),
            counters: Counters::default(),
            options,
        }
    }

    /// `at` in whole seconds since the cache started: the clock of [`Cached::last_used`].
    pub(super) fn tick(&self, at: Instant) -> u32 {
        u32::try_from(at.saturating_duration_since(self.epoch).as_secs()).unwrap_or(u32::MAX)
    }

    /// Marks the entry used at `now`, for eviction. Written only when the second changed, so
    /// checks on a hot customer do not all write one cache line.
    pub(super) fn touch(&self, cached: &Cached, now: Instant) {
        let tick = self.tick(now);
        if cached.last_used.load(Ordering::Relaxed) != tick {
            cached.last_used.store(tick, Ordering::Relaxed);
        }
    }

    /// The entitlements to cache for a customer: for one without an override, its plan's
    /// single shared copy. A copy per customer was two thirds of the cache's memory (2.2 KB
    /// a customer on a three-limit plan; 760 bytes shared). Bounded by the number of plans.
    pub(super) fn share(&self, entitlements: Entitlements, overridden: bool) -> Arc<Entitlements> {
        if overridden {
            return Arc::new(entitlements);
        }
        let mut plans = self.plans.lock().unwrap_or_else(PoisonError::into_inner);
        match plans.get(&entitlements.plan) {
            Some(shared) if **shared == entitlements => shared.clone(),
            // The plan's first customer, or the plan changed since.
            _ => {
                let shared = Arc::new(entitlements);
                plans.insert(shared.plan.clone(), shared.clone());
                shared
            }
        }
    }

    /// The aggregation of `meter`, reloading the meter list when it is not known (yet). One
    /// reload at a time: concurrent first checks wait for it instead of each running it.
    pub(super) async fn aggregation(&self, meter: &str) -> Result<Aggregation, QuotaError> {
        if let Some(answer) = self.known_aggregation(meter) {
            return answer;
        }
        let _one_reload = self.meters_reload.lock().await;
        // Reloaded while this check waited?
        if let Some(answer) = self.known_aggregation(meter) {
            return answer;
        }
        let recorded = tally_db::meters::all(&self.pool)
            .await
            .map_err(BillingStoreError::from)?;
        let mut aggregations = self.aggregations.write().unwrap_or_else(|e| e.into_inner());
        aggregations.by_meter = recorded
            .into_iter()
            .map(|meter| (meter.name, meter.aggregation))
            .collect();
        aggregations.loaded = Some(Instant::now());
        (aggregations.by_meter.get(meter).copied())
            .ok_or_else(|| QuotaError::UnknownMeter(meter.to_owned()))
    }

    /// The answer for `meter` without reloading, when the list was reloaded less than
    /// [`METERS_RELOAD`] ago: its aggregation, or "unknown"; `None` when it should be reloaded.
    fn known_aggregation(&self, meter: &str) -> Option<Result<Aggregation, QuotaError>> {
        let aggregations = self.aggregations.read().unwrap_or_else(|e| e.into_inner());
        // A known meter's aggregation is trusted no longer than an unknown one's absence:
        // `tally rebuild` may redefine it.
        if aggregations
            .loaded
            .is_none_or(|at| at.elapsed() >= METERS_RELOAD)
        {
            return None;
        }
        Some(match aggregations.by_meter.get(meter) {
            Some(aggregation) => Ok(*aggregation),
            None => Err(QuotaError::UnknownMeter(meter.to_owned())),
        })
    }

    /// The rate card, reloaded first when it is older than [`RATES_RELOAD`].
    pub(super) async fn rate_card(&self) -> Result<Arc<RateCard>, QuotaError> {
        {
            let rates = self.rates.read().unwrap_or_else(PoisonError::into_inner);
            if rates.1.is_some_and(|at| at.elapsed() < RATES_RELOAD) {
                return Ok(rates.0.clone());
            }
        }
        let card = Arc::new(
            RateCard::load(&self.pool)
                .await
                .map_err(BillingStoreError::from)?,
        );
        *self.rates.write().unwrap_or_else(PoisonError::into_inner) =
            (card.clone(), Some(Instant::now()));
        Ok(card)
    }

    /// The rate card as last loaded (loads keep it fresh; a check never waits for it).
    pub(super) fn cached_rates(&self) -> Arc<RateCard> {
        self.rates
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .clone()
    }

    /// The customer's cached state, fresh or stale.
    pub(super) fn get(&self, customer: &str) -> Option<Arc<Cached>> {
        self.customers.get(customer)
    }

    /// Queues the customer for the refresher's next batch and wakes it, unless a reload of
    /// this entry is under way already.
    pub(super) fn queue_reload(&self, customer: &str, cached: &Cached) {
        if cached.reloading.swap(true, Ordering::AcqRel) {
            return;
        }
        self.due
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(customer.to_owned());
        self.wake.notify_one();
    }

    /// Takes up to `most` of the customers due: those the change feed named first, then
    /// those queued because their state grew old, oldest first. Each once.
    pub(super) fn take_due(&self, most: usize) -> Vec<String> {
        let mut taken = self.feed.take_changed(most);
        let mut due = self.due.lock().unwrap_or_else(PoisonError::into_inner);
        let more = due.len().min(most - taken.len());
        taken.extend(due.drain(..more));
        drop(due);
        taken.sort_unstable();
        taken.dedup();
        taken
    }

    /// Whether customers are still queued after a batch.
    pub(super) fn more_due(&self) -> bool {
        self.feed.any_changed()
            || !self
                .due
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty()
    }

    /// Queues every cached customer for a reload (the change feed began listening again, or
    /// a plan changed).
    pub(super) fn mark_all_changed(&self) {
        self.customers
            .for_each(|customer, _| self.feed.mark_changed(customer));
    }

    /// Caches a customer's state, evicting others if the cache is full.
    pub(super) fn insert(&self, customer: &str, cached: Arc<Cached>) {
        let evicted = self.customers.insert(customer, cached);
        if evicted > 0 {
            crate::telemetry::evicted(evicted);
            self.counters
                .evicted
                .fetch_add(evicted as u64, Ordering::Relaxed);
        }
    }

    /// Marks a customer's cached state out of date (see [`CustomerState::Invalidated`]), and
    /// forgets a load under way, so that the next check starts a new one.
    ///
    /// A customer neither cached nor being loaded gets no mark: its next load reads the state
    /// after the change anyway, and a mark would take a place in the cache (the scheduler
    /// invalidates thousands of customers at a month's start; their marks would evict the
    /// customers being checked).
    pub(super) fn invalidate(&self, customer: &str) {
        let now = Instant::now();
        let loading = self.single_flight.forget(customer);
        if loading || self.get(customer).is_some() {
            self.customers.insert(
                customer,
                Arc::new(Cached::new(CustomerState::Invalidated, now, self.tick(now))),
            );
        }
    }

    /// Clears every "reload under way" mark, so stale customers are queued again.
    pub(super) fn reset_reloading(&self) {
        self.customers.for_each(|_, cached| {
            cached.reloading.store(false, Ordering::Release);
        });
    }

    /// Caches a load that failed for this customer's own reasons (answered until
    /// `failed_load_ttl` has passed, then loaded again).
    pub(super) fn insert_failure(&self, customer: &str, error: QuotaError) {
        let failed = Instant::now();
        let cached = Cached::new(CustomerState::LoadFailed(error), failed, self.tick(failed));
        self.insert(customer, Arc::new(cached));
    }

    /// A failed reload: the next stale check queues the customer again.
    pub(super) fn reload_failed(&self, customer: &str) {
        if let Some(cached) = self.get(customer) {
            cached.reloading.store(false, Ordering::Release);
        }
    }
}
