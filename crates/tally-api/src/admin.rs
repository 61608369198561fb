//! The admin API: plans (read), subscriptions tally manages (create, change, cancel,
//! reactivate), overrides, and customers (list, one customer's whole picture). Every change
//! is written to `entitlement_audit` with the token's name as the actor and the `reason` the
//! request gives, and drops the customer from this process's quota cache.
//!
//! - `plans.rs`: `GET /v1/plans`, `GET /v1/plans/{name}`.
//! - `subscriptions.rs`: `/v1/subscriptions…` and `GET /v1/customers/{id}/subscriptions`.
//! - `customers.rs`: `GET /v1/customers`, `GET /v1/customers/{id}`, overrides.
//! - `credits.rs`: `/v1/customers/{id}/credits…`: grants, voids, the balance and the ledger
//!   (written to the credit ledger, `tally_credits`' own audit trail, not `entitlement_audit`).
//! - `billing.rs`: self-serve billing through Stripe: Checkout for plans and credit packs, the
//!   billing portal, invoices (`tally_billing::checkout` and `::invoices`).
//! - `alerts.rs`: `/v1/customers/{id}/alerts…` (a customer's own and its plan's alert rules,
//!   what fired) and `/v1/alerts/…` (webhook endpoints, deliveries); `tally_alerts`' tables.

pub(crate) mod alerts;
pub(crate) mod billing;
pub(crate) mod credits;
pub(crate) mod customers;
pub(crate) mod plans;
pub(crate) mod subscriptions;

use axum::http::StatusCode;
use rust_decimal::Decimal;
use serde_json::value::RawValue;
use tally_alerts::AlertError;
use tally_billing::subscriptions::{Actor, SubscriptionError};
use tally_billing::BillingStoreError;
use tally_credits::CreditError;

use crate::auth::Caller;
use crate::error::ApiError;

/// A decimal field of a JSON body as a JSON number (`100`, `12.5`) or a decimal string
/// (`"12.5"`), exactly: never through f64, and more digits than a decimal holds is refused, not
/// rounded. The error names the field and how to write it.
pub(crate) fn exact_decimal(field: &str, raw: &RawValue) -> Result<Decimal, String> {
    let text = raw.get();
    let text = if text.starts_with('"') {
        serde_json::from_str::<String>(text).map_err(|_| format!("{field} is not a string"))?
    } else {
        text.to_owned()
    };
    Decimal::from_str_exact(&text).map_err(|_| {
        format!(
            "{field} {:?} is not a decimal of at most 28 digits; write it plainly, e.g. 100 or \"12.5\"",
            text.chars().take(64).collect::<String>()
        )
    })
}

/// A customer id events could carry: no grant, balance, ledger or alert rule exists for any
/// other.
pub(crate) fn valid_customer(customer: &str) -> Result<(), ApiError> {
    tally_core::event::validate_customer(customer)
        .map_err(|rejection| ApiError::invalid(rejection.detail))
}

/// The audit trail's actor for a request: the token's name.
pub(crate) fn actor(caller: &Caller, reason: &str) -> Result<Actor, ApiError> {
    Ok(Actor::new(format!("token:{}", caller.name()), reason)?)
}

impl From<SubscriptionError> for ApiError {
    fn from(error: SubscriptionError) -> ApiError {
        let status = match &error {
            SubscriptionError::NotFound(_) => StatusCode::NOT_FOUND,
            SubscriptionError::StripeManaged(_)
            | SubscriptionError::Ended { .. }
            | SubscriptionError::NothingToReactivate(_)
            | SubscriptionError::NoNextPeriod(_)
            | SubscriptionError::OverrideConflict { .. } => StatusCode::CONFLICT,
            SubscriptionError::Invalid(_) | SubscriptionError::ReasonRequired => {
                StatusCode::BAD_REQUEST
            }
            SubscriptionError::Store(store) => return store_error(store, error.code()),
        };
        ApiError::new(status, error.code(), error.to_string())
    }
}

impl From<CreditError> for ApiError {
    fn from(error: CreditError) -> ApiError {
        let status =
            StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        match &error {
            // Postgres's own words stay in the log.
            CreditError::Store(_) if status == StatusCode::SERVICE_UNAVAILABLE => {
                ApiError::unavailable("STORE_UNAVAILABLE", &error)
            }
            CreditError::Store(_) => ApiError::new(
                status,
                error.code(),
                "a credit amount is beyond what a 28-digit decimal holds; it cannot be stored or read exactly",
            )
            .with_detail(&error),
            _ => ApiError::new(status, error.code(), error.to_string()),
        }
    }
}

impl From<AlertError> for ApiError {
    fn from(error: AlertError) -> ApiError {
        let status =
            StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            // Postgres's own words stay in the log.
            return ApiError::unavailable("STORE_UNAVAILABLE", &error);
        }
        ApiError::new(status, error.code(), error.to_string())
    }
}

impl From<BillingStoreError> for ApiError {
    fn from(error: BillingStoreError) -> ApiError {
        let code = match &error {
            BillingStoreError::UnknownPlan(_) => "UNKNOWN_PLAN",
            BillingStoreError::SecondLiveSubscription { .. } => "SECOND_LIVE_SUBSCRIPTION",
            BillingStoreError::OverrideDoesNotFit { .. }
            | BillingStoreError::OverridesDoNotFit { .. } => "OVERRIDE_CONFLICT",
            _ => "STORE_UNAVAILABLE",
        };
        store_error(&error, code)
    }
}

fn store_error(error: &BillingStoreError, code: &'static str) -> ApiError {
    match error {
        BillingStoreError::UnknownPlan(_) => {
            ApiError::new(StatusCode::NOT_FOUND, code, error.to_string())
        }
        BillingStoreError::SecondLiveSubscription { .. }
        | BillingStoreError::OverrideDoesNotFit { .. }
        | BillingStoreError::OverridesDoNotFit { .. } => {
            ApiError::new(StatusCode::CONFLICT, code, error.to_string())
        }
        BillingStoreError::Corrupt(_) => ApiError::internal("stored subscription data", error),
        _ => ApiError::unavailable("STORE_UNAVAILABLE", error),
    }
}

/// What a token that is not an admin's (a customer's own, a gateway's) may not read of the
/// operators' side: who granted, voided or made a rule, why, and the idempotency keys used.
pub(super) fn for_reader(caller: &Caller, item: &mut serde_json::Value, operators_only: &[&str]) {
    if caller.scope() == crate::config::Scope::Admin {
        return;
    }
    if let Some(fields) = item.as_object_mut() {
        for field in operators_only {
            fields.remove(*field);
        }
    }
}
