//! The answers the middleware writes itself, and the `RateLimit-*` headers it adds. Statuses,
//! codes and bodies are tally-api's (`{"code", "message"}` errors mapped as its `ApiError`
//! maps a [`QuotaError`]; the deny body of `POST /v1/quota/check`), so a client handles a
//! service behind the middleware and `tally serve` alike. Pure: no state, no I/O.

use chrono::{DateTime, Utc};
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};
use rust_decimal::Decimal;
use serde_json::json;

use crate::{Decision, QuotaError};

/// The limit of the route's meter in its period (IETF `RateLimit` header fields, draft 7 style:
/// one header per field).
pub const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
/// What is left of the limit: after this request when it was let through, before it when it
/// was denied.
pub const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
/// Seconds until the period ends and usage starts again from zero.
pub const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// The `RateLimit-*` figures of a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RateLimit {
    limit: Decimal,
    remaining: Decimal,
    /// Seconds until the period resets, rounded up; `None` when the decision has no reset.
    reset: Option<u64>,
}

impl RateLimit {
    /// `None` when the meter has no limit (nothing to tell).
    pub(super) fn of(decision: &Decision, now: DateTime<Utc>) -> Option<RateLimit> {
        let (limit, remaining, resets_at) = match decision {
            Decision::Allow {
                limit: Some(limit),
                remaining,
                resets_at,
                ..
            } => (*limit, remaining.unwrap_or(Decimal::ZERO), *resets_at),
            Decision::Allow { limit: None, .. } => return None,
            // Above the limit (soft, or within the grace): nothing is left.
            Decision::Warn {
                limit, resets_at, ..
            } => (*limit, Decimal::ZERO, *resets_at),
            // This request is not served: what is left is what the usage so far leaves, which
            // may be more than zero yet less than this request asked for.
            Decision::Deny {
                used,
                limit,
                resets_at,
            } => (
                *limit,
                limit.checked_sub(*used).unwrap_or(Decimal::ZERO),
                *resets_at,
            ),
        };
        Some(RateLimit {
            limit,
            remaining: remaining.max(Decimal::ZERO),
            reset: resets_at.map(|at| seconds_until(at, now)),
        })
    }

    /// Adds `RateLimit-Limit`, `RateLimit-Remaining` and (when known) `RateLimit-Reset`.
    pub(super) fn add_to(&self, headers: &mut HeaderMap) {
        headers.insert(RATELIMIT_LIMIT, decimal_value(self.limit));
        headers.insert(RATELIMIT_REMAINING, decimal_value(self.remaining));
        if let Some(reset) = self.reset {
            headers.insert(RATELIMIT_RESET, HeaderValue::from(reset));
        }
    }
}

/// Whole seconds from `now` until `at`, rounded up (a client that waits this long finds the
/// period over), never negative.
fn seconds_until(at: DateTime<Utc>, now: DateTime<Utc>) -> u64 {
    let millis = at.signed_duration_since(now).num_milliseconds().max(0);
    u64::try_from(millis.saturating_add(999) / 1000).unwrap_or(0)
}

/// A decimal as written, exactly (never through f64): `100`, `2.5`. Limits are whole numbers
/// on most plans; a fractional one is sent as it is rather than rounded into a false figure.
fn decimal_value(value: Decimal) -> HeaderValue {
    // Digits, a sign and a point: always a valid header value.
    HeaderValue::from_str(&value.normalize().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// 429 `LIMIT_EXCEEDED`: the body of tally-api's quota check deny, the `RateLimit-*` headers
/// and `Retry-After` (the seconds until the period resets).
pub(super) fn limit_exceeded<B: From<String>>(
    meter: &str,
    decision: &Decision,
    now: DateTime<Utc>,
) -> Response<B> {
    let (used, limit, resets_at) = match decision {
        Decision::Deny {
            used,
            limit,
            resets_at,
        } => (*used, *limit, *resets_at),
        // Only a deny is answered with this; anything else is a bug in the caller, answered
        // as a deny at the limit rather than a panic.
        Decision::Allow { used, .. } | Decision::Warn { used, .. } => (*used, *used, None),
    };
    let body = crate::deny::limit_exceeded_body(meter, used, limit, resets_at);
    let mut response = json_response(StatusCode::TOO_MANY_REQUESTS, &body);
    if let Some(rate_limit) = RateLimit::of(decision, now) {
        rate_limit.add_to(response.headers_mut());
        if let Some(reset) = rate_limit.reset {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(reset));
        }
    }
    response
}

/// The answer for a check that has no decision, with tally-api's status and code for it.
pub(super) fn quota_error<B: From<String>>(error: &QuotaError) -> Response<B> {
    let status =
        StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        // What went wrong inside is for the log, not the client (as in tally-api).
        tracing::error!(%error, "quota check failed: its store is unavailable; answered 503");
        return error_response(
            status,
            "STORE_UNAVAILABLE",
            "a store this request needs is unavailable; retry later",
        );
    }
    if let QuotaError::InsufficientCredits {
        customer,
        meter,
        balance,
        required,
    } = error
    {
        let body = crate::deny::insufficient_credits_body(customer, meter, *balance, *required);
        return json_response(status, &body);
    }
    error_response(status, error.code(), &error.to_string())
}

/// 401 `UNAUTHORIZED`: a metered route must know whom to count the request against.
pub(super) fn no_customer<B: From<String>>() -> Response<B> {
    error_response(
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
        "this route is metered and the service's authentication named no customer for this request",
    )
}

