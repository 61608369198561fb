//! The cached customers: a map that never holds more than `max_customers` entries. It is
//! split into shards (up to 64), each a `RwLock<HashMap>` holding its share of the bound, so
//! that a check takes a read lock on one shard only, and making room pauses one shard only.
//!
//! When a customer new to a full shard comes in, the shard evicts a batch of entries
//! ([`evict`]): those without a live subscription first, then the least recently used. That
//! takes one pass over the shard (about 15,600 entries at 1,000,000 customers), once per
//! batch of inserts, so its cost per insert stays small, and checks never write a shared
//! structure: a check only stores its second into its entry's `last_used`.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::entry::Cached;

/// Shards hold at least this many customers each (a small cache is one shard, so that its
/// eviction order is the same for every customer).
const MIN_PER_SHARD: usize = 4096;
const MAX_SHARDS: usize = 64;
/// A full shard evicts this fraction of its entries at once (1/32: about 3%).
const EVICT_DIVISOR: usize = 32;

type Shard = RwLock<HashMap<String, Arc<Cached>>>;

pub(super) struct Customers {
    /// A power of two of them.
    shards: Box<[Shard]>,
    /// Picks a customer's shard. Keyed at random per process, so that nobody can aim a
    /// flood of made-up ids at one shard and push its customers out.
    hasher: RandomState,
    /// Most entries in one shard: all shards together hold at most `max_customers`.
    per_shard: usize,
}

impl Customers {
    pub(super) fn new(max_customers: usize) -> Customers {
        let max_customers = max_customers.max(1);
        let mut shards = 1;
        while shards < MAX_SHARDS && max_customers / (shards * 2) >= MIN_PER_SHARD {
            shards *= 2;
        }
        Customers {
            shards: (0..shards).map(|_| Shard::default()).collect(),
            hasher: RandomState::new(),
            per_shard: max_customers / shards,
        }
    }

    fn shard(&self, customer: &str) -> &Shard {
        let hash = self.hasher.hash_one(customer) as usize;
        &self.shards[hash & (self.shards.len() - 1)]
    }

    pub(super) fn get(&self, customer: &str) -> Option<Arc<Cached>> {
        read(self.shard(customer)).get(customer).cloned()
    }

    /// Inserts or replaces the customer's entry, unless the entry there is newer (a load that
    /// started before an invalidation, or before a later load landed, never replaces it). A
    /// customer new to a full shard first evicts a batch of others; returns how many.
    pub(super) fn insert(&self, customer: &str, cached: Arc<Cached>) -> usize {
        let mut shard = write(self.shard(customer));
        if shard
            .get(customer)
            .is_some_and(|current| current.loaded > cached.loaded)
        {
            return 0;
        }
        let mut evicted = 0;
        if shard.len() >= self.per_shard && !shard.contains_key(customer) {
            evicted = evict(&mut shard, (self.per_shard / EVICT_DIVISOR).max(1));
        }
        shard.insert(customer.to_owned(), cached);
        evicted
    }

    /// Replaces the customer's entry if it is still cached (and not newer): the refresher's
    /// insert. A customer evicted while its reload ran stays out, since a change notified
    /// meanwhile was passed by (the feed ignores customers not cached). Whether it replaced.
    pub(super) fn replace(&self, customer: &str, cached: Arc<Cached>) -> bool {
        let mut shard = write(self.shard(customer));
        match shard.get_mut(customer) {
            Some(current) if current.loaded <= cached.loaded => {
                *current = cached;
                true
            }
            _ => false,
        }
    }

    /// How many customers are cached.
    pub(super) fn len(&self) -> usize {
        self.shards.iter().map(|shard| read(shard).len()).sum()
    }

    /// Visits every entry, one shard (read-locked) at a time.
    pub(super) fn for_each(&self, mut visit: impl FnMut(&str, &Arc<Cached>)) {
        for shard in self.shards.iter() {
            for (customer, cached) in read(shard).iter() {
                visit(customer, cached);
            }
        }
    }
}

