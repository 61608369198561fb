//! The handlers.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::json;
use tally_quota::{Decision, QuotaError};

use crate::auth::{Caller, ReadableCustomer};
use crate::error::{json_body, ApiError};
use crate::telemetry;
use crate::ApiState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CheckRequest {
    customer: String,
    meter: String,
    /// A decimal, as a JSON number or string; defaults to 1.
    #[serde(default)]
    quantity: Option<serde_json::Value>,
    /// Also require this feature.
    #[serde(default)]
    feature: Option<String>,
    /// The usage's dimensions (e.g. `{"model": "large"}`), for a meter under `credits`
    /// enforcement priced per group-by value.
    #[serde(default)]
    dimensions: Option<BTreeMap<String, String>>,
}

/// `POST /v1/quota/check`: 200 allow/warn; 429 `LIMIT_EXCEEDED`; 402 `INSUFFICIENT_CREDITS`;
/// 403 `FEATURE_DISABLED`; 404 `NO_ACTIVE_SUBSCRIPTION`. A customer token's check only looks: what it is allowed is not
/// counted, so it cannot use up (or probe by using up) anybody's quota.
pub(crate) async fn quota_check(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    body: Result<Json<CheckRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(request) = json_body(body)?;
    caller.may_read(&request.customer)?;
    let quantity = match &request.quantity {
        None => Decimal::ONE,
        Some(value) => decimal(value)?,
    };
    if let Some(feature) = &request.feature {
        state
            .quota
            .require_feature(&request.customer, feature)
            .await?;
    }
    let no_dimensions = BTreeMap::new();
    let dimensions = request.dimensions.as_ref().unwrap_or(&no_dimensions);
    let (customer, meter) = (&request.customer, &request.meter);
    let answer = match (caller.counts_usage(), request.dimensions.is_some()) {
        (true, true) => {
            state
                .quota
                .check_with(customer, meter, quantity, dimensions)
                .await
        }
        (true, false) => state.quota.check(customer, meter, quantity).await,
        (false, true) => {
            state
                .quota
                .peek_with(customer, meter, quantity, dimensions)
                .await
        }
        (false, false) => state.quota.peek(customer, meter, quantity).await,
    };
    let decision = match answer {
        Err(QuotaError::InsufficientCredits {
            customer,
            meter,
            balance,
            required,
        }) => {
            telemetry::quota_decision("deny");
            return Ok((
                StatusCode::PAYMENT_REQUIRED,
                Json(tally_quota::deny::insufficient_credits_body(
                    &customer, &meter, balance, required,
                )),
            )
                .into_response());
        }
        answer => answer?,
    };
    telemetry::quota_decision(match &decision {
        Decision::Allow { .. } => "allow",
        Decision::Warn { .. } => "warn",
        Decision::Deny { .. } => "deny",
    });
    Ok(match decision {
        Decision::Allow {
            used,
            limit,
            remaining,
            resets_at,
            credits,
        } => Json(json!({
            "decision": "allow", "metric": request.meter, "current": used, "limit": limit,
            "remaining": remaining, "resets_at": resets_at, "credits_remaining": credits,
        }))
        .into_response(),
        Decision::Warn {
            used,
            limit,
            resets_at,
            enforcement,
            credits,
        } => Json(json!({
            "decision": "warn", "metric": request.meter, "current": used, "limit": limit,
            "resets_at": resets_at, "enforcement": enforcement, "credits_remaining": credits,
        }))
        .into_response(),
        Decision::Deny {
            used,
            limit,
            resets_at,
        } => (
            StatusCode::TOO_MANY_REQUESTS,
            Json(tally_quota::deny::limit_exceeded_body(
                &request.meter,
                used,
                limit,
                resets_at,
            )),
        )
            .into_response(),
    })
}

/// An exact, non-negative decimal from a JSON number or string (never through f64).
fn decimal(value: &serde_json::Value) -> Result<Decimal, ApiError> {
    let text = match value {
        serde_json::Value::Number(number) => number.to_string(),
        serde_json::Value::String(text) => text.clone(),
        _ => {
            return Err(ApiError::invalid_quantity(
                "quantity must be a number or a decimal string",
            ))
        }
    };
    let quantity = parse_decimal(&text).ok_or_else(|| {
        ApiError::invalid_quantity(format!(
            "quantity {:?} is not a decimal of at most 28 digits",
            text.chars().take(64).collect::<String>()
        ))
    })?;
    if quantity.is_sign_negative() && !quantity.is_zero() {
        return Err(ApiError::invalid_quantity("quantity must not be negative"));
    }
    Ok(quantity)
}

