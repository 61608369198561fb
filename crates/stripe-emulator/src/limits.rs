//! Stripe's request limits: calls per second per account, and one call at a time per customer
//! and meter.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Admits at most `rate` calls in any one-second window per API key (a sliding log, so the
/// limit is exact and a client that bursts past it sees 429s).
#[derive(Default)]
pub(crate) struct RateWindow {
    per_key: HashMap<String, VecDeque<Instant>>,
}

impl RateWindow {
    pub(crate) fn admit(&mut self, key: &str, rate: u32, now: Instant) -> bool {
        self.admit_many(key, 1, rate, now)
    }

    /// Admits `count` units at once (a stream request's events), or none of them.
    pub(crate) fn admit_many(&mut self, key: &str, count: usize, rate: u32, now: Instant) -> bool {
        let log = self.per_key.entry(key.to_owned()).or_default();
        while log
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            log.pop_front();
        }
        if log.len() + count > rate as usize {
            return false;
        }
        log.extend(std::iter::repeat_n(now, count));
        true
    }
}

/// The (customer, event name) pairs with a call in progress.
#[derive(Clone, Default)]
pub(crate) struct PairLocks {
    held: Arc<Mutex<HashSet<(String, String)>>>,
}

/// Releases its pair when dropped, including when the client goes away mid-call.
pub(crate) struct PairGuard {
    locks: PairLocks,
    pair: (String, String),
}

impl PairLocks {
    pub(crate) fn try_lock(&self, customer: &str, event_name: &str) -> Option<PairGuard> {
        let pair = (customer.to_owned(), event_name.to_owned());
        let mut held = self.held.lock().expect("pair lock poisoned");
        if !held.insert(pair.clone()) {
            return None;
        }
        Some(PairGuard {
            locks: self.clone(),
            pair,
        })
    }
}

impl Drop for PairGuard {
    fn drop(&mut self) {
        if let Ok(mut held) = self.locks.held.lock() {
            held.remove(&self.pair);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_window_admits_exactly_rate_per_second() {
        let mut window = RateWindow::default();
        let start = Instant::now();
        let admitted = (0..30)
            .filter(|_| window.admit("sk_test_a", 25, start))
            .count();
        assert_eq!(admitted, 25);
        assert!(window.admit("sk_test_b", 25, start), "keys are separate");
        assert!(!window.admit("sk_test_a", 25, start + Duration::from_millis(999)));
        assert!(window.admit("sk_test_a", 25, start + Duration::from_secs(1)));
    }

    #[test]
    fn pair_lock_is_released_on_drop() {
        let locks = PairLocks::default();
        let guard = locks.try_lock("cus_1", "api_calls").unwrap();
        assert!(locks.try_lock("cus_1", "api_calls").is_none());
        assert!(locks.try_lock("cus_1", "tokens").is_some());
        drop(guard);
        assert!(locks.try_lock("cus_1", "api_calls").is_some());
    }
}
