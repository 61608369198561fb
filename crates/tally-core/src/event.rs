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
            if exceeds_chars(source, MAX_SOURCE_CHARS) {
                return Err(Rejection::new(
                    RejectReason::Malformed,
                    format!("source is longer than {MAX_SOURCE_CHARS} characters"),
                ));
            }
        }
        validate_dimensions(&self.dimensions)
    }
}

fn validate_customer(customer: &str) -> Result<(), Rejection> {
    if customer.is_empty() || exceeds_chars(customer, MAX_CUSTOMER_CHARS) {
        return Err(Rejection::new(
            RejectReason::InvalidCustomer,
            format!("customer must be 1 to {MAX_CUSTOMER_CHARS} characters"),
        ));
    }
    // Control characters would corrupt logs, CSV exports and terminal tables downstream.
    if customer.chars().any(char::is_control) {
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

fn validate_quantity(quantity: Decimal) -> Result<(), Rejection> {
    if quantity.is_sign_negative() && !quantity.is_zero() {
        return Err(Rejection::new(
            RejectReason::InvalidQuantity,
            format!("quantity {quantity} is negative; usage only grows"),
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
    }
    Ok(())
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
}