/// `{"code", "message"}` with `status`.
pub(super) fn error_response<B: From<String>>(
    status: StatusCode,
    code: &str,
    message: &str,
) -> Response<B> {
    json_response(status, &json!({ "code": code, "message": message }))
}

fn json_response<B: From<String>>(status: StatusCode, body: &serde_json::Value) -> Response<B> {
    let mut response = Response::new(B::from(body.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;
    use tally_billing::store::BillingStoreError;

    fn n(value: i64) -> Decimal {
        Decimal::from(value)
    }

    fn header<'a>(response: &'a Response<String>, name: &HeaderName) -> Option<&'a str> {
        response.headers().get(name).map(|v| v.to_str().unwrap())
    }

    #[test]
    fn rate_limit_figures_of_each_decision() {
        let now = Utc::now();
        let resets_at = Some(now + TimeDelta::milliseconds(90_500));
        let allow = Decision::Allow {
            used: n(97),
            limit: Some(n(100)),
            remaining: Some(n(2)),
            resets_at,
            credits: None,
        };
        assert_eq!(
            RateLimit::of(&allow, now),
            Some(RateLimit {
                limit: n(100),
                remaining: n(2),
                reset: Some(91)
            }),
            "remaining after this request; the reset rounded up"
        );
        let unlimited = Decision::Allow {
            used: n(5),
            limit: None,
            remaining: None,
            resets_at,
            credits: None,
        };
        assert_eq!(RateLimit::of(&unlimited, now), None);
        let warn = Decision::Warn {
            used: n(120),
            limit: n(100),
            resets_at,
            enforcement: tally_billing::Enforcement::Soft,
            credits: None,
        };
        assert_eq!(RateLimit::of(&warn, now).unwrap().remaining, n(0));
        let deny = Decision::Deny {
            used: n(95),
            limit: n(100),
            resets_at: Some(now - TimeDelta::seconds(3)),
        };
        assert_eq!(
            RateLimit::of(&deny, now),
            Some(RateLimit {
                limit: n(100),
                remaining: n(5),
                reset: Some(0)
            }),
            "left before this request; a reset in the past is 0, not negative"
        );
        let beyond = Decision::Deny {
            used: n(130),
            limit: n(100),
            resets_at: None,
        };
        let figures = RateLimit::of(&beyond, now).unwrap();
        assert_eq!((figures.remaining, figures.reset), (n(0), None));
    }

    #[test]
    fn headers_are_exact_decimals() {
        let mut headers = HeaderMap::new();
        RateLimit {
            limit: Decimal::new(2500, 3),
            remaining: Decimal::new(1250, 3),
            reset: Some(60),
        }
        .add_to(&mut headers);
        assert_eq!(headers[&RATELIMIT_LIMIT], "2.5");
        assert_eq!(headers[&RATELIMIT_REMAINING], "1.25");
        assert_eq!(headers[&RATELIMIT_RESET], "60");
    }

    #[test]
    fn a_deny_is_tally_apis_body_with_headers() {
        let now = Utc::now();
        let resets_at = now + TimeDelta::seconds(120);
        let deny = Decision::Deny {
            used: n(100),
            limit: n(100),
            resets_at: Some(resets_at),
        };
        let response: Response<String> = limit_exceeded("api_calls", &deny, now);
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(header(&response, &CONTENT_TYPE), Some("application/json"));
        assert_eq!(header(&response, &RATELIMIT_LIMIT), Some("100"));
        assert_eq!(header(&response, &RATELIMIT_REMAINING), Some("0"));
        assert_eq!(header(&response, &RATELIMIT_RESET), Some("120"));
        assert_eq!(header(&response, &RETRY_AFTER), Some("120"));
        let body: serde_json::Value = serde_json::from_str(response.body()).unwrap();
        assert_eq!(
            body,
            json!({
                "code": "LIMIT_EXCEEDED", "metric": "api_calls", "limit": "100",
                "current": "100", "resets_at": resets_at, "upgrade_hint": true,
            })
        );
    }

    #[test]
    fn quota_errors_have_tally_apis_statuses_and_codes() {
        let cases: [(QuotaError, u16, &str); 6] = [
            (
                QuotaError::NoActiveSubscription("acme".into()),
                404,
                "NO_ACTIVE_SUBSCRIPTION",
            ),
            (
                QuotaError::FeatureDisabled {
                    customer: "acme".into(),
                    feature: "sso".into(),
                },
                403,
                "FEATURE_DISABLED",
            ),
            (QuotaError::UnknownMeter("x".into()), 400, "UNKNOWN_METER"),
            (
                QuotaError::InsufficientCredits {
                    customer: "acme".into(),
                    meter: "tokens".into(),
                    balance: n(0),
                    required: n(1),
                },
                402,
                "INSUFFICIENT_CREDITS",
            ),
            (
                QuotaError::OutOfRange { quantity: n(1) },
                400,
                "INVALID_QUANTITY",
            ),
            (
                QuotaError::Store(BillingStoreError::RecentlyFailed(
                    "connection refused to 10.0.0.7".into(),
                )),
                503,
                "STORE_UNAVAILABLE",
            ),
        ];
        for (error, status, code) in cases {
            let response: Response<String> = quota_error(&error);
            assert_eq!(response.status().as_u16(), status, "{error}");
            let body: serde_json::Value = serde_json::from_str(response.body()).unwrap();
            assert_eq!(body["code"], code);
            assert!(
                !body["message"].as_str().unwrap().contains("10.0.0.7"),
                "what went wrong inside stays in the log"
            );
        }
        let response: Response<String> = no_customer();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
}
