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

pub(crate) mod credits;
pub(crate) mod customers;
pub(crate) mod plans;
pub(crate) mod subscriptions;

use axum::http::StatusCode;
use tally_credits::CreditError;
use tally_quota::subscriptions::{Actor, SubscriptionError};
use tally_quota::QuotaStoreError;

use crate::auth::Caller;
use crate::error::ApiError;

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
            | SubscriptionError::NoNextPeriod(_) => StatusCode::CONFLICT,
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

impl From<QuotaStoreError> for ApiError {
    fn from(error: QuotaStoreError) -> ApiError {
        let code = match &error {
            QuotaStoreError::UnknownPlan(_) => "UNKNOWN_PLAN",
            QuotaStoreError::SecondLiveSubscription { .. } => "SECOND_LIVE_SUBSCRIPTION",
            _ => "STORE_UNAVAILABLE",
        };
        store_error(&error, code)
    }
}

fn store_error(error: &QuotaStoreError, code: &'static str) -> ApiError {
    match error {
        QuotaStoreError::UnknownPlan(_) => {
            ApiError::new(StatusCode::NOT_FOUND, code, error.to_string())
        }
        QuotaStoreError::SecondLiveSubscription { .. } => {
            ApiError::new(StatusCode::CONFLICT, code, error.to_string())
        }
        QuotaStoreError::Corrupt(_) => ApiError::internal("stored subscription data", error),
        _ => ApiError::unavailable("STORE_UNAVAILABLE", error),
    }
}
