//! Usage alerts: a customer's usage reaching a share of a limit, or its projected credit
//! balance falling below an amount, delivered once per crossing as a signed webhook.
//!
//! - `config.rs`: `[alerts]` in tally.toml.
//! - `store.rs`: customers' own rules, endpoints (their secret shown once), firings and
//!   deliveries as the API reads them; the owner of the `alert_*` tables.
//! - `evaluate.rs`: the evaluator: the customers whose usage or credits changed, their plan's
//!   (`[[plans.alerts]]`) and own rules, each crossing recorded once per period.
//! - `deliver.rs`: the sender: signed POSTs, each on its own (a slow endpoint holds up no
//!   other), an answer read up to a small bound, retried with jittered backoff for
//!   `alerts.retry_for`, a circuit breaker per endpoint.
//! - `destination.rs`: where deliveries may go: https only, public addresses only (checked
//!   at registration and again after resolution at every connect), unless allowed.
//! - `signature.rs`: `Tally-Signature` (as Stripe signs): signing, and verifying as a receiver.
//! - `run.rs`: both, supervised, in `tally aggregate`.
//! - `telemetry.rs`: metrics.

mod config;
pub mod deliver;
pub mod destination;
pub mod evaluate;
mod run;
pub mod signature;
pub mod store;
pub mod telemetry;

pub use config::AlertsConfig;
pub use deliver::{deliver_due, Sender};
pub use destination::Destinations;
pub use evaluate::{evaluate_once, Evaluation};
pub use run::start_alerts;
pub use store::{
    AlertError, CustomerRule, Delivery, Endpoint, Firing, BALANCE_BELOW, USAGE_CROSSED,
};
