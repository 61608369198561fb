-- Prepaid credits: grants, the append-only ledger of every movement, the rate card that prices
-- usage in credits, and the queue of committed usage waiting to be burned.

-- (contract) What one unit of a meter costs in credits, as tally.toml's [[credits.rates]] last
-- recorded it. `dimensions` narrows a rate to windows whose group-by values include them
-- ({} = the meter's default rate); the most specific match wins.
CREATE TABLE credit_rates (
    meter            text COLLATE "C" NOT NULL,
    dimensions       jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(dimensions) = 'object'),
    credits_per_unit numeric NOT NULL CHECK (credits_per_unit >= 0),
    recorded_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (meter, dimensions)
);

-- (contract) A customer's credit grants. `remaining` is what the ledger leaves of `amount`
-- (kept in the same transaction as every ledger entry that moves it); `closed_at` is set when a
-- grant expires or is voided, after which nothing draws from it.
CREATE TABLE credit_grants (
    grant_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id     text COLLATE "C" NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('purchased', 'subscription', 'promotional')),
    amount          numeric NOT NULL CHECK (amount > 0),
    remaining       numeric NOT NULL CHECK (remaining >= 0 AND remaining <= amount),
    -- Lower draws first; NULL takes the kind's default (purchased 10, subscription 20,
    -- promotional 30).
    priority        integer CHECK (priority BETWEEN 0 AND 1000),
    -- Usage in windows that end after `effective_at` and start before `expires_at` draws from it.
    effective_at    timestamptz NOT NULL,
    expires_at      timestamptz CHECK (expires_at > effective_at),
    -- The same key for the same customer is the same grant (a top-up sent twice is one).
    idempotency_key text COLLATE "C" NOT NULL CHECK (idempotency_key <> ''),
    -- For `subscription` grants: the subscription and the period they were granted for.
    subscription_id bigint REFERENCES subscriptions (subscription_id),
    description     text,
    granted_by      text NOT NULL CHECK (granted_by <> ''),
    reason          text NOT NULL CHECK (reason <> ''),
    created_at      timestamptz NOT NULL DEFAULT now(),
    closed_at       timestamptz,
    closed_as       text CHECK (closed_as IN ('expired', 'voided')),
    CHECK ((closed_at IS NULL) = (closed_as IS NULL)),
    CHECK (kind = 'purchased' OR expires_at IS NOT NULL),
    UNIQUE (customer_id, idempotency_key)
);
CREATE INDEX credit_grants_open ON credit_grants (customer_id) WHERE closed_at IS NULL;
CREATE INDEX credit_grants_expiring ON credit_grants (expires_at) WHERE closed_at IS NULL;

-- (contract) Every movement of credits, append-only: `grant` (+amount), `consume` (-credits
-- for usage in one source window), `expire` and `void` (-what was left). A consume with no
-- grant is usage no grant covered (`uncovered`), recorded so that the ledger accounts for all
-- priced usage.
CREATE TABLE credit_transactions (
    transaction_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id    text COLLATE "C" NOT NULL,
    grant_id       bigint REFERENCES credit_grants (grant_id),
    kind           text NOT NULL CHECK (kind IN ('grant', 'consume', 'expire', 'void')),
    -- Signed: positive for a grant, negative for the rest.
    amount         numeric NOT NULL CHECK ((kind = 'grant') = (amount > 0) OR amount = 0),
    -- For `consume`: the source window and how much usage of it this entry paid for.
    meter          text COLLATE "C",
    group_key      text COLLATE "C",
    window_start   timestamptz,
    quantity       numeric,
    credits_per_unit numeric,
    CHECK ((kind = 'consume') = (window_start IS NOT NULL)),
    CHECK (kind = 'consume' OR grant_id IS NOT NULL),
    actor          text NOT NULL,
    reason         text,
    at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX credit_transactions_customer ON credit_transactions (customer_id, transaction_id);
CREATE INDEX credit_transactions_grant ON credit_transactions (grant_id) WHERE grant_id IS NOT NULL;
-- The invoice preview's credits applied in a period.
CREATE INDEX credit_transactions_consumed ON credit_transactions (customer_id, window_start)
    WHERE kind = 'consume';

CREATE FUNCTION credit_transactions_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'credit_transactions is append-only: record a correcting entry instead'
        USING ERRCODE = 'restrict_violation';
END $$;
CREATE TRIGGER credit_transactions_append_only BEFORE UPDATE OR DELETE OR TRUNCATE
    ON credit_transactions FOR EACH STATEMENT EXECUTE FUNCTION credit_transactions_append_only();

-- Committed usage of priced meters waiting to be burned: the aggregator adds a row per window
-- it changed, in the batch's transaction (so exactly the counted events are queued, once); the
-- burner draws it down from grants and deletes it, in one transaction.
CREATE TABLE credit_usage_queue (
    queue_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id  text COLLATE "C" NOT NULL,
    meter        text COLLATE "C" NOT NULL,
    group_key    text COLLATE "C" NOT NULL,
    window_start timestamptz NOT NULL,
    quantity     numeric NOT NULL,
    queued_at    timestamptz NOT NULL DEFAULT now(),
    -- Set when a burn could not price the row (a cost beyond a 28-digit decimal): left here,
    -- not burned, for an operator.
    stuck        text
);
CREATE INDEX credit_usage_queue_customer ON credit_usage_queue (customer_id);

-- The balance finance reads: per customer and grant kind, what was granted, consumed, expired,
-- voided, and what remains on open grants.
CREATE VIEW finance_credit_balances AS
SELECT g.customer_id,
       g.kind,
       sum(g.amount) AS granted,
       coalesce(sum(-t.consumed), 0) AS consumed,
       coalesce(sum(-t.expired), 0) AS expired,
       coalesce(sum(-t.voided), 0) AS voided,
       coalesce(sum(g.remaining) FILTER (WHERE g.closed_at IS NULL), 0) AS remaining
FROM credit_grants g
LEFT JOIN LATERAL (
    SELECT sum(amount) FILTER (WHERE kind = 'consume') AS consumed,
           sum(amount) FILTER (WHERE kind = 'expire') AS expired,
           sum(amount) FILTER (WHERE kind = 'void') AS voided
    FROM credit_transactions WHERE grant_id = g.grant_id
) t ON true
GROUP BY g.customer_id, g.kind;
