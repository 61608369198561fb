//! The admin API: plans (read), subscriptions tally manages (create, change, cancel,
//! reactivate), overrides, and customers (list, one customer's whole picture). Every change
//! is written to `entitlement_audit` with the token's name as the actor and the `reason` the
//! request gives, and drops the customer from this process's quota cache.
//!
//! - `plans.rs`: `GET /v1/plans`, `GET /v1/plans/{name}`.
//! - `subscriptions.rs`: `/v1/subscriptions…` and `GET /v1/customers/{id}/subscriptions`.
//! - `customers.rs`: `GET /v1/customers`, `GET /v1/customers/{id}`, overrides.

pub(crate) mod customers;
pub(crate) mod plans;
pub(crate) mod subscriptions;

use axum::http::StatusCode;
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
