//! For tests and benchmarks (the `testing` feature): what the cache did, and ways to put it in
//! a state that is slow to reach for real (a period that ends, a million cached customers).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use rust_decimal::Decimal;

use super::entry::{Cached, CustomerState, Live, MeterUsage};
use super::usage::period_bounds;
use super::Quota;
use crate::testing::CacheCounts;
use tally_billing::plan::Entitlements;
use tally_billing::store::Subscription;

impl Quota {
    /// What the cache holds and did so far.
    pub fn cache_counts(&self) -> CacheCounts {
        let counters = &self.cache.counters;
        CacheCounts {
            cached: self.cache.customers.len(),
            waited_loads: counters.waited_loads.load(Ordering::Relaxed),
            background_loads: counters.background_loads.load(Ordering::Relaxed),
            evicted: counters.evicted.load(Ordering::Relaxed),
            peak_running_loads: counters.peak_running_loads.load(Ordering::Relaxed),
        }
    }

    /// Whether the change feed listens and was heard from lately: a customer loaded now would
    /// be kept current by it.
    pub fn change_feed_listening(&self) -> bool {
        let now = Instant::now();
        self.cache.feed.keeps_current(now, now)
    }

    /// Makes every cached limit's period end now, as at midnight: the next check of each
    /// customer finds its period over.
    pub fn end_periods_now(&self) {
        let now = Utc::now();
        self.cache.customers.for_each(|_, cached| {
            if let CustomerState::Live(live) = &cached.state {
                for usage in live.meters.iter() {
                    usage.lock().resets_at = now;
                }
            }
        });
    }

    /// Caches a customer without an override as a load would, with no usage yet, without
    /// asking Postgres.
    pub fn insert_loaded(&self, subscription: Subscription, entitlements: Entitlements) {
        let now = Utc::now();
        let meters = entitlements
            .limits
            .iter()
            .map(|(meter, limit)| {
                let resets_at = period_bounds(limit.period, &subscription, now).resets_at;
                MeterUsage::new(meter.clone(), Decimal::ZERO, resets_at)
            })
            .collect();
        let customer = subscription.customer_id.clone();
        let entitlements = self.cache.share(entitlements, false);
        let live = Live::new(subscription, entitlements, meters, now);
        let loaded = Instant::now();
        let cached = Cached::new(CustomerState::Live(live), loaded, self.cache.tick(loaded));
        self.cache.insert(&customer, Arc::new(cached));
    }
}
