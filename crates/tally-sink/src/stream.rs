//! Stripe's v2 meter events, called with tally's own HTTP client (async-stripe has no v2):
//! a meter event session (a token good for 15 minutes, from `POST
//! /v2/billing/meter_event_session`), the stream (`POST /v2/billing/meter_event_stream` with that
//! token, up to 100 events a request), and cancels (`POST /v2/billing/meter_event_adjustments`).
//!
//! The stream validates events after it has answered: one Stripe then refuses arrives later as
//! the thin event `v1.billing.meter.error_report_triggered`, which tally's webhook endpoint
//! records (`stripe_meter_error_reports`) and `tally reconcile` lists. Identifiers keep their
//! meaning: Stripe drops an event whose identifier it has seen within 24 hours, so a request
//! sent again (its answer lost) bills nothing twice.

use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use hyper::header::HeaderValue;
use serde_json::{json, Value};

use crate::limiter::RateLimiter;
use crate::stripe::{StripeCallError, StripeHttp};

/// The most events one stream request carries (Stripe's limit).
pub(crate) const MAX_EVENTS_PER_REQUEST: usize = 100;
/// How long Stripe says a session's token is good for.
const SESSION_LIFETIME: TimeDelta = TimeDelta::minutes(15);
/// A session is renewed this long before it expires, so no request carries a token that
/// expires on the way.
const RENEW_BEFORE: TimeDelta = TimeDelta::minutes(1);
/// A token longer than this is not Stripe's: it is refused rather than sent in every header.
const MAX_TOKEN_BYTES: usize = 4096;

/// The v2 meter event API of one account.
pub(crate) struct MeterEventStream {
    stripe: StripeHttp,
    /// `…/v2/billing/meter_event_stream` on `stripe.meter_events_base`.
    stream_url: String,
    /// The account's rate, which session and adjustment calls count against.
    account_limiter: Arc<RateLimiter>,
    session: tokio::sync::Mutex<Option<Session>>,
}

struct Session {
    /// `Bearer <authentication_token>`.
    authorization: HeaderValue,
    expires_at: DateTime<Utc>,
}

impl MeterEventStream {
    pub(crate) fn new(
        stripe: StripeHttp,
        meter_events_base: &str,
        account_limiter: Arc<RateLimiter>,
    ) -> MeterEventStream {
        MeterEventStream {
            stripe,
            stream_url: format!("{meter_events_base}v2/billing/meter_event_stream"),
            account_limiter,
            session: tokio::sync::Mutex::new(None),
        }
    }

    /// Opens a session: whether the account has the v2 stream at all.
    pub(crate) async fn open(&self) -> Result<(), StripeCallError> {
        self.authorization().await.map(drop)
    }

    /// Sends up to 100 events (`{"events": [...]}`, see [`stream_event`]). A token Stripe
    /// refuses (expired, or revoked) is dropped, a new session opened and the request sent
    /// again, once.
    pub(crate) async fn send(&self, body: &Value) -> Result<(), StripeCallError> {
        let mut renewed = false;
        loop {
            let authorization = self.authorization().await?;
            match self
                .stripe
                .post_json_as(&self.stream_url, &authorization, body)
                .await
            {
                // A token Stripe no longer takes, expired or not, is never sent again.
                Err(error) if error.status == Some(401) => {
                    self.forget(&authorization).await;
                    if !renewed {
                        renewed = true;
                        continue;
                    }
                    return Err(error);
                }
                answer => return answer.map(drop),
            }
        }
    }

    /// Cancels the event `identifier` of `event_name` (Stripe takes a cancel within 24 hours
    /// of receiving the event).
    pub(crate) async fn cancel(
        &self,
        event_name: &str,
        identifier: &str,
    ) -> Result<(), StripeCallError> {
        self.account_limiter.acquire().await;
        let body = json!({
            "event_name": event_name,
            "type": "cancel",
            "cancel": { "identifier": identifier },
        });
        self.stripe
            .post_json("v2/billing/meter_event_adjustments", &body)
            .await
            .map(drop)
    }