/// Plain (`12.5`) or scientific (`1.25e1`) notation. An exponent is read only when it is small
/// enough to give a 28-digit decimal: the parser's own arithmetic is never asked to go beyond.
fn parse_decimal(text: &str) -> Option<Decimal> {
    if text.len() > 64 {
        return None;
    }
    if let Ok(plain) = text.parse::<Decimal>() {
        return Some(plain);
    }
    let (mantissa, exponent) = text.split_once(['e', 'E'])?;
    let exponent: i32 = exponent.parse().ok()?;
    if !(-28..=28).contains(&exponent) {
        return None;
    }
    let mantissa: Decimal = mantissa.parse().ok()?;
    if exponent >= 0 {
        mantissa.checked_mul(Decimal::from_i128_with_scale(
            10i128.pow(exponent.unsigned_abs()),
            0,
        ))
    } else {
        // Exact: more fraction digits, the same digits.
        let scale = mantissa.scale().checked_add(exponent.unsigned_abs())?;
        (scale <= 28).then(|| Decimal::from_i128_with_scale(mantissa.mantissa(), scale))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EntitlementsQuery {
    /// A plan: what the customer would get on it, with their override merged in.
    #[serde(default)]
    preview: Option<String>,
}

/// `GET /v1/customers/{id}/entitlements[?preview=PLAN]`.
pub(crate) async fn entitlements(
    State(state): State<Arc<ApiState>>,
    ReadableCustomer(customer): ReadableCustomer,
    query: Result<Query<EntitlementsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    if let Some(plan) = query.preview {
        let preview = tally_billing::store::preview_entitlements(&state.pool, &customer, &plan)
            .await?
            .map_err(|why| {
                ApiError::new(
                    StatusCode::CONFLICT,
                    "OVERRIDE_CONFLICT",
                    format!("the customer's override does not fit plan {plan:?}: {why}; change the override with the plan"),
                )
            })?;
        return Ok(Json(json!({
            "customer": customer, "plan": preview.plan, "preview": true,
            "features": preview.features, "limits": preview.limits,
        }))
        .into_response());
    }
    let (subscription, entitlements) = state.quota.entitlements(&customer).await?;
    Ok(Json(json!({
        "customer": customer,
        "plan": entitlements.plan,
        "status": subscription.status,
        "current_period_start": subscription.current_period_start,
        "current_period_end": subscription.current_period_end,
        "cancel_at_period_end": subscription.cancel_at_period_end,
        "features": entitlements.features,
        "limits": entitlements.limits,
    }))
    .into_response())
}

pub(crate) async fn healthz() -> &'static str {
    "ok"
}

/// Ready when Postgres answers (asked now) and every other dependency this process uses is
/// reachable; the answer lists each, and since when one is away.
pub(crate) async fn readyz(State(state): State<Arc<ApiState>>) -> Response {
    let postgres = tally_runtime::dependency("postgres");
    match sqlx::query("SELECT 1").execute(&state.pool).await {
        Ok(_) => postgres.up(),
        Err(error) => postgres.down(&error),
    }
    readiness().await
}

/// 200 when every dependency this process uses is reachable, else 503; the body lists each
/// (`/readyz` here, and on the admin listener of `tally aggregate` and `tally sink`).
pub async fn readiness() -> Response {
    let dependencies: Vec<serde_json::Value> = tally_runtime::health::readiness()
        .into_iter()
        .map(|d| {
            serde_json::json!({
                "name": d.name, "up": d.up,
                "down_seconds": d.down_for.map(|t| t.as_secs_f64()), "error": d.error,
            })
        })
        .collect();
    let ready = dependencies.iter().all(|d| d["up"] == true);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({ "ready": ready, "dependencies": dependencies });
    (status, Json(body)).into_response()
}

pub(crate) async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    match &state.metrics {
        Some(handle) => handle.render().into_response(),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "NO_METRICS",
            "metrics are not enabled in this process",
        )
        .into_response(),
    }
}
