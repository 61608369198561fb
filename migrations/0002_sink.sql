-- The sink: what is owed to Stripe, the outbox of meter events, and what was sent.

-- tally customer → Stripe customer (`tally customers map`). Usage of an unmapped customer
-- waits in usage_slot_changes until it is mapped.
CREATE TABLE stripe_customers (
    customer_id        text COLLATE "C" PRIMARY KEY,
    stripe_customer_id text COLLATE "C" NOT NULL CHECK (stripe_customer_id <> ''),
    mapped_at          timestamptz NOT NULL DEFAULT now()
);

-- Billing slots (5 minutes) the aggregator changed since the sink last billed them. The
-- aggregator appends a row in the batch's transaction (an insert costs less than an upsert and
-- cannot race with the sink's delete); the sink deletes exactly the rows it billed, so a change
-- committed while the sink works is billed on its next pass.
CREATE TABLE usage_slot_changes (
    change_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id text COLLATE "C" NOT NULL,
    meter       text COLLATE "C" NOT NULL,
    slot_start  timestamptz NOT NULL
);
CREATE INDEX usage_slot_changes_slot ON usage_slot_changes (slot_start);

-- Per slot: the exact window total the sink has accounted for, and its last revision.
CREATE TABLE billing_slots (
    customer_id text COLLATE "C" NOT NULL,
    meter       text COLLATE "C" NOT NULL,
    slot_start  timestamptz NOT NULL,
    accounted   numeric NOT NULL,
    revision    integer NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, meter, slot_start)
);

-- Per customer and sum/count meter: exact usage accounted and whole units put in the outbox.
-- floor(accounted) - submitted is what a new submission carries; accounted - floor(accounted)
-- is the fraction carried forward (Stripe takes whole numbers).
CREATE TABLE billing_balances (
    customer_id text COLLATE "C" NOT NULL,
    meter       text COLLATE "C" NOT NULL,
    accounted   numeric NOT NULL,
    submitted   numeric NOT NULL,
    PRIMARY KEY (customer_id, meter)
);

-- The outbox (contract). A row is written, with its identifier, in the same transaction that
-- accounts for the usage, before any call to Stripe; every retry sends the same identifier.
CREATE TABLE stripe_submissions (
    submission_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    identifier         text COLLATE "C" NOT NULL UNIQUE CHECK (length(identifier) <= 100),
    customer_id        text COLLATE "C" NOT NULL,
    meter              text COLLATE "C" NOT NULL,
    slot_start         timestamptz NOT NULL,
    revision           integer NOT NULL,
    stripe_customer_id text COLLATE "C" NOT NULL,
    event_name         text COLLATE "C" NOT NULL,
    -- 'delta': whole units to add (sum/count meters, Stripe `sum`);
    -- 'last': the slot's value (max/latest meters, Stripe `last`);
    -- 'cancel': withdraw the event `cancels` (a meter event adjustment), `value` its units.
    kind               text NOT NULL CHECK (kind IN ('delta', 'last', 'cancel')),
    cancels            text COLLATE "C" CHECK ((kind = 'cancel') = (cancels IS NOT NULL)),
    value              numeric NOT NULL CHECK (value = trunc(value)),
    event_timestamp    timestamptz NOT NULL,
    status             text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed')),
    attempts           integer NOT NULL DEFAULT 0,
    next_attempt_at    timestamptz NOT NULL DEFAULT now(),
    -- A sink process holds a row while it calls Stripe; an expired lease (crash) frees it.
    leased_until       timestamptz,
    last_error         text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    sent_at            timestamptz,
    UNIQUE (customer_id, meter, slot_start, revision)
);
-- The pending rows per customer and meter, oldest first: the sink leases a pair's head.
CREATE INDEX stripe_submissions_pending ON stripe_submissions (customer_id, meter, submission_id) WHERE status = 'pending';

-- Usage that went down after it was billed and could not be corrected at Stripe (a revision
-- sent more than 23 hours ago cannot be canceled): finance credits it. Never dropped silently.
CREATE TABLE billing_corrections (
    correction_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id   text COLLATE "C" NOT NULL,
    meter         text COLLATE "C" NOT NULL,
    slot_start    timestamptz NOT NULL,
    -- Whole units billed above what the windows now hold.
    overbilled    numeric NOT NULL,
    detail        text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    resolved_at   timestamptz
);

-- Usage that waits because its customer has no Stripe customer id (`tally customers map`).
CREATE VIEW stripe_unmapped_usage AS
SELECT c.customer_id, c.meter, count(DISTINCT c.slot_start) AS slots, min(c.slot_start) AS oldest_slot
FROM usage_slot_changes c
LEFT JOIN stripe_customers m USING (customer_id)
WHERE m.customer_id IS NULL
GROUP BY c.customer_id, c.meter;

-- The outbox per state, for operators and finance.
CREATE VIEW stripe_outbox_summary AS
SELECT status, count(*) AS submissions, sum(value) AS units, min(created_at) AS oldest
FROM stripe_submissions
GROUP BY status;
