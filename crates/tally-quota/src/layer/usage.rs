//! The usage event the middleware emits for a request: its id, derived from the request id so
//! that a retried request counts once, and its time. Pure: no state, no I/O.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sha2::{Digest, Sha256};
use tally_core::event::MAX_ID_CHARS;
use tally_core::UsageEvent;

/// The event id for `meter`'s usage of the request with this id: `{request_id}:{meter}`.
///
/// - Stable: a retry with the same request id gets the same event id, which the aggregator
///   counts once.
/// - Distinct per meter: two layers metering one request (calls and tokens) emit two events.
///   Meter names cannot hold `:`, so the meter is what follows the last `:` and no two
///   (request id, meter) pairs share an id.
/// - Always a valid event id (1 to 128 characters, no control characters): a request id that
///   would break that (too long, a tab, bytes that are not UTF-8) is hashed instead,
///   `sha256:{32 hex digits}:{meter}`, still stable, so its usage is neither refused nor lost.
pub(super) fn event_id(request_id: &[u8], meter: &str) -> String {
    let plain = std::str::from_utf8(request_id)
        .ok()
        .map(|request_id| format!("{request_id}:{meter}"))
        .filter(|id| id.chars().count() <= MAX_ID_CHARS && !id.chars().any(char::is_control));
    plain.unwrap_or_else(|| {
        let digest = Sha256::digest(request_id);
        // 128 bits: ids from different requests do not meet by chance.
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}:{meter}")
    })
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
        .with_id(event_id(request_id, meter))
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
    fn a_plain_request_id_gives_a_readable_id_per_meter() {
        let request_id = b"0190a5f2-7c1e-7d4b-9a51-3f1f7b2d6c10";
        let calls = event_id(request_id, "api_calls");
        assert_eq!(calls, "0190a5f2-7c1e-7d4b-9a51-3f1f7b2d6c10:api_calls");
        assert_eq!(event_id(request_id, "api_calls"), calls, "stable");
        assert_ne!(event_id(request_id, "tokens"), calls);
        assert_ne!(
            event_id(b"a:api_calls", "tokens"),
            event_id(b"a", "api_calls")
        );
        assert!(valid(&calls));
    }

    #[test]
    fn a_request_id_that_makes_no_valid_event_id_is_hashed_stably() {
        let long = "r".repeat(200);
        let bad: [&[u8]; 4] = [long.as_bytes(), b"req\tone", b"caf\xe9", &[0xff; 8]];
        for request_id in bad {
            let id = event_id(request_id, "api_calls");
            assert!(
                id.starts_with("sha256:") && id.ends_with(":api_calls"),
                "{id}"
            );
            assert!(valid(&id), "{id}");
            assert_eq!(event_id(request_id, "api_calls"), id);
            assert_ne!(event_id(request_id, "tokens"), id);
        }
        assert_ne!(
            event_id(long.as_bytes(), "api_calls"),
            event_id(&long.as_bytes()[1..], "api_calls")
        );
        // The longest meter still fits.
        let meter = "m".repeat(64);
        assert!(valid(&event_id(long.as_bytes(), &meter)));
        // Exactly 128 characters is kept as it is.
        let fits = "x".repeat(MAX_ID_CHARS - ":api_calls".len());
        assert_eq!(event_id(fits.as_bytes(), "api_calls").len(), MAX_ID_CHARS);
        assert!(event_id(format!("{fits}x").as_bytes(), "api_calls").starts_with("sha256:"));
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
        assert_eq!(first.id, "r1:api_calls");
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
