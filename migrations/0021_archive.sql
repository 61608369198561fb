-- The event archive (docs/archive.md): every file `tally archive` wrote, the offset ranges it
-- holds, and where the archiver resumes. A flush records its files and advances the offsets in
-- one transaction, so a file is in `archive_files` exactly when the offsets say its events were
-- archived; a staged file no row names is an orphan of a flush that never committed.
CREATE TABLE archive_files (
    file_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Where readers find it (`events/date=…/hour=…/<flush>-<n>.parquet`), and where it was
    -- written first (`_staging/<flush>/<n>.parquet`).
    path             text COLLATE "C" NOT NULL UNIQUE,
    staging_path     text COLLATE "C" NOT NULL,
    flush_id         uuid NOT NULL,
    -- The hour its events happened in (a rejected record's: the hour it came).
    hour             timestamptz NOT NULL CHECK (date_trunc('hour', hour) = hour),
    bytes            bigint NOT NULL CHECK (bytes > 0),
    sha256           text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    records          bigint NOT NULL CHECK (records > 0),
    accepted         bigint NOT NULL CHECK (accepted >= 0 AND accepted <= records),
    schema_version   integer NOT NULL,
    -- staged: recorded, not yet moved to `path`; published: readers see it.
    state            text NOT NULL DEFAULT 'staged' CHECK (state IN ('staged', 'published')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    published_at     timestamptz
);
CREATE INDEX archive_files_hour ON archive_files (hour);
CREATE INDEX archive_files_staged ON archive_files (file_id) WHERE state = 'staged';

-- The offsets of each partition a file holds: [first_offset, last_offset], `records` of them
-- (a compacted or transactional topic may leave gaps).
CREATE TABLE archive_file_ranges (
    file_id      bigint NOT NULL REFERENCES archive_files (file_id) ON DELETE CASCADE,
    topic        text COLLATE "C" NOT NULL,
    partition    integer NOT NULL,
    first_offset bigint NOT NULL,
    last_offset  bigint NOT NULL CHECK (last_offset >= first_offset),
    records      bigint NOT NULL CHECK (records > 0),
    PRIMARY KEY (file_id, topic, partition)
);
CREATE INDEX archive_file_ranges_position ON archive_file_ranges (topic, partition, first_offset);

-- Where the archiver resumes in each partition (its own consumer group's truth, as
-- `kafka_offsets` is the aggregators'), and which archiver process holds the partition.
CREATE TABLE archive_offsets (
    topic       text COLLATE "C" NOT NULL,
    partition   integer NOT NULL,
    next_offset bigint NOT NULL CHECK (next_offset >= 0),
    owner       text,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);
