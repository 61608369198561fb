//! Events on the wire: one JSON object per Kafka message (key = customer).
//!
//! Two shapes are accepted:
//! - **tally native**: `{"id","customer","meter","quantity","timestamp","source"?,"dimensions"?}`.
//!   Unknown fields are refused, so a typo such as `"dimension"` cannot silently drop data.
//! - **CloudEvents 1.0 structured JSON** (recognised by `specversion`): `type` is the meter,
//!   `subject` the customer, `time` the timestamp, `data.value` the quantity and every other
//!   scalar in `data` a dimension. Extension attributes are ignored, as the spec asks.
//!
//! Quantities are read from the raw JSON text (number or string), never through `f64`.
//! Decoding is total: any input gives an event or a [`Rejection`], never a panic.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::event::{UsageEvent, MAX_EVENT_BYTES};
use crate::reject::{RejectReason, Rejection};

/// Encodes an event in the native shape. The quantity is written as a string to keep it exact.
pub fn encode(event: &UsageEvent) -> Vec<u8> {
    let mut out = Vec::with_capacity(192);
    encode_into(event, &mut out);
    out
}

/// Appends the native encoding of `event` to `out` (reuse one buffer on hot paths).
pub fn encode_into(event: &UsageEvent, out: &mut Vec<u8>) {
    #[derive(Serialize)]
    struct Native<'a> {
        id: &'a str,
        customer: &'a str,
        meter: &'a str,
        quantity: &'a Decimal,
        timestamp: &'a DateTime<Utc>,
        #[serde(skip_serializing_if = "Option::is_none")]
        source: Option<&'a str>,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        dimensions: &'a BTreeMap<String, String>,
    }
    let native = Native {
        id: &event.id,
        customer: &event.customer,
        meter: &event.meter,
        quantity: &event.quantity,
        timestamp: &event.timestamp,
        source: event.source.as_deref(),
        dimensions: &event.dimensions,
    };
    // Serializing plain strings, a decimal and a timestamp into a Vec cannot fail.
    let _ = serde_json::to_writer(out, &native);
}

/// Decodes and validates one event. `now` is the receiver's clock (future-timestamp rule).
pub fn decode(bytes: &[u8], now: DateTime<Utc>) -> Result<UsageEvent, Rejection> {
    decode_inner(bytes, now, None)
}

/// Like [`decode`], for receivers that fill in what a native event leaves out (HTTP ingest):
/// an absent or null `id` becomes `new_id()`, an absent or null `timestamp` becomes `now`.
/// CloudEvents carry both by their own spec and get nothing filled in.
pub fn decode_filling(
    bytes: &[u8],
    now: DateTime<Utc>,
    new_id: &mut dyn FnMut() -> String,
) -> Result<UsageEvent, Rejection> {
    decode_inner(bytes, now, Some(new_id))
}

fn decode_inner(
    bytes: &[u8],
    now: DateTime<Utc>,
    fill: Option<&mut dyn FnMut() -> String>,
) -> Result<UsageEvent, Rejection> {
    if bytes.len() > MAX_EVENT_BYTES {
        return Err(Rejection::new(
            RejectReason::Oversize,
            format!(
                "event is {} bytes; at most {MAX_EVENT_BYTES} are accepted",
                bytes.len()
            ),
        ));
    }
    let fields: Fields<'_> = serde_json::from_slice(bytes).map_err(|e| {
        Rejection::new(
            RejectReason::Malformed,
            format!("not a JSON event object: {e}"),
        )
    })?;
    let event = if fields.get("specversion").is_some() {
        from_cloud_event(&fields)?
    } else {
        from_native(&fields, now, fill)?
    };
    event.validate(now)?;
    Ok(event)
}

