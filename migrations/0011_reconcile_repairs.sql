-- `tally reconcile --repair --apply`: drift tally can prove is sent to Stripe again as a new
-- outbox row. Each repair is recorded here with what proved it; its outbox row points back.
--
-- A repair row re-sends units Stripe accepted once and then did not bill (dropped after its
-- asynchronous validation, or withdrawn outside tally): after it is sent, Stripe holds what the
-- outbox's other rows say it should. So `tally reconcile` and the finance views leave repair
-- rows out of "sent", and show them on their own.
CREATE TABLE billing_repairs (
    repair_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id        text COLLATE "C" NOT NULL,
    meter              text COLLATE "C" NOT NULL,
    -- The reconciled range whose drift the repair makes good.
    range_from         timestamptz NOT NULL,
    range_to           timestamptz NOT NULL,
    stripe_customer_id text COLLATE "C" NOT NULL,
    -- 'delta': `units` whole units Stripe lacks; 'last': the value Stripe should hold.
    kind               text NOT NULL CHECK (kind IN ('delta', 'last')),
    -- What Stripe's meter event summary reported, and what the outbox had sent, for the range.
    stripe_value       numeric NOT NULL,
    sent_value         numeric NOT NULL,
    units              numeric NOT NULL CHECK (units = trunc(units) AND units >= 0),
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_repairs_pair ON billing_repairs (customer_id, meter, created_at);

ALTER TABLE stripe_submissions
    ADD COLUMN repair_id bigint REFERENCES billing_repairs (repair_id);

-- Finance: units_sent leaves repair rows out (Stripe holds each repaired unit once, in place
-- of the one it dropped); units_repaired shows them, on the day of the slot they were sent in.
CREATE OR REPLACE VIEW finance_billed_daily AS
SELECT customer_id,
       meter,
       (slot_start AT TIME ZONE 'UTC')::date AS period,
       CASE WHEN bool_or(kind = 'last') THEN 'last' ELSE 'delta' END AS billed_as,
       CASE WHEN bool_or(kind = 'last')
           THEN (array_agg(value ORDER BY slot_start DESC, revision DESC)
                     FILTER (WHERE status = 'sent' AND kind = 'last' AND repair_id IS NULL))[1]
           ELSE coalesce(sum(CASE kind WHEN 'cancel' THEN -value ELSE value END)
                             FILTER (WHERE status = 'sent' AND repair_id IS NULL), 0)
       END AS units_sent,
       coalesce(sum(value) FILTER (WHERE status = 'sent' AND kind = 'cancel'), 0) AS units_canceled,
       count(*) FILTER (WHERE status = 'sent') AS submissions_sent,
       count(*) FILTER (WHERE status <> 'sent') AS submissions_unsent,
       min(sent_at) FILTER (WHERE status = 'sent') AS first_sent_at,
       max(sent_at) FILTER (WHERE status = 'sent') AS last_sent_at,
       coalesce(sum(value) FILTER (WHERE status = 'sent' AND repair_id IS NOT NULL), 0) AS units_repaired
FROM stripe_submissions
GROUP BY customer_id, meter, (slot_start AT TIME ZONE 'UTC')::date;

CREATE OR REPLACE VIEW finance_billed_monthly AS
SELECT customer_id,
       meter,
       date_trunc('month', period::timestamp)::date AS period,
       billed_as,
       CASE billed_as
           WHEN 'last' THEN (array_agg(units_sent ORDER BY period DESC)
                                 FILTER (WHERE units_sent IS NOT NULL))[1]
           ELSE sum(units_sent)
       END AS units_sent,
       sum(units_canceled) AS units_canceled,
       sum(submissions_sent)::bigint AS submissions_sent,
       sum(submissions_unsent)::bigint AS submissions_unsent,
       min(first_sent_at) AS first_sent_at,
       max(last_sent_at) AS last_sent_at,
       sum(units_repaired) AS units_repaired
FROM finance_billed_daily
GROUP BY customer_id, meter, date_trunc('month', period::timestamp)::date, billed_as;

-- Repairs are finance's to see too: what was resent, to whom, and what proved it.
CREATE VIEW finance_repairs AS
SELECT r.repair_id,
       r.customer_id,
       r.meter,
       r.range_from,
       r.range_to,
       r.stripe_customer_id,
       r.kind,
       r.stripe_value,
       r.sent_value,
       r.units,
       r.created_at,
       s.status,
       s.sent_at
FROM billing_repairs r
LEFT JOIN stripe_submissions s ON s.repair_id = r.repair_id;
