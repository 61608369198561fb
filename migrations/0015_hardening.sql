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

-- A customer one of the background loops could not process (the alert evaluator, the credit
-- burner, the subscription scheduler): one row per loop and customer, with the error, while the
-- loop goes on with everyone else. The loop tries the customer again at `retry_at` (backing off
-- to an hour) and deletes the row once it succeeds. `tally status` lists them.
CREATE TABLE customer_errors (
    stage        text NOT NULL,
    customer_id  text COLLATE "C" NOT NULL,
    error        text NOT NULL,
    attempts     integer NOT NULL DEFAULT 1,
    first_at     timestamptz NOT NULL DEFAULT now(),
    last_at      timestamptz NOT NULL DEFAULT now(),
    retry_at     timestamptz NOT NULL,
    PRIMARY KEY (stage, customer_id)
);
CREATE INDEX customer_errors_due ON customer_errors (stage, retry_at);

-- The idempotency key of a plan's period credits, defined once, here: the burner finds the
-- subscriptions due their grant with it and makes the grant under the key it returns. (It was
-- built twice: rounding seconds in SQL, truncating them in Rust; a period starting at .5 s or
-- later never matched its own grant and stayed due for ever.) Truncated, as the keys granted
-- so far were.
CREATE FUNCTION plan_grant_key(subscription_id bigint, period_start timestamptz) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT 'plan:' || subscription_id || ':' || floor(extract(epoch FROM period_start))::bigint $$;

-- A grant's `remaining` is its ledger's sum, by construction: every entry written to
-- credit_transactions moves its grant's remaining by its amount (one statement-level trigger,
-- so a burn of thousands of entries is one update per grant), and nothing else may change it.
-- A grant starts at 0; its `grant` entry brings it to its amount.
CREATE FUNCTION credit_transactions_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE credit_grants g SET remaining = g.remaining + moved.amount
    FROM (SELECT grant_id, sum(amount) AS amount FROM entered
          WHERE grant_id IS NOT NULL GROUP BY grant_id) AS moved
    WHERE g.grant_id = moved.grant_id;
    RETURN NULL;
END $$;
CREATE TRIGGER credit_transactions_apply AFTER INSERT ON credit_transactions
    REFERENCING NEW TABLE AS entered FOR EACH STATEMENT EXECUTE FUNCTION credit_transactions_apply();

CREATE FUNCTION credit_grants_remaining_follows_the_ledger() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' AND NEW.remaining <> 0 THEN
        RAISE EXCEPTION 'a new grant starts at remaining = 0: its grant entry in credit_transactions brings it to its amount'
            USING ERRCODE = 'restrict_violation';
    END IF;
    -- Depth 2: the update made by credit_transactions_apply, and only that.
    IF TG_OP = 'UPDATE' AND NEW.remaining IS DISTINCT FROM OLD.remaining AND pg_trigger_depth() < 2 THEN
        RAISE EXCEPTION 'credit_grants.remaining follows the ledger: record a credit_transactions entry instead'
            USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER credit_grants_remaining_follows_the_ledger BEFORE INSERT OR UPDATE ON credit_grants
    FOR EACH ROW EXECUTE FUNCTION credit_grants_remaining_follows_the_ledger();
