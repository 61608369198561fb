//! The fold side of a batch: the events whose ids Postgres let us claim are combined into one
//! [`WindowDelta`] per window, by the meter's aggregation, at minute or day granularity.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use tally_core::window::minute_start;
use tally_core::Aggregation;

use super::check::Candidate;

/// Window granularity: the minute windows, and the daily rollup quota checks read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Granularity {
    Minute,
    Day,
}

impl Granularity {
    fn start(self, t: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Granularity::Minute => minute_start(t),
            Granularity::Day => t
                .date_naive()
                .and_hms_opt(0, 0, 0)
                .map_or(t, |midnight| midnight.and_utc()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct WindowKey {
    pub(crate) customer: String,
    pub(crate) meter: String,
    pub(crate) start: DateTime<Utc>,
    pub(crate) group_key: String,
}

/// What one batch adds to one window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WindowDelta {
    pub(crate) key: WindowKey,
    pub(crate) aggregation: Aggregation,
    /// Sum, count or max of this batch's events. A sum is split into several exact partial
    /// sums in the (absurd) case it would not fit a 28-digit decimal; Postgres adds them.
    pub(crate) partials: Vec<Decimal>,
    pub(crate) events: i64,
    /// For `latest`: the event the value is from.
    pub(crate) latest: Option<LatestEvent>,
    /// For `unique_count`: distinct values seen; Postgres says which are new to the window.
    pub(crate) unique_values: BTreeSet<String>,
}

/// For `latest`: which event a window's value is from. A later event (by time, then id) replaces
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LatestEvent {
    /// The event's timestamp.
    pub(crate) at: DateTime<Utc>,
    /// The event's id.
    pub(crate) id: String,
}

impl WindowDelta {
    fn new(key: WindowKey, aggregation: Aggregation) -> Self {
        WindowDelta {
            key,
            aggregation,
            partials: Vec::new(),
            events: 0,
            latest: None,
            unique_values: BTreeSet::new(),
        }
    }

    fn add(&mut self, candidate: &Candidate) {
        let event = &candidate.event;
        self.events += 1;
        match self.aggregation {
            Aggregation::Sum => add_exact(&mut self.partials, event.quantity),
            Aggregation::Count => add_exact(&mut self.partials, Decimal::ONE),
            Aggregation::Max => match self.partials.first_mut() {
                Some(max) => *max = (*max).max(event.quantity),
                None => self.partials.push(event.quantity),
            },
            Aggregation::Latest => {
                let newer = self.latest.as_ref().is_none_or(|latest| {
                    (event.timestamp, event.id.as_str()) > (latest.at, latest.id.as_str())
                });
                if newer {
                    self.partials = vec![event.quantity];
                    self.latest = Some(LatestEvent {
                        at: event.timestamp,
                        id: event.id.clone(),
                    });
                }
            }
            Aggregation::UniqueCount => {
                if let Some(value) = &candidate.unique_value {
                    self.unique_values.insert(value.clone());
                }
            }
        }
    }

    /// The first (usually only) partial value.
    #[cfg(test)]
    pub(crate) fn value(&self) -> Decimal {
        self.partials.first().copied().unwrap_or(Decimal::ZERO)
    }
}

/// Adds `x` to the last partial sum if the result is exact, else starts a new partial.
fn add_exact(partials: &mut Vec<Decimal>, x: Decimal) {
    if let Some(last) = partials.last_mut() {
        if let Some(sum) = last.checked_add(x) {
            // rust_decimal rounds rather than fail when a sum outgrows 28 digits at its
            // scale; subtracting back detects that.
            if sum.checked_sub(*last) == Some(x) {
                *last = sum;
                return;
            }
        }
    }
    partials.push(x);
}

/// Folds the claimed candidates into window deltas, sorted by key (a stable lock order, so two
/// aggregators touching the same windows during a rebalance cannot deadlock).
pub(crate) fn fold<'a>(
    claimed: impl IntoIterator<Item = &'a Candidate>,
    granularity: Granularity,
) -> Vec<WindowDelta> {
    // Keyed by borrowed strings: the owned key is built once per window, not per event.
    let mut windows: HashMap<(&str, &str, DateTime<Utc>, &str), WindowDelta> = HashMap::new();
    for candidate in claimed {
        let event = &candidate.event;
        let start = granularity.start(event.timestamp);
        let key = (
            event.customer.as_str(),
            event.meter.as_str(),
            start,
            candidate.group_key.as_str(),
        );
        windows
            .entry(key)
            .or_insert_with(|| {
                let key = WindowKey {
                    customer: event.customer.clone(),
                    meter: event.meter.clone(),
                    start,
                    group_key: candidate.group_key.clone(),
                };
                WindowDelta::new(key, candidate.aggregation)
            })
            .add(candidate);
    }
    let mut deltas: Vec<WindowDelta> = windows.into_values().collect();
    deltas.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    deltas
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::fixtures::{at, event, push};
    use crate::batch::Batch;
    use proptest::prelude::*;
    use std::str::FromStr;
    use tally_core::UsageEvent;

    fn deltas(events: &[UsageEvent], granularity: Granularity) -> Vec<WindowDelta> {
        let mut batch = Batch::default();
        for (i, e) in events.iter().enumerate() {
            push(&mut batch, i as i64, e);
        }
        assert!(batch.rejects.is_empty(), "{:?}", batch.rejects);
        fold(&batch.candidates, granularity)
    }

    #[test]
    fn each_aggregation_folds_by_its_rule() {
        let events = [
            event("1", "tokens", "1.5", "2026-11-22T12:00:01Z").with_dimension("model", "s"),
            event("2", "tokens", "2.25", "2026-11-22T12:00:59Z").with_dimension("model", "s"),
            event("3", "tokens", "7", "2026-11-22T12:00:10Z").with_dimension("model", "l"),
            event("4", "api_calls", "99", "2026-11-22T11:59:59Z"),
            event("5", "api_calls", "99", "2026-11-22T11:59:00Z"),
            event("6", "peak", "3", "2026-11-22T12:00:00Z"),
            event("7", "peak", "9", "2026-11-22T12:00:01Z"),
            event("8", "peak", "4", "2026-11-22T12:00:02Z"),
            event("b", "seats", "10", "2026-11-22T12:00:20Z"),
            event("a", "seats", "11", "2026-11-22T12:00:20Z"),
            event("c", "seats", "12", "2026-11-22T12:00:05Z"),
            event("u1", "users", "1", "2026-11-22T12:00:00Z").with_dimension("user", "x"),
            event("u2", "users", "1", "2026-11-22T12:00:01Z").with_dimension("user", "x"),
            event("u3", "users", "1", "2026-11-22T12:00:02Z").with_dimension("user", "y"),
        ];
        let found: Vec<(String, String, String, Decimal, i64)> =
            deltas(&events, Granularity::Minute)
                .into_iter()
                .map(|d| {
                    let value = if d.aggregation == Aggregation::UniqueCount {
                        Decimal::from(d.unique_values.len())
                    } else {
                        d.value()
                    };
                    (
                        d.key.meter,
                        d.key.start.format("%H:%M").to_string(),
                        d.key.group_key,
                        value,
                        d.events,
                    )
                })
                .collect();
        let d = |s: &str| Decimal::from_str(s).unwrap();
        let expected = vec![
            ("api_calls".into(), "11:59".into(), "".into(), d("2"), 2),
            ("peak".into(), "12:00".into(), "".into(), d("9"), 3),
            // Latest by event time; on a tie, the larger id wins (deterministic on replay).
            ("seats".into(), "12:00".into(), "".into(), d("10"), 3),
            (
                "tokens".into(),
                "12:00".into(),
                r#"{"model":"l"}"#.into(),
                d("7"),
                1,
            ),
            (
                "tokens".into(),
                "12:00".into(),
                r#"{"model":"s"}"#.into(),
                d("3.75"),
                2,
            ),
            ("users".into(), "12:00".into(), "".into(), d("2"), 3),
        ];
        assert_eq!(found, expected);
    }

    #[test]
    fn daily_granularity_rolls_minutes_into_the_utc_day() {
        let events = [
            event("1", "tokens", "1", "2026-11-22T00:00:00Z"),
            event("2", "tokens", "2", "2026-11-22T11:59:00Z"),
            event("3", "tokens", "4", "2026-11-21T23:59:59Z"),
        ];
        let daily = deltas(&events, Granularity::Day);
        assert_eq!(daily.len(), 2);
        assert_eq!(daily[1].key.start, at("2026-11-22T00:00:00Z"));
        assert_eq!(daily[1].value(), Decimal::from(3));
    }

    #[test]
    fn sums_too_large_for_one_decimal_split_into_exact_partials() {
        let mut partials = Vec::new();
        let big = Decimal::from_str("50000000000000000000000000000").unwrap();
        add_exact(&mut partials, big);
        add_exact(&mut partials, big);
        add_exact(&mut partials, Decimal::from_str("0.000001").unwrap());
        assert_eq!(partials.len(), 3);
    }

    proptest! {
        /// However events are split into batches, the folded sums add up to the same total.
        #[test]
        fn fold_is_split_invariant(quantities in proptest::collection::vec(0u64..1_000_000_000, 1..60), split in 0usize..60) {
            let events: Vec<UsageEvent> = quantities
                .iter()
                .enumerate()
                .map(|(i, q)| event(&i.to_string(), "tokens", &format!("{q}.{}", i % 100), "2026-11-22T12:00:00Z"))
                .collect();
            let split = split.min(events.len());
            let total = |es: &[UsageEvent]| -> Decimal {
                if es.is_empty() { return Decimal::ZERO; }
                deltas(es, Granularity::Minute).iter().flat_map(|d| d.partials.clone()).sum()
            };
            let whole = total(&events);
            prop_assert_eq!(whole, total(&events[..split]) + total(&events[split..]));
            let expected: Decimal = events.iter().map(|e| e.quantity).sum();
            prop_assert_eq!(whole, expected);
        }
    }
}
