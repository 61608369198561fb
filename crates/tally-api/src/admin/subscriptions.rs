//! Subscriptions tally manages: `POST /v1/subscriptions`, `GET /v1/subscriptions/{id}`,
//! `POST /v1/subscriptions/{id}/change|cancel|reactivate`, `PUT
//! /v1/subscriptions/{id}/payment-method`, and `GET /v1/customers/{id}/subscriptions` (every
//! subscription the customer had, with its history). A Stripe-managed subscription is shown
//! but not changed (409 STRIPE_MANAGED: change it in Stripe).

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;
use tally_billing::subscriptions::{self, NewSubscription, SubscriptionRecord, Term, When};

use super::actor;
use crate::auth::{Caller, ReadableCustomer};
use crate::error::{json_body, ApiError};
use crate::ApiState;

/// `billing_period`: `"month"`, `"year"`, or `{"end": "…"}` for one fixed term.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum BillingPeriod {
    Named(String),
    Until { end: DateTime<Utc> },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateRequest {
    customer: String,
    plan: String,
    #[serde(default)]
    start: Option<DateTime<Utc>>,
    #[serde(default)]
    trial_end: Option<DateTime<Utc>>,
    #[serde(default)]
    billing_period: Option<BillingPeriod>,
    #[serde(default)]
    payment_method: bool,
    reason: String,
}

/// `POST /v1/subscriptions`: 201 with the subscription.
pub(crate) async fn create(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    body: Result<Json<CreateRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(request) = json_body(body)?;
    let actor = actor(&caller, &request.reason)?;
    let term = match request.billing_period {
        None => Term::Month,
        Some(BillingPeriod::Named(name)) if name == "month" => Term::Month,
        Some(BillingPeriod::Named(name)) if name == "year" => Term::Year,
        Some(BillingPeriod::Until { end }) => Term::Until(end),
        Some(BillingPeriod::Named(other)) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "INVALID_SUBSCRIPTION",
                format!("billing_period {other:?}: use \"month\", \"year\" or {{\"end\": \"<RFC 3339 time>\"}}"),
            ))
        }
    };
    let new = NewSubscription {
        customer: request.customer,
        plan: request.plan,
        start: request.start,
        trial_end: request.trial_end,
        term,
        payment_method: request.payment_method,
    };
    let created = subscriptions::create(&state.pool, &new, &actor).await?;
    state.quota.invalidate(&created.customer);
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// `GET /v1/subscriptions/{id}`.
pub(crate) async fn get(
    State(state): State<Arc<ApiState>>,
    id: Result<Path<i64>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = subscription_id(id)?;
    Ok(Json(subscriptions::get(&state.pool, id).await?).into_response())
}

/// `GET /v1/customers/{id}/subscriptions`: newest first, each with its plan and status history.
pub(crate) async fn of_customer(
    State(state): State<Arc<ApiState>>,
    ReadableCustomer(customer): ReadableCustomer,
) -> Result<Response, ApiError> {
    let listed = subscriptions::customer_subscriptions(&state.pool, &customer).await?;
    Ok(Json(json!({ "customer": customer, "subscriptions": listed })).into_response())
}

/// When a change takes effect: `"now"` or `"period_end"`.
fn when(at: Option<&str>, default: When) -> Result<When, ApiError> {
    match at {
        None => Ok(default),
        Some("now") => Ok(When::Now),
        Some("period_end") => Ok(When::PeriodEnd),
        Some(other) => Err(ApiError::invalid(format!(
            "at {other:?}: use \"now\" or \"period_end\""
        ))),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChangeRequest {
    plan: String,
    /// `now` (default) or `period_end`.
    #[serde(default)]
    at: Option<String>,
    reason: String,
}

/// `POST /v1/subscriptions/{id}/change`.
pub(crate) async fn change(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    id: Result<Path<i64>, PathRejection>,
    body: Result<Json<ChangeRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let id = subscription_id(id)?;
    let Json(request) = json_body(body)?;
    let actor = actor(&caller, &request.reason)?;
    let when = when(request.at.as_deref(), When::Now)?;
    let changed = subscriptions::change_plan(&state.pool, id, &request.plan, when, &actor).await?;
    Ok(answer(&state, changed))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CancelRequest {
    /// `period_end` (default) or `now`.
    #[serde(default)]
    at: Option<String>,
    reason: String,
}

/// `POST /v1/subscriptions/{id}/cancel`: at the period's end by default; `now` ends it (and
/// moves the customer to the fallback plan, when one is configured).
pub(crate) async fn cancel(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    id: Result<Path<i64>, PathRejection>,
    body: Result<Json<CancelRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let id = subscription_id(id)?;
    let Json(request) = json_body(body)?;
    let actor = actor(&caller, &request.reason)?;
    let when = when(request.at.as_deref(), When::PeriodEnd)?;
    let fallback = state.fallback_plan.as_deref();
    let canceled = subscriptions::cancel(&state.pool, id, when, fallback, &actor).await?;
    Ok(answer(&state, canceled))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReasonRequest {
    reason: String,
}

/// `POST /v1/subscriptions/{id}/reactivate`: withdraws a cancellation at period end.
pub(crate) async fn reactivate(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    id: Result<Path<i64>, PathRejection>,
    body: Result<Json<ReasonRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let id = subscription_id(id)?;
    let Json(request) = json_body(body)?;
    let actor = actor(&caller, &request.reason)?;
    let reactivated = subscriptions::reactivate(&state.pool, id, &actor).await?;
    Ok(answer(&state, reactivated))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PaymentMethodRequest {
    on_record: bool,
    reason: String,
}

/// `PUT /v1/subscriptions/{id}/payment-method`: whether a payment method is on record (a
/// trial on a plan with `requires_payment_method` converts only with one).
pub(crate) async fn payment_method(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    id: Result<Path<i64>, PathRejection>,
    body: Result<Json<PaymentMethodRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let id = subscription_id(id)?;
    let Json(request) = json_body(body)?;
    let actor = actor(&caller, &request.reason)?;
    let changed =
        subscriptions::set_payment_method(&state.pool, id, request.on_record, &actor).await?;
    Ok(answer(&state, changed))
}

fn answer(state: &ApiState, subscription: SubscriptionRecord) -> Response {
    state.quota.invalidate(&subscription.customer);
    Json(subscription).into_response()
}

fn subscription_id(id: Result<Path<i64>, PathRejection>) -> Result<i64, ApiError> {
    id.map(|Path(id)| id)
        .map_err(|_| ApiError::invalid("a subscription id is a whole number"))
}
