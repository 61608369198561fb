//! Plans, subscriptions and entitlements, and the quota check.
//!
//! - `plan.rs`: plan definitions from `tally.toml`, per-customer overrides, and resolving the
//!   two into a customer's entitlements (pure).
//! - `store.rs`: plans, subscriptions and overrides in Postgres, every change audited.
//! - `stripe.rs`: Stripe webhook events applied to subscriptions and recorded invoices.
//! - `check.rs`: `Quota::check` and `require_feature`, with the local cache.

mod check;
pub mod plan;
pub mod store;
pub mod stripe;
pub mod testing;

pub use check::{decide, Decision, Quota, QuotaError};
pub use plan::{Enforcement, Entitlements, LimitDefinition, Override, Period, PlanDefinition};
pub use store::{apply_plans, list_plans, PlanChange, QuotaStoreError, Subscription};
