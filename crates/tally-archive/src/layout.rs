//! Where files go in the store: published under their events' date and hour (Hive-style, so
//! DuckDB, Spark and Athena prune by `date` and `hour`), staged under their flush.

use chrono::{DateTime, Utc};
use object_store::path::Path;
use uuid::Uuid;

/// Readers read this prefix, and only it.
pub const PUBLISHED: &str = "events";
/// Written, not yet recorded in Postgres: no reader looks here.
pub const STAGING: &str = "_staging";

/// `events/date=2026-12-07/hour=11/<flush>-<n>.parquet`: the `n`th file of a flush, holding
/// events of the hour starting at `hour`.
pub fn published_path(hour: DateTime<Utc>, flush: Uuid, n: usize) -> Path {
    Path::from(format!(
        "{PUBLISHED}/date={}/hour={}/{flush}-{n}.parquet",
        hour.format("%Y-%m-%d"),
        hour.format("%H")
    ))
}

/// `_staging/<flush>/<n>.parquet`.
pub fn staging_path(flush: Uuid, n: usize) -> Path {
    Path::from(format!("{STAGING}/{flush}/{n}.parquet"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_published_under_their_hour_and_staged_under_their_flush() {
        let flush = Uuid::parse_str("0193a0a0-0000-7000-8000-000000000001").unwrap();
        let hour: DateTime<Utc> = "2026-12-07T09:00:00Z".parse().unwrap();
        assert_eq!(
            published_path(hour, flush, 3).as_ref(),
            "events/date=2026-12-07/hour=09/0193a0a0-0000-7000-8000-000000000001-3.parquet"
        );
        assert_eq!(
            staging_path(flush, 3).as_ref(),
            "_staging/0193a0a0-0000-7000-8000-000000000001/3.parquet"
        );
    }
}
