//! A batch, before and after Postgres has its say. [`Batch::push`] decodes and checks each
//! Kafka message (refusing bad ones with a reason) and drops same-payload copies within the
//! batch; [`fold`] then adds the events whose ids Postgres let us claim into window deltas.
//! No I/O here, so every rule is tested beside the code.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use chrono::{DateTime, TimeDelta, Utc};
use rust_decimal::Decimal;
use tally_core::window::minute_start;
use tally_core::{wire, Aggregation, MeterDefinition, Meters, RejectReason, Rejection, UsageEvent};

/// One Kafka message, as the batch needs it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Message<'a> {
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) key: Option<&'a [u8]>,
    pub(crate) payload: Option<&'a [u8]>,
    /// Kafka's message timestamp (append or create time), Unix milliseconds.
    pub(crate) timestamp_ms: Option<i64>,
}

/// A valid event whose id is not yet known to be new.
#[derive(Debug, Clone)]
pub(crate) struct Candidate {
    pub(crate) event: UsageEvent,
    pub(crate) aggregation: Aggregation,
    pub(crate) payload_hash: i64,
    pub(crate) group_key: String,
    /// For `unique_count`: the value of the counted dimension.
    pub(crate) unique_value: Option<String>,
    pub(crate) origin: Origin,
}

/// Where a message came from, kept for anything that may still be refused.
#[derive(Debug, Clone)]
pub(crate) struct Origin {
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) raw: Vec<u8>,
}

/// A refused message, bound for `rejected_events` and the DLQ topic.
#[derive(Debug, Clone)]
pub(crate) struct Reject {
    pub(crate) rejection: Rejection,
    pub(crate) event_id: Option<String>,
    pub(crate) customer: Option<String>,
    pub(crate) meter: Option<String>,
    pub(crate) origin: Origin,
}

impl Reject {
    pub(crate) fn of(candidate: &Candidate, rejection: Rejection) -> Self {
        Reject {
            rejection,
            event_id: Some(candidate.event.id.clone()),
            customer: Some(candidate.event.customer.clone()),
            meter: Some(candidate.event.meter.clone()),
            origin: candidate.origin.clone(),
        }
    }
}

/// What the batch checks events against.
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    pub(crate) meters: Meters,
    /// Events older than `now - lateness_horizon` are `too_late`.
    pub(crate) lateness_horizon: TimeDelta,
}

/// Messages consumed since the last commit, checked and deduplicated within the batch.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub(crate) candidates: Vec<Candidate>,
    pub(crate) rejects: Vec<Reject>,
    /// Copies of an id already in this batch with the same payload.
    pub(crate) duplicates: u64,
    /// Per partition, the offset after the last message consumed: what to store on commit.
    pub(crate) next_offsets: BTreeMap<i32, i64>,
    /// Kafka timestamps of the messages, for append-to-commit latency.
    pub(crate) timestamps_ms: Vec<i64>,
    pub(crate) consumed: u64,
    pub(crate) bytes: usize,
    pub(crate) opened: Option<Instant>,
    first_by_id: HashMap<String, usize>,
}

impl Batch {
    pub(crate) fn is_empty(&self) -> bool {
        self.consumed == 0
    }

    /// Adds one message: a candidate, a duplicate within the batch, or a reject.
    pub(crate) fn push(&mut self, message: Message<'_>, rules: &Rules, now: DateTime<Utc>) {
        self.opened.get_or_insert_with(Instant::now);
        self.consumed += 1;
        self.next_offsets
            .insert(message.partition, message.offset + 1);
        if let Some(ms) = message.timestamp_ms {
            self.timestamps_ms.push(ms);
        }
        let raw = message.payload.unwrap_or_default();
        self.bytes += raw.len();
        let origin = Origin {
            partition: message.partition,
            offset: message.offset,
            key: message.key.map(<[u8]>::to_vec),
            raw: raw.to_vec(),
        };
        let event = match message.payload {
            None => Err(Rejection::new(
                RejectReason::Malformed,
                "message has no payload",
            )),
            Some(payload) => wire::decode(payload, now),
        };
        let event = match event {
            Ok(event) => event,
            Err(rejection) => {
                self.rejects.push(Reject {
                    rejection,
                    event_id: None,
                    customer: None,
                    meter: None,
                    origin,
                });
                return;
            }
        };
        let candidate = match check(event, rules, now, origin) {
            Ok(candidate) => candidate,
            Err(reject) => {
                self.rejects.push(*reject);
                return;
            }
        };
        match self.first_by_id.get(&candidate.event.id) {
            None => {
                self.first_by_id
                    .insert(candidate.event.id.clone(), self.candidates.len());
                self.candidates.push(candidate);
            }
            Some(&first) if self.candidates[first].payload_hash == candidate.payload_hash => {
                self.duplicates += 1;
            }
            Some(_) => {
                let rejection = conflict(&candidate.event.id);
                self.rejects.push(Reject::of(&candidate, rejection));
            }
        }
    }
}

