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

-- Which store the archive is in: the id a marker object at the store's root carries
-- (`_tally_archive_id`). An archiver pointed at another store (a host's own empty directory)
-- refuses to start, rather than taking the files Postgres records for lost.
CREATE TABLE archive_store (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    store_id   uuid NOT NULL,
    url        text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- `tally archive verify` looks up the aggregator's refusals by Kafka position, for the offsets
-- of the files it reads only.
CREATE INDEX rejected_events_position ON rejected_events (topic, partition, "offset")
    WHERE received_via = 'kafka';

-- `tally backfill`: how far each input file has been sent (its records up to `next_record`
-- acknowledged by Kafka), so a backfill killed midway goes on where it stopped. A file is
-- known by its content (SHA-256), whatever its path.
CREATE TABLE backfill_progress (
    topic        text COLLATE "C" NOT NULL,
    sha256       text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    path         text NOT NULL,
    next_record  bigint NOT NULL DEFAULT 0 CHECK (next_record >= 0),
    started_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    done_at      timestamptz,
    PRIMARY KEY (topic, sha256)
);
