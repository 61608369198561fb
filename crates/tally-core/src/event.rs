//! The usage event and the rules every event obeys, wherever it enters tally.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
use rust_decimal::Decimal;

use crate::reject::{RejectReason, Rejection};

/// Longest event id, in characters.
pub const MAX_ID_CHARS: usize = 128;
/// Longest customer id, in characters.
pub const MAX_CUSTOMER_CHARS: usize = 256;
/// Longest meter name (`[a-z0-9_.-]{1,64}`).
pub const MAX_METER_CHARS: usize = 64;
/// Longest `source`, in characters.
pub const MAX_SOURCE_CHARS: usize = 256;
/// Most dimensions on one event.
pub const MAX_DIMENSIONS: usize = 16;
/// Longest dimension key, in characters.
pub const MAX_DIMENSION_KEY_CHARS: usize = 64;
/// Longest dimension value, in characters.
pub const MAX_DIMENSION_VALUE_CHARS: usize = 256;
/// Largest encoded event accepted from the wire, in bytes.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;
/// How far ahead of the receiver's clock a timestamp may be (clock skew allowance).
pub const FUTURE_TOLERANCE: TimeDelta = TimeDelta::minutes(5);
/// Largest quantity of one event: 10^15 (a petabyte in bytes, a quadrillion tokens).
pub const MAX_QUANTITY: Decimal = Decimal::from_parts(2_764_472_320, 232_830, 0, false, 0);
/// Most fraction digits of a quantity (trailing zeros do not count): nano-units.
///
/// Why these bounds: tally adds quantities exactly in Postgres and reads the sums back into
/// 96-bit decimals (28 digits). With at most 9 fraction digits a sum keeps at most 9, so sums
/// read back exactly up to 7.9 × 10^19: at least 79,000 events of the largest quantity in one
/// window, day or period, and far more than any real usage. Beyond that a sum is an error for
/// that one customer, never a crash.
pub const MAX_QUANTITY_SCALE: u32 = 9;
/// Most bytes of a window key: the customer plus the JSON of all the event's dimensions
/// (any of them may be a `group_by` or a `unique_count` dimension). Keeps every index entry of
/// the windows under Postgres's b-tree limit (about 2,700 bytes) whatever the meters group by.
pub const MAX_KEY_BYTES: usize = 1_200;

/// One usage report: "customer `customer` used `quantity` of `meter` at `timestamp`".
///
/// `id` makes the report idempotent: the same id counts once, however often it is delivered.
/// An empty `id` asks the emitter to assign a UUIDv7.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageEvent {
    pub id: String,
    pub customer: String,
    pub meter: String,
    /// Exact decimal; never a float anywhere in tally.
    pub quantity: Decimal,
    pub timestamp: DateTime<Utc>,
    pub source: Option<String>,
    pub dimensions: BTreeMap<String, String>,
}

impl UsageEvent {
    /// An event at the current time with no id yet (the emitter assigns one).
    pub fn new(customer: impl Into<String>, meter: impl Into<String>, quantity: Decimal) -> Self {
        UsageEvent {
            id: String::new(),
            customer: customer.into(),
            meter: meter.into(),
            quantity,
            timestamp: Utc::now(),
            source: None,
            dimensions: BTreeMap::new(),
        }
    }

    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    pub fn at(mut self, timestamp: DateTime<Utc>) -> Self {
        self.timestamp = timestamp;
        self
    }

    pub fn with_source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    pub fn with_dimension(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.dimensions.insert(key.into(), value.into());
        self
    }

    /// Checks every field rule. `now` is the receiver's clock, for the future-timestamp rule.
    pub fn validate(&self, now: DateTime<Utc>) -> Result<(), Rejection> {
        if self.id.is_empty() || exceeds_chars(&self.id, MAX_ID_CHARS) {
            return Err(Rejection::new(
                RejectReason::InvalidId,
                format!("id must be 1 to {MAX_ID_CHARS} characters"),
            ));
        }
        if has_control(&self.id) {
            return Err(Rejection::new(
                RejectReason::InvalidId,
                "id must not contain control characters (U+0000-U+001F, U+007F-U+009F)",
            ));
        }
        validate_customer(&self.customer)?;
        validate_meter_name(&self.meter)
            .map_err(|detail| Rejection::new(RejectReason::InvalidMeter, detail))?;
        validate_quantity(self.quantity)?;
        if self.timestamp > now + FUTURE_TOLERANCE {
            return Err(Rejection::new(
                RejectReason::FutureTimestamp,
                format!(
                    "timestamp {} is more than 5 minutes ahead of the receiver's clock ({})",
                    self.timestamp.to_rfc3339(),
                    now.to_rfc3339()
                ),
            ));
        }
        if let Some(source) = &self.source {
            if exceeds_chars(source, MAX_SOURCE_CHARS) || has_control(source) {
                return Err(Rejection::new(
                    RejectReason::InvalidSource,
                    format!("source must be at most {MAX_SOURCE_CHARS} characters, without control characters"),
                ));
            }
        }
        validate_dimensions(&self.dimensions)?;
        let key_bytes = self.customer.len() + dimensions_json_len(&self.dimensions);
        if key_bytes > MAX_KEY_BYTES {
            return Err(Rejection::new(
                RejectReason::InvalidDimensions,
                format!(
                    "customer and dimensions take {key_bytes} bytes (customer plus the dimensions as JSON); at most {MAX_KEY_BYTES} fit a window key: send shorter dimension values or fewer dimensions"
                ),
            ));
        }
        Ok(())
    }
}

