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

-- Alert endpoints: limited to some customers and event types (NULL: all), a second secret that
-- keeps signing during a rotation until it expires (receivers verify either, as with Stripe),
-- and a circuit breaker: after repeated failures the endpoint is left alone until `open_until`,
-- then tried with one delivery at a time until one succeeds.
ALTER TABLE alert_endpoints
    ADD COLUMN customers                  text[] COLLATE "C",
    ADD COLUMN event_types                text[],
    ADD COLUMN previous_secret            text,
    ADD COLUMN previous_secret_expires_at timestamptz,
    ADD COLUMN consecutive_failures       integer NOT NULL DEFAULT 0,
    ADD COLUMN open_until                 timestamptz;

-- Reads of one customer's firings, newest first (GET /v1/customers/{id}/alerts).
CREATE INDEX alert_firings_customer ON alert_firings (customer_id, firing_id DESC);
