//! Prepaid credits: customers hold grants, usage of priced meters burns them down exactly
//! once as the aggregator commits it, and every movement is an entry in an append-only ledger.
//!
//! - `config.rs`: `[credits]` in tally.toml: the rate card (`[[credits.rates]]`) and how often
//!   the burner runs.
//! - `rates.rs`: [`RateCard`], what a unit of each meter costs (per group-by value if asked),
//!   recorded in `credit_rates` so every process prices alike.
//! - `grants.rs`: grants (idempotent per key) and voids, each with its ledger entry: the owner
//!   of `credit_grants` and `credit_transactions` (and their errors, [`CreditError`]).
//! - `balance.rs`: a customer's balance, and the projected balances quota checks load.
//! - `ledger.rs`: reading the ledger: pages of entries, credits applied in a period.
//! - `queue.rs`: what the aggregator calls in its batch transaction to queue counted usage.
//! - `burn.rs`: the burner in `tally aggregate`: queued usage drawn down from grants in
//!   precedence order, expiry, plan grants each period; `burn/draw.rs` is the pure draw-down.
//! - `telemetry.rs`: the burner's metrics.

mod balance;
pub mod burn;
mod config;
pub mod grants;
pub mod ledger;
pub mod queue;
pub mod rates;
pub mod telemetry;

pub use balance::{
    balance, next_balance_changes, projected_balances, projected_balances_isolating, Balance,
};
pub use burn::{burn_once, settle, start_burner, BurnReport, Settled};
pub use config::{CreditPack, CreditsConfig, PackPrice, RateDefinition};
pub use grants::{
    get_grant, grant, grant_purchase, take_back_in, void, void_in, Actor, CreditError, Grant,
    GrantKind, Granted, NewGrant,
};
pub use ledger::{applied_in_period, ledger, LedgerEntry, LedgerPage, MeterCredits, PeriodCredits};
pub use rates::RateCard;
