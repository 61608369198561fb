-- The archive's retention: a file past `archive.retention` is deleted from the store and its
-- row kept as `deleted` (so `tally archive verify` can say an hour is no longer archived,
-- rather than find it empty). A file recorded but found neither staged nor published (its disk
-- lost it) is `lost`: its hour is reported, and it no longer holds back the other files.
-- A file's hour is whole in UTC, whatever the session's zone.
ALTER TABLE archive_files
    DROP CONSTRAINT archive_files_hour_check,
    ADD CONSTRAINT archive_files_hour_check CHECK (date_trunc('hour', hour, 'UTC') = hour),
    DROP CONSTRAINT archive_files_state_check,
    ADD CONSTRAINT archive_files_state_check CHECK (state IN ('staged', 'published', 'deleted', 'lost')),
    ADD COLUMN deleted_at timestamptz;

-- `tally archive verify` looks up the aggregator's refusals by Kafka position, for the offsets
-- of the files it reads only.
CREATE INDEX rejected_events_position ON rejected_events (topic, partition, "offset")
    WHERE received_via = 'kafka';
