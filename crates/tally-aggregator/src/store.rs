//! The aggregator's Postgres queries, and the error they share. [`commit_batch`] is the one
//! transaction per batch that invariants 1 and 2 rest on: claim ids, add windows, update the
//! daily rollup, record rejects, advance the stored offsets, all or nothing.
//!
//! - `commit`: the batch transaction, composed of the parts below, and what it reports.
//! - `claims`: claiming the batch's event ids in `event_ids` (dedup across batches).
//! - `windows`: upserting window deltas into `usage_minute` and `usage_daily`, the values of
//!   `unique_count` windows, and the billing slots a batch changed.
//! - `ownership`: `kafka_offsets`: taking partitions (owner epochs, fencing the previous
//!   owner) and advancing the stored offsets only under the current epoch.
//! - `members`: `aggregator_members`, each running aggregator as its watchdog saw it.
//! - `unprocessable`: after a data error, finding the events Postgres refuses by bisecting the
//!   batch in rolled-back transactions.
//! - `retention`: deleting expired dedup claims and unique values.

mod claims;
mod commit;
mod members;
mod ownership;
mod retention;
mod unprocessable;
mod windows;

pub(crate) use windows::{upsert_windows, WindowTables};

pub(crate) use commit::commit_batch;
pub(crate) use members::{covered_by_others, forget_member, record_member, MemberRecord};
pub use members::{members, AggregatorMember};
pub use ownership::{committed_offsets, CommittedOffset};
pub(crate) use ownership::{take_partitions, Epochs, Ownership, TakenPartition};
pub(crate) use retention::delete_expired;
pub(crate) use unprocessable::isolate_unprocessable;

/// A store error, tagged with whether running the same batch again can succeed.
#[derive(Debug, thiserror::Error)]
pub enum AggregatorStoreError {
    /// Another aggregator took one of the batch's partitions (a rebalance); nothing was written.
    #[error("partition {partition} of {topic} now belongs to another aggregator; the batch was rolled back")]
    Fenced { topic: String, partition: i32 },
    #[error("Postgres: {0}")]
    Retryable(sqlx::Error),
    /// Postgres refused the data itself (SQLSTATE class 22 data exception, 23 integrity
    /// violation other than the dedup race, 54 program limit such as an index row too large):
    /// some event in the batch is to blame, and `isolate_unprocessable` finds it.
    #[error("Postgres refused the batch's data: {0}")]
    Data(sqlx::Error),
    #[error("Postgres: {0}")]
    Permanent(sqlx::Error),
    #[error("{0}")]
    MeterChanged(String),
    /// `tally rebuild` redefined a meter after the batch was checked: nothing was written; the
    /// batch is checked again under the new definition.
    #[error("meter {meter:?} was redefined by a rebuild; the batch is checked again under its new definition")]
    Redefined { meter: String },
}

impl From<sqlx::Error> for AggregatorStoreError {
    fn from(error: sqlx::Error) -> Self {
        if tally_db::is_retryable(&error) {
            AggregatorStoreError::Retryable(error)
        } else if tally_db::is_data_error(&error) {
            AggregatorStoreError::Data(error)
        } else {
            AggregatorStoreError::Permanent(error)
        }
    }
}

impl From<tally_db::meters::CatalogError> for AggregatorStoreError {
    fn from(error: tally_db::meters::CatalogError) -> Self {
        match error {
            tally_db::meters::CatalogError::Postgres(error) => error.into(),
            changed => AggregatorStoreError::MeterChanged(changed.to_string()),
        }
    }
}
