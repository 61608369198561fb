-- Self-serve billing: the Stripe prices tally sells, the Checkout Sessions it opened, and
-- invoices kept with their lines and links.

-- The Stripe prices of plans and credit packs, as Stripe described them when `tally plans
-- apply` or `tally plans sync` last checked them. Checkout sells only what is here.
--   kind   licensed (a plan's fee), metered (a plan's usage, billed from a Stripe meter) or
--          one_time (a credit pack)
--   meter  for a metered price, the tally meter whose stripe_event_name the Stripe meter takes
CREATE TABLE stripe_prices (
    price_id            text COLLATE "C" PRIMARY KEY,
    plan                text COLLATE "C",
    pack                text COLLATE "C",
    kind                text NOT NULL CHECK (kind IN ('licensed', 'metered', 'one_time')),
    currency            text NOT NULL,
    unit_amount_decimal numeric NOT NULL,
    recurring_interval  text,
    meter               text COLLATE "C",
    livemode            boolean NOT NULL,
    checked_at          timestamptz NOT NULL DEFAULT now(),
    CHECK ((plan IS NULL) <> (pack IS NULL))
);
CREATE INDEX stripe_prices_plan ON stripe_prices (plan) WHERE plan IS NOT NULL;

-- Every Checkout Session tally opened, written before Stripe is asked (its checkout_id goes
-- into the session's metadata, so a session Stripe created but tally never heard the answer
-- for is still tally's). Only sessions found here are acted on: a paid pack is granted once,
-- from what this row says (customer, credits), never from what the event says.
--   status  open → complete (paid, or waiting for a delayed payment) → granted, or expired,
--           payment_failed, refunded (a refund before the grant: nothing is granted)
CREATE TABLE checkout_sessions (
    checkout_id            text COLLATE "C" PRIMARY KEY,
    session_id             text COLLATE "C" UNIQUE,
    customer_id            text COLLATE "C" NOT NULL,
    stripe_customer_id     text COLLATE "C" NOT NULL,
    mode                   text NOT NULL CHECK (mode IN ('subscription', 'payment')),
    plan                   text COLLATE "C",
    pack                   text COLLATE "C",
    credits                numeric,
    credits_expire_after   interval,
    amount                 bigint NOT NULL,
    currency               text NOT NULL,
    status                 text NOT NULL DEFAULT 'open' CHECK (status IN
                               ('open', 'complete', 'granted', 'expired', 'payment_failed', 'refunded')),
    payment_intent         text COLLATE "C",
    stripe_subscription_id text COLLATE "C",
    grant_id               bigint REFERENCES credit_grants (grant_id),
    requested_by           text NOT NULL,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    CHECK ((mode = 'subscription') = (plan IS NOT NULL)),
    CHECK ((mode = 'payment') = (pack IS NOT NULL AND credits > 0))
);
CREATE INDEX checkout_sessions_customer ON checkout_sessions (customer_id, created_at);
CREATE INDEX checkout_sessions_payment ON checkout_sessions (payment_intent)
    WHERE payment_intent IS NOT NULL;

-- Refunds (charge.refunded) of payments tally has not yet seen paid: Stripe does not deliver
-- in order, so a refund may come before the checkout.session.completed of its payment. That
-- event then finds the refund here and grants nothing.
CREATE TABLE stripe_refunds (
    payment_intent  text COLLATE "C" PRIMARY KEY,
    charge_id       text COLLATE "C" NOT NULL,
    amount_refunded bigint NOT NULL,
    event_id        text NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now()
);

-- Webhook outcomes of self-serve billing: an event about a session or payment tally did not
-- open (not_tallys), and one about tally's session that does not match its record (refused).
ALTER TABLE stripe_webhook_events DROP CONSTRAINT stripe_webhook_events_outcome_check;
ALTER TABLE stripe_webhook_events ADD CONSTRAINT stripe_webhook_events_outcome_check
    CHECK (outcome IN ('applied', 'stale', 'ignored', 'not_tallys', 'refused'));

-- Invoices keep their links and lines. lines: [{id, price, meter, description, quantity,
-- amount, period_start, period_end}], meter named when the price is a plan's metered price.
ALTER TABLE stripe_invoices
    ADD COLUMN hosted_invoice_url text,
    ADD COLUMN invoice_pdf        text,
    ADD COLUMN lines              jsonb NOT NULL DEFAULT '[]',
    -- false when Stripe's event carried only the first of the invoice's lines (has_more).
    ADD COLUMN lines_complete     boolean NOT NULL DEFAULT true,
    ADD COLUMN created            timestamptz;
CREATE INDEX stripe_invoices_customer_created ON stripe_invoices (customer_id, created DESC, invoice_id);

-- New columns go at the end of the finance view (its contract keeps the old ones in place).
CREATE OR REPLACE VIEW finance_invoices AS
SELECT invoice_id,
       customer_id,
       stripe_customer_id,
       stripe_subscription_id,
       number,
       status,
       currency,
       amount_due,
       amount_paid,
       amount_remaining,
       total,
       period_start,
       period_end,
       attempt_count,
       last_event_type,
       last_event_created,
       updated_at,
       hosted_invoice_url,
       invoice_pdf,
       lines,
       created,
       lines_complete
FROM stripe_invoices;

-- One row per invoice line, for finance: metered lines name their meter.
CREATE VIEW finance_invoice_lines AS
SELECT i.invoice_id,
       i.customer_id,
       i.currency,
       i.status,
       l.line ->> 'id' AS line_id,
       l.line ->> 'price' AS price_id,
       l.line ->> 'meter' AS meter,
       l.line ->> 'description' AS description,
       (l.line ->> 'quantity')::numeric AS quantity,
       (l.line ->> 'amount')::bigint AS amount,
       to_timestamp((l.line ->> 'period_start')::bigint) AS period_start,
       to_timestamp((l.line ->> 'period_end')::bigint) AS period_end
FROM stripe_invoices i
CROSS JOIN LATERAL jsonb_array_elements(i.lines) AS l(line);


-- Usage that prepaid credits pay for is not billed to Stripe. What of a customer's meter in
-- [from_ts, to_ts) Stripe must not bill: usage credits covered (consume entries drawn from a
-- grant) and usage still queued for the burner (not yet known to be covered or not; the burner
-- marks its slots changed when it has burned it, so the sink bills what stayed uncovered then).
-- Defined once, here: the sink bills `usage - usage_paid_by_credits`, and reconcile compares
-- Stripe with the same. STABLE: inside one statement it reads that statement's snapshot, so
-- usage, queue and ledger are seen at one moment.
CREATE FUNCTION usage_covered_by_credits(customer text, meter text, from_ts timestamptz, to_ts timestamptz)
RETURNS numeric LANGUAGE sql STABLE AS $$
    SELECT coalesce(sum(t.quantity), 0) FROM credit_transactions t
    WHERE t.customer_id = $1 AND t.meter = $2 AND t.kind = 'consume' AND t.grant_id IS NOT NULL
      AND t.window_start >= $3 AND t.window_start < $4
$$;
CREATE FUNCTION usage_waiting_for_burner(customer text, meter text, from_ts timestamptz, to_ts timestamptz)
RETURNS numeric LANGUAGE sql STABLE AS $$
    SELECT coalesce(sum(q.quantity), 0) FROM credit_usage_queue q
    WHERE q.customer_id = $1 AND q.meter = $2 AND q.window_start >= $3 AND q.window_start < $4
$$;
CREATE FUNCTION usage_paid_by_credits(customer text, meter text, from_ts timestamptz, to_ts timestamptz)
RETURNS numeric LANGUAGE sql STABLE AS $$
    SELECT usage_covered_by_credits($1, $2, $3, $4) + usage_waiting_for_burner($1, $2, $3, $4)
$$;
CREATE INDEX credit_usage_queue_window ON credit_usage_queue (customer_id, meter, window_start);

-- Per customer, meter and UTC day: usage prepaid credits covered (not billed to Stripe) and
-- usage the burner found no credits for (billed).
CREATE VIEW finance_credit_usage_daily AS
SELECT customer_id,
       meter,
       (window_start AT TIME ZONE 'UTC')::date AS day,
       coalesce(sum(quantity) FILTER (WHERE grant_id IS NOT NULL), 0) AS covered,
       coalesce(sum(quantity) FILTER (WHERE grant_id IS NULL), 0) AS uncovered,
       coalesce(-sum(amount), 0) AS credits
FROM credit_transactions
WHERE kind = 'consume'
GROUP BY 1, 2, 3;
