//! Customers: `GET /v1/customers?plan&status&limit&after` (paged by customer id), `GET
//! /v1/customers/{id}` (subscription, entitlements, usage against each limit and the invoice
//! preview in one answer), and `PUT`/`DELETE /v1/customers/{id}/overrides`.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use tally_billing::subscriptions::{self, Status, MAX_PAGE};
use tally_billing::{Entitlements, Override};
use tally_quota::{Decision, QuotaError};

use super::actor;
use crate::auth::{Caller, ReadableCustomer};
use crate::error::{json_body, ApiError};
use crate::usage::invoice_preview_of;
use crate::ApiState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    #[serde(default)]
    plan: Option<String>,
    #[serde(default)]
    status: Option<String>,
    /// The `next` of the previous page.
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    limit: Option<i64>,
}

/// `GET /v1/customers`: customers with a subscription, by id; each with their live (else
/// latest) subscription's plan and status.
pub(crate) async fn list(
    State(state): State<Arc<ApiState>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let status = query
        .status
        .as_deref()
        .map(str::parse::<Status>)
        .transpose()
        .map_err(ApiError::invalid)?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(format!(
            "limit {limit}: between 1 and {MAX_PAGE}"
        )));
    }
    let page = subscriptions::list_customers(
        &state.pool,
        query.plan.as_deref(),
        status,
        query.after.as_deref(),
        limit,
    )
    .await?;
    Ok(Json(page).into_response())
}

/// `GET /v1/customers/{id}`: the live subscription (else the latest), the override, the
/// entitlements, usage against each limit (as a quota check sees it) and the invoice preview.
pub(crate) async fn get(
    State(state): State<Arc<ApiState>>,
    ReadableCustomer(customer): ReadableCustomer,
) -> Result<Response, ApiError> {
    let listed = subscriptions::customer_subscriptions(&state.pool, &customer).await?;
    let Some(latest) = listed
        .iter()
        .find(|s| s.subscription.status.is_live())
        .or(listed.first())
    else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NO_SUCH_CUSTOMER",
            format!("no subscription was ever recorded for customer {customer:?}; create one with POST /v1/subscriptions"),
        ));
    };
    let overrides = tally_billing::store::get_override(&state.pool, &customer).await?;
    let (entitlements, usage, preview) = if latest.subscription.status.is_live() {
        let (_, entitlements) = state.quota.entitlements(&customer).await?;
        let usage = usage_against_limits(&state, &customer, &entitlements).await?;
        let preview = invoice_preview_of(&state, &customer).await?;
        (Some(entitlements), usage, Some(preview))
    } else {
        (None, Vec::new(), None)
    };
    Ok(Json(json!({
        "customer": customer,
        "subscription": latest.subscription,
        "override": overrides,
        "entitlements": entitlements.map(|e| json!({ "plan": e.plan, "features": e.features, "limits": e.limits })),
        "usage": usage,
        "invoice_preview": preview,
    }))
    .into_response())
}

/// Each limited meter's usage in its current period, as a check would see it (nothing counted).
async fn usage_against_limits(
    state: &ApiState,
    customer: &str,
    entitlements: &Entitlements,
) -> Result<Vec<serde_json::Value>, ApiError> {
    let mut usage = Vec::new();
    for (meter, limit) in &entitlements.limits {
        let decision = match state
            .quota
            .peek(customer, meter, rust_decimal::Decimal::ZERO)
            .await
        {
            Ok(decision) => decision,
            // A plan may limit a meter no event has recorded yet: nothing used.
            Err(QuotaError::UnknownMeter(_)) => continue,
            Err(error) => return Err(error.into()),
        };
        let (used, resets_at) = match decision {
            Decision::Allow {
                used, resets_at, ..
            }
            | Decision::Warn {
                used, resets_at, ..
            }
            | Decision::Deny {
                used, resets_at, ..
            } => (used, resets_at),
        };
        let remaining =
            (!limit.is_unlimited()).then(|| (limit.limit - used).max(rust_decimal::Decimal::ZERO));
        usage.push(json!({
            "meter": meter, "used": used, "limit": (!limit.is_unlimited()).then_some(limit.limit),
            "remaining": remaining, "period": limit.period, "enforcement": limit.enforcement,
            "resets_at": resets_at,
        }));
    }
    Ok(usage)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OverrideRequest {
    overrides: Override,
    reason: String,
}

/// `PUT /v1/customers/{id}/overrides`: replaces the customer's override. Its limits must name
/// known meters, and it must fit the customer's current plan.
pub(crate) async fn put_override(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ReadableCustomer(customer): ReadableCustomer,
    body: Result<Json<OverrideRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(request) = json_body(body)?;
    let actor = actor(&caller, &request.reason)?;
    tally_core::event::validate_customer(&customer)
        .map_err(|rejection| ApiError::invalid(rejection.detail))?;
    for meter in request.overrides.limits.keys() {
        let known = tally_db::meters::aggregation_of(&state.pool, meter)
            .await
            .map_err(|e| ApiError::unavailable("STORE_UNAVAILABLE", e))?;
        if known.is_none() {
            return Err(invalid_override(format!(
                "the override limits meter {meter:?}, which is not in [[meters]]"
            )));
        }
    }
    // It must fit the plan the customer is on, and the one it moves to at the period's end
    // (checked by `set_override`, under the customer's lock).
    tally_billing::store::set_override(
        &state.pool,
        &customer,
        &request.overrides,
        &actor.reason,
        &actor.name,
    )
    .await
    .map_err(|error| match error {
        tally_billing::BillingStoreError::OverrideDoesNotFit { plan, why, .. } => {
            invalid_override(format!("it does not fit plan {plan:?}: {why}"))
        }
        other => other.into(),
    })?;
    state.quota.invalidate(&customer);
    Ok(Json(json!({
        "customer": customer, "overrides": request.overrides,
        "reason": actor.reason, "set_by": actor.name,
    }))
    .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReasonQuery {
    #[serde(default)]
    reason: String,
}

/// `DELETE /v1/customers/{id}/overrides?reason=…`: 204, or 404 NO_OVERRIDE.
pub(crate) async fn delete_override(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ReadableCustomer(customer): ReadableCustomer,
    query: Result<Query<ReasonQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let actor = actor(&caller, &query.reason)?;
    let deleted =
        tally_billing::store::delete_override(&state.pool, &customer, &actor.reason, &actor.name)
            .await?;
    if !deleted {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NO_OVERRIDE",
            format!("customer {customer:?} has no override"),
        ));
    }
    state.quota.invalidate(&customer);
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn invalid_override(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "INVALID_OVERRIDE", message)
}
