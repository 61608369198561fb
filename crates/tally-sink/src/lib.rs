//! The sink: bills closed five-minute slots to Stripe Billing meter events, exactly once.
//!
//! - `config.rs`: `[sink]` and `[stripe]`.
//! - `plan.rs`: what a slot still owes Stripe (pure arithmetic, identifiers).
//! - `store.rs`: the Postgres side (accounting transaction, outbox leases, outcomes).
//! - `stripe.rs`: the Stripe client and its error classification.
//! - `limiter.rs`: the token bucket under the account's rate.
//! - `sink.rs`: the pass loop (account, then send).
//! - `stripe_meters.rs`: the Stripe meters tally bills under (check, create).
//! - `reconcile.rs`: tally's windows vs the outbox vs Stripe's event summaries.
//! - `telemetry.rs`: metric names.

mod config;
mod limiter;
pub mod plan;
mod reconcile;
mod sink;
pub mod store;
mod stripe;
mod stripe_meters;
pub mod telemetry;

pub use config::{SinkConfig, StripeConfig};
pub use reconcile::{
    meter_error_reports, reconcile, render_table, MeterErrorReport, ReconcileRow, Verdict,
};
pub use sink::{Mode, Sink, SinkError, SinkSummary};
pub use stripe::{StripeCallError, StripeHttp};
pub use stripe_meters::{create_stripe_meters, missing_stripe_meters};