/// The rejection for a re-sent id whose payload differs from the counted one.
pub(crate) fn conflict(id: &str) -> Rejection {
    Rejection::new(
        RejectReason::ConflictingDuplicate,
        format!("id {id:?} was already counted with a different payload; this copy is not counted"),
    )
}

/// The aggregator's own rules, on top of the event contract `wire::decode` enforces.
fn check(
    event: UsageEvent,
    rules: &Rules,
    now: DateTime<Utc>,
    origin: Origin,
) -> Result<Candidate, Box<Reject>> {
    let refuse = |event: &UsageEvent, reason, detail: String| {
        Box::new(Reject {
            rejection: Rejection::new(reason, detail),
            event_id: Some(event.id.clone()),
            customer: Some(event.customer.clone()),
            meter: Some(event.meter.clone()),
            origin: origin.clone(),
        })
    };
    let Some(meter) = rules.meters.get(&event.meter) else {
        let detail = format!(
            "meter {:?} is not configured; add a [[meters]] entry for it and replay from rejected_events",
            event.meter
        );
        return Err(refuse(&event, RejectReason::UnknownMeter, detail));
    };
    if event.timestamp < now - rules.lateness_horizon {
        let detail = format!(
            "timestamp {} is older than the lateness horizon ({} days); its window is closed",
            event.timestamp.to_rfc3339(),
            rules.lateness_horizon.num_days()
        );
        return Err(refuse(&event, RejectReason::TooLate, detail));
    }
    let unique_value = match &meter.unique_dimension {
        None => None,
        Some(dimension) => match event.dimensions.get(dimension) {
            Some(value) => Some(value.clone()),
            None => {
                let detail = format!(
                    "meter {:?} counts distinct values of dimension {dimension:?}, which this event lacks",
                    meter.name
                );
                return Err(refuse(&event, RejectReason::InvalidDimensions, detail));
            }
        },
    };
    Ok(Candidate {
        aggregation: meter.aggregation,
        payload_hash: payload_hash(&event),
        group_key: group_key(meter, &event),
        unique_value,
        event,
        origin,
    })
}

/// `''` for a meter without `group_by`, else a JSON object of the group_by dimensions the event
/// carries (absent ones are left out), keys in `group_by` order: unambiguous and readable.
pub(crate) fn group_key(meter: &MeterDefinition, event: &UsageEvent) -> String {
    if meter.group_by.is_empty() {
        return String::new();
    }
    let mut key = String::from("{");
    for dimension in &meter.group_by {
        if let Some(value) = event.dimensions.get(dimension) {
            if key.len() > 1 {
                key.push(',');
            }
            // Serializing a &str cannot fail.
            key.push_str(&serde_json::to_string(dimension).unwrap_or_default());
            key.push(':');
            key.push_str(&serde_json::to_string(value).unwrap_or_default());
        }
    }
    key.push('}');
    key
}

