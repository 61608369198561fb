-- Usage alerts: rules (per plan in tally.toml, per customer here), what fired, and the signed
-- webhook deliveries to the endpoints registered through the API.

-- Customers whose usage or credits changed, for the alert evaluator: the aggregator adds one
-- row per customer and meter a batch changed, in the batch's transaction (the burner, grants and
-- voids add theirs with meter ''); the evaluator takes and deletes them.
CREATE TABLE customer_changes (
    change_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id text COLLATE "C" NOT NULL,
    meter       text COLLATE "C" NOT NULL
);

-- (contract) A customer's own alert rules (plans' rules are in their definition): usage of a
-- meter reaching `percent` of its limit in the limit's period, or the projected credit balance
-- falling below `below`.
CREATE TABLE alert_rules (
    rule_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id text COLLATE "C" NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('usage', 'credit_balance')),
    meter       text COLLATE "C",
    percent     numeric CHECK (percent > 0 AND percent <= 1000),
    below       numeric,
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'usage') = (meter IS NOT NULL AND percent IS NOT NULL AND below IS NULL)),
    CHECK ((kind = 'credit_balance') = (below IS NOT NULL AND meter IS NULL AND percent IS NULL))
);
CREATE INDEX alert_rules_customer ON alert_rules (customer_id);

-- (contract) Each crossing, once: a usage rule fires once per (customer, period); a balance
-- rule once until the balance is back at or above its amount (`rearmed_at`).
CREATE TABLE alert_firings (
    firing_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The stable event id receivers dedupe on.
    event_id     text COLLATE "C" NOT NULL UNIQUE,
    -- `plan:<plan>:<rule>` or `customer:<rule id>`.
    rule_key     text COLLATE "C" NOT NULL,
    customer_id  text COLLATE "C" NOT NULL,
    -- For usage rules: the start of the limit's period; for balance rules: when it fired.
    period_start timestamptz NOT NULL,
    event_type   text NOT NULL,
    payload      jsonb NOT NULL,
    fired_at     timestamptz NOT NULL DEFAULT now(),
    rearmed_at   timestamptz,
    UNIQUE (rule_key, customer_id, period_start)
);
CREATE UNIQUE INDEX alert_firings_one_armed_balance ON alert_firings (rule_key, customer_id)
    WHERE event_type = 'credits.balance_below' AND rearmed_at IS NULL;

-- Where alerts are sent. The secret signs every delivery; it is shown once, when created.
CREATE TABLE alert_endpoints (
    endpoint_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    url         text NOT NULL CHECK (url ~ '^https?://'),
    secret      text NOT NULL,
    description text,
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    deleted_at  timestamptz
);

-- (contract) Each firing sent to each endpoint: attempts and outcome. Retried with backoff
-- for a day, then `failed`.
CREATE TABLE alert_deliveries (
    delivery_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    firing_id       bigint NOT NULL REFERENCES alert_firings (firing_id),
    endpoint_id     bigint NOT NULL REFERENCES alert_endpoints (endpoint_id),
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_status     integer,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    UNIQUE (firing_id, endpoint_id)
);
CREATE INDEX alert_deliveries_due ON alert_deliveries (next_attempt_at) WHERE status = 'pending';
