//! Stripe's v2 meter events: sessions, the stream, and v2 adjustments.
//!
//! - `POST /v2/billing/meter_event_session` (secret key) answers an `authentication_token`
//!   valid 15 minutes.
//! - `POST /v2/billing/meter_event_stream` (that token as Bearer; Stripe serves it from
//!   `meter-events.stripe.com`, the emulator from the same address) takes `{"events": […]}`, 1
//!   to 100 a request, under a per-account limit of events per second. Only the request's shape
//!   is checked at once (400 for all of it); each event is validated afterwards, as Stripe does,
//!   and one that fails is dropped and reported as a thin event
//!   `v1.billing.meter.error_report_triggered` (or `…no_meter_found`). An identifier already
//!   taken within 24 hours is dropped without a report: a resent batch bills nothing twice. The
//!   answer is `{}`. An expired token is refused with 401 `temporary_session_expired`.
//! - `POST /v2/billing/meter_event_adjustments` (secret key, JSON) cancels by identifier.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};

use crate::reply::Reply;

/// How long a session's token is good for (Stripe: 15 minutes).
pub(crate) const SESSION_SECONDS: i64 = 15 * 60;
/// Events one stream request may carry (Stripe: 100).
pub(crate) const MAX_EVENTS_PER_REQUEST: usize = 100;

/// A meter event session: whose token it is, and until when.
#[derive(Clone)]
pub(crate) struct Session {
    pub(crate) api_key: String,
    pub(crate) livemode: bool,
    pub(crate) expires_at: i64,
}

/// The sessions handed out, by token. Expired ones are forgotten an hour after they expire.
#[derive(Default)]
pub(crate) struct Sessions {
    by_token: HashMap<String, Session>,
    next_id: u64,
}

impl Sessions {
    /// `POST /v2/billing/meter_event_session`.
    pub(crate) fn create(&mut self, api_key: &str, livemode: bool, now: i64) -> Reply {
        self.by_token
            .retain(|_, session| session.expires_at + 3600 > now);
        self.next_id += 1;
        let id = format!("mes_emu{:010}", self.next_id);
        let token = format!("ek_emu_{:032x}", rand::random::<u128>());
        let session = Session {
            api_key: api_key.to_owned(),
            livemode,
            expires_at: now + SESSION_SECONDS,
        };
        let reply = Reply::json(
            200,
            &json!({
                "id": id,
                "object": "v2.billing.meter_event_session",
                "authentication_token": token,
                "created": rfc3339(now),
                "expires_at": rfc3339(session.expires_at),
                "livemode": livemode,
            }),
        );
        self.by_token.insert(token, session);
        reply
    }

    /// Forgets every session, as a restarted server or revoked tokens would.
    pub(crate) fn revoke_all(&mut self) {
        self.by_token.clear();
    }

    /// The session a stream request's token names, if it is still good.
    pub(crate) fn authenticate(&self, token: Option<&str>, now: i64) -> Result<Session, Reply> {
        let Some(session) = token.and_then(|t| self.by_token.get(t)) else {
            return Err(Reply::error(
                401,
                "invalid_request_error",
                None,
                "Invalid meter event session token: create one with POST /v2/billing/meter_event_session and send its authentication_token as Bearer.",
                None,
            ));
        };
        if now >= session.expires_at {
            return Err(Reply::error(
                401,
                "temporary_session_expired",
                Some("billing_meter_event_session_expired"),
                "The temporary session token has expired.",
                None,
            ));
        }
        Ok(session.clone())
    }
}

/// One event of a stream request, its shape checked; its values are validated afterwards.
pub(crate) struct StreamEvent {
    pub(crate) event_name: String,
    pub(crate) identifier: Option<String>,
    pub(crate) payload: BTreeMap<String, String>,
    /// `None` when absent (Stripe takes the time of receipt); `Err` when not RFC 3339 (reported
    /// afterwards, like any other invalid value).
    pub(crate) timestamp: Option<Result<i64, String>>,
}

/// Reads a stream request's body: `{"events": [...]}` with 1 to 100 events, each with an
/// `event_name` and a `payload` of strings. A shape error refuses the whole request.
pub(crate) fn parse_stream(body: &[u8]) -> Result<Vec<StreamEvent>, Reply> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| Reply::invalid(format!("The request body is not JSON: {e}."), None))?;
    let Some(events) = value.get("events").and_then(Value::as_array) else {
        return Err(Reply::missing("events"));
    };
    if events.is_empty() || events.len() > MAX_EVENTS_PER_REQUEST {
        return Err(Reply::invalid(
            format!(
                "events must hold 1 to {MAX_EVENTS_PER_REQUEST} events; got {}.",
                events.len()
            ),
            Some("events"),
        ));
    }
    events
        .iter()
        .enumerate()
        .map(|(i, event)| parse_event(i, event))
        .collect()
}

