//! Usage alerts: `GET /v1/customers/{id}/alerts` (the customer's own rules, its plan's
//! `[[plans.alerts]]` and what fired), `POST /v1/customers/{id}/alerts` and `DELETE
//! /v1/customers/{id}/alerts/{rule_id}` (its own rules), `/v1/alerts/endpoints` (where alerts
//! are delivered, each endpoint's signing secret shown once) and `GET /v1/alerts/deliveries`
//! (each delivery's outcome, paged). The functions and the tables are `tally_alerts`'.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;
use tally_alerts::{store, AlertError, Endpoint};
use tally_billing::AlertRule;
use tally_quota::QuotaError;

use super::{exact_decimal, for_reader, valid_customer};
use crate::auth::{Caller, ReadableCustomer};
use crate::error::{json_body, ApiError};
use crate::ApiState;

/// Firings `GET /v1/customers/{id}/alerts` shows, newest first.
const FIRINGS_SHOWN: i64 = 50;

/// Deliveries on a page when `limit` is not given.
const DEFAULT_DELIVERIES_PAGE: i64 = 100;

/// The most deliveries on a page.
const MAX_DELIVERIES_PAGE: i64 = 1000;

/// Who made a rule or an endpoint: the token's name, as the admin API's audit trail has it.
fn actor(caller: &Caller) -> String {
    format!("token:{}", caller.name())
}

/// Rules a customer may hold of its own making (an admin may add more), and make in a day:
/// each new rule may fire at once, to every endpoint, so making and deleting rules in a loop
/// must not become a flood.
const MAX_CUSTOMER_MADE_RULES: usize = 20;

/// What a customer's own token (or its portal) asks to change.
enum Edit {
    Add,
    Delete(i64),
}

/// Whether a rule was made by the customer's side (its token, or a portal session of it),
/// not by the team.
fn customer_made(created_by: &str, caller: &Caller) -> bool {
    created_by.starts_with("token:portal:") || created_by == actor(caller)
}

/// A customer's own token (or its portal) may add and remove its own alert rules only on a
/// live plan with `self_serve = true`: at most [`MAX_CUSTOMER_MADE_RULES`] held and made a
/// day, and never a rule the team made.
async fn customer_may_edit(
    state: &ApiState,
    caller: &Caller,
    customer: &str,
    edit: Edit,
) -> Result<(), ApiError> {
    if caller.scope() != crate::config::Scope::Customer {
        return Ok(());
    }
    let not_self_serve = || {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "NOT_SELF_SERVE",
            "this customer's plan does not let customers change their alerts; ask the team (an admin token may)",
        )
    };
    let plan = match state.quota.entitlements(customer).await {
        Ok((_, entitlements)) => entitlements.plan,
        Err(QuotaError::NoActiveSubscription(_)) => return Err(not_self_serve()),
        Err(error) => return Err(error.into()),
    };
    let self_serve = tally_billing::store::get_plan(&state.pool, &plan)
        .await?
        .is_some_and(|definition| definition.self_serve);
    if !self_serve {
        return Err(not_self_serve());
    }
    let rules = store::list_rules(&state.pool, customer).await?;
    match edit {
        Edit::Delete(rule_id) => {
            let theirs = rules
                .iter()
                .find(|rule| rule.rule_id == rule_id)
                .is_none_or(|rule| customer_made(&rule.created_by, caller));
            if !theirs {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "NOT_SELF_SERVE",
                    "this alert rule was set by the team; ask them to remove it",
                ));
            }
        }
        Edit::Add => {
            let held = rules
                .iter()
                .filter(|rule| customer_made(&rule.created_by, caller))
                .count();
            let made_today: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM customer_alert_rule_creations
                 WHERE customer_id = $1 AND created_at > now() - interval '1 day'",
            )
            .bind(customer)
            .fetch_one(&state.pool)
            .await
            .map_err(|e| ApiError::unavailable("STORE_UNAVAILABLE", e))?;
            if held >= MAX_CUSTOMER_MADE_RULES || made_today >= MAX_CUSTOMER_MADE_RULES as i64 {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "TOO_MANY_ALERT_RULES",
                    format!("a customer may hold at most {MAX_CUSTOMER_MADE_RULES} alert rules of its own and make {MAX_CUSTOMER_MADE_RULES} a day; delete one, or try again tomorrow"),
                ));
            }
        }
    }
    Ok(())
}

