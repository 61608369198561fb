-- The archive's retention: a file past `archive.retention` is deleted from the store and its
-- row kept as `deleted` (so `tally archive verify` can say an hour is no longer archived,
-- rather than find it empty). And a file's hour is whole in UTC, whatever the session's zone.
ALTER TABLE archive_files
    DROP CONSTRAINT archive_files_hour_check,
    ADD CONSTRAINT archive_files_hour_check CHECK (date_trunc('hour', hour, 'UTC') = hour),
    DROP CONSTRAINT archive_files_state_check,
    ADD CONSTRAINT archive_files_state_check CHECK (state IN ('staged', 'published', 'deleted')),
    ADD COLUMN deleted_at timestamptz;
