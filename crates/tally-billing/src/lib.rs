//! The billing side: plans, subscriptions, and what Stripe tells tally about its customers.
//!
//! - `catalog.rs`: the Stripe prices plans and credit packs sell, checked against tally.toml
//!   and recorded (`tally plans apply`), and created when missing (`tally plans sync --create`).
//! - `checkout.rs`: Checkout Sessions for plans and credit packs, the billing portal, and what
//!   their webhook events do (a paid pack granted once, a refund voiding it).
//! - `events.rs`: what tally reads from a verified Stripe webhook event, and the outcomes.
//! - `invoices.rs`: the invoices Stripe's webhooks described, for the API and the CLI.
//! - `plan.rs`: plan definitions from `tally.toml`, per-customer overrides, and resolving the
//!   two into a customer's entitlements (pure).
//! - `store.rs`: plans, subscriptions and overrides in Postgres, every change audited; the
//!   batched read of live subscriptions with their resolved entitlements.
//! - `stripe.rs`: Stripe webhook events applied to subscriptions and recorded invoices.
//! - `subscriptions.rs`: subscriptions tally manages without a payment provider (create,
//!   change, cancel, reactivate; audited), their periods, and the scheduler that renews them,
//!   ends trials and terms, and applies the fallback plan. Its parts are in `subscriptions/`.
//! - `telemetry.rs`: the scheduler's metrics.
//! - `testing.rs`: subscriptions and plans without the ceremony, for tests and benchmarks.

pub mod catalog;
pub mod checkout;
pub mod events;
pub mod invoices;
pub mod plan;
pub mod store;
pub mod stripe;
pub mod subscriptions;
pub mod telemetry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use plan::{
    AlertRule, Enforcement, Entitlements, LimitDefinition, Override, Period, PlanCredits,
    PlanDefinition, PlanPrice, PriceInterval,
};
pub use store::{apply_plans, list_plans, BillingStoreError, PlanChange, Subscription};
