//! Prepaid credits: `POST /v1/customers/{id}/credits/grants` (grant, once per idempotency
//! key), `POST /v1/customers/{id}/credits/grants/{grant_id}/void`, `GET
//! /v1/customers/{id}/credits` (balance and open grants) and `GET
//! /v1/customers/{id}/credits/ledger` (every movement, paged). Grants and voids are written to
//! the credit ledger with the token's name as the actor and the request's `reason`; the
//! functions and the tables are `tally_credits`'.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use tally_credits::ledger::MAX_LEDGER_PAGE;
use tally_credits::LedgerPage;
use tally_credits::{Actor, CreditError, GrantKind, NewGrant, RateCard};

use super::{exact_decimal, for_reader, valid_customer};
use crate::auth::{Caller, ReadableCustomer};
use crate::error::{json_body, ApiError};
use crate::ApiState;

/// The header that may carry a grant's idempotency key instead of the body (as Stripe takes it).
const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Ledger entries on a page when `limit` is not given.
const DEFAULT_LEDGER_PAGE: i64 = 100;

/// The ledger's actor for a request: the token's name, as the admin API's audit trail has it.
fn actor(caller: &Caller, reason: &str) -> Result<Actor, ApiError> {
    Ok(Actor::new(&format!("token:{}", caller.name()), reason)?)
}