fn from_native(
    fields: &Fields<'_>,
    now: DateTime<Utc>,
    fill: Option<&mut dyn FnMut() -> String>,
) -> Result<UsageEvent, Rejection> {
    const KNOWN: [&str; 7] = [
        "id",
        "customer",
        "meter",
        "quantity",
        "timestamp",
        "source",
        "dimensions",
    ];
    if let Some((name, _)) = fields.0.iter().find(|(k, _)| !KNOWN.contains(&k.as_str())) {
        return Err(Rejection::new(
            RejectReason::Malformed,
            format!(
                "unknown field `{name}`; expected one of {}",
                KNOWN.join(", ")
            ),
        ));
    }
    let dimensions = match fields.optional("dimensions") {
        None => BTreeMap::new(),
        Some(raw) => serde_json::from_str(raw.get()).map_err(|_| {
            Rejection::new(
                RejectReason::Malformed,
                "field `dimensions` must be an object of string values",
            )
        })?,
    };
    let filling = fill.is_some();
    let id = match (fields.optional("id"), fill) {
        (None, Some(new_id)) => new_id(),
        _ => fields.string("id")?,
    };
    let timestamp = match fields.optional("timestamp") {
        None if filling => now,
        _ => timestamp(&fields.string("timestamp")?)?,
    };
    Ok(UsageEvent {
        id,
        customer: fields.string("customer")?,
        meter: fields.string("meter")?,
        quantity: quantity(fields.required("quantity")?, "quantity")?,
        timestamp,
        source: fields.optional_string("source")?,
        dimensions,
    })
}

fn from_cloud_event(fields: &Fields<'_>) -> Result<UsageEvent, Rejection> {
    let spec = fields.string("specversion")?;
    if spec != "1.0" {
        return Err(Rejection::new(
            RejectReason::Malformed,
            format!("CloudEvents specversion {spec:?} is not supported; send \"1.0\""),
        ));
    }
    if let Some(content_type) = fields.optional_string("datacontenttype")? {
        if !content_type.starts_with("application/json") {
            return Err(Rejection::new(
                RejectReason::Malformed,
                format!("datacontenttype {content_type:?} is not supported; send application/json"),
            ));
        }
    }
    let data: Fields<'_> = serde_json::from_str(fields.required("data")?.get()).map_err(|_| {
        Rejection::new(
            RejectReason::Malformed,
            "CloudEvent `data` must be a JSON object",
        )
    })?;
    let mut dimensions = BTreeMap::new();
    for (key, raw) in data.0.iter().filter(|(k, _)| k != "value") {
        let text = raw.get();
        let value = match text.as_bytes().first() {
            Some(b'"') => serde_json::from_str::<String>(text).ok(),
            // Numbers and booleans become dimensions by their exact JSON text.
            Some(b'-' | b'0'..=b'9' | b't' | b'f') => Some(text.to_owned()),
            _ => None,
        };
        let value = value.ok_or_else(|| {
            Rejection::new(
                RejectReason::Malformed,
                format!("CloudEvent `data.{key}` must be a string, number or boolean"),
            )
        })?;
        dimensions.insert(key.clone(), value);
    }
    let value = data.get("value").ok_or_else(|| {
        Rejection::new(
            RejectReason::MissingField,
            "CloudEvent field `data.value` (the quantity) is missing",
        )
    })?;
    Ok(UsageEvent {
        id: fields.string("id")?,
        customer: fields.string("subject")?,
        meter: fields.string("type")?,
        quantity: quantity(value, "data.value")?,
        timestamp: timestamp(&fields.string("time")?)?,
        source: Some(fields.string("source")?),
        dimensions,
    })
}

fn quantity(raw: &RawValue, field: &str) -> Result<Decimal, Rejection> {
    let text = raw.get();
    let owned;
    let digits = if text.starts_with('"') {
        owned = serde_json::from_str::<String>(text).unwrap_or_default();
        owned.as_str()
    } else {
        text
    };
    let parsed = if digits.contains(['e', 'E']) {
        Decimal::from_scientific(digits)
    } else {
        Decimal::from_str_exact(digits)
    };
    parsed.map_err(|_| {
        Rejection::new(
            RejectReason::InvalidQuantity,
            format!(
                "field `{field}` is {text}; send a non-negative decimal, as a JSON number or string"
            ),
        )
    })
}

