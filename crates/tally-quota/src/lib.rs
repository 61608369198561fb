//! The quota check services call in their request path: its cache and its middleware. Plans,
//! subscriptions and entitlements are `tally-billing`'s.
//!
//! - `check.rs`: the `Quota` handle: `check`, `peek`, `require_feature`, `entitlements`,
//!   `invalidate`; how the cache and its refresh behave (`serve.refresh`) and what bounds it
//!   (`QuotaOptions`: at most `max_customers` cached, about 760 bytes each with a three-limit
//!   plan; one load per customer at a time; failed loads cached for a second). Its parts, in
//!   `check/`:
//!   - `error.rs`: `QuotaError`, why a check has no decision, with its stable API code.
//!   - `decision.rs`: `Decision` and `decide`, pure arithmetic on a limit, its grace and the
//!     usage so far.
//!   - `cache.rs`: in-memory state: each customer's cached subscription, entitlements and
//!     usage (and its rollover when a day or month period ends), the meter → aggregation map,
//!     and the `CacheState` the checks share with the refresher.
//!   - `customers.rs`: the map of cached customers, sharded and bounded, and its eviction (no
//!     live subscription first, then least recently used).
//!   - `single_flight.rs`: the loads a check waits for: one per customer at a time, a few at
//!     once, failures cached.
//!   - `load.rs`: loading a batch of customers from Postgres into cached state, in two queries.
//!   - `usage.rs`: a limit's period bounds (whole UTC days) and the batched `usage_daily` query.
//!   - `refresher.rs`: the supervised background task that reloads stale customers in batches.
//!   - `feed.rs`: the change feed: which customers Postgres said changed, and when what it
//!     says can be trusted; `listener.rs`: the supervised task that listens on Postgres's
//!     `tally_changes` channel for it, with its heartbeat.
//!   - `hooks.rs`: for tests (the `testing` feature): the cache's counts, a period's end, and
//!     customers cached without Postgres.
//! - `layer.rs` (the `layer` feature): `QuotaLayer`, the tower middleware (works with axum):
//!   checks the route's meter before the handler (429 `LIMIT_EXCEEDED` with `RateLimit-*`
//!   headers on deny), emits the usage once per request id after a 2xx. Its parts, in `layer/`:
//!   `response.rs` (the answers it writes: errors, the deny body, the headers), `usage.rs` (the
//!   usage event and its id from the request id), `telemetry.rs` (its metrics).
//! - `deny.rs`: the bodies of a refused check (429 `LIMIT_EXCEEDED`, 402
//!   `INSUFFICIENT_CREDITS`), the API's and the middleware's.
//! - `telemetry.rs`: the cache's hit and miss counter.
//! - `testing.rs`: the cache's counts and usage without the aggregator, for tests and
//!   benchmarks.

mod check;
pub mod deny;
#[cfg(feature = "layer")]
pub mod layer;
pub mod telemetry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use check::{
    decide, usage_against_limits, CustomerUsage, Decision, MeterPeriodUsage, Quota, QuotaError,
    QuotaOptions, UsageAgainstLimits,
};
