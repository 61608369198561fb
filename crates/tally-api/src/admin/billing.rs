//! Self-serve billing through Stripe: `POST /v1/customers/{id}/checkout` (a plan),
//! `POST /v1/customers/{id}/credits/checkout` (a credit pack), `POST
//! /v1/customers/{id}/billing-portal`, `GET /v1/customers/{id}/invoices` and
//! `GET /v1/invoices/{id}`. An admin token may do all of it for any customer; a customer token
//! for its own customer: read its invoices, open its billing portal, buy credit packs, and
//! check out a plan that allows it (`self_serve = true`). Sessions and their webhook events are
//! `tally_billing::checkout`'s.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tally_billing::checkout::{self, CheckoutError, CheckoutRequest};
use tally_billing::invoices;

use super::valid_customer;
use crate::auth::{Caller, ReadableCustomer};
use crate::config::Scope;
use crate::error::{json_body, ApiError};
use crate::ApiState;

/// Invoices on a page when `limit` is not given.
const DEFAULT_INVOICE_PAGE: i64 = 20;

impl From<CheckoutError> for ApiError {
    fn from(error: CheckoutError) -> ApiError {
        let status =
            StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        match &error {
            CheckoutError::Store(_) | CheckoutError::Plans(_) => {
                ApiError::unavailable("STORE_UNAVAILABLE", &error)
            }
            // What Stripe said goes to the log; the client learns it was Stripe.
            CheckoutError::StripeRefused(_) | CheckoutError::StripeUnavailable(_) => {
                ApiError::new(status, error.code(), match error {
                    CheckoutError::StripeRefused(_) => "Stripe refused to open the session; the request id leads to Stripe's answer in tally's log",
                    _ => "Stripe could not be reached; try again",
                })
                .with_detail(&error)
            }
            _ => ApiError::new(status, error.code(), error.to_string()),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PlanCheckout {
    plan: String,
    success_url: String,
    cancel_url: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PackCheckout {
    pack: String,
    success_url: String,
    cancel_url: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PortalRequest {
    return_url: String,
}

fn stripe(state: &ApiState) -> Result<&tally_sink::StripeHttp, ApiError> {
    state
        .billing
        .stripe
        .as_ref()
        .ok_or_else(|| CheckoutError::StripeNotConfigured.into())
}

fn return_urls(state: &ApiState, urls: &[(&'static str, &str)]) -> Result<(), ApiError> {
    for (field, url) in urls {
        checkout::check_return_url(
            field,
            url,
            &state.billing.return_origins,
            state.billing.livemode,
        )?;
    }
    Ok(())
}

/// Who asks and where the customer goes after; the return URLs are checked first.
fn checkout_request<'a>(
    caller: &'a Caller,
    customer: &'a str,
    success_url: &'a str,
    cancel_url: &'a str,
) -> CheckoutRequest<'a> {
    CheckoutRequest {
        customer,
        success_url,
        cancel_url,
        requested_by: format!("token:{}", caller.name()),
        operator: caller.scope() == Scope::Admin,
    }
}

/// `POST /v1/customers/{id}/checkout`: `{plan, success_url, cancel_url}` → `{id, url}`.
pub(crate) async fn plan(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ReadableCustomer(customer): ReadableCustomer,
    body: Result<Json<PlanCheckout>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    valid_customer(&customer)?;
    let Json(request) = json_body(body)?;
    return_urls(
        &state,
        &[
            ("success_url", &request.success_url),
            ("cancel_url", &request.cancel_url),
        ],
    )?;
    let opened = checkout::checkout_plan(
        &state.pool,
        stripe(&state)?,
        &request.plan,
        &checkout_request(
            &caller,
            &customer,
            &request.success_url,
            &request.cancel_url,
        ),
    )
    .await?;
    Ok(Json(json!(opened)))
}

/// `POST /v1/customers/{id}/credits/checkout`: `{pack, success_url, cancel_url}` → `{id, url}`.
pub(crate) async fn pack(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    ReadableCustomer(customer): ReadableCustomer,
    body: Result<Json<PackCheckout>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    valid_customer(&customer)?;
    let Json(request) = json_body(body)?;
    return_urls(
        &state,
        &[
            ("success_url", &request.success_url),
            ("cancel_url", &request.cancel_url),
        ],
    )?;
    let pack = state
        .billing
        .packs
        .iter()
        .find(|p| p.name == request.pack)
        .ok_or_else(|| CheckoutError::UnknownPack(request.pack.clone()))?;
    let opened = checkout::checkout_pack(
        &state.pool,
        stripe(&state)?,
        pack,
        &checkout_request(
            &caller,
            &customer,
            &request.success_url,
            &request.cancel_url,
        ),
    )
    .await?;
    Ok(Json(json!(opened)))
}

/// `POST /v1/customers/{id}/billing-portal`: `{return_url}` → `{url}`.
pub(crate) async fn portal(
    State(state): State<Arc<ApiState>>,
    ReadableCustomer(customer): ReadableCustomer,
    body: Result<Json<PortalRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    valid_customer(&customer)?;
    let Json(request) = json_body(body)?;
    return_urls(&state, &[("return_url", &request.return_url)])?;
    let url =
        checkout::billing_portal(&state.pool, stripe(&state)?, &customer, &request.return_url)
            .await?;
    Ok(Json(json!({ "url": url })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct InvoicePage {
    #[serde(default)]
    limit: Option<i64>,
    #[serde(default)]
    starting_after: Option<String>,
}

/// `GET /v1/customers/{id}/invoices?limit=&starting_after=`: newest first.
pub(crate) async fn list_invoices(
    State(state): State<Arc<ApiState>>,
    ReadableCustomer(customer): ReadableCustomer,
    query: Result<Query<InvoicePage>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    valid_customer(&customer)?;
    let Query(page) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let limit = page.limit.unwrap_or(DEFAULT_INVOICE_PAGE);
    if !(1..=invoices::MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(format!(
            "limit {limit}: between 1 and {}",
            invoices::MAX_PAGE
        )));
    }
    let (data, has_more) = invoices::list(
        &state.reader_pool,
        &customer,
        limit,
        page.starting_after.as_deref(),
    )
    .await
    .map_err(|e| ApiError::unavailable("STORE_UNAVAILABLE", e))?;
    Ok(Json(json!({ "data": data, "has_more": has_more })))
}

/// `GET /v1/invoices/{id}`: a customer token reads its own only (another's is not found).
pub(crate) async fn get_invoice(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "NO_SUCH_INVOICE",
            "no such invoice; list a customer's with GET /v1/customers/{id}/invoices",
        )
    };
    if id.len() > 255 {
        return Err(not_found());
    }
    let invoice = invoices::get(&state.reader_pool, &id)
        .await
        .map_err(|e| ApiError::unavailable("STORE_UNAVAILABLE", e))?
        .ok_or_else(not_found)?;
    // The same answer for another customer's invoice as for none: ids are not confirmed.
    let own = invoice
        .customer
        .as_deref()
        .is_some_and(|customer| caller.may_read(customer).is_ok());
    if !own && caller.scope() != Scope::Admin {
        return Err(not_found());
    }
    Ok(Json(json!(invoice)))
}
