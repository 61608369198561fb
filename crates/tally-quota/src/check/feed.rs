//! The change feed: Postgres tells the cache which customers changed, so a check sees a
//! committed batch within milliseconds and a customer nobody changes costs no reload.
//!
//! Every write that changes what a check answers notifies the channel `tally_changes` in its
//! own transaction (migration 0019: triggers on `customer_changes`, which the aggregator's
//! batches, burns, grants and voids write; on `subscriptions`, `customer_overrides` and
//! `plans`). Postgres delivers a notification only after its transaction committed, so a reload
//! that starts after the notification arrived reads the change.
//!
//! One supervised task listens (`listener.rs`). It also sends itself a heartbeat every second: the feed is
//! *trusted* only while something (a change or a heartbeat) arrived within [`SILENCE`], and only
//! for entries loaded since the current connection began listening (notifications sent while
//! no connection listened are lost; on every new connection all cached customers are reloaded).
//! While the feed is trusted a cached entry is reloaded when a notification names it, and at
//! the latest after `feed_max_age` (a bound, should a writer ever change a customer without
//! notifying); while it is not, the cache falls back to reloading on a timer (`refresh`) and
//! never deciding on state older than `max_staleness`, as without a feed.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The channel the writers notify (migration 0019).
pub(super) const CHANNEL: &str = "tally_changes";
/// How often the listener sends itself a heartbeat through the pool.
pub(super) const HEARTBEAT: Duration = Duration::from_secs(1);
/// The feed is trusted while something arrived this recently: three heartbeats.
pub(super) const SILENCE: Duration = Duration::from_secs(3);
/// A value of `listening_since` that means "no connection is listening".
const NOT_LISTENING: u64 = u64::MAX;

/// What the listener knows, shared with the checks and the refresher.
pub(super) struct Feed {
    epoch: Instant,
    /// When something last arrived, in microseconds since `epoch` (0: never).
    heard: AtomicU64,
    /// When the current connection began listening, in microseconds since `epoch`.
    listening_since: AtomicU64,
    /// The connection before: when it began listening and when it was last heard. Entries
    /// it kept current were current as of then.
    previous_since: AtomicU64,
    previous_heard: AtomicU64,
    /// Counts the change notifications: a load that saw it move while it ran may have read a
    /// customer's state from before a change it was not yet cached to be told of.
    pub(super) notifications: AtomicU64,
    /// Customers a notification named, for the refresher's next batch. A set: a customer named
    /// by many batches while a reload runs is reloaded once more, not once per batch.
    changed: Mutex<HashSet<String>>,
}

impl Feed {
    pub(super) fn new() -> Feed {
        Feed {
            epoch: Instant::now(),
            heard: AtomicU64::new(0),
            listening_since: AtomicU64::new(NOT_LISTENING),
            previous_since: AtomicU64::new(NOT_LISTENING),
            previous_heard: AtomicU64::new(0),
            notifications: AtomicU64::new(0),
            changed: Mutex::default(),
        }
    }

