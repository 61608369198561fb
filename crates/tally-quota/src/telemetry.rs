//! The quota check's metrics and their Prometheus names.

use metrics::Counter;

/// Checks answered from the cache (`result="hit"`) or that waited for Postgres (`"miss"`: a
/// customer's first check, after eviction, or a billing period's end).
pub const CACHE_LOOKUPS: &str = "tally_quota_cache_lookups_total";

/// Customers in the cache (bounded by `serve.max_cached_customers`), after each refresh batch.
pub const CACHED_CUSTOMERS: &str = "tally_quota_cached_customers";

/// Loads of customers' state, by `kind`: `waited` (a check waited for it: a first check, state
/// older than `max_staleness`, an invalidation, a billing period's end; one per customer
/// however many checks shared it) or `background` (a refresher batch).
pub const CACHE_LOADS: &str = "tally_quota_cache_loads_total";

/// Customers evicted to stay within `serve.max_cached_customers`.
pub const CACHE_EVICTIONS: &str = "tally_quota_cache_evictions_total";

/// Customers whose state could not be loaded for their own reasons (an override that no
/// longer fits the plan, usage beyond a decimal): their checks answer the error.
pub const CACHE_CUSTOMER_FAILURES: &str = "tally_quota_cache_customer_failures_total";

/// Notifications the change feed delivered (migration 0019): each names customers whose
/// usage, credits, subscription or override changed, or says a plan changed.
pub const CHANGE_NOTIFICATIONS: &str = "tally_quota_change_notifications_total";

pub(crate) fn change_notification() {
    metrics::counter!(CHANGE_NOTIFICATIONS).increment(1);
}

pub(crate) fn cached_customers(count: usize) {
    metrics::gauge!(CACHED_CUSTOMERS).set(count as f64);
}

pub(crate) fn load(kind: &'static str) {
    metrics::counter!(CACHE_LOADS, "kind" => kind).increment(1);
}

pub(crate) fn evicted(count: usize) {
    metrics::counter!(CACHE_EVICTIONS).increment(count as u64);
}

pub(crate) fn customer_failure() {
    metrics::counter!(CACHE_CUSTOMER_FAILURES).increment(1);
}

/// The counters a check increments, registered once: a check pays one atomic add, not a
/// registry lookup.
pub(crate) struct Lookups {
    pub(crate) hit: Counter,
    pub(crate) miss: Counter,
}

impl Lookups {
    pub(crate) fn register() -> Lookups {
        metrics::describe_gauge!(CACHED_CUSTOMERS, "Customers in the quota cache");
        for kind in ["waited", "background"] {
            metrics::counter!(CACHE_LOADS, "kind" => kind).increment(0);
        }
        metrics::counter!(CACHE_EVICTIONS).increment(0);
        metrics::counter!(CHANGE_NOTIFICATIONS).increment(0);
        metrics::counter!(CACHE_CUSTOMER_FAILURES).increment(0);
        metrics::describe_counter!(
            CACHE_LOOKUPS,
            "Quota checks answered from the cache (hit) or after a Postgres load (miss)"
        );
        Lookups {
            hit: metrics::counter!(CACHE_LOOKUPS, "result" => "hit"),
            miss: metrics::counter!(CACHE_LOOKUPS, "result" => "miss"),
        }
    }
}
