//! Why an event was refused. The codes are a contract: they are stored in
//! `rejected_events.reason`, returned by the HTTP API and counted in metrics, so a code is
//! never renamed once released.

use std::fmt;

/// The stable reason an event was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// Not JSON, not an object, a field of the wrong type, a duplicate or unknown field.
    Malformed,
    /// A required field is absent.
    MissingField,
    /// The id is empty or longer than 128 characters.
    InvalidId,
    /// The customer is empty, longer than 256 characters, or holds control characters.
    InvalidCustomer,
    /// The meter name does not match `[a-z0-9_.-]{1,64}`.
    InvalidMeter,
    /// The quantity is not an exact decimal, or is negative.
    InvalidQuantity,
    /// The quantity is a decimal outside tally's domain: above [`crate::event::MAX_QUANTITY`]
    /// or with more than [`crate::event::MAX_QUANTITY_SCALE`] fraction digits.
    QuantityOutOfRange,
    /// The timestamp is not RFC 3339.
    InvalidTimestamp,
    /// The timestamp is more than five minutes in the future.
    FutureTimestamp,
    /// The source is longer than 256 characters or holds control characters.
    InvalidSource,
    /// More than 16 dimensions, a dimension key or value out of bounds or holding control
    /// characters, or customer and dimensions together too long for a window key.
    InvalidDimensions,
    /// The encoded event is larger than [`crate::MAX_EVENT_BYTES`].
    Oversize,
    /// The meter is well-formed but not configured (decided by the aggregator).
    UnknownMeter,
    /// The event is older than the lateness horizon (decided by the aggregator).
    TooLate,
    /// The id was seen before with a different payload (decided by the aggregator).
    ConflictingDuplicate,
    /// Valid by the contract, but Postgres refused to store it (decided by the aggregator when
    /// a batch fails with a data error and splitting finds this event; the detail holds the
    /// database's message). Never expected: report it.
    Unprocessable,
}

impl RejectReason {
    /// Every reason, for metrics that pre-register one series per reason.
    pub const ALL: [RejectReason; 16] = [
        RejectReason::Malformed,
        RejectReason::MissingField,
        RejectReason::InvalidId,
        RejectReason::InvalidCustomer,
        RejectReason::InvalidMeter,
        RejectReason::InvalidQuantity,
        RejectReason::QuantityOutOfRange,
        RejectReason::InvalidTimestamp,
        RejectReason::FutureTimestamp,
        RejectReason::InvalidSource,
        RejectReason::InvalidDimensions,
        RejectReason::Oversize,
        RejectReason::UnknownMeter,
        RejectReason::TooLate,
        RejectReason::ConflictingDuplicate,
        RejectReason::Unprocessable,
    ];

    /// The stable code (contract).
    pub const fn code(self) -> &'static str {
        match self {
            RejectReason::Malformed => "malformed",
            RejectReason::MissingField => "missing_field",
            RejectReason::InvalidId => "invalid_id",
            RejectReason::InvalidCustomer => "invalid_customer",
            RejectReason::InvalidMeter => "invalid_meter",
            RejectReason::InvalidQuantity => "invalid_quantity",
            RejectReason::QuantityOutOfRange => "quantity_out_of_range",
            RejectReason::InvalidTimestamp => "invalid_timestamp",
            RejectReason::FutureTimestamp => "future_timestamp",
            RejectReason::InvalidSource => "invalid_source",
            RejectReason::InvalidDimensions => "invalid_dimensions",
            RejectReason::Oversize => "oversize",
            RejectReason::UnknownMeter => "unknown_meter",
            RejectReason::TooLate => "too_late",
            RejectReason::ConflictingDuplicate => "conflicting_duplicate",
            RejectReason::Unprocessable => "unprocessable",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A refused event: the stable reason and a human detail that names the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Rejection {
    pub reason: RejectReason,
    pub detail: String,
}

impl Rejection {
    /// The detail is made printable ([`printable`]): it may quote hostile input, and it is
    /// stored as Postgres `text` and sent as a Kafka header.
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Rejection {
            reason,
            detail: printable(detail.into()),
        }
    }
}

/// `text` with every control character (U+0000–U+001F, U+007F–U+009F) written as an escape
/// such as `\u{0}`. Postgres `text` cannot hold U+0000, and the others corrupt logs and
/// terminals; whatever describes a refused event goes through this.
pub fn printable(text: String) -> String {
    if !text.chars().any(char::is_control) {
        return text;
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case() {
        let mut codes: Vec<&str> = RejectReason::ALL.iter().map(|r| r.code()).collect();
        assert!(codes
            .iter()
            .all(|c| c.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')));
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), RejectReason::ALL.len());
    }

    #[test]
    fn details_are_printable() {
        let rejection = Rejection::new(RejectReason::Malformed, "field `a\u{0}b\n`");
        assert_eq!(rejection.detail, "field `a\\u{0}b\\u{a}`");
        assert_eq!(printable("plain é".into()), "plain é");
    }
}
