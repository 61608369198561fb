-- Stripe webhooks: subscriptions follow Stripe, invoices are recorded for finance.

-- Every webhook event tally accepted, once per id: a replay finds its row and changes nothing.
CREATE TABLE stripe_webhook_events (
    event_id    text COLLATE "C" PRIMARY KEY,
    type        text NOT NULL,
    -- Stripe's time for the event: it orders changes to one object (older never wins).
    created     timestamptz NOT NULL,
    livemode    boolean NOT NULL,
    object_id   text COLLATE "C",
    -- applied: changed tally; stale: an older event than one already applied to the object;
    -- ignored: a type tally does not act on.
    outcome     text NOT NULL CHECK (outcome IN ('applied', 'stale', 'ignored')),
    detail      text,
    payload     jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stripe_webhook_events_object ON stripe_webhook_events (object_id, created);

-- Webhooks find the tally customer from the Stripe customer.
CREATE INDEX stripe_customers_stripe_id ON stripe_customers (stripe_customer_id);

-- Stripe's own status (incomplete, unpaid, paused, ...) beside tally's four.
ALTER TABLE subscriptions ADD COLUMN stripe_status text;

-- (contract) Invoices as Stripe last described them, for finance. Amounts are in the
-- currency's minor unit, as Stripe gives them.
CREATE TABLE stripe_invoices (
    invoice_id             text COLLATE "C" PRIMARY KEY,
    stripe_customer_id     text COLLATE "C",
    -- tally's customer, when the Stripe customer is mapped (`tally customers map`).
    customer_id            text COLLATE "C",
    stripe_subscription_id text COLLATE "C",
    number                 text,
    status                 text,
    currency               text NOT NULL,
    amount_due             bigint NOT NULL,
    amount_paid            bigint NOT NULL,
    amount_remaining       bigint NOT NULL,
    total                  bigint NOT NULL,
    period_start           timestamptz NOT NULL,
    period_end             timestamptz NOT NULL,
    attempt_count          bigint NOT NULL,
    -- The event that last changed the row (invoice.created, .finalized, .paid, .payment_failed)
    -- and its time: an older event never overwrites a newer one.
    last_event_type        text NOT NULL,
    last_event_created     timestamptz NOT NULL,
    updated_at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stripe_invoices_customer ON stripe_invoices (customer_id, period_start);
