//! The quota check services call in their request path: the [`Quota`] handle.
//!
//! A customer's subscription, entitlements and current-period usage are loaded once and kept
//! in a local cache. Postgres says which customers changed (the change feed, `check/feed.rs`):
//! while the feed is heard, a customer is reloaded in the background when a write that changes
//! it commits, and otherwise not before `feed_max_age` (2 min). Without the feed (silent for 3 s,
//! or `change_feed` off) the cache works on a timer: a customer being checked is reloaded in the
//! background every `refresh` (`serve.refresh`, 250 ms by default) while checks go on answering
//! from the cached state, and **no check decides on state older than `max_staleness`**
//! (`serve.max_staleness`, 1 s by default): a customer whose state
//! is older (the first check after a quiet spell, or reloads that fell behind) is loaded again
//! before the answer, one load for every check waiting, and a load that fails is answered as
//! an error (503), never from the old state. So a balance burned or a limit reached elsewhere
//! (another `tally serve` behind the same load balancer, the credit burner) is seen within
//! `max_staleness` plus the aggregator's lag, on every replica. One refresher task reloads
//! every customer that became stale in a batch of two queries, so a thousand active customers
//! cost a few queries per refresh, not a thousand. A check on a cached customer is a read lock
//! on one shard of the map, a lookup and a few decimal operations (about 400-500 ns). Usage
//! this process allowed since the last refresh is added locally, so a burst through one
//! process cannot overshoot a hard limit by more than what it allowed that the aggregator has
//! not yet committed when the cache refreshes: about one refresh interval plus the
//! aggregator's lag (under 2 s at the defaults) worth of usage. Several processes each add
//! only their own; their combined overshoot is bounded the same way, per process.
//! [`Quota::peek`] answers what a check would without adding anything.
//!
//! What checks from the internet (made-up ids, floods, Postgres away) can cost, and why it is
//! bounded ([`QuotaOptions`]):
//!
//! - **Memory.** At most `max_customers` customers are cached (1,000,000 by default): live
//!   ones, those without a subscription, failed loads. A customer on a plan with three limited
//!   meters takes about 760 bytes (its plan's entitlements are shared with the plan's other
//!   customers without an override), so 1,000,000 take about 730 MB (`tests/memory.rs`
//!   measures it). When a shard is full it evicts a batch: customers without a live
//!   subscription and failed loads first (all a flood of made-up ids ever creates), then the
//!   least recently used. A check writes only its second into its own entry.
//! - **Postgres, on a miss.** A check waits for Postgres only on a customer's first use (or
//!   after its eviction), once a failed load's TTL has passed, or when a billing period has
//!   ended. Concurrent checks of one customer then share one load, and at most
//!   `max_concurrent_loads` such loads run at once, so a flood of unknown ids cannot take
//!   every connection. The meter list is reloaded by one check at a time too.
//! - **Postgres, when it fails.** A failed load is cached as such for `failed_load_ttl` (1 s):
//!   the customer's checks get its error (`Store`: the API answers 503) without asking again.
//! - **Postgres, at a period's end.** Every day and month period ends at once (midnight UTC,
//!   the 1st). A check rolls such a period over in place (usage zero in the new period, exact
//!   at the reset; `Counts::roll_over` says why that is safe for a hard limit) and the real
//!   figure comes with the refresher's next batch, so no check waits. A billing period ends per
//!   subscription; at its end the customer is reloaded before answering (whether it renewed is
//!   only in Postgres), once for every check waiting.
//!
//! Period usage comes from `usage_daily`, which the aggregator updates in the same transaction as
//! the minute windows: a check never reads minute windows. Billing periods are counted by whole
//! UTC days, from the day the period starts.
//!
//! The parts are in `check/`; the crate doc (`lib.rs`) says what each file holds.

mod cache;
mod customers;
mod decision;
mod entry;
mod error;
mod feed;
#[cfg(any(test, feature = "testing"))]
mod hooks;
mod listener;
mod load;
mod refresher;
mod single_flight;
mod usage;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use rust_decimal::Decimal;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Lookups;
use cache::CacheState;
pub use decision::{decide, Decision};
use entry::{Cached, CustomerState};
pub use error::QuotaError;
use tally_billing::plan::{Enforcement, Entitlements};
use tally_billing::store::Subscription;
pub use usage::{usage_against_limits, CustomerUsage, MeterPeriodUsage, UsageAgainstLimits};

