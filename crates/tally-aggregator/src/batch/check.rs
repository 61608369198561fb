//! The "is this event acceptable" side of a batch: each Kafka message is decoded against the
//! wire contract, checked against the configured meters and the aggregator's own rules, and
//! either becomes a [`Candidate`] or a [`Reject`] carrying the reason. Same-payload copies of
//! an id already in the batch are dropped here; a copy with another payload is a conflict.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, TimeDelta, Utc};
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
    /// The Kafka message the event came in.
    pub(crate) message: ConsumedMessage,
}

/// An owned copy of a consumed Kafka message (where it sits and its bytes), kept for anything
/// that may still be refused.
#[derive(Debug, Clone)]
pub(crate) struct ConsumedMessage {
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
    /// The Kafka message refused.
    pub(crate) message: ConsumedMessage,
}

impl Reject {
    pub(crate) fn of(candidate: &Candidate, rejection: Rejection) -> Self {
        Reject {
            rejection,
            event_id: Some(candidate.event.id.clone()),
            customer: Some(candidate.event.customer.clone()),
            meter: Some(candidate.event.meter.clone()),
            message: candidate.message.clone(),
        }
    }
}

/// What the batch checks events against.
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    pub(crate) meters: Meters,
    /// Events older than `now - lateness_horizon` are `too_late`.
    pub(crate) lateness_horizon: TimeDelta,
    /// The catalog's version of each meter's definition these rules hold (`meters.version`):
    /// a batch commits only while they are still current (`tally rebuild` may redefine one).
    pub(crate) versions: Arc<HashMap<String, i64>>,
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
    /// The meter versions of the rules the batch was checked under (those of its first
    /// message; a batch that saw newer rules midway fails the version check and is checked
    /// again whole, see [`Batch::recheck`]).
    pub(crate) versions: Arc<HashMap<String, i64>>,
    /// The messages of those duplicates (a batch checked again decides them again).
    duplicate_messages: Vec<ConsumedMessage>,
    first_by_id: HashMap<String, usize>,
}

impl Batch {
    pub(crate) fn is_empty(&self) -> bool {
        self.consumed == 0
    }

    /// Adds one message: a candidate, a duplicate within the batch, or a reject.
    pub(crate) fn push(&mut self, message: Message<'_>, rules: &Rules, now: DateTime<Utc>) {
        if self.consumed == 0 {
            self.versions = rules.versions.clone();
        }
        self.opened.get_or_insert_with(Instant::now);
        self.consumed += 1;
        self.next_offsets
            .insert(message.partition, message.offset + 1);
        if let Some(ms) = message.timestamp_ms {
            self.timestamps_ms.push(ms);
        }
        let raw = message.payload.unwrap_or_default();
        self.bytes += raw.len();
        let kept = ConsumedMessage {
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
                    message: kept,
                });
                return;
            }
        };
        let candidate = match check(event, rules, now, kept) {
            Ok(candidate) => candidate,
            Err(reject) => {
                self.rejects.push(*reject);
                return;
            }
        };
        self.admit(candidate);
    }

    /// A checked event: a candidate, a same-payload copy of one in the batch (a duplicate), or
    /// a conflicting copy (a reject).
    fn admit(&mut self, candidate: Candidate) {
        match self.first_by_id.get(&candidate.event.id) {
            None => {
                self.first_by_id
                    .insert(candidate.event.id.clone(), self.candidates.len());
                self.candidates.push(candidate);
            }
            Some(&first) if self.candidates[first].payload_hash == candidate.payload_hash => {
                self.duplicates += 1;
                self.duplicate_messages.push(candidate.message);
            }
            Some(_) => {
                let rejection = conflict(&candidate.event.id);
                self.rejects.push(Reject::of(&candidate, rejection));
            }
        }
    }
}

