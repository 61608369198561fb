//! Retention: deleting what is past its use, in the background, never in a batch's way.

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgPool;

use super::AggregatorStoreError;

/// Deletes dedup claims made before `claimed_before` (older than the retention), in chunks of
/// short transactions so that neither locks nor WAL pile up, and minute unique-values past the
/// lateness horizon. Returns how many claims were deleted.
pub(crate) async fn delete_expired(
    pool: &PgPool,
    claimed_before: NaiveDate,
    values_before: DateTime<Utc>,
) -> Result<u64, AggregatorStoreError> {
    const CHUNK: i64 = 20_000;
    let mut deleted = 0;
    loop {
        let chunk = sqlx::query(
            "DELETE FROM event_ids WHERE ctid = ANY(ARRAY(
                SELECT ctid FROM event_ids WHERE claimed_on < $1 LIMIT $2))",
        )
        .bind(claimed_before)
        .bind(CHUNK)
        .execute(pool)
        .await?
        .rows_affected();
        deleted += chunk;
        if chunk < CHUNK as u64 {
            break;
        }
    }
    sqlx::query("DELETE FROM usage_minute_values WHERE window_start < $1")
        .bind(values_before)
        .execute(pool)
        .await?;
    Ok(deleted)
}
