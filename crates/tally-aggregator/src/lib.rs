//! `tally aggregate`: consumes `usage-events` and rolls events into exact one-minute windows in
//! Postgres, exactly once.
//!
//! Exactly once rests on one transaction per batch that claims the event ids (dedup), adds the
//! newly claimed events to `usage_minute` and the daily rollup, records rejected events, and
//! stores the consumed Kafka offsets. Consumption always resumes from the offsets stored in
//! Postgres, and each partition carries an owner epoch so that a batch from an aggregator that
//! lost the partition in a rebalance is rolled back rather than applied.
//!
//! Layout: `batch` (decode, check, fold; pure), `store` (the Postgres queries),
//! `kafka` (consumer and rebalance handling, DLQ), `aggregator` (the loop).

mod aggregator;
mod batch;
mod config;
mod kafka;
mod store;
mod telemetry;

pub use aggregator::{Aggregator, AggregatorError, Hooks, Mode, RunSummary, Step};
pub use config::AggregatorConfig;
pub use store::StoreError;
pub use telemetry::BatchReport;
