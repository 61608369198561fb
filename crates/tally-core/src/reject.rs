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
    /// The quantity is not an exact decimal, is negative, or does not fit 28 digits.
    InvalidQuantity,
    /// The timestamp is not RFC 3339.
    InvalidTimestamp,
    /// The timestamp is more than five minutes in the future.
    FutureTimestamp,
    /// More than 16 dimensions, or a dimension key or value out of bounds.
    InvalidDimensions,
    /// The encoded event is larger than [`crate::MAX_EVENT_BYTES`].
    Oversize,
    /// The meter is well-formed but not configured (decided by the aggregator).
    UnknownMeter,
    /// The event is older than the lateness horizon (decided by the aggregator).
    TooLate,
    /// The id was seen before with a different payload (decided by the aggregator).
    ConflictingDuplicate,
}

impl RejectReason {
    /// Every reason, for metrics that pre-register one series per reason.
    pub const ALL: [RejectReason; 13] = [
        RejectReason::Malformed,
        RejectReason::MissingField,
        RejectReason::InvalidId,
        RejectReason::InvalidCustomer,
        RejectReason::InvalidMeter,
        RejectReason::InvalidQuantity,
        RejectReason::InvalidTimestamp,
        RejectReason::FutureTimestamp,
        RejectReason::InvalidDimensions,
        RejectReason::Oversize,
        RejectReason::UnknownMeter,
        RejectReason::TooLate,
        RejectReason::ConflictingDuplicate,
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
            RejectReason::InvalidTimestamp => "invalid_timestamp",
            RejectReason::FutureTimestamp => "future_timestamp",
            RejectReason::InvalidDimensions => "invalid_dimensions",
            RejectReason::Oversize => "oversize",
            RejectReason::UnknownMeter => "unknown_meter",
            RejectReason::TooLate => "too_late",
            RejectReason::ConflictingDuplicate => "conflicting_duplicate",
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
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Rejection {
            reason,
            detail: detail.into(),
        }
    }
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
}