fn timestamp(text: &str) -> Result<DateTime<Utc>, Rejection> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            Rejection::new(
                RejectReason::InvalidTimestamp,
                format!("timestamp {text:?} is not RFC 3339 ({e}); send e.g. 2026-01-31T12:00:00Z"),
            )
        })
}

/// A JSON object's fields in order, values kept as raw text; duplicate keys are an error.
struct Fields<'a>(Vec<(String, &'a RawValue)>);

impl<'a> Fields<'a> {
    fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
    }

    /// The field, treating JSON `null` as absent.
    fn optional(&self, name: &str) -> Option<&'a RawValue> {
        self.get(name).filter(|raw| raw.get() != "null")
    }

    fn required(&self, name: &str) -> Result<&'a RawValue, Rejection> {
        self.optional(name).ok_or_else(|| {
            Rejection::new(
                RejectReason::MissingField,
                format!("field `{name}` is missing"),
            )
        })
    }

    fn string(&self, name: &str) -> Result<String, Rejection> {
        as_string(self.required(name)?, name)
    }

    fn optional_string(&self, name: &str) -> Result<Option<String>, Rejection> {
        self.optional(name)
            .map(|raw| as_string(raw, name))
            .transpose()
    }
}

fn as_string(raw: &RawValue, name: &str) -> Result<String, Rejection> {
    serde_json::from_str(raw.get()).map_err(|_| {
        Rejection::new(
            RejectReason::Malformed,
            format!("field `{name}` must be a string"),
        )
    })
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields: Vec<(String, &'de RawValue)> = Vec::with_capacity(8);
                while let Some(key) = map.next_key::<String>()? {
                    let value: &'de RawValue = map.next_value()?;
                    if fields.iter().any(|(k, _)| *k == key) {
                        return Err(de::Error::custom(format!("duplicate field `{key}`")));
                    }
                    fields.push((key, value));
                }
                Ok(Fields(fields))
            }
        }
        deserializer.deserialize_map(FieldsVisitor)
    }
}