fn parse_event(i: usize, event: &Value) -> Result<StreamEvent, Reply> {
    let field = |name: &str| format!("events[{i}].{name}");
    let event_name = match event.get("event_name").and_then(Value::as_str) {
        Some(name) if !name.is_empty() && name.len() <= 100 => name.to_owned(),
        Some(_) => {
            return Err(Reply::invalid(
                "event_name must be 1 to 100 characters.",
                Some(&field("event_name")),
            ))
        }
        None => return Err(Reply::missing(&field("event_name"))),
    };
    let identifier = match event.get("identifier") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) if !id.is_empty() && id.len() <= 100 => Some(id.clone()),
        Some(_) => {
            return Err(Reply::invalid(
                "identifier must be a string of 1 to 100 characters.",
                Some(&field("identifier")),
            ))
        }
    };
    let Some(payload) = event.get("payload").and_then(Value::as_object) else {
        return Err(Reply::missing(&field("payload")));
    };
    let mut strings = BTreeMap::new();
    for (key, value) in payload {
        let Some(text) = value.as_str() else {
            return Err(Reply::invalid(
                format!("payload values must be strings; {key} is not."),
                Some(&field(&format!("payload.{key}"))),
            ));
        };
        strings.insert(key.clone(), text.to_owned());
    }
    let timestamp = match event.get("timestamp") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(
            chrono::DateTime::parse_from_rfc3339(text)
                .map(|t| t.timestamp())
                .map_err(|_| format!("Invalid timestamp {text:?}: not an RFC 3339 time.")),
        ),
        Some(_) => {
            return Err(Reply::invalid(
                "timestamp must be an RFC 3339 string.",
                Some(&field("timestamp")),
            ))
        }
    };
    Ok(StreamEvent {
        event_name,
        identifier,
        payload: strings,
        timestamp,
    })
}

/// The error report code Stripe gives an event that failed validation, from the parameter
/// the synchronous (v1) check names.
pub(crate) fn error_code(param: Option<&str>, message: &str) -> &'static str {
    let param = param.unwrap_or("");
    if param.starts_with("timestamp") {
        if message.contains("future") && !message.contains("past") {
            "timestamp_in_future"
        } else {
            "timestamp_too_far_in_past"
        }
    } else if param.starts_with("payload[") && message.starts_with("Missing") {
        if param.contains("customer") {
            "meter_event_no_customer_defined"
        } else {
            "meter_event_value_not_found"
        }
    } else if param.starts_with("payload[") {
        "meter_event_invalid_value"
    } else {
        "meter_event_invalid_payload"
    }
}

/// `POST /v2/billing/meter_event_adjustments`: `{"event_name", "type": "cancel",
/// "cancel": {"identifier"}}`, as its parts.
pub(crate) fn parse_adjustment(body: &[u8]) -> Result<(String, String), Reply> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| Reply::invalid(format!("The request body is not JSON: {e}."), None))?;
    let Some(event_name) = value.get("event_name").and_then(Value::as_str) else {
        return Err(Reply::missing("event_name"));
    };
    match value.get("type").and_then(Value::as_str) {
        Some("cancel") => {}
        None => return Err(Reply::missing("type")),
        Some(other) => {
            return Err(Reply::invalid(
                format!("Invalid type: must be cancel; got {other}."),
                Some("type"),
            ))
        }
    }
    let Some(identifier) = value
        .get("cancel")
        .and_then(|c| c.get("identifier"))
        .and_then(Value::as_str)
    else {
        return Err(Reply::missing("cancel.identifier"));
    };
    Ok((event_name.to_owned(), identifier.to_owned()))
}

/// The v2 shape of a cancel Stripe took.
pub(crate) fn adjustment_json(
    id: &str,
    event_name: &str,
    identifier: &str,
    livemode: bool,
    now: i64,
) -> Value {
    json!({
        "id": id,
        "object": "v2.billing.meter_event_adjustment",
        "cancel": { "identifier": identifier },
        "created": rfc3339(now),
        "event_name": event_name,
        "livemode": livemode,
        "status": "pending",
        "type": "cancel",
    })
}

pub(crate) fn rfc3339(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_body_is_checked_for_shape_only() {
        let ok = br#"{"events":[{"event_name":"api","identifier":"a","payload":{"stripe_customer_id":"cus_1","value":"x"},"timestamp":"2026-12-07T10:00:00.000Z"}]}"#;
        let events = parse_stream(ok).unwrap();
        assert_eq!(
            events[0].payload["value"], "x",
            "values are validated later"
        );
        assert!(matches!(events[0].timestamp, Some(Ok(_))));
        for bad in [
            &br#"{"events":[]}"#[..],
            br#"{"events":[{"payload":{}}]}"#,
            br#"{"events":[{"event_name":"api","payload":{"value":3}}]}"#,
            br#"{"events":[{"event_name":"api"}]}"#,
            br#"not json"#,
        ] {
            assert_eq!(parse_stream(bad).err().map(|r| r.status), Some(400));
        }
        let many = format!(
            r#"{{"events":[{}]}}"#,
            vec![r#"{"event_name":"a","payload":{}}"#; 101].join(",")
        );
        assert_eq!(
            parse_stream(many.as_bytes()).err().map(|r| r.status),
            Some(400)
        );
    }

    #[test]
    fn an_expired_session_is_refused_as_stripe_does() {
        let mut sessions = Sessions::default();
        let reply = sessions.create("sk_test_x", false, 1_000);
        let body: Value = serde_json::from_slice(&reply.body).unwrap();
        let token = body["authentication_token"].as_str().unwrap();
        assert!(sessions.authenticate(Some(token), 1_000 + 899).is_ok());
        let expired = sessions
            .authenticate(Some(token), 1_000 + 900)
            .err()
            .unwrap();
        assert_eq!(expired.status, 401);
        let error: Value = serde_json::from_slice(&expired.body).unwrap();
        assert_eq!(error["error"]["type"], "temporary_session_expired");
        assert!(sessions.authenticate(Some("ek_other"), 1_000).is_err());
        assert!(sessions.authenticate(None, 1_000).is_err());
    }
}