/// Removes the `count` entries that rank lowest ([`Cached::eviction_rank`]: no live
/// subscription first, then least recently used). One pass and a selection, no sort.
fn evict(shard: &mut HashMap<String, Arc<Cached>>, count: usize) -> usize {
    let mut ranked: Vec<(u64, &String)> = shard
        .iter()
        .map(|(customer, cached)| (cached.eviction_rank(), customer))
        .collect();
    let count = count.min(ranked.len());
    if count == 0 {
        return 0;
    }
    ranked.select_nth_unstable_by_key(count - 1, |(rank, _)| *rank);
    let victims: Vec<String> = ranked[..count]
        .iter()
        .map(|(_, customer)| (*customer).clone())
        .collect();
    for customer in &victims {
        shard.remove(customer);
    }
    count
}

// A poisoned shard is still a consistent map (no code panics halfway through changing it).
fn read(shard: &Shard) -> RwLockReadGuard<'_, HashMap<String, Arc<Cached>>> {
    shard.read().unwrap_or_else(PoisonError::into_inner)
}

fn write(shard: &Shard) -> RwLockWriteGuard<'_, HashMap<String, Arc<Cached>>> {
    shard.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Instant;

    use super::*;
    use crate::check::entry::{CustomerState, Live};
    use tally_billing::plan::Entitlements;
    use tally_billing::store::Subscription;

    fn live() -> CustomerState {
        let subscription = Subscription {
            customer_id: "c".into(),
            plan: "P".into(),
            status: "active".into(),
            current_period_start: chrono::Utc::now(),
            current_period_end: chrono::Utc::now(),
            cancel_at_period_end: false,
        };
        let entitlements = Entitlements {
            plan: "P".into(),
            features: Default::default(),
            limits: Default::default(),
        };
        CustomerState::Live(Live::new(
            subscription,
            Arc::new(entitlements),
            Box::new([]),
            chrono::Utc::now(),
        ))
    }

    fn entry(state: CustomerState, last_used: u32) -> Arc<Cached> {
        Arc::new(Cached::new(state, Instant::now(), last_used))
    }

    #[test]
    fn shards_split_the_bound_and_never_exceed_it() {
        for (max, shards) in [(1, 1), (1000, 1), (8191, 1), (8192, 2), (1_000_000, 64)] {
            let customers = Customers::new(max);
            assert_eq!(customers.shards.len(), shards, "max {max}");
            assert!(customers.per_shard * shards <= max && customers.per_shard >= 1);
        }
        let customers = Customers::new(100);
        for i in 0..1000 {
            customers.insert(&format!("u{i}"), entry(CustomerState::NoSubscription, 0));
            assert!(customers.len() <= 100);
        }
    }

    #[test]
    fn evicts_without_subscription_first_then_least_recently_used() {
        let customers = Customers::new(64);
        for i in 0..32 {
            // Live ones used at seconds 100..132, older ones first.
            customers.insert(&format!("live{i}"), entry(live(), 100 + i));
        }
        for i in 0..32 {
            // Made-up ids, used later than any live one.
            customers.insert(
                &format!("unknown{i}"),
                entry(CustomerState::NoSubscription, 500),
            );
        }
        assert_eq!(customers.len(), 64);
        // Full: the next newcomer evicts 64 / 32 = 2 entries, both without a subscription.
        customers.insert("new", entry(live(), 600));
        assert_eq!(customers.len(), 63);
        assert_eq!(
            (0..32)
                .filter(|i| customers.get(&format!("live{i}")).is_some())
                .count(),
            32
        );
        // Only live ones left (the unknown ones replaced by live newcomers): the least
        // recently used go.
        for i in 0..40 {
            customers.insert(&format!("more{i}"), entry(live(), 700));
        }
        assert!(customers.get("live0").is_none() && customers.get("live1").is_none());
        assert!(customers.get("live31").is_some() && customers.get("new").is_some());
        let touched = customers.get("live31").unwrap();
        touched.last_used.store(800, Ordering::Relaxed);
        assert!(touched.eviction_rank() > entry(live(), 799).eviction_rank());
        assert!(
            entry(CustomerState::NoSubscription, u32::MAX).eviction_rank()
                < entry(live(), 0).eviction_rank()
        );
    }
}