/// Parses a quantity given as text (CLI flags, config), with the same exactness and domain
/// rules as events.
pub fn parse_quantity(text: &str) -> Result<Decimal, Rejection> {
    let parsed = Decimal::from_str_exact(text).map_err(|_| {
        Rejection::new(
            RejectReason::InvalidQuantity,
            format!("{text:?} is not a decimal number"),
        )
    })?;
    crate::event::validate_quantity(parsed)?;
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 22, 12, 0, 0).unwrap()
    }

    fn reason(json: &str) -> RejectReason {
        decode(json.as_bytes(), now()).unwrap_err().reason
    }

    const NATIVE: &str = r#"{"id":"e1","customer":"acme","meter":"api_calls","quantity":"12.50","timestamp":"2026-11-22T11:59:00.5Z","source":"svc","dimensions":{"region":"eu"}}"#;

    #[test]
    fn native_event_decodes_exactly() {
        let e = decode(NATIVE.as_bytes(), now()).unwrap();
        assert_eq!(e.id, "e1");
        assert_eq!(e.customer, "acme");
        assert_eq!(e.meter, "api_calls");
        assert_eq!(e.quantity.to_string(), "12.50");
        assert_eq!(e.timestamp.to_rfc3339(), "2026-11-22T11:59:00.500+00:00");
        assert_eq!(e.source.as_deref(), Some("svc"));
        assert_eq!(e.dimensions.get("region").map(String::as_str), Some("eu"));
    }

    #[test]
    fn quantity_as_number_never_passes_through_f64() {
        // 24 significant digits: an f64 keeps about 16.
        let json = NATIVE.replace(r#""12.50""#, "123456789012345.123456789");
        let e = decode(json.as_bytes(), now()).unwrap();
        assert_eq!(e.quantity.to_string(), "123456789012345.123456789");
        let json = NATIVE.replace(r#""12.50""#, "25e2");
        assert_eq!(
            decode(json.as_bytes(), now()).unwrap().quantity,
            Decimal::from(2500)
        );
    }

    #[test]
    fn offsets_are_normalised_to_utc() {
        let json = NATIVE.replace("2026-11-22T11:59:00.5Z", "2026-11-22T12:59:00+01:00");
        let e = decode(json.as_bytes(), now()).unwrap();
        assert_eq!(
            e.timestamp,
            Utc.with_ymd_and_hms(2026, 11, 22, 11, 59, 0).unwrap()
        );
    }

    #[test]
    fn cloud_event_decodes() {
        let json = r#"{"specversion":"1.0","id":"ce-1","source":"gateway","type":"tokens","subject":"acme","time":"2026-11-22T11:00:00Z","datacontenttype":"application/json","ext1":"ignored","data":{"value":5120,"model":"large","cached":false}}"#;
        let e = decode(json.as_bytes(), now()).unwrap();
        assert_eq!(
            (e.id.as_str(), e.customer.as_str(), e.meter.as_str()),
            ("ce-1", "acme", "tokens")
        );
        assert_eq!(e.quantity, Decimal::from(5120));
        assert_eq!(e.source.as_deref(), Some("gateway"));
        assert_eq!(e.dimensions.len(), 2);
        assert_eq!(e.dimensions["model"], "large");
        assert_eq!(e.dimensions["cached"], "false");
    }

    #[test]
    fn every_bad_input_has_its_reason() {
        assert_eq!(reason("not json"), RejectReason::Malformed);
        assert_eq!(reason("[1,2]"), RejectReason::Malformed);
        assert_eq!(
            reason(&NATIVE.replace("\"source\"", "\"sauce\"")),
            RejectReason::Malformed
        );
        assert_eq!(
            reason(&NATIVE.replace(r#""source":"svc","#, r#""id":"x","#)),
            RejectReason::Malformed
        );
        assert_eq!(
            reason(&NATIVE.replace(r#""customer":"acme""#, r#""customer":7"#)),
            RejectReason::Malformed
        );
        assert_eq!(
            reason(&NATIVE.replace(r#""meter":"api_calls","#, "")),
            RejectReason::MissingField
        );
        assert_eq!(
            reason(&NATIVE.replace(r#""12.50""#, r#""12,5""#)),
            RejectReason::InvalidQuantity
        );
        assert_eq!(
            reason(&NATIVE.replace(r#""12.50""#, "-1")),
            RejectReason::InvalidQuantity
        );
        assert_eq!(
            reason(&NATIVE.replace(r#""12.50""#, "1e400")),
            RejectReason::InvalidQuantity
        );
        assert_eq!(
            reason(&NATIVE.replace(r#""12.50""#, "1e16")),
            RejectReason::QuantityOutOfRange
        );
        assert_eq!(
            reason(&NATIVE.replace(r#""12.50""#, "0.1000000000000000000000000001")),
            RejectReason::QuantityOutOfRange
        );
        assert_eq!(
            reason(&NATIVE.replace(r#""svc""#, r#""s\u0000c""#)),
            RejectReason::InvalidSource
        );
        assert_eq!(
            reason(&NATIVE.replace(r#""e1""#, r#""e\u0000""#)),
            RejectReason::InvalidId
        );
        assert_eq!(
            reason(&NATIVE.replace(r#""eu""#, r#""e\u0000u""#)),
            RejectReason::InvalidDimensions
        );
        assert_eq!(
            reason(&NATIVE.replace(r#""12.50""#, "true")),
            RejectReason::InvalidQuantity
        );
        assert_eq!(
            reason(&NATIVE.replace("2026-11-22T11:59:00.5Z", "yesterday")),
            RejectReason::InvalidTimestamp
        );
        assert_eq!(
            reason(&NATIVE.replace("2026-11-22T11:59:00.5Z", "2026-11-22T12:06:00Z")),
            RejectReason::FutureTimestamp
        );
        assert_eq!(
            reason(&NATIVE.replace("api_calls", "API Calls")),
            RejectReason::InvalidMeter
        );
        assert_eq!(
            reason(&NATIVE.replace(r#""id":"e1""#, r#""id":"""#)),
            RejectReason::InvalidId
        );
        let big = NATIVE.replace("svc", &"s".repeat(MAX_EVENT_BYTES));
        assert_eq!(reason(&big), RejectReason::Oversize);
        assert_eq!(
            reason(r#"{"specversion":"0.3","id":"x"}"#),
            RejectReason::Malformed
        );
        assert_eq!(
            reason(
                r#"{"specversion":"1.0","id":"x","source":"s","type":"m","subject":"c","time":"2026-11-22T11:00:00Z","data":{"n":1}}"#
            ),
            RejectReason::MissingField
        );
    }

    #[test]
    fn filling_assigns_an_omitted_id_and_timestamp_only() {
        let json = r#"{"customer":"acme","meter":"api_calls","quantity":12345678901234567.5}"#;
        let mut n = 0;
        let mut new_id = || {
            n += 1;
            format!("assigned-{n}")
        };
        // Out of range, but read exactly (never through f64) to tell so.
        assert_eq!(
            decode_filling(json.as_bytes(), now(), &mut new_id)
                .unwrap_err()
                .reason,
            RejectReason::QuantityOutOfRange
        );
        let json = r#"{"customer":"acme","meter":"api_calls","quantity":123456789012345.123456789,"id":null}"#;
        let e = decode_filling(json.as_bytes(), now(), &mut new_id).unwrap();
        assert_eq!(e.id, "assigned-2");
        assert_eq!(e.timestamp, now());
        assert_eq!(e.quantity.to_string(), "123456789012345.123456789");
        let e = decode_filling(NATIVE.as_bytes(), now(), &mut new_id).unwrap();
        assert_eq!(e.id, "e1", "a given id is kept");
        assert_eq!(
            decode(json.as_bytes(), now()).unwrap_err().reason,
            RejectReason::MissingField,
            "plain decode fills nothing"
        );
    }

    #[test]
    fn encode_then_decode_is_identity() {
        let e = decode(NATIVE.as_bytes(), now()).unwrap();
        assert_eq!(decode(&encode(&e), now()).unwrap(), e);
    }

    prop_compose! {
        fn valid_event()(
            id in "[a-zA-Z0-9-]{1,40}",
            customer in "\\PC{1,40}",
            meter in "[a-z0-9_.-]{1,64}",
            mantissa in 0i64..1_000_000_000_000_000,
            scale in 0u32..=9,
            secs in -2_000_000_000i64..1_790_000_000,
            nanos in 0u32..1_000_000_000,
            source in proptest::option::of("\\PC{0,20}"),
            dimensions in proptest::collection::btree_map("[a-z]{1,10}", "\\PC{0,20}", 0..5),
        ) -> UsageEvent {
            UsageEvent {
                id, customer, meter,
                quantity: Decimal::new(mantissa, scale),
                timestamp: DateTime::from_timestamp(secs, nanos).unwrap(),
                source, dimensions,
            }
        }
    }

    proptest! {
        #[test]
        fn decode_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes, now());
        }

        #[test]
        fn decode_never_panics_on_json_like_text(text in r#"\{("[a-z]{1,12}":("[^"]{0,12}"|-?[0-9.eE+-]{1,12}|null|true|\{\}|\[\]),?){0,9}\}"#) {
            let _ = decode(text.as_bytes(), now());
        }

        #[test]
        fn encode_decode_round_trips(event in valid_event()) {
            let decoded = decode(&encode(&event), now()).unwrap();
            prop_assert_eq!(decoded, event);
        }
    }
}
