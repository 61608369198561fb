//! The quota check services call in their request path: the [`Quota`] handle.
//!
//! A customer's subscription, entitlements and current-period usage are loaded once and kept
//! in a local cache, reloaded in the background every `refresh` (`serve.refresh`, 250 ms by
//! default) while checks go on answering from the cached state. One refresher task reloads
//! every customer that became stale in a batch of two queries, so a thousand active customers
//! cost a few queries per refresh, not a thousand. A check on a cached customer is a map lookup
//! and a few decimal operations. Usage this process allowed since the last refresh is added
//! locally, so a burst through one process cannot overshoot a hard limit by more than what it
//! allowed that the aggregator has not yet committed when the cache refreshes: about one
//! refresh interval plus the aggregator's lag (under 2 s at the defaults) worth of usage.
//! Several processes each add only their own; their combined overshoot is bounded the same way,
//! per process.
//!
//! Period usage comes from `usage_daily`, which the aggregator updates in the same transaction as
//! the minute windows: a check never reads minute windows. Billing periods are counted by whole
//! UTC days, from the day the period starts.
//!
//! The parts are in `check/`; the crate doc (`lib.rs`) says what each file holds.

mod cache;
mod decision;
mod error;
mod load;
mod refresher;
mod usage;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rust_decimal::Decimal;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::plan::Entitlements;
use crate::store::Subscription;
use cache::{CacheState, Cached};
pub use decision::{decide, Decision};
pub use error::QuotaError;

/// Quota checks with a local cache. Cheap to share (`Arc`).
pub struct Quota {
    cache: Arc<CacheState>,
    refresh: Duration,
    /// Ends the supervised refresher when the `Quota` is dropped.
    stop: CancellationToken,
}

impl Quota {
    /// Starts the background refresher. Touches no database: meters, entitlements and usage
    /// are loaded on first use, so a server can start while Postgres is away.
    pub async fn new(pool: PgPool, refresh: Duration) -> Result<Quota, QuotaError> {
        let cache = Arc::new(CacheState::new(pool));
        let stop = CancellationToken::new();
        refresher::start(&cache, stop.clone());
        Ok(Quota {
            cache,
            refresh,
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
        self.cache.aggregation(meter).await?;
        let cached = self.cached(customer).await?;
        let live = cached
            .live
            .as_ref()
            .ok_or_else(|| QuotaError::NoActiveSubscription(customer.to_owned()))?;
        let (Some(limit), Some(usage)) =
            (live.entitlements.limits.get(meter), live.meters.get(meter))
        else {
            return Ok(Decision::Allow {
                used: Decimal::ZERO,
                limit: None,
                remaining: None,
                resets_at: None,
            });
        };
        let out_of_range = || QuotaError::OutOfRange { quantity };
        let mut allowed = usage
            .allowed_locally
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let used = usage
            .committed
            .checked_add(*allowed)
            .ok_or_else(out_of_range)?;
        let decision = decide(limit, used, quantity, usage.resets_at).ok_or_else(out_of_range)?;
        if !matches!(decision, Decision::Deny { .. }) {
            *allowed = allowed.checked_add(quantity).ok_or_else(out_of_range)?;
        }
        Ok(decision)
    }

    /// `Ok` when `feature` is enabled for the customer's plan (with overrides).
    pub async fn require_feature(&self, customer: &str, feature: &str) -> Result<(), QuotaError> {
        let cached = self.cached(customer).await?;
        let live = cached
            .live
            .as_ref()
            .ok_or_else(|| QuotaError::NoActiveSubscription(customer.to_owned()))?;
        if live.entitlements.feature(feature) {
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
        let cached = self.cached(customer).await?;
        let live = cached
            .live
            .as_ref()
            .ok_or_else(|| QuotaError::NoActiveSubscription(customer.to_owned()))?;
        Ok((live.subscription.clone(), live.entitlements.clone()))
    }

    /// Drops a customer's cached state (after a subscription or override change).
    pub fn invalidate(&self, customer: &str) {
        self.cache.remove(customer);
    }

    /// The customer's cached state. A stale entry is still answered from while one background
    /// task reloads it, so a check waits for Postgres only on a customer's first use or when a
    /// period has ended (the usage must then be reloaded before answering).
    async fn cached(&self, customer: &str) -> Result<Arc<Cached>, QuotaError> {
        if let Some(cached) = self.cache.get(customer) {
            let period_ended = cached
                .live
                .as_ref()
                .is_some_and(|live| live.period_ended(Utc::now()));
            if !period_ended {
                let stale = cached.loaded.elapsed() >= self.refresh;
                if stale && !cached.reloading.swap(true, Ordering::AcqRel) {
                    self.cache.queue_reload(customer);
                }
                return Ok(cached);
            }
        }
        let loaded = self
            .cache
            .load(vec![customer.to_owned()])
            .await?
            .pop()
            .expect("one result per customer");
        let loaded = Arc::new(loaded.cached?);
        self.cache.insert(customer, loaded.clone());
        Ok(loaded)
    }
}

impl Drop for Quota {
    fn drop(&mut self) {
        // The refresher holds only a weak reference: woken now, it finds the cache gone.
        self.stop.cancel();
        self.cache.wake.notify_one();
    }
}