/// How the quota cache behaves. [`QuotaOptions::new`] gives the defaults for everything but
/// the refresh interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaOptions {
    /// How often a customer's cached state is reloaded in the background (`serve.refresh`).
    pub refresh: Duration,
    /// Most customers cached: live ones, those without a subscription and failed loads
    /// together. About 760 bytes each on a plan with three limited meters (`tests/memory.rs`),
    /// so the default, 1,000,000, is about 730 MB at most. The bound is split among shards,
    /// which fill unevenly: eviction starts a little before the total is reached (about 98%).
    pub max_customers: usize,
    /// Most loads checks wait for running at once (first checks, mostly), each on a Postgres
    /// connection: keep it below the pool's size less one (the change feed's listener holds
    /// one), so that a flood of checks for unknown customers leaves connections to the
    /// refresher, webhooks and ingestion.
    pub max_concurrent_loads: usize,
    /// How long a failed load is answered with its error before Postgres is asked again.
    pub failed_load_ttl: Duration,
    /// The oldest cached state a check may decide on (`serve.max_staleness`); older state is
    /// loaded again before the answer. At least `refresh`. While the change feed is trusted,
    /// `feed_max_age` bounds it instead.
    pub max_staleness: Duration,
    /// Follow the change feed (`serve.change_feed`, on by default there; off in
    /// [`QuotaOptions::new`], since the listener holds one of the pool's connections for
    /// good; see `check/feed.rs`): reload a customer when Postgres says it changed, instead of
    /// every `refresh`.
    pub change_feed: bool,
    /// The oldest state a check decides on while the change feed is trusted
    /// (`serve.feed_max_age`, 2 minutes): a bound should a writer change a customer without
    /// notifying (a hand-written SQL update of usage); customers checked are reloaded in the
    /// background once their state is half this old.
    pub feed_max_age: Duration,
}

impl QuotaOptions {
    pub const DEFAULT_MAX_CUSTOMERS: usize = 1_000_000;
    pub const DEFAULT_MAX_CONCURRENT_LOADS: usize = 4;
    pub const DEFAULT_FAILED_LOAD_TTL: Duration = Duration::from_secs(1);
    pub const DEFAULT_FEED_MAX_AGE: Duration = Duration::from_secs(120);

    /// The defaults, with this refresh interval (and `max_staleness` four times it, at least
    /// a second).
    pub fn new(refresh: Duration) -> QuotaOptions {
        QuotaOptions {
            refresh,
            max_customers: QuotaOptions::DEFAULT_MAX_CUSTOMERS,
            max_concurrent_loads: QuotaOptions::DEFAULT_MAX_CONCURRENT_LOADS,
            failed_load_ttl: QuotaOptions::DEFAULT_FAILED_LOAD_TTL,
            max_staleness: (refresh * 4).max(Duration::from_secs(1)),
            change_feed: false,
            feed_max_age: QuotaOptions::DEFAULT_FEED_MAX_AGE,
        }
    }
}

/// Quota checks with a local cache. Cheap to share (`Arc`).
pub struct Quota {
    cache: Arc<CacheState>,
    lookups: Lookups,
    /// Ends the supervised refresher when the `Quota` is dropped.
    stop: CancellationToken,
}

/// Whether an answer counts the quantity against the customer's quota.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Counting {
    Count,
    Peek,
}

impl Quota {
    /// [`Quota::with_options`] with the defaults ([`QuotaOptions::new`]).
    pub async fn new(pool: PgPool, refresh: Duration) -> Result<Quota, QuotaError> {
        Quota::with_options(pool, QuotaOptions::new(refresh)).await
    }

    /// Starts the background refresher. Touches no database: meters, entitlements and usage
    /// are loaded on first use, so a server can start while Postgres is away.
    pub async fn with_options(pool: PgPool, options: QuotaOptions) -> Result<Quota, QuotaError> {
        let cache = Arc::new(CacheState::new(pool, options));
        let stop = CancellationToken::new();
        refresher::start(&cache, stop.clone());
        if cache.options.change_feed {
            listener::start(&cache, stop.clone());
        }
        Ok(Quota {
            cache,
            lookups: Lookups::register(),
            stop,
        })
    }

    /// May `customer` use `quantity` more of `meter`? An allowed quantity counts against the
    /// customer's quota in this process until the next refresh.
    pub async fn check(
        &self,
        customer: &str,
        meter: &str,
        quantity: Decimal,
    ) -> Result<Decision, QuotaError> {
        self.answer(customer, meter, quantity, None, Counting::Count)
            .await
    }

