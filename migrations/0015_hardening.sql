-- Hardening after an attacker-minded review (issue 23): the aggregator's members as their
-- watchdogs see them, and what the rest of this file says per section.

-- Each running aggregator, as its watchdog last saw it (every few seconds): its assignment and,
-- when it holds partitions without consuming them (or holds none while partitions nobody
-- consumes have lag), what is wrong and since when. Deleted when the process stops; `tally
-- status` shows the rows seen recently.
CREATE TABLE aggregator_members (
    owner          text PRIMARY KEY,
    consumer_group text NOT NULL,
    topic          text NOT NULL,
    instance_id    text,
    assigned       integer[] NOT NULL,
    stall          text,
    stalled_since  timestamptz,
    started_at     timestamptz NOT NULL DEFAULT now(),
    seen_at        timestamptz NOT NULL DEFAULT now()
);