    fn micros(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX)
    }

    /// Whether an entry loaded at `loaded` is kept current by the feed at `now`: something
    /// arrived within [`SILENCE`], and the entry was loaded while the current connection
    /// listened.
    pub(super) fn keeps_current(&self, loaded: Instant, now: Instant) -> bool {
        let heard = self.heard.load(Ordering::Acquire);
        let since = self.listening_since.load(Ordering::Acquire);
        since != NOT_LISTENING
            && heard != 0
            && self.micros(now).saturating_sub(heard) <= SILENCE.as_micros() as u64
            && self.micros(loaded) >= since
    }

    /// Until when an entry loaded at `loaded` was kept current by the feed: the last time a
    /// connection that listened since before the load was heard from. `None` if no such
    /// connection. Without it the timer rules would count an entry's age from its load, and a
    /// feed falling silent would make every entry too old to decide on at once.
    pub(super) fn current_as_of(&self, loaded: Instant) -> Option<Instant> {
        let loaded_at = self.micros(loaded);
        let windows = [
            (&self.listening_since, &self.heard),
            (&self.previous_since, &self.previous_heard),
        ];
        windows.into_iter().find_map(|(since, heard)| {
            let since = since.load(Ordering::Acquire);
            let heard = heard.load(Ordering::Acquire);
            (since != NOT_LISTENING && loaded_at >= since && heard > loaded_at)
                .then(|| self.epoch + Duration::from_micros(heard))
        })
    }

    /// The count of change notifications so far (see [`Feed::notifications`]).
    pub(super) fn notifications(&self) -> u64 {
        self.notifications.load(Ordering::Acquire)
    }

    /// Queues a customer for the refresher's next batch, whatever its entry says.
    pub(super) fn mark_changed(&self, customer: &str) {
        self.changed_set().insert(customer.to_owned());
    }

    /// Puts back customers whose reload failed, so the refresher tries them again and checks
    /// do not trust their entries meanwhile.
    pub(super) fn changed_again(&self, customers: &[String]) {
        self.changed_set().extend(customers.iter().cloned());
    }

    /// Takes up to `most` of the customers notifications named.
    pub(super) fn take_changed(&self, most: usize) -> Vec<String> {
        let mut changed = self.changed_set();
        let taken: Vec<String> = changed.iter().take(most).cloned().collect();
        for customer in &taken {
            changed.remove(customer);
        }
        taken
    }

    pub(super) fn any_changed(&self) -> bool {
        !self.changed_set().is_empty()
    }

    fn changed_set(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.changed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn heard_now(&self) {
        self.heard
            .store(self.micros(Instant::now()).max(1), Ordering::Release);
    }

    pub(super) fn listening(&self, since: Option<Instant>) {
        let before = self.listening_since.load(Ordering::Acquire);
        if before != NOT_LISTENING {
            self.previous_heard
                .store(self.heard.load(Ordering::Acquire), Ordering::Release);
            self.previous_since.store(before, Ordering::Release);
        }
        let since = since.map_or(NOT_LISTENING, |at| self.micros(at));
        self.listening_since.store(since, Ordering::Release);
    }
}

/// What one notification says.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Notice<'a> {
    Customers(Vec<&'a str>),
    Everyone,
    Heartbeat,
    /// A payload this version does not know (a newer writer): treated as "everyone", the
    /// safe reading.
    Unknown,
}

pub(super) fn parse(payload: &str) -> Notice<'_> {
    let mut lines = payload.split('\n');
    match lines.next() {
        Some("") if payload.is_empty() => Notice::Heartbeat,
        Some("customers") => Notice::Customers(lines.filter(|c| !c.is_empty()).collect()),
        Some("everyone") => Notice::Everyone,
        _ => Notice::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_read_as_written_by_migration_0019() {
        assert_eq!(parse(""), Notice::Heartbeat);
        assert_eq!(parse("everyone"), Notice::Everyone);
        assert_eq!(
            parse("customers\nacme\neveryone\n*"),
            Notice::Customers(vec!["acme", "everyone", "*"])
        );
        assert_eq!(parse("customers"), Notice::Customers(vec![]));
        assert_eq!(parse("something new"), Notice::Unknown);
    }

    #[test]
    fn the_feed_keeps_current_only_what_was_loaded_while_it_listens_and_speaks() {
        let feed = Feed::new();
        let before = Instant::now();
        assert!(!feed.keeps_current(before, before), "never listened");
        std::thread::sleep(Duration::from_millis(2));
        feed.listening(Some(Instant::now()));
        feed.heard_now();
        let now = Instant::now();
        assert!(feed.keeps_current(now, now));
        assert!(
            !feed.keeps_current(before, now),
            "loaded before it listened"
        );
        assert!(
            !feed.keeps_current(now, now + SILENCE + Duration::from_millis(10)),
            "silent too long"
        );
        feed.listening(None);
        assert!(!feed.keeps_current(now, now));
    }
}
