//! What every long-running tally process shares, so that an outage is handled the same way in
//! each of them (ARCHITECTURE.md, invariant 8: outages are waited out):
//!
//! - `health.rs`: each dependency (Postgres, Kafka, Stripe) as this process sees it: one log
//!   line when it goes away and one when it is back, `tally_dependency_up`, and the readiness
//!   that `/readyz` reports.
//! - `attention.rs`: when a figure needs a person (`tally status`, the console).
//! - `backoff.rs`: capped exponential backoff with jitter, for waiting one out.
//! - `supervise.rs`: background tasks that are restarted (and counted) when they fail, never
//!   silently gone.
//! - `mode.rs`: `RunMode`, daemon or once, for the aggregator and the sink.
//! - `telemetry.rs`: metric names.

pub mod attention;
mod backoff;
pub mod health;
mod mode;
mod supervise;
pub mod telemetry;

pub use backoff::{sleep_unless_stopped, Backoff};
pub use health::{check, dependency, Dependency, DependencyStatus};
pub use mode::RunMode;
pub use supervise::supervise;