/// Checks a customer id: 1 to [`MAX_CUSTOMER_CHARS`] characters, none of them control characters.
pub fn validate_customer(customer: &str) -> Result<(), Rejection> {
    if customer.is_empty() || exceeds_chars(customer, MAX_CUSTOMER_CHARS) {
        return Err(Rejection::new(
            RejectReason::InvalidCustomer,
            format!("customer must be 1 to {MAX_CUSTOMER_CHARS} characters"),
        ));
    }
    // Control characters would corrupt logs, CSV exports and terminal tables downstream, and
    // Postgres `text` cannot hold U+0000.
    if has_control(customer) {
        return Err(Rejection::new(
            RejectReason::InvalidCustomer,
            "customer must not contain control characters",
        ));
    }
    Ok(())
}

/// Checks `[a-z0-9_.-]{1,64}`; the error names the rule, for reject details and config errors.
pub fn validate_meter_name(meter: &str) -> Result<(), String> {
    let well_formed = !meter.is_empty()
        && meter.len() <= MAX_METER_CHARS
        && meter.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
        });
    if well_formed {
        Ok(())
    } else {
        Err(format!(
            "meter {meter:?} must match [a-z0-9_.-]{{1,{MAX_METER_CHARS}}}"
        ))
    }
}

/// Checks a quantity against tally's domain: not negative, at most [`MAX_QUANTITY`], at most
/// [`MAX_QUANTITY_SCALE`] fraction digits (trailing zeros do not count).
pub fn validate_quantity(quantity: Decimal) -> Result<(), Rejection> {
    if quantity.is_sign_negative() && !quantity.is_zero() {
        return Err(Rejection::new(
            RejectReason::InvalidQuantity,
            format!("quantity {quantity} is negative; usage only grows"),
        ));
    }
    if quantity > MAX_QUANTITY || quantity.normalize().scale() > MAX_QUANTITY_SCALE {
        return Err(Rejection::new(
            RejectReason::QuantityOutOfRange,
            format!(
                "quantity {quantity} is outside tally's domain: at most {MAX_QUANTITY} with at most {MAX_QUANTITY_SCALE} fraction digits"
            ),
        ));
    }
    Ok(())
}

fn validate_dimensions(dimensions: &BTreeMap<String, String>) -> Result<(), Rejection> {
    if dimensions.len() > MAX_DIMENSIONS {
        return Err(Rejection::new(
            RejectReason::InvalidDimensions,
            format!(
                "{} dimensions; at most {MAX_DIMENSIONS} are allowed",
                dimensions.len()
            ),
        ));
    }
    for (key, value) in dimensions {
        if key.is_empty() || exceeds_chars(key, MAX_DIMENSION_KEY_CHARS) {
            return Err(Rejection::new(
                RejectReason::InvalidDimensions,
                format!("dimension key {key:?} must be 1 to {MAX_DIMENSION_KEY_CHARS} characters"),
            ));
        }
        if exceeds_chars(value, MAX_DIMENSION_VALUE_CHARS) {
            return Err(Rejection::new(
                RejectReason::InvalidDimensions,
                format!("dimension {key:?} is longer than {MAX_DIMENSION_VALUE_CHARS} characters"),
            ));
        }
        if has_control(key) || has_control(value) {
            return Err(Rejection::new(
                RejectReason::InvalidDimensions,
                format!("dimension {key:?} must not contain control characters"),
            ));
        }
    }
    Ok(())
}

/// Length of `{"k":"v",...}` for the dimensions: an upper bound on any group key built from
/// them (group keys escape no control characters, which are refused, so only `"` and `\`
/// take two bytes).
fn dimensions_json_len(dimensions: &BTreeMap<String, String>) -> usize {
    let quoted = |s: &str| 2 + s.len() + s.bytes().filter(|b| matches!(b, b'"' | b'\\')).count();
    2 + dimensions
        .iter()
        .map(|(k, v)| quoted(k) + 1 + quoted(v) + 1)
        .sum::<usize>()
}

fn has_control(text: &str) -> bool {
    text.chars().any(char::is_control)
}