    /// [`Quota::check`] for usage with these dimensions: a meter under `credits` enforcement
    /// is priced at the rate for them (e.g. per model). Without dimensions it is priced at the
    /// meter's default rate, or the highest of its rates when it has no default.
    pub async fn check_with(
        &self,
        customer: &str,
        meter: &str,
        quantity: Decimal,
        dimensions: &BTreeMap<String, String>,
    ) -> Result<Decision, QuotaError> {
        self.answer(customer, meter, quantity, Some(dimensions), Counting::Count)
            .await
    }

    /// What [`Quota::check`] would answer now, without counting `quantity`: nobody's quota
    /// changes (for callers that may look but not use, like a customer's own token).
    pub async fn peek(
        &self,
        customer: &str,
        meter: &str,
        quantity: Decimal,
    ) -> Result<Decision, QuotaError> {
        self.answer(customer, meter, quantity, None, Counting::Peek)
            .await
    }

    /// [`Quota::peek`] with dimensions, as [`Quota::check_with`].
    pub async fn peek_with(
        &self,
        customer: &str,
        meter: &str,
        quantity: Decimal,
        dimensions: &BTreeMap<String, String>,
    ) -> Result<Decision, QuotaError> {
        self.answer(customer, meter, quantity, Some(dimensions), Counting::Peek)
            .await
    }

    async fn answer(
        &self,
        customer: &str,
        meter: &str,
        quantity: Decimal,
        dimensions: Option<&BTreeMap<String, String>>,
        counting: Counting,
    ) -> Result<Decision, QuotaError> {
        self.cache.aggregation(meter).await?;
        let cached = self.cached(customer).await;
        let live = cached.live(customer)?;
        let (Some(limit), Some(usage)) = (live.entitlements.limits.get(meter), live.meter(meter))
        else {
            return Ok(Decision::Allow {
                used: Decimal::ZERO,
                limit: None,
                remaining: None,
                resets_at: None,
                credits: None,
            });
        };
        let out_of_range = || QuotaError::OutOfRange { quantity };
        let mut counts = usage.lock();
        if counts.roll_over(limit.period, &live.subscription, Utc::now()) {
            // The new period's real usage, in the refresher's next batch (see `roll_over`).
            self.cache.queue_reload(customer, &cached);
        }
        let used = counts
            .committed
            .checked_add(counts.allowed_locally)
            .ok_or_else(out_of_range)?;
        let mut decision =
            decide(limit, used, quantity, Some(counts.resets_at)).ok_or_else(out_of_range)?;
        if limit.enforcement == Enforcement::Credits && !matches!(decision, Decision::Deny { .. }) {
            let left = self.spend_credits(customer, meter, quantity, dimensions, live, counting)?;
            decision = decision.with_credits(left);
        }
        if !matches!(decision, Decision::Deny { .. }) {
            let allowed = counts
                .allowed_locally
                .checked_add(quantity)
                .ok_or_else(out_of_range)?;
            if counting == Counting::Count {
                counts.allowed_locally = allowed;
            }
        }
        Ok(decision)
    }

    /// For a meter under `credits` enforcement: whether the customer's projected balance, less
    /// what this process allowed since the load, covers `quantity` at the meter's rate; if so
    /// (and counting) the cost is counted locally, and the balance left is returned. A meter
    /// without a rate costs nothing.
    fn spend_credits(
        &self,
        customer: &str,
        meter: &str,
        quantity: Decimal,
        dimensions: Option<&BTreeMap<String, String>>,
        live: &entry::Live,
        counting: Counting,
    ) -> Result<Decimal, QuotaError> {
        let out_of_range = || QuotaError::OutOfRange { quantity };
        let rate = self
            .cache
            .cached_rates()
            .rate_for_dimensions(meter, dimensions)
            .unwrap_or_default();
        let cost = quantity.checked_mul(rate).ok_or_else(out_of_range)?;
        // Loaded with the customer whenever a meter uses credits; absent only if the plan
        // changed under the cached state, which the next load fixes: no balance until then.
        let Some(mut credits) = live.credits() else {
            return Err(QuotaError::InsufficientCredits {
                customer: customer.to_owned(),
                meter: meter.to_owned(),
                balance: Decimal::ZERO,
                required: cost,
            });
        };
        let left = credits
            .projected
            .checked_sub(credits.spent_locally)
            .ok_or_else(out_of_range)?;
        // Nothing to cover (a zero quantity, a free meter) is allowed even when overdrawn.
        if cost > left && !cost.is_zero() {
            return Err(QuotaError::InsufficientCredits {
                customer: customer.to_owned(),
                meter: meter.to_owned(),
                balance: left,
                required: cost,
            });
        }
        if counting == Counting::Count {
            credits.spent_locally += cost;
        }
        Ok(left - cost)
    }