    /// The current session's `Authorization`, creating a session when there is none or it
    /// expires within a minute.
    async fn authorization(&self) -> Result<HeaderValue, StripeCallError> {
        let mut session = self.session.lock().await;
        if let Some(current) = &*session {
            if current.expires_at - Utc::now() > RENEW_BEFORE {
                return Ok(current.authorization.clone());
            }
        }
        self.account_limiter.acquire().await;
        let opened = self
            .stripe
            .post_json("v2/billing/meter_event_session", &json!({}))
            .await
            .and_then(|created| Session::from_answer(&created, Utc::now()));
        let fresh = opened.map_err(|error| StripeCallError {
            session: true,
            message: format!("cannot open a meter event session: {}", error.message),
            ..error
        })?;
        let authorization = fresh.authorization.clone();
        *session = Some(fresh);
        Ok(authorization)
    }

    /// Drops the session whose token Stripe refused as expired (unless another request has
    /// already replaced it).
    async fn forget(&self, authorization: &HeaderValue) {
        let mut session = self.session.lock().await;
        if session
            .as_ref()
            .is_some_and(|s| s.authorization == *authorization)
        {
            *session = None;
        }
    }
}

impl Session {
    /// Reads Stripe's answer to a session's creation. Its `expires_at` (an RFC 3339 time, or
    /// unix seconds) is believed only up to Stripe's documented 15 minutes from now: a token is
    /// never trusted for longer than Stripe promises, whatever a server says.
    fn from_answer(answer: &Value, now: DateTime<Utc>) -> Result<Session, StripeCallError> {
        let token = answer["authentication_token"]
            .as_str()
            .filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN_BYTES)
            .ok_or_else(|| {
                StripeCallError::transport(
                    "the meter event session's answer has no usable authentication_token",
                )
            })?;
        let mut authorization =
            HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                StripeCallError::transport(
                    "the meter event session's token holds characters a header cannot carry",
                )
            })?;
        authorization.set_sensitive(true);
        let stated = match &answer["expires_at"] {
            Value::String(text) => DateTime::parse_from_rfc3339(text)
                .ok()
                .map(|t| t.with_timezone(&Utc)),
            Value::Number(n) => n.as_i64().and_then(|s| DateTime::from_timestamp(s, 0)),
            _ => None,
        };
        let expires_at = stated
            .unwrap_or(now + SESSION_LIFETIME)
            .min(now + SESSION_LIFETIME);
        Ok(Session {
            authorization,
            expires_at,
        })
    }
}

/// One event of a stream request: the same identifier, payload and timestamp a v1 call
/// carries, in the v2 JSON shape (`timestamp` as an RFC 3339 time).
pub(crate) fn stream_event(
    event_name: &str,
    identifier: &str,
    stripe_customer_id: &str,
    value: &str,
    timestamp: DateTime<Utc>,
) -> Value {
    json!({
        "event_name": event_name,
        "identifier": identifier,
        "payload": { "stripe_customer_id": stripe_customer_id, "value": value },
        "timestamp": timestamp.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_trusted_for_no_longer_than_stripe_promises() {
        let now = Utc::now();
        let far = json!({ "authentication_token": "ek_1", "expires_at": "2999-01-01T00:00:00Z" });
        assert_eq!(
            Session::from_answer(&far, now).unwrap().expires_at,
            now + SESSION_LIFETIME
        );
        let soon = now + TimeDelta::minutes(5);
        let numeric = json!({ "authentication_token": "ek_1", "expires_at": soon.timestamp() });
        assert_eq!(
            Session::from_answer(&numeric, now)
                .unwrap()
                .expires_at
                .timestamp(),
            soon.timestamp()
        );
        let missing = json!({ "authentication_token": "ek_1" });
        assert_eq!(
            Session::from_answer(&missing, now).unwrap().expires_at,
            now + SESSION_LIFETIME
        );
        for bad in [
            json!({}),
            json!({ "authentication_token": "" }),
            json!({ "authentication_token": "a\nb" }),
            json!({ "authentication_token": "x".repeat(MAX_TOKEN_BYTES + 1) }),
        ] {
            assert!(Session::from_answer(&bad, now).is_err(), "{bad}");
        }
    }
}
