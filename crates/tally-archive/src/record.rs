//! One Kafka record of the usage topic as the archive keeps it.

use chrono::{DateTime, TimeDelta, Utc};
use tally_core::window::hour_start;
use tally_core::{wire, RejectReason, UsageEvent, MAX_EVENT_BYTES};

/// What the event contract made of a record.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Accepted(UsageEvent),
    /// Refused by the contract: the reason, and the bytes as received (at most
    /// [`MAX_EVENT_BYTES`]: a longer record is refused for its size and kept cut).
    Rejected {
        reason: RejectReason,
        payload: Vec<u8>,
    },
}

/// How far ahead of its arrival an event is still filed under its own hour. The aggregator
/// counts an event up to [`tally_core::event::FUTURE_TOLERANCE`] ahead of its own clock; one further
/// ahead it counts only once that time has come, which a backlog of a day makes possible.
pub const FILED_AHEAD: TimeDelta = TimeDelta::days(1);

/// A record, where it was in Kafka, and when Kafka took it.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchivedRecord {
    pub partition: i32,
    pub offset: i64,
    /// The record's Kafka timestamp (when the producer or the broker stamped it).
    pub received_at: DateTime<Utc>,
    pub verdict: Verdict,
}

impl ArchivedRecord {
    /// Decodes a record by the event contract's rules that do not depend on a clock. The
    /// future-timestamp rule counts from the receiver's clock, which only the aggregator has:
    /// like an unknown meter or a late event, it is left to the aggregator (and to a rebuild),
    /// so the archive and the windows never disagree about it.
    pub fn decode(
        bytes: &[u8],
        partition: i32,
        offset: i64,
        received_at: DateTime<Utc>,
    ) -> ArchivedRecord {
        // A receiver's clock so far ahead that no timestamp is in its future.
        let no_future = DateTime::<Utc>::MAX_UTC - TimeDelta::days(1);
        let verdict = match wire::decode(bytes, no_future) {
            Ok(event) => Verdict::Accepted(event),
            Err(rejection) => Verdict::Rejected {
                reason: rejection.reason,
                payload: bytes[..bytes.len().min(MAX_EVENT_BYTES)].to_vec(),
            },
        };
        ArchivedRecord {
            partition,
            offset,
            received_at,
            verdict,
        }
    }

    /// The hour the record is filed under: its event's (UTC), so a late event lands where it
    /// happened; a refused record, whose time may be unreadable, under the hour it came.
    ///
    /// An event the aggregator can never count is filed under the hour it came too (its own
    /// time stays in its `timestamp` column): one older than `lateness_horizon` when it came,
    /// or more than [`FILED_AHEAD`] ahead of it. A client picks its events' times, and could
    /// otherwise open a file for every hour of history, each flush writing one per event.
    pub fn hour(&self, lateness_horizon: TimeDelta) -> DateTime<Utc> {
        let at = match &self.verdict {
            Verdict::Accepted(event) => {
                let oldest = self.received_at.checked_sub_signed(lateness_horizon);
                let newest = self.received_at.checked_add_signed(FILED_AHEAD);
                let countable = oldest.is_none_or(|oldest| event.timestamp >= oldest)
                    && newest.is_none_or(|newest| event.timestamp <= newest);
                if countable {
                    event.timestamp
                } else {
                    self.received_at
                }
            }
            Verdict::Rejected { .. } => self.received_at,
        };
        hour_start(at)
    }

    /// The accepted event, if the contract accepted it.
    pub fn event(&self) -> Option<&UsageEvent> {
        match &self.verdict {
            Verdict::Accepted(event) => Some(event),
            Verdict::Rejected { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HORIZON: TimeDelta = TimeDelta::days(35);

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    #[test]
    fn an_event_is_filed_under_its_own_hour_and_a_refused_record_under_its_arrival() {
        let event = br#"{"id":"e1","customer":"acme","meter":"api_calls","quantity":"2.5","timestamp":"2026-12-06T23:59:30Z"}"#;
        let late = ArchivedRecord::decode(event, 3, 42, at("2026-12-07T11:05:00Z"));
        assert_eq!(late.hour(HORIZON), at("2026-12-06T23:00:00Z"));
        assert_eq!(late.event().map(|e| e.id.as_str()), Some("e1"));

        let refused = ArchivedRecord::decode(b"not json", 0, 7, at("2026-12-07T11:05:00Z"));
        assert_eq!(refused.hour(HORIZON), at("2026-12-07T11:00:00Z"));
        assert!(matches!(
            refused.verdict,
            Verdict::Rejected { reason: RejectReason::Malformed, ref payload } if payload == b"not json"
        ));
    }

    #[test]
    fn the_future_is_the_aggregators_to_decide_and_any_year_has_an_hour() {
        // An hour ahead of its arrival: the aggregator's clock decides; the archive keeps it.
        let event = br#"{"id":"e1","customer":"acme","meter":"api_calls","quantity":"1","timestamp":"2026-12-07T12:00:00Z"}"#;
        let early = ArchivedRecord::decode(event, 0, 0, at("2026-12-07T11:00:00Z"));
        assert!(early.event().is_some());
        assert_eq!(early.hour(HORIZON), at("2026-12-07T12:00:00Z"));
        // Outside the range of nanosecond timestamps, where chrono's rounding gives up (with
        // a horizon that reaches that far back); and times the aggregator can never count,
        // filed under the hour they came.
        let forever = TimeDelta::days(365 * 1000);
        for (timestamp, horizon, hour) in [
            ("1500-01-01T00:30:00Z", forever, "1500-01-01T00:00:00Z"),
            ("1500-01-01T00:30:00Z", HORIZON, "2026-12-07T11:00:00Z"),
            ("2026-11-01T10:00:00Z", HORIZON, "2026-12-07T11:00:00Z"),
            ("2026-11-03T10:00:00Z", HORIZON, "2026-11-03T10:00:00Z"),
            ("2026-12-08T11:30:00Z", HORIZON, "2026-12-08T11:00:00Z"),
            ("2026-12-08T11:30:01Z", HORIZON, "2026-12-07T11:00:00Z"),
            ("9999-12-31T23:59:59Z", forever, "2026-12-07T11:00:00Z"),
        ] {
            let event = format!(
                r#"{{"id":"e1","customer":"acme","meter":"api_calls","quantity":"1","timestamp":"{timestamp}"}}"#
            );
            let record = ArchivedRecord::decode(event.as_bytes(), 0, 0, at("2026-12-07T11:30:00Z"));
            assert_eq!(record.hour(horizon), at(hour), "{timestamp}");
        }
    }
}
