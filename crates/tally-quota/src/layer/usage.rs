//! The usage event the middleware emits for a request: its id, derived from the request id so
//! that a retried request counts once, and its time. Pure: no state, no I/O.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sha2::{Digest, Sha256};
use tally_core::UsageEvent;

/// The event id for `meter`'s usage of `customer`'s request with this id:
/// `req_{32 hex digits}:{meter}`, the digits the first 128 bits of SHA-256 over the customer
/// (length first) and the request id.
///
/// - Scoped to the customer: the same request id under another customer is another event, so
///   no customer can pre-empt (or be pre-empted on) another's ids, whatever ids they send.
/// - Stable: a retry under the same (trusted) request id gets the same event id, which the
///   aggregator counts once.
/// - Distinct per meter: two layers metering one request (calls and tokens) emit two events.
///   Meter names cannot hold `:`, so the meter is what follows the last `:`.
/// - Always a valid event id (at most 101 characters, printable), whatever bytes the request
///   id holds.
pub fn event_id(customer: &str, request_id: &[u8], meter: &str) -> String {
    let mut hash = Sha256::new();
    hash.update((customer.len() as u64).to_be_bytes());
    hash.update(customer.as_bytes());
    hash.update(request_id);
    let digest = hash.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("req_{hex}:{meter}")
}

/// The event for a request's usage, dated at the start of the current minute.
///
/// Why the minute and not the instant: usage is counted in one-minute windows, so the window
/// (and every sum and bill) is the same, while a retry of the request within the same minute
/// becomes an exact copy of the first event, which the aggregator drops silently as a
/// duplicate. With the instant, every retry would differ in its timestamp and be recorded as a
/// `conflicting_duplicate` reject (still counted once), where it could set off the rejected
/// events alert. A retry in a later minute still counts once, as such a reject.
pub(super) fn usage_event(
    customer: &str,
    meter: &str,
    quantity: Decimal,
    request_id: &[u8],
    now: DateTime<Utc>,
) -> UsageEvent {
    UsageEvent::new(customer, meter, quantity)
        .with_id(event_id(customer, request_id, meter))
        .at(minute_of(now))
}

fn minute_of(now: DateTime<Utc>) -> DateTime<Utc> {
    let seconds = now.timestamp();
    DateTime::from_timestamp(seconds - seconds.rem_euclid(60), 0).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(id: &str) -> bool {
        UsageEvent::new("acme", "api_calls", Decimal::ONE)
            .with_id(id)
            .validate(Utc::now())
            .is_ok()
    }

    #[test]
    fn an_id_is_stable_per_customer_request_and_meter_and_scoped_to_the_customer() {
        let calls = event_id("acme", b"r1", "api_calls");
        assert!(
            calls.starts_with("req_") && calls.ends_with(":api_calls"),
            "{calls}"
        );
        assert_eq!(calls.len(), "req_".len() + 32 + ":api_calls".len());
        assert_eq!(event_id("acme", b"r1", "api_calls"), calls, "stable");
        assert_ne!(event_id("acme", b"r1", "tokens"), calls, "per meter");
        assert_ne!(
            event_id("globex", b"r1", "api_calls"),
            calls,
            "per customer"
        );
        // The customer's length is hashed first: no (customer, request id) pair can be made
        // to collide with another by moving bytes between them.
        assert_ne!(
            event_id("ac", b"mer1", "api_calls"),
            event_id("acme", b"r1", "api_calls")
        );
        assert!(valid(&calls));
    }

    #[test]
    fn any_request_id_makes_a_valid_event_id() {
        let long = "r".repeat(10_000);
        let odd: [&[u8]; 5] = [long.as_bytes(), b"req\tone", b"caf\xe9", &[0xff; 8], b""];
        let meter = "m".repeat(64);
        for request_id in odd {
            let id = event_id("acme", request_id, &meter);
            assert!(valid(&id), "{id}");
            assert!(id.chars().count() <= tally_core::event::MAX_ID_CHARS);
        }
    }

    #[test]
    fn a_retry_within_the_minute_is_an_exact_copy() {
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().to_utc();
        let first = usage_event(
            "acme",
            "api_calls",
            Decimal::ONE,
            b"r1",
            at("2026-03-01T10:15:02.25Z"),
        );
        let retry = usage_event(
            "acme",
            "api_calls",
            Decimal::ONE,
            b"r1",
            at("2026-03-01T10:15:59.9Z"),
        );
        assert_eq!(first, retry);
        assert_eq!(first.timestamp, at("2026-03-01T10:15:00Z"));
        assert_eq!(first.id, event_id("acme", b"r1", "api_calls"));
        let later = usage_event(
            "acme",
            "api_calls",
            Decimal::ONE,
            b"r1",
            at("2026-03-01T10:16:00Z"),
        );
        assert_eq!(later.id, first.id);
        assert_ne!(later.timestamp, first.timestamp);
    }
}