impl Batch {
    /// Checks the batch again under new rules (a meter was redefined by `tally rebuild` after
    /// it was checked): every message it consumed is pushed again, in offset order, into a
    /// fresh batch, so group keys, unique values, refusals, in-batch duplicates and conflicts
    /// are all decided as if the new rules had been there from the start. What is stored with
    /// the batch (offsets, timestamps, sizes) is unchanged.
    pub(crate) fn recheck(&mut self, rules: &Rules, now: DateTime<Utc>) {
        let old = std::mem::take(self);
        let mut messages: Vec<ConsumedMessage> = old
            .candidates
            .into_iter()
            .map(|c| c.message)
            .chain(old.rejects.into_iter().map(|r| r.message))
            .chain(old.duplicate_messages)
            .collect();
        messages.sort_by_key(|m| (m.partition, m.offset));
        for message in &messages {
            self.push(
                Message {
                    partition: message.partition,
                    offset: message.offset,
                    key: message.key.as_deref(),
                    // Kept as consumed: an empty payload stands for none.
                    payload: (!message.raw.is_empty()).then_some(message.raw.as_slice()),
                    timestamp_ms: None,
                },
                rules,
                now,
            );
        }
        self.next_offsets = old.next_offsets;
        self.timestamps_ms = old.timestamps_ms;
        self.consumed = old.consumed;
        self.bytes = old.bytes;
        self.opened = old.opened;
        self.versions = rules.versions.clone();
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
    message: ConsumedMessage,
) -> Result<Candidate, Box<Reject>> {
    let refuse = |event: &UsageEvent, reason, detail: String| {
        Box::new(Reject {
            rejection: Rejection::new(reason, detail),
            event_id: Some(event.id.clone()),
            customer: Some(event.customer.clone()),
            meter: Some(event.meter.clone()),
            message: message.clone(),
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
    counted_as(meter, event, message).map_err(|refused| {
        let (event, message, detail) = *refused;
        Box::new(Reject {
            rejection: Rejection::new(RejectReason::InvalidDimensions, detail),
            event_id: Some(event.id),
            customer: Some(event.customer),
            meter: Some(event.meter),
            message,
        })
    })
}

/// What a meter's definition makes of an event it counts: its group key, and for
/// `unique_count` the value counted (an event without that dimension is refused: the detail
/// says why). The part of the checks a rebuild applies again under a new definition.
pub(crate) fn counted_as(
    meter: &MeterDefinition,
    event: UsageEvent,
    message: ConsumedMessage,
) -> Result<Candidate, Box<(UsageEvent, ConsumedMessage, String)>> {
    let unique_value = match &meter.unique_dimension {
        None => None,
        Some(dimension) => match event.dimensions.get(dimension) {
            Some(value) => Some(value.clone()),
            None => {
                let detail = format!(
                    "meter {:?} counts distinct values of dimension {dimension:?}, which this event lacks",
                    meter.name
                );
                return Err(Box::new((event, message, detail)));
            }
        },
    };
    Ok(Candidate {
        aggregation: meter.aggregation,
        payload_hash: payload_hash(&event),
        group_key: group_key(meter, &event),
        unique_value,
        event,
        message,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::fixtures::{event, meters, now, push, rules};

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
        assert_eq!(batch.rejects[3].message.raw, b"{not json");
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
        assert_eq!(batch.rejects[0].message.offset, 2);
    }

    #[test]
    fn a_batch_checked_again_takes_the_new_definition_and_keeps_its_refusals() {
        let mut batch = Batch::default();
        push(
            &mut batch,
            0,
            &event("a", "tokens", "1", "2026-11-22T12:00:00Z")
                .with_dimension("model", "large")
                .with_dimension("region", "eu"),
        );
        push(
            &mut batch,
            1,
            &event("b", "nope", "1", "2026-11-22T12:00:00Z"),
        );
        push(
            &mut batch,
            2,
            &event("c", "users", "1", "2026-11-22T12:00:00Z").with_dimension("user", "x"),
        );
        // Refused under the old definition (no "user"), counted under the new one.
        push(
            &mut batch,
            3,
            &event("d", "users", "1", "2026-11-22T12:00:00Z").with_dimension("session", "s"),
        );
        // A copy of c: a duplicate now, refused with it under the new definition.
        push(
            &mut batch,
            4,
            &event("c", "users", "1", "2026-11-22T12:00:00Z").with_dimension("user", "x"),
        );
        assert_eq!(batch.duplicates, 1);
        assert_eq!(batch.candidates[0].group_key, r#"{"model":"large"}"#);
        let mut rules = rules();
        let mut definitions: Vec<MeterDefinition> =
            ["tokens", "users", "api_calls", "seats", "peak"]
                .iter()
                .map(|name| rules.meters.get(name).unwrap().clone())
                .collect();
        definitions[0].group_by.push("region".into());
        definitions[1].unique_dimension = Some("session".into());
        rules.meters = Meters::new(&definitions).unwrap();
        rules.versions = Arc::new(HashMap::from([("tokens".to_owned(), 2)]));
        batch.recheck(&rules, now());
        assert_eq!(batch.candidates.len(), 2);
        assert_eq!(
            batch.candidates[0].group_key,
            r#"{"model":"large","region":"eu"}"#
        );
        assert_eq!(batch.candidates[1].event.id, "d");
        // The unknown meter stays refused; the event without the new unique dimension joins it.
        assert_eq!(
            reasons(&batch),
            [
                RejectReason::UnknownMeter,
                RejectReason::InvalidDimensions,
                RejectReason::InvalidDimensions
            ]
        );
        assert_eq!(batch.duplicates, 0);
        assert_eq!(batch.consumed, 5);
        assert_eq!(batch.next_offsets[&0], 5);
        assert_eq!(batch.versions.get("tokens"), Some(&2));
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
}
