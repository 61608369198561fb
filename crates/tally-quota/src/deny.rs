//! The bodies of a refused check, written in one place: tally-api's quota check and the
//! middleware answer with the same JSON, so one client (the paywall script, a team's own code)
//! reads both.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::{json, Value};

/// 429 `LIMIT_EXCEEDED`: the meter, its limit, the use so far and when the period resets.
pub fn limit_exceeded_body(
    meter: &str,
    used: Decimal,
    limit: Decimal,
    resets_at: Option<DateTime<Utc>>,
) -> Value {
    json!({
        "code": "LIMIT_EXCEEDED", "metric": meter, "limit": limit,
        "current": used, "resets_at": resets_at, "upgrade_hint": true,
    })
}

/// 402 `INSUFFICIENT_CREDITS`: the meter, the projected balance and the credits the usage
/// needs.
pub fn insufficient_credits_body(
    customer: &str,
    meter: &str,
    balance: Decimal,
    required: Decimal,
) -> Value {
    let message = format!("customer {customer:?} has {balance} credits left; {required} are needed for this {meter} usage; grant or buy more credits");
    json!({
        "code": "INSUFFICIENT_CREDITS", "message": message, "metric": meter,
        "balance": balance, "required": required,
    })
}