    /// `Ok` when `feature` is enabled for the customer's plan (with overrides).
    pub async fn require_feature(&self, customer: &str, feature: &str) -> Result<(), QuotaError> {
        let cached = self.cached(customer).await;
        if cached.live(customer)?.entitlements.feature(feature) {
            Ok(())
        } else {
            Err(QuotaError::FeatureDisabled {
                customer: customer.to_owned(),
                feature: feature.to_owned(),
            })
        }
    }

    /// The customer's subscription and entitlements, as the checks see them.
    pub async fn entitlements(
        &self,
        customer: &str,
    ) -> Result<(Subscription, Entitlements), QuotaError> {
        let cached = self.cached(customer).await;
        let live = cached.live(customer)?;
        Ok((live.subscription.clone(), (*live.entitlements).clone()))
    }

    /// Drops a customer's cached state (after a subscription or override change): its next
    /// check loads it again, and a load that started before this never lands in its place.
    pub fn invalidate(&self, customer: &str) {
        self.cache.invalidate(customer);
    }

    /// The customer's cached state. An entry younger than `max_staleness` is answered from
    /// while one background task reloads it (once it is older than `refresh`), so a check
    /// waits for Postgres only on a customer's first use (or after eviction or invalidation),
    /// when its state is older than `max_staleness`, once a failed load's `failed_load_ttl`
    /// has passed, or when a billing period has ended; and then it shares one load with every
    /// other check of the customer (`single_flight.rs`).
    async fn cached(&self, customer: &str) -> Arc<Cached> {
        let now = Instant::now();
        let Some(cached) = self.cache.get(customer) else {
            self.lookups.miss.increment(1);
            return self.cache.load_for_check(customer, None).await;
        };
        self.cache.touch(&cached, now);
        let age = now.saturating_duration_since(cached.loaded);
        let options = &self.cache.options;
        // While the change feed keeps this entry current, it is reloaded when it changes, and
        // the timer is only a bound; otherwise the timer is all there is.
        let feed = &self.cache.feed;
        let (max_age, refresh, age) =
            if options.change_feed && feed.keeps_current(cached.loaded, now) {
                (options.feed_max_age, options.feed_max_age / 2, age)
            } else {
                // The timer's rules, with the age counted from when the feed last vouched for the
                // entry, and 3 s more allowed before a check must wait for a load: a feed that
                // falls silent then does not make every entry too old at once (a stampede of
                // loads on the pool the feed's heartbeat needs), while the refresher reloads the
                // customers being checked in the background.
                let vouched = options
                    .change_feed
                    .then(|| feed.current_as_of(cached.loaded))
                    .flatten();
                match vouched {
                    Some(as_of) => (
                        options.max_staleness + feed::SILENCE,
                        options.refresh,
                        now.saturating_duration_since(as_of),
                    ),
                    None => (options.max_staleness, options.refresh, age),
                }
            };
        let must_load = match &cached.state {
            CustomerState::Live(live) => {
                age >= max_age || live.reload_at.is_some_and(|at| Utc::now() >= at)
            }
            CustomerState::NoSubscription => age >= max_age,
            CustomerState::LoadFailed(_) => age >= options.failed_load_ttl,
            CustomerState::Invalidated => true,
        };
        if must_load {
            self.lookups.miss.increment(1);
            return self.cache.load_for_check(customer, Some(&cached)).await;
        }
        self.lookups.hit.increment(1);
        let failed = matches!(cached.state, CustomerState::LoadFailed(_));
        if age >= refresh && !failed {
            self.cache.queue_reload(customer, &cached);
        }
        cached
    }
}

impl Drop for Quota {
    fn drop(&mut self) {
        // The refresher holds only a weak reference: woken now, it finds the cache gone.
        self.stop.cancel();
        self.cache.wake.notify_one();
    }
}