/// A stable 64-bit hash of everything but the id, so a re-sent id can be told apart from a
/// conflicting one. Quantities are normalized (`1.0` and `1` are the same usage).
pub(crate) fn payload_hash(event: &UsageEvent) -> i64 {
    let mut canonical = Vec::with_capacity(128);
    let mut field = |bytes: &[u8]| {
        canonical.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        canonical.extend_from_slice(bytes);
    };
    field(event.customer.as_bytes());
    field(event.meter.as_bytes());
    field(event.quantity.normalize().to_string().as_bytes());
    field(
        &event
            .timestamp
            .timestamp_nanos_opt()
            .unwrap_or(i64::MIN)
            .to_le_bytes(),
    );
    field(event.source.as_deref().unwrap_or("\u{0}").as_bytes());
    for (key, value) in &event.dimensions {
        field(key.as_bytes());
        field(value.as_bytes());
    }
    xxhash_rust::xxh3::xxh3_64(&canonical) as i64
}

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
    /// For `latest`: the event time and id of the value.
    pub(crate) latest: Option<(DateTime<Utc>, String)>,
    /// For `unique_count`: distinct values seen; Postgres says which are new to the window.
    pub(crate) unique_values: BTreeSet<String>,
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
                let newer = self.latest.as_ref().is_none_or(|(at, id)| {
                    (event.timestamp, event.id.as_str()) > (*at, id.as_str())
                });
                if newer {
                    self.partials = vec![event.quantity];
                    self.latest = Some((event.timestamp, event.id.clone()));
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
    use proptest::prelude::*;
    use std::str::FromStr;

    fn meters() -> Meters {
        let toml = r#"
            [[meters]]
            name = "api_calls"
            aggregation = "count"
            [[meters]]
            name = "tokens"
            aggregation = "sum"
            group_by = ["model"]
            [[meters]]
            name = "seats"
            aggregation = "latest"
            [[meters]]
            name = "peak"
            aggregation = "max"
            [[meters]]
            name = "users"
            aggregation = "unique_count"
            unique_dimension = "user"
        "#;
        Meters::new(&tally_core::meter::meters_from_toml(toml).unwrap()).unwrap()
    }

    fn rules() -> Rules {
        Rules {
            meters: meters(),
            lateness_horizon: TimeDelta::days(35),
        }
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    fn now() -> DateTime<Utc> {
        at("2026-11-22T12:00:30Z")
    }

    fn event(id: &str, meter: &str, quantity: &str, t: &str) -> UsageEvent {
        UsageEvent::new("acme", meter, Decimal::from_str(quantity).unwrap())
            .with_id(id)
            .at(at(t))
    }

    fn push(batch: &mut Batch, offset: i64, event: &UsageEvent) {
        let bytes = wire::encode(event);
        let message = Message {
            partition: 0,
            offset,
            key: Some(event.customer.as_bytes()),
            payload: Some(&bytes),
            timestamp_ms: Some(0),
        };
        batch.push(message, &rules(), now());
    }

    fn reasons(batch: &Batch) -> Vec<RejectReason> {
        batch.rejects.iter().map(|r| r.rejection.reason).collect()
    }

    #[test]
    fn refuses_with_the_aggregators_reasons() {
        let mut batch = Batch::default();
        push(
            &mut batch,
            0,
            &event("a", "nope", "1", "2026-11-22T12:00:00Z"),
        );
        push(
            &mut batch,
            1,
            &event("b", "tokens", "1", "2026-10-01T12:00:00Z"),
        );
        push(
            &mut batch,
            2,
            &event("c", "users", "1", "2026-11-22T12:00:00Z"),
        );
        batch.push(
            Message {
                partition: 0,
                offset: 3,
                key: None,
                payload: Some(b"{not json"),
                timestamp_ms: None,
            },
            &rules(),
            now(),
        );
        push(
            &mut batch,
            4,
            &event("d", "tokens", "1", "2026-11-22T12:10:00Z"),
        );
        assert_eq!(
            reasons(&batch),
            [
                RejectReason::UnknownMeter,
                RejectReason::TooLate,
                RejectReason::InvalidDimensions,
                RejectReason::Malformed,
                RejectReason::FutureTimestamp,
            ]
        );
        assert!(batch.candidates.is_empty());
        assert_eq!(batch.consumed, 5);
        assert_eq!(batch.next_offsets[&0], 5);
        assert_eq!(batch.rejects[3].origin.raw, b"{not json");
    }

    #[test]
    fn same_payload_copies_are_duplicates_and_other_payloads_conflict() {
        let mut batch = Batch::default();
        let first = event("a", "tokens", "5", "2026-11-22T12:00:00Z");
        push(&mut batch, 0, &first);
        // The same usage written with another scale is the same payload.
        push(
            &mut batch,
            1,
            &event("a", "tokens", "5.00", "2026-11-22T12:00:00Z"),
        );
        push(
            &mut batch,
            2,
            &event("a", "tokens", "6", "2026-11-22T12:00:00Z"),
        );
        assert_eq!(batch.candidates.len(), 1);
        assert_eq!(batch.duplicates, 1);
        assert_eq!(reasons(&batch), [RejectReason::ConflictingDuplicate]);
        assert_eq!(batch.rejects[0].origin.offset, 2);
    }

    #[test]
    fn group_key_is_unambiguous_json() {
        let mut m = meters().get("tokens").unwrap().clone();
        m.group_by = vec!["model".into(), "region".into()];
        let e = event("a", "tokens", "1", "2026-11-22T12:00:00Z")
            .with_dimension("region", "eu,\"x\"")
            .with_dimension("model", "large");
        assert_eq!(
            group_key(&m, &e),
            r#"{"model":"large","region":"eu,\"x\""}"#
        );
        let e = event("a", "tokens", "1", "2026-11-22T12:00:00Z");
        assert_eq!(group_key(&m, &e), "{}");
        m.group_by.clear();
        assert_eq!(group_key(&m, &e), "");
    }

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
