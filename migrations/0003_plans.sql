-- Plans, subscriptions and per-customer overrides. Every change is written to
-- entitlement_audit by the code that makes it, in the same transaction.

-- Plans as `tally plans apply` last wrote them from tally.toml.
CREATE TABLE plans (
    name       text COLLATE "C" PRIMARY KEY,
    -- The plan's definition: {"features": {..}, "limits": {meter: {..}}, "stripe_prices": [..]}.
    definition jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE subscriptions (
    subscription_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id          text COLLATE "C" NOT NULL,
    plan                 text COLLATE "C" NOT NULL REFERENCES plans (name),
    status               text NOT NULL CHECK (status IN ('trialing', 'active', 'past_due', 'canceled')),
    current_period_start timestamptz NOT NULL,
    current_period_end   timestamptz NOT NULL CHECK (current_period_end > current_period_start),
    cancel_at_period_end boolean NOT NULL DEFAULT false,
    -- Set when the subscription comes from Stripe (webhooks).
    stripe_subscription_id text COLLATE "C" UNIQUE,
    -- The Stripe event time that last changed this row: an older event must not win.
    stripe_event_created timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);
-- At most one active or trialing subscription per customer: a constraint, not a hope.
CREATE UNIQUE INDEX subscriptions_one_live_per_customer
    ON subscriptions (customer_id) WHERE status IN ('active', 'trialing');
CREATE INDEX subscriptions_customer ON subscriptions (customer_id);

-- A customer's override of their plan (deep-merged, the override wins), with why and who.
CREATE TABLE customer_overrides (
    customer_id text COLLATE "C" PRIMARY KEY,
    -- {"features": {..}, "limits": {meter: {limit?, period?, enforcement?, grace_percent?, unit_price?}}}
    overrides   jsonb NOT NULL,
    reason      text NOT NULL CHECK (reason <> ''),
    set_by      text NOT NULL CHECK (set_by <> ''),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Every change to plans, subscriptions and overrides: what it was, what it became, who, why.
CREATE TABLE entitlement_audit (
    audit_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    entity      text NOT NULL CHECK (entity IN ('plan', 'subscription', 'override')),
    entity_key  text COLLATE "C" NOT NULL,
    action      text NOT NULL CHECK (action IN ('create', 'update', 'delete')),
    before      jsonb,
    after       jsonb,
    actor       text NOT NULL,
    reason      text,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX entitlement_audit_entity ON entitlement_audit (entity, entity_key, at);
