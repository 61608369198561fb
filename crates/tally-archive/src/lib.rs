//! The event archive: every record of the usage topic, accepted or rejected by the event
//! contract, kept as Parquet files in an object store (docs/archive.md).
//!
//! A record's life: [`ArchivedRecord::decode`] reads the Kafka record as the aggregator would;
//! [`layout`] files it under its event's hour; [`file::encode`] writes a bucket's records as
//! one Parquet file; [`ArchiveStore::stage`] puts it under `_staging/`, and once Postgres has
//! recorded it (with the offsets it advances, in one transaction: [`flush::flush`]),
//! [`ArchiveStore::publish`] moves it to `events/`, where readers find it.
//!
//! Layout:
//! - `archiver.rs`: the `tally archive` loop (read, buffer, flush; rebalances and failures
//!   read again from where Postgres says the archive ends); `kafka.rs`: its consumer;
//!   `config.rs`: `[archive]`; `telemetry.rs`: its metrics.
//! - `record.rs`, `file.rs`, `layout.rs`, `store.rs`, `flush.rs`: a record, a file, where it
//!   goes, the object store, and the exactly-once flush.
//! - `retention.rs`: `archive.retention`; `verify.rs`: `tally archive verify`.
//! - `backfill.rs`: `tally backfill` (files of events sent through Kafka, resumable);
//!   `input.rs`: the files it reads (JSON lines, CSV, Parquet).

mod archiver;
pub mod backfill;
mod config;
pub mod file;
pub mod flush;
pub mod input;
mod kafka;
pub mod layout;
mod record;
pub mod retention;
mod store;
mod telemetry;
pub mod verify;

pub use archiver::{Archiver, ArchiverError, RunSummary};
pub use config::ArchiveConfig;
pub use record::{ArchivedRecord, Verdict, FILED_AHEAD};
pub use store::{ArchiveStore, Staged};

/// Why the archive could not do something.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("Parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("Arrow: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("archive.url {url:?}: {why}")]
    Url { url: String, why: String },
    #[error("archive file {path}: {why}")]
    File { path: String, why: String },
    /// A recorded file the store no longer has whole: its records are not in the archive.
    #[error("archive file {path} is lost: {why}")]
    Lost { path: String, why: String },
    /// A record the schema cannot hold (never expected: the contract bounds every field).
    #[error("record at partition {partition} offset {offset}: {why}")]
    Unencodable {
        partition: i32,
        offset: i64,
        why: String,
    },
}
