//! `tally aggregate`: consumes `usage-events` and rolls events into exact one-minute windows in
//! Postgres, exactly once.
//!
//! Exactly once rests on one transaction per batch that claims the event ids (dedup), adds the
//! newly claimed events to `usage_minute` and the daily rollup, records rejected events, and
//! stores the consumed Kafka offsets. Consumption always resumes from the offsets stored in
//! Postgres, and each partition carries an owner epoch so that a batch from an aggregator that
//! lost the partition in a rebalance is rolled back rather than applied.
//!
//! Layout:
//! - `aggregator.rs`: the loop: poll, build batches per lane, commit, retry, notify; the public
//!   [`Aggregator`], its errors, and (feature `testing`) the `Hooks` tests observe a batch with.
//! - `config.rs`: the `[aggregator]` settings, [`AggregatorConfig`], with defaults and checks.
//! - `kafka.rs`: the group consumer and its rebalance handling, the watermarks client, the DLQ
//!   producer and publisher.
//! - `membership.rs`: what the loop and the watchdog share about the member (its assignment,
//!   its progress, the watchdog's request to join again).
//! - `watchdog.rs`: notices a member that holds partitions without consuming them (or none
//!   while partitions nobody consumes lag), says so in `/readyz`, metrics and
//!   `aggregator_members`, and has the loop join the group again with a fresh consumer.
//! - `telemetry.rs`: metric names and recording, [`BatchReport`].
//! - `batch.rs`: a batch of consumed messages, pure (no I/O):
//!   - `batch/check.rs`: decode and check each message: candidates, in-batch duplicates,
//!     rejects with their reasons;
//!   - `batch/fold.rs`: fold accepted events into one delta per window and aggregation;
//!   - `batch/fixtures.rs`: fixtures shared by the batch unit tests.
//! - `rebuild.rs`: `tally rebuild`, windows recomputed from the event archive under a meter's
//!   current definition (`rebuild/source.rs`: the counted events, from the archive and Kafka;
//!   `rebuild/shadow.rs`: the shadow tables, compared and swapped in).
//! - `store.rs`: the Postgres side and [`AggregatorStoreError`]:
//!   - `store/commit.rs`: the one transaction per batch, and its report;
//!   - `store/claims.rs`: claiming event ids (dedup across batches);
//!   - `store/windows.rs`: window upserts, unique values, changed billing slots;
//!   - `store/ownership.rs`: taking partitions (owner epochs) and advancing stored offsets;
//!   - `store/unprocessable.rs`: bisecting a batch Postgres refuses to find the events to blame;
//!   - `store/retention.rs`: deleting expired dedup claims and unique values.

mod aggregator;
mod batch;
mod config;
mod kafka;
mod membership;
pub mod rebuild;
mod store;
mod telemetry;
mod watchdog;

#[cfg(feature = "testing")]
pub use aggregator::Hooks;
pub use aggregator::{Aggregator, AggregatorError, RunSummary, Step};
pub use config::AggregatorConfig;
pub use kafka::end_offsets;
pub use store::{
    committed_offsets, members, AggregatorMember, AggregatorStoreError, CommittedOffset,
};
pub use tally_runtime::RunMode;
pub use telemetry::BatchReport;