/// True when `s` has more than `max` characters; counts only when the byte length allows it.
fn exceeds_chars(s: &str, max: usize) -> bool {
    s.len() > max && s.chars().count() > max
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> UsageEvent {
        UsageEvent::new("acme", "api_calls", Decimal::ONE).with_id("e1")
    }

    fn reason(e: &UsageEvent) -> Option<RejectReason> {
        e.validate(Utc::now()).err().map(|r| r.reason)
    }

    #[test]
    fn a_plain_event_is_valid() {
        assert_eq!(reason(&event()), None);
    }

    #[test]
    fn each_rule_has_its_reason() {
        assert_eq!(reason(&event().with_id("")), Some(RejectReason::InvalidId));
        assert_eq!(
            reason(&event().with_id("x".repeat(129))),
            Some(RejectReason::InvalidId)
        );
        assert_eq!(reason(&event().with_id("é".repeat(128))), None);
        let mut e = event();
        e.customer = String::new();
        assert_eq!(reason(&e), Some(RejectReason::InvalidCustomer));
        e.customer = "a\nb".into();
        assert_eq!(reason(&e), Some(RejectReason::InvalidCustomer));
        let mut e = event();
        e.meter = "API".into();
        assert_eq!(reason(&e), Some(RejectReason::InvalidMeter));
        e.meter = "a".repeat(65);
        assert_eq!(reason(&e), Some(RejectReason::InvalidMeter));
        e.meter = "tokens.large-v2_x".into();
        assert_eq!(reason(&e), None);
        let mut e = event();
        e.quantity = Decimal::NEGATIVE_ONE;
        assert_eq!(reason(&e), Some(RejectReason::InvalidQuantity));
        let e = event().at(Utc::now() + TimeDelta::minutes(6));
        assert_eq!(reason(&e), Some(RejectReason::FutureTimestamp));
        let e = event().at(Utc::now() + TimeDelta::minutes(4));
        assert_eq!(reason(&e), None);
        let mut e = event();
        for i in 0..17 {
            e = e.with_dimension(format!("k{i}"), "v");
        }
        assert_eq!(reason(&e), Some(RejectReason::InvalidDimensions));
        let e = event().with_dimension("", "v");
        assert_eq!(reason(&e), Some(RejectReason::InvalidDimensions));
    }

    /// Postgres `text` cannot hold U+0000: a NUL anywhere must be refused at the contract, or
    /// it fails the aggregator's batch transaction.
    #[test]
    fn control_characters_are_refused_in_every_string_field() {
        for bad in ["a\u{0}b", "a\u{1f}", "\u{7f}", "x\u{9b}", "tab\there"] {
            assert_eq!(reason(&event().with_id(bad)), Some(RejectReason::InvalidId));
            let mut e = event();
            e.customer = bad.into();
            assert_eq!(reason(&e), Some(RejectReason::InvalidCustomer));
            assert_eq!(
                reason(&event().with_source(bad)),
                Some(RejectReason::InvalidSource)
            );
            assert_eq!(
                reason(&event().with_dimension("k", bad)),
                Some(RejectReason::InvalidDimensions)
            );
            assert_eq!(
                reason(&event().with_dimension(bad, "v")),
                Some(RejectReason::InvalidDimensions)
            );
        }
        // Printable characters of any width are fine, 4-byte ones included.
        let e = event()
            .with_id("𝄞é")
            .with_source("😀")
            .with_dimension("k", "𝄞");
        assert_eq!(reason(&e), None);
    }

    #[test]
    fn quantities_have_a_domain() {
        let with = |q: &str| {
            let mut e = event();
            e.quantity = q.parse().unwrap();
            reason(&e)
        };
        assert_eq!(with("1000000000000000"), None);
        assert_eq!(with("999999999999999.999999999"), None);
        assert_eq!(with("0.000000001"), None);
        assert_eq!(
            with("1.5000000000000000"),
            None,
            "trailing zeros do not count"
        );
        assert_eq!(
            with("1000000000000000.000000001"),
            Some(RejectReason::QuantityOutOfRange)
        );
        assert_eq!(with("0.0000000001"), Some(RejectReason::QuantityOutOfRange));
        assert_eq!(
            with("79228162514264337593543950335"),
            Some(RejectReason::QuantityOutOfRange)
        );
        assert_eq!(MAX_QUANTITY, Decimal::from(1_000_000_000_000_000i64));
    }

    #[test]
    fn customer_and_dimensions_must_fit_a_window_key() {
        // 256 four-byte characters: the longest customer, 1,024 bytes.
        let mut e = event();
        e.customer = "𝄞".repeat(256);
        assert_eq!(reason(&e), None);
        let e = e.with_dimension("model", "x".repeat(200));
        assert_eq!(reason(&e), Some(RejectReason::InvalidDimensions));
        let mut e = event();
        for i in 0..16 {
            e = e.with_dimension(format!("k{i}"), "v".repeat(70));
        }
        assert_eq!(reason(&e), Some(RejectReason::InvalidDimensions));
        let mut e = event();
        for i in 0..16 {
            e = e.with_dimension(format!("k{i}"), "v".repeat(50));
        }
        assert_eq!(reason(&e), None);
    }
}
