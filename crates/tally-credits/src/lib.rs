//! Prepaid credits: customers hold grants, usage of priced meters burns them down exactly
//! once as the aggregator commits it, and every movement is an entry in an append-only ledger.
//!
//! - `config.rs`: `[credits]` in tally.toml: the rate card (`[[credits.rates]]`) and how often
//!   the burner runs.
//! - `rates.rs`: [`RateCard`], what a unit of each meter costs (per group-by value if asked),
//!   recorded in `credit_rates` so every process prices alike.
//! - `grants.rs`: grants (idempotent per key), voids, balances and the ledger: the owner of
//!   `credit_grants` and `credit_transactions`.
//! - `queue.rs`: what the aggregator calls in its batch transaction to queue counted usage.
//! - `burn.rs`: the burner in `tally aggregate`: queued usage drawn down from grants in
//!   precedence order, expiry, plan grants each period; `burn/draw.rs` is the pure draw-down.
//! - `telemetry.rs`: the burner's metrics.

pub mod burn;
mod config;
pub mod grants;
pub mod queue;
pub mod rates;
pub mod telemetry;

pub use burn::{burn_once, settle, start_burner, BurnReport, Settled};
pub use config::{CreditsConfig, RateDefinition};
pub use grants::{
    applied_in_period, balance, get_grant, grant, ledger, projected_balances, void, Actor, Balance,
    CreditError, Grant, GrantKind, Granted, LedgerEntry, MeterCredits, NewGrant, PeriodCredits,
};
pub use rates::RateCard;