/// Counts a rule a customer made, for the daily bound (and forgets those older than a day).
async fn record_customer_made(state: &ApiState, customer: &str) -> Result<(), ApiError> {
    sqlx::query(
        "WITH forgotten AS (DELETE FROM customer_alert_rule_creations
                            WHERE customer_id = $1 AND created_at <= now() - interval '1 day')
         INSERT INTO customer_alert_rule_creations (customer_id) VALUES ($1)",
    )
    .bind(customer)
    .execute(&state.pool)
    .await
    .map_err(|e| ApiError::unavailable("STORE_UNAVAILABLE", e))?;
    Ok(())
}

fn invalid_alert(message: impl Into<String>) -> ApiError {
    ApiError::from(AlertError::Invalid(message.into()))
}

/// A plan's rule as this customer has it: `key` is what its firings' `rule` says.
#[derive(Debug, Serialize)]
struct PlanRule {
    key: String,
    #[serde(flatten)]
    rule: AlertRule,
}

/// `GET /v1/customers/{id}/alerts`: the customer's own rules, its live plan's rules (none
/// without a live subscription) and its latest firings.
pub(crate) async fn list(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ReadableCustomer(customer): ReadableCustomer,
) -> Result<Response, ApiError> {
    valid_customer(&customer)?;
    let plan = match state.quota.entitlements(&customer).await {
        Ok((_, entitlements)) => Some(entitlements.plan),
        Err(QuotaError::NoActiveSubscription(_)) => None,
        Err(error) => return Err(error.into()),
    };
    let mut plan_rules = Vec::new();
    if let Some(plan) = &plan {
        let definition = tally_billing::store::get_plan(&state.reader_pool, plan).await?;
        for rule in definition
            .into_iter()
            .flat_map(|definition| definition.alerts)
        {
            let key = format!("plan:{plan}:{}", rule.key());
            plan_rules.push(PlanRule { key, rule });
        }
    }
    let mut rules = json!(store::list_rules(&state.reader_pool, &customer).await?);
    for rule in rules.as_array_mut().into_iter().flatten() {
        for_reader(&caller, rule, &["created_by"]);
    }
    let firings = store::firings(&state.reader_pool, &customer, FIRINGS_SHOWN).await?;
    Ok(Json(json!({
        "customer": customer, "plan": plan, "rules": rules, "plan_rules": plan_rules,
        "firings": firings,
    }))
    .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RuleRequest {
    #[serde(default)]
    meter: Option<String>,
    /// Raw, so that a JSON number is read exactly as written, never through f64.
    #[serde(default)]
    percent: Option<Box<RawValue>>,
    #[serde(default)]
    credit_balance_below: Option<Box<RawValue>>,
}

/// `POST /v1/customers/{id}/alerts`: 201 with the new rule: usage of `meter` reaching
/// `percent` of its limit, or the projected credit balance falling below
/// `credit_balance_below`. Evaluated at once, not at the customer's next usage.
pub(crate) async fn create(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ReadableCustomer(customer): ReadableCustomer,
    body: Result<Json<RuleRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    valid_customer(&customer)?;
    let Json(request) = json_body(body)?;
    customer_may_edit(&state, &caller, &customer, Edit::Add).await?;
    let decimal = |field: &str, raw: Option<Box<RawValue>>| {
        raw.map(|raw| exact_decimal(field, &raw).map_err(invalid_alert))
            .transpose()
    };
    let rule = AlertRule {
        meter: request.meter,
        percent: decimal("percent", request.percent)?,
        credit_balance_below: decimal("credit_balance_below", request.credit_balance_below)?,
    };
    let meters: Vec<String> = tally_db::meters::all(&state.pool)
        .await
        .map_err(AlertError::Store)?
        .into_iter()
        .map(|meter| meter.name)
        .collect();
    let created =
        store::create_rule(&state.pool, &customer, &rule, &meters, &actor(&caller)).await?;
    if caller.scope() == crate::config::Scope::Customer {
        record_customer_made(&state, &customer).await?;
    }
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// `DELETE /v1/customers/{id}/alerts/{rule_id}`: 204; what the rule fired stays listed.
pub(crate) async fn delete(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path((customer, rule_id)) = path.map_err(|e| ApiError::invalid(e.body_text()))?;
    caller.may_read(&customer)?;
    valid_customer(&customer)?;
    let rule_id: i64 = rule_id.parse().map_err(|_| {
        ApiError::invalid(
            "an alert rule id is a whole number; list the customer's rules with GET /v1/customers/{id}/alerts",
        )
    })?;
    customer_may_edit(&state, &caller, &customer, Edit::Delete(rule_id)).await?;
    store::delete_rule(&state.pool, &customer, rule_id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EndpointRequest {
    url: String,
    #[serde(default)]
    description: Option<String>,
    /// Only these customers' alerts; all when left out.
    #[serde(default)]
    customers: Option<Vec<String>>,
    /// Only these event types; all when left out.
    #[serde(default)]
    event_types: Option<Vec<String>>,
}

/// An endpoint as created: the only answer that holds its secret.
#[derive(Debug, Serialize)]
struct CreatedEndpoint {
    #[serde(flatten)]
    endpoint: Endpoint,
    secret: String,
}

/// `POST /v1/alerts/endpoints`: 201 with the endpoint and its signing secret, shown this once.
pub(crate) async fn create_endpoint(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    body: Result<Json<EndpointRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(request) = json_body(body)?;
    let new = store::NewEndpoint {
        url: &request.url,
        description: request.description.as_deref(),
        customers: request.customers,
        event_types: request.event_types,
    };
    let (endpoint, secret) = store::create_endpoint(
        &state.pool,
        &state.alert_destinations,
        &new,
        &actor(&caller),
    )
    .await?;
    let created = CreatedEndpoint { endpoint, secret };
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RotateRequest {
    /// How long the replaced secret keeps signing too, in seconds (default a day).
    #[serde(default)]
    previous_secret_valid_seconds: Option<u64>,
}

/// `POST /v1/alerts/endpoints/{endpoint_id}/rotate-secret`: 200 with the endpoint and its new
/// secret, shown this once; the replaced secret signs every delivery too until
/// `previous_secret_expires_at` (a day by default), so receivers switch without a gap.
pub(crate) async fn rotate_secret(
    State(state): State<Arc<ApiState>>,
    path: Result<Path<String>, PathRejection>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let endpoint_id = endpoint_id(path)?;
    // The body is optional: empty means the defaults.
    let request: RotateRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RotateRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::invalid(format!("the request body: {e}")))?
    };
    let overlap = request
        .previous_secret_valid_seconds
        .map_or(store::ROTATION_OVERLAP, std::time::Duration::from_secs);
    let (endpoint, secret) = store::rotate_secret(&state.pool, endpoint_id, overlap).await?;
    Ok(Json(CreatedEndpoint { endpoint, secret }).into_response())
}

fn endpoint_id(path: Result<Path<String>, PathRejection>) -> Result<i64, ApiError> {
    let Path(endpoint_id) = path.map_err(|e| ApiError::invalid(e.body_text()))?;
    endpoint_id.parse().map_err(|_| {
        ApiError::invalid(
            "an endpoint id is a whole number; list the endpoints with GET /v1/alerts/endpoints",
        )
    })
}

/// `GET /v1/alerts/endpoints`: the endpoints alerts are delivered to, without their secrets.
pub(crate) async fn list_endpoints(
    State(state): State<Arc<ApiState>>,
) -> Result<Response, ApiError> {
    let endpoints = store::list_endpoints(&state.reader_pool).await?;
    Ok(Json(json!({ "endpoints": endpoints })).into_response())
}

/// `DELETE /v1/alerts/endpoints/{endpoint_id}`: 204; its pending deliveries are given up.
pub(crate) async fn delete_endpoint(
    State(state): State<Arc<ApiState>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let endpoint_id = endpoint_id(path)?;
    store::delete_endpoint(&state.pool, endpoint_id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A delivery's state, as `?status=` takes it.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum DeliveryStatus {
    Pending,
    Delivered,
    Failed,
}

impl DeliveryStatus {
    fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeliveriesQuery {
    #[serde(default)]
    status: Option<DeliveryStatus>,
    /// The `next_before` of the previous page.
    #[serde(default)]
    before: Option<i64>,
    #[serde(default)]
    limit: Option<i64>,
}

/// `GET /v1/alerts/deliveries?status&before&limit`: deliveries newest first; `next_before` is
/// the last one's id (pass it as `before` for the next page), null on an empty page.
pub(crate) async fn deliveries(
    State(state): State<Arc<ApiState>>,
    query: Result<Query<DeliveriesQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let limit = query.limit.unwrap_or(DEFAULT_DELIVERIES_PAGE);
    if !(1..=MAX_DELIVERIES_PAGE).contains(&limit) {
        return Err(ApiError::invalid(format!(
            "limit {limit}: between 1 and {MAX_DELIVERIES_PAGE}"
        )));
    }
    if query.before.is_some_and(|before| before < 1) {
        return Err(ApiError::invalid(
            "before is the next_before of the previous page: 1 or more",
        ));
    }
    let deliveries = store::deliveries(
        &state.reader_pool,
        query.status.map(DeliveryStatus::as_str),
        query.before,
        limit,
    )
    .await?;
    let next_before = deliveries.last().map(|delivery| delivery.delivery_id);
    Ok(Json(json!({ "deliveries": deliveries, "next_before": next_before })).into_response())
}