fn invalid_grant(message: impl Into<String>) -> ApiError {
    ApiError::from(CreditError::Invalid(message.into()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GrantRequest {
    kind: GrantKind,
    /// Raw, so that a JSON number is read exactly as written, never through f64.
    amount: Box<RawValue>,
    #[serde(default)]
    priority: Option<i32>,
    #[serde(default)]
    effective_at: Option<DateTime<Utc>>,
    #[serde(default)]
    expires_at: Option<DateTime<Utc>>,
    /// Or the `Idempotency-Key` header.
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    description: Option<String>,
    reason: String,
}

/// An amount as a JSON number (`100`, `12.5`) or decimal string (`"12.5"`), exactly.
fn amount(raw: &RawValue) -> Result<Decimal, ApiError> {
    exact_decimal("amount", raw).map_err(invalid_grant)
}

/// The key from the body or the `Idempotency-Key` header; both may be given only if they agree.
fn idempotency_key(body: Option<String>, headers: &HeaderMap) -> Result<String, ApiError> {
    let header = headers
        .get(IDEMPOTENCY_KEY)
        .map(|value| {
            value
                .to_str()
                .map(str::to_owned)
                .map_err(|_| invalid_grant("the Idempotency-Key header must be printable ASCII"))
        })
        .transpose()?;
    match (body, header) {
        (Some(body), Some(header)) if body != header => Err(invalid_grant(format!(
            "idempotency_key {body:?} and the Idempotency-Key header {header:?} differ; send one of them"
        ))),
        (Some(key), _) | (None, Some(key)) => Ok(key),
        (None, None) => Err(invalid_grant(
            "an idempotency key is required (idempotency_key in the body or the Idempotency-Key header): the same top-up sent twice must grant once",
        )),
    }
}

/// `POST /v1/customers/{id}/credits/grants`: 201 with the grant; 200 with the first grant when
/// its idempotency key comes again with the same grant; 409 IDEMPOTENCY_CONFLICT when it comes
/// with a different one.
pub(crate) async fn grant(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ReadableCustomer(customer): ReadableCustomer,
    headers: HeaderMap,
    body: Result<Json<GrantRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    valid_customer(&customer)?;
    let Json(request) = json_body(body)?;
    let actor = actor(&caller, &request.reason)?;
    let new = NewGrant {
        customer,
        kind: request.kind,
        amount: amount(&request.amount)?,
        priority: request.priority,
        effective_at: request.effective_at,
        expires_at: request.expires_at,
        idempotency_key: idempotency_key(request.idempotency_key, &headers)?,
        description: request.description,
    };
    let granted = tally_credits::grant(&state.pool, &new, &actor).await?;
    // A check on this server must see the new balance now, not at its next refresh.
    state.quota.invalidate(&new.customer);
    let status = if granted.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(granted.grant)).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct VoidRequest {
    reason: String,
}

/// `POST /v1/customers/{id}/credits/grants/{grant_id}/void`: what is left of the grant is
/// voided (a `void` entry); what was consumed stays consumed.
pub(crate) async fn void(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    path: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
    body: Result<Json<VoidRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Path((customer, grant_id)) = path.map_err(|e| ApiError::invalid(e.body_text()))?;
    caller.may_read(&customer)?;
    valid_customer(&customer)?;
    let grant_id: i64 = grant_id
        .parse()
        .map_err(|_| ApiError::invalid("a grant id is a whole number"))?;
    let Json(request) = json_body(body)?;
    let actor = actor(&caller, &request.reason)?;
    let voided = tally_credits::void(&state.pool, &customer, grant_id, &actor).await?;
    state.quota.invalidate(&customer);
    Ok(Json(voided).into_response())
}

/// `GET /v1/customers/{id}/credits`: the balance (available, pending, projected, uncovered)
/// and the open grants in the order they are drawn.
pub(crate) async fn balance(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ReadableCustomer(customer): ReadableCustomer,
) -> Result<Response, ApiError> {
    valid_customer(&customer)?;
    let rates = RateCard::load(&state.reader_pool)
        .await
        .map_err(CreditError::Store)?;
    let balance = tally_credits::balance(&state.reader_pool, &customer, &rates, Utc::now()).await?;
    let mut answer = json!(balance);
    if let Some(grants) = answer["grants"].as_array_mut() {
        for grant in grants {
            for_reader(&caller, grant, &["idempotency_key", "granted_by", "reason"]);
        }
    }
    Ok(Json(answer).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LedgerQuery {
    /// The `next_after` of the previous page (oldest first).
    #[serde(default)]
    after: Option<i64>,
    /// `oldest` (default: oldest first, paged with `after`) or `newest` (newest first, paged
    /// with `before`).
    #[serde(default)]
    order: Option<String>,
    /// The `next_before` of the previous page (newest first).
    #[serde(default)]
    before: Option<i64>,
    #[serde(default)]
    limit: Option<i64>,
}

/// `GET /v1/customers/{id}/credits/ledger?after&limit`: entries oldest first; `next_after` is
/// the last entry's id (the ledger only grows: a client polls with it), null on an empty page.
pub(crate) async fn ledger(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ReadableCustomer(customer): ReadableCustomer,
    query: Result<Query<LedgerQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    valid_customer(&customer)?;
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let limit = query.limit.unwrap_or(DEFAULT_LEDGER_PAGE);
    if !(1..=MAX_LEDGER_PAGE).contains(&limit) {
        return Err(ApiError::invalid(format!(
            "limit {limit}: between 1 and {MAX_LEDGER_PAGE}"
        )));
    }
    if query.after.is_some_and(|after| after < 0) {
        return Err(ApiError::invalid(
            "after is the next_after of the previous page: 0 or more",
        ));
    }
    let newest = match query.order.as_deref() {
        None | Some("oldest") => false,
        Some("newest") => true,
        Some(other) => {
            return Err(ApiError::invalid(format!(
            "order {other:?}: oldest (the default, paged with after) or newest (paged with before)"
        )))
        }
    };
    let page = match (newest, query.after, query.before) {
        (false, after, None) => LedgerPage::After(after.unwrap_or(0)),
        (true, None, before) => LedgerPage::Before(before),
        _ => {
            return Err(ApiError::invalid(
                "after pages the oldest-first ledger, before the newest-first one (order=newest); not both",
            ))
        }
    };
    let entries = tally_credits::ledger(&state.reader_pool, &customer, page, limit).await?;
    let last = entries.last().map(|entry| entry.transaction_id);
    let mut entries = json!(entries);
    for entry in entries.as_array_mut().into_iter().flatten() {
        for_reader(&caller, entry, &["actor", "reason"]);
    }
    let cursor = if newest { "next_before" } else { "next_after" };
    Ok(Json(json!({ "customer": customer, "entries": entries, cursor: last })).into_response())
}
