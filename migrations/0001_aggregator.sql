-- The aggregator's tables: claimed event ids, one-minute windows, daily rollups, rejected
-- events, consumed Kafka offsets, and the finance views.
-- Text keys use the "C" collation: byte order is what dedup and upserts need, and it is much
-- cheaper to compare than a locale's.

-- Meter definitions as the aggregator last saw them in tally.toml. Views and later stages
-- (sink, quotas) read the aggregation from here.
CREATE TABLE meters (
    name              text COLLATE "C" PRIMARY KEY,
    aggregation       text NOT NULL CHECK (aggregation IN ('sum', 'count', 'max', 'latest', 'unique_count')),
    group_by          text[] NOT NULL DEFAULT '{}',
    unique_dimension  text,
    stripe_event_name text NOT NULL,
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- (contract) One row per customer, meter, minute and group key.
-- group_key is '' for a meter without group_by, else a JSON object of the group_by dimensions
-- the event carried, e.g. {"model":"large"}.
CREATE TABLE usage_minute (
    customer_id   text COLLATE "C" NOT NULL,
    meter         text COLLATE "C" NOT NULL,
    window_start  timestamptz NOT NULL,
    group_key     text COLLATE "C" NOT NULL,
    value         numeric NOT NULL,
    event_count   bigint NOT NULL,
    -- For `latest`: the event time and id of the event whose quantity `value` holds.
    latest_at     timestamptz,
    latest_id     text COLLATE "C",
    first_updated timestamptz NOT NULL,
    last_updated  timestamptz NOT NULL,
    PRIMARY KEY (customer_id, meter, window_start, group_key)
) WITH (fillfactor = 90); -- room for HOT updates: upserts change no indexed column

-- Period rollup (UTC days) kept in the same transaction as the minutes: quota checks and the
-- finance views read this, never the minute windows. Same merge rules as usage_minute.
CREATE TABLE usage_daily (
    customer_id   text COLLATE "C" NOT NULL,
    meter         text COLLATE "C" NOT NULL,
    day           date NOT NULL,
    group_key     text COLLATE "C" NOT NULL,
    value         numeric NOT NULL,
    event_count   bigint NOT NULL,
    latest_at     timestamptz,
    latest_id     text COLLATE "C",
    first_updated timestamptz NOT NULL,
    last_updated  timestamptz NOT NULL,
    PRIMARY KEY (customer_id, meter, day, group_key)
) WITH (fillfactor = 90);

-- Distinct values seen by `unique_count` meters, so counts stay exact across batches.
-- Minute values are needed only while late events can still arrive (the lateness horizon);
-- daily values are kept, so monthly distinct counts stay exact.
CREATE TABLE usage_minute_values (
    customer_id  text COLLATE "C" NOT NULL,
    meter        text COLLATE "C" NOT NULL,
    window_start timestamptz NOT NULL,
    group_key    text COLLATE "C" NOT NULL,
    value        text COLLATE "C" NOT NULL,
    PRIMARY KEY (customer_id, meter, window_start, group_key, value)
);

CREATE TABLE usage_daily_values (
    customer_id text COLLATE "C" NOT NULL,
    meter       text COLLATE "C" NOT NULL,
    day         date NOT NULL,
    group_key   text COLLATE "C" NOT NULL,
    value       text COLLATE "C" NOT NULL,
    PRIMARY KEY (customer_id, meter, day, group_key, value)
);

-- Claimed event ids (dedup). Partitioned by the event's UTC day: an event older than the
-- lateness horizon is refused before its id is looked up, so a day partition older than the
-- horizon can never be consulted again and is dropped whole (no DELETE, no vacuum debt).
-- The aggregator creates day partitions as events need them.
CREATE TABLE event_ids (
    id           text COLLATE "C" NOT NULL,
    event_day    date NOT NULL,
    -- xxh3 of the canonical payload: a re-sent id with another payload is a conflict.
    payload_hash bigint NOT NULL,
    PRIMARY KEY (id, event_day)
) PARTITION BY RANGE (event_day);

-- (contract) Every refused event, with its raw bytes and where it came from.
CREATE TABLE rejected_events (
    rejection_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    reason       text NOT NULL,
    detail       text NOT NULL,
    topic        text NOT NULL,
    partition    integer NOT NULL,
    "offset"     bigint NOT NULL,
    -- When the event decoded far enough to tell.
    event_id     text,
    customer_id  text,
    meter        text,
    raw          bytea NOT NULL,
    kafka_key    bytea,
    rejected_at  timestamptz NOT NULL DEFAULT now(),
    -- Set once the copy on the DLQ topic is acknowledged; rows left NULL by a crash are
    -- published again at the next start (the table is the record, the topic a copy).
    dlq_published_at timestamptz
);
CREATE INDEX rejected_events_reason_time ON rejected_events (reason, rejected_at);
CREATE INDEX rejected_events_dlq_pending ON rejected_events (rejection_id) WHERE dlq_published_at IS NULL;

-- The next Kafka offset to consume, per consumer group, topic and partition; written in the
-- same transaction as the windows, so this (not Kafka's committed offset) is the truth.
-- owner_epoch fences a batch from an aggregator that lost the partition in a rebalance: taking
-- a partition bumps the epoch, and a batch commits only if its epoch is still current.
CREATE TABLE kafka_offsets (
    consumer_group text NOT NULL,
    topic          text NOT NULL,
    partition      integer NOT NULL,
    next_offset    bigint,
    owner          text,
    owner_epoch    bigint NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);

-- (contract) Finance views.
CREATE VIEW finance_usage_daily AS
SELECT customer_id, meter, group_key, day AS period, value, event_count AS events
FROM usage_daily;

CREATE VIEW finance_usage_monthly AS
SELECT d.customer_id,
       d.meter,
       d.group_key,
       d.month AS period,
       CASE m.aggregation
           WHEN 'max' THEN max(d.value)
           WHEN 'latest' THEN (array_agg(d.value ORDER BY d.latest_at DESC, d.latest_id DESC))[1]
           -- Distinct over the month, not a sum of daily distinct counts.
           WHEN 'unique_count' THEN (
               SELECT count(DISTINCT v.value)
               FROM usage_daily_values v
               WHERE v.customer_id = d.customer_id AND v.meter = d.meter
                 AND v.group_key = d.group_key
                 AND v.day >= d.month AND v.day < d.month + interval '1 month')
           ELSE sum(d.value)
       END AS value,
       sum(d.event_count)::bigint AS events
FROM (SELECT *, date_trunc('month', day)::date AS month FROM usage_daily) d
JOIN meters m ON m.name = d.meter
GROUP BY d.customer_id, d.meter, d.group_key, d.month, m.aggregation;
