//! `archive.retention`: files whose events are older than it are deleted from the store; their
//! rows stay, marked `deleted`, so a reader of `archive_files` knows the hour was archived once.

use chrono::{DateTime, TimeDelta, Utc};
use object_store::path::Path;
use sqlx::PgPool;

use crate::flush::FlushError;
use crate::ArchiveStore;

/// Files deleted per query; the pass goes on until none is left.
const PAGE: i64 = 500;

/// Deletes every published file whose hour ended before `before`. A file the store will not
/// delete is skipped (and tried again by the next pass) without holding back the others;
/// the first such error is answered after trying them all. Returns how many were deleted.
pub async fn expire(
    pool: &PgPool,
    store: &ArchiveStore,
    before: DateTime<Utc>,
) -> Result<usize, FlushError> {
    let hour_starts_before = before - TimeDelta::hours(1);
    let mut after_id = 0_i64;
    let mut expired = 0;
    let mut first_error = None;
    loop {
        let page: Vec<(i64, String)> = sqlx::query_as(
            "SELECT file_id, path FROM archive_files
             WHERE state = 'published' AND hour <= $1 AND file_id > $2
             ORDER BY file_id LIMIT $3",
        )
        .bind(hour_starts_before)
        .bind(after_id)
        .bind(PAGE)
        .fetch_all(pool)
        .await?;
        let Some(&(last, _)) = page.last() else {
            break;
        };
        after_id = last;
        for (file_id, path) in page {
            // The file first, then its row: a crash between leaves a row that the next pass
            // deletes again (already gone is not an error), never a file no row names.
            if let Err(error) = store.delete(&Path::from(path.as_str())).await {
                tracing::warn!(%path, %error, "cannot delete an expired archive file; trying again next pass");
                first_error.get_or_insert(error);
                continue;
            }
            sqlx::query(
                "UPDATE archive_files SET state = 'deleted', deleted_at = now()
                 WHERE file_id = $1 AND state = 'published'",
            )
            .bind(file_id)
            .execute(pool)
            .await?;
            expired += 1;
        }
    }
    match first_error {
        Some(error) if expired == 0 => Err(FlushError::Archive(error)),
        _ => Ok(expired),
    }
}
