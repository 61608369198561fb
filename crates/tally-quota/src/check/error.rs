//! Why a check has no decision: [`QuotaError`], with a stable code for APIs.

use rust_decimal::Decimal;

use tally_billing::store::BillingStoreError;

/// Why a check has no decision. Each has a stable code for APIs.
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("customer {0:?} has no active or trialing subscription")]
    NoActiveSubscription(String),
    #[error("feature {feature:?} is not enabled for customer {customer:?}")]
    FeatureDisabled { customer: String, feature: String },
    #[error("unknown meter {0:?}; it is not in [[meters]]")]
    UnknownMeter(String),
    #[error("quota on unique_count meter {0:?} is not supported yet")]
    Unsupported(String),
    /// The quantity, or the usage plus the quantity, is beyond what a 28-digit decimal holds.
    #[error("quantity {quantity} on top of the customer's usage is beyond a 28-digit decimal; send a quantity within tally's domain (at most 10^15)")]
    OutOfRange { quantity: Decimal },
    /// A meter with `credits` enforcement: the customer's projected credit balance cannot
    /// cover the quantity at the meter's rate.
    #[error("customer {customer:?} has {balance} credits left; {required} are needed for this {meter} usage; grant or buy more credits (POST /v1/customers/{customer}/credits/grants)")]
    InsufficientCredits {
        customer: String,
        meter: String,
        balance: Decimal,
        required: Decimal,
    },
    #[error(transparent)]
    Store(#[from] BillingStoreError),
}

impl QuotaError {
    /// The same error again, for checks answered from a failed load the cache holds. A
    /// Postgres error cannot be cloned: it comes back as [`BillingStoreError::RecentlyFailed`]
    /// with its message, still a `Store` error (the API answers 503, retry later).
    pub(super) fn again(&self) -> QuotaError {
        match self {
            QuotaError::NoActiveSubscription(customer) => {
                QuotaError::NoActiveSubscription(customer.clone())
            }
            QuotaError::FeatureDisabled { customer, feature } => QuotaError::FeatureDisabled {
                customer: customer.clone(),
                feature: feature.clone(),
            },
            QuotaError::UnknownMeter(meter) => QuotaError::UnknownMeter(meter.clone()),
            QuotaError::Unsupported(meter) => QuotaError::Unsupported(meter.clone()),
            QuotaError::OutOfRange { quantity } => QuotaError::OutOfRange {
                quantity: *quantity,
            },
            QuotaError::InsufficientCredits {
                customer,
                meter,
                balance,
                required,
            } => QuotaError::InsufficientCredits {
                customer: customer.clone(),
                meter: meter.clone(),
                balance: *balance,
                required: *required,
            },
            QuotaError::Store(error) => QuotaError::Store(match error {
                BillingStoreError::Postgres(error) => {
                    BillingStoreError::RecentlyFailed(error.to_string())
                }
                BillingStoreError::PlanInUse {
                    plan,
                    subscriptions,
                } => BillingStoreError::PlanInUse {
                    plan: plan.clone(),
                    subscriptions: *subscriptions,
                },
                BillingStoreError::SecondLiveSubscription { customer } => {
                    BillingStoreError::SecondLiveSubscription {
                        customer: customer.clone(),
                    }
                }
                BillingStoreError::UnknownPlan(plan) => {
                    BillingStoreError::UnknownPlan(plan.clone())
                }
                BillingStoreError::Corrupt(what) => BillingStoreError::Corrupt(what.clone()),
                BillingStoreError::OverrideDoesNotFit {
                    customer,
                    plan,
                    why,
                } => BillingStoreError::OverrideDoesNotFit {
                    customer: customer.clone(),
                    plan: plan.clone(),
                    why: why.clone(),
                },
                BillingStoreError::OverridesDoNotFit { count, examples } => {
                    BillingStoreError::OverridesDoNotFit {
                        count: *count,
                        examples: examples.clone(),
                    }
                }
                BillingStoreError::RecentlyFailed(what) => {
                    BillingStoreError::RecentlyFailed(what.clone())
                }
            }),
        }
    }

    /// A stable code for API errors.
    pub fn code(&self) -> &'static str {
        match self {
            QuotaError::NoActiveSubscription(_) => "NO_ACTIVE_SUBSCRIPTION",
            QuotaError::FeatureDisabled { .. } => "FEATURE_DISABLED",
            QuotaError::UnknownMeter(_) => "UNKNOWN_METER",
            QuotaError::Unsupported(_) => "UNSUPPORTED",
            QuotaError::OutOfRange { .. } => "INVALID_QUANTITY",
            QuotaError::InsufficientCredits { .. } => "INSUFFICIENT_CREDITS",
            QuotaError::Store(BillingStoreError::OverrideDoesNotFit { .. }) => "OVERRIDE_CONFLICT",
            QuotaError::Store(_) => "INTERNAL",
        }
    }

    /// The HTTP status an answer with this error carries (the API and the middleware answer
    /// alike); 503 means the store is away: retry.
    pub fn http_status(&self) -> u16 {
        match self {
            QuotaError::NoActiveSubscription(_) => 404,
            QuotaError::FeatureDisabled { .. } => 403,
            QuotaError::UnknownMeter(_)
            | QuotaError::Unsupported(_)
            | QuotaError::OutOfRange { .. } => 400,
            // 402, not 429: retrying does not help until credits are added (a 429 invites
            // clients to back off and retry).
            QuotaError::InsufficientCredits { .. } => 402,
            // Not the store's fault, and not the caller's: an operator must fix the override.
            QuotaError::Store(BillingStoreError::OverrideDoesNotFit { .. }) => 409,
            QuotaError::Store(_) => 503,
        }
    }
}
