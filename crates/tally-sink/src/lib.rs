//! The sink: bills closed five-minute slots to Stripe Billing meter events, exactly once.
//!
//! - `config.rs`: `[sink]` and `[stripe]`.
//! - `owed.rs`: what a slot still owes Stripe (pure arithmetic, identifiers).
//! - `store.rs`: the Postgres side's shared error (`SinkStoreError`) and re-exports; one
//!   concern a file under `store/`:
//!   - `meters.rs`: how each meter is billed (`meters` table);
//!   - `accounting.rs`: the accounting transaction (settled slot changes → outbox rows);
//!   - `outbox.rs`: leasing outbox rows, renewing leases, recording outcomes;
//!   - `review.rs`: outbox rows parked as `needs_review`, and their resolution;
//!   - `quarantine.rs`: customer+meter pairs set aside (`billing_quarantine`);
//!   - `backlog.rs`: backlog figures for the metrics;
//!   - `customers.rs`: customer mapping (`stripe_customers`) and usage waiting for one.
//! - `sink.rs`: the pass loop (`Sink::run`): account, then lease the outbox, hand the
//!   customer+meter pairs to the dispatcher, record the outcomes.
//! - `send.rs`: rows into requests (100 pairs' rows on the v2 stream, one on v1, a pair's rows
//!   in order), and each request's retries, backoff, and what its answer means.
//! - `stream.rs`: Stripe's v2 meter events: the session's token, the stream, cancels.
//! - `stripe.rs`: the Stripe client and its error classification; Stripe customers listed and
//!   created for `tally customers sync`.
//! - `limiter.rs`: the token bucket under the account's rate.
//! - `stripe_meters.rs`: the Stripe meters tally bills under (check, create).
//! - `reconcile.rs`: tally's windows vs the outbox vs Stripe's event summaries.
//! - `repair.rs`: drift reconcile can prove, sent again through the outbox (`--repair`).
//! - `telemetry.rs`: metric names.

mod config;
mod limiter;
pub mod owed;
mod reconcile;
mod repair;
mod send;
mod sink;
pub mod store;
mod stream;
mod stripe;
mod stripe_meters;
pub mod telemetry;

pub use config::{MeterEventsApi, SinkConfig, StripeConfig};
pub use reconcile::{
    meter_error_reports, reconcile, render_table, MeterErrorReport, ReconcileRow, Verdict,
};
pub use repair::{apply_repair, plan_repairs, Applied, RepairAction, RepairPlan, SETTLE};
pub use sink::{Sink, SinkError, SinkSummary};
pub use stripe::{
    customer_idempotency_key, StripeCallError, StripeCustomer, StripeCustomers, StripeHttp,
    DEFAULT_CUSTOMER_METADATA_KEY, MAX_RESPONSE_BYTES,
};
pub use stripe_meters::{create_stripe_meters, missing_stripe_meters, stripe_meters_by_id};
pub use tally_runtime::RunMode;
