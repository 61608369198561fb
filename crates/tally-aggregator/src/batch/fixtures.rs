//! Shared fixtures for the batch unit tests: a meter catalog with one meter per aggregation,
//! the rules built from it, a fixed "now", and a helper that pushes an encoded event.

use std::str::FromStr;

use chrono::{DateTime, TimeDelta, Utc};
use rust_decimal::Decimal;
use tally_core::{wire, Meters, UsageEvent};

use super::{Batch, Message, Rules};

pub(super) fn meters() -> Meters {
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

pub(super) fn rules() -> Rules {
    Rules {
        meters: meters(),
        lateness_horizon: TimeDelta::days(35),
        versions: Default::default(),
    }
}

pub(super) fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().to_utc()
}

pub(super) fn now() -> DateTime<Utc> {
    at("2026-11-22T12:00:30Z")
}

pub(super) fn event(id: &str, meter: &str, quantity: &str, t: &str) -> UsageEvent {
    UsageEvent::new("acme", meter, Decimal::from_str(quantity).unwrap())
        .with_id(id)
        .at(at(t))
}

pub(super) fn push(batch: &mut Batch, offset: i64, event: &UsageEvent) {
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
