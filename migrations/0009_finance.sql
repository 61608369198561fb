-- Finance (contract): read-only views of what was used, what was billed to Stripe, what was
-- credited, and Stripe's invoices. docs/finance.md documents every column.
--
-- A finance role gets SELECT on the finance_* views only (`tally finance grant ROLE`), never on
-- a table. The views run with their owner's rights (Postgres's default; no security_invoker),
-- so the role reads through them without any right on usage_daily, stripe_submissions, ... and
-- nothing here exposes raw payloads, event ids, API tokens or Stripe webhook bodies.
-- Days and months are UTC (`usage_daily.day` is a UTC day; slots are bucketed in UTC).

-- The meters as recorded from tally.toml, and how Stripe bills each: 'delta' (whole units
-- added, Stripe `sum`), 'last' (the slot's value, Stripe `last`) or NULL (not billed).
CREATE VIEW finance_meters AS
SELECT name AS meter,
       aggregation,
       CASE aggregation
           WHEN 'sum' THEN 'delta'
           WHEN 'count' THEN 'delta'
           WHEN 'max' THEN 'last'
           WHEN 'latest' THEN 'last'
       END AS billed_as,
       group_by,
       unique_dimension,
       stripe_event_name
FROM meters;

-- tally customer -> Stripe customer, as `tally customers map` recorded it.
CREATE VIEW finance_customers AS
SELECT customer_id, stripe_customer_id, mapped_at
FROM stripe_customers;

-- What the sink sent to Stripe, per customer, meter and UTC day of the usage (the day of the
-- five-minute slot the submission bills, not the day it was sent).
--   billed_as          'delta' or 'last' (see finance_meters)
--   units_sent         delta: whole units Stripe accepted for the day's slots, less the units of
--                      events withdrawn by a sent cancel; last: the value last sent for the
--                      day's latest billed slot (NULL when none was sent yet)
--   units_canceled     delta units withdrawn at Stripe (meter event adjustments)
--   submissions_sent   outbox rows Stripe accepted
--   submissions_unsent outbox rows not (yet) accepted: pending, failed or needs_review
--   first_sent_at, last_sent_at: when the day's accepted rows were sent (a last_sent_at after
--                      the day shows late usage billed as a later revision)
CREATE VIEW finance_billed_daily AS
SELECT customer_id,
       meter,
       (slot_start AT TIME ZONE 'UTC')::date AS period,
       CASE WHEN bool_or(kind = 'last') THEN 'last' ELSE 'delta' END AS billed_as,
       CASE WHEN bool_or(kind = 'last')
           THEN (array_agg(value ORDER BY slot_start DESC, revision DESC)
                     FILTER (WHERE status = 'sent' AND kind = 'last'))[1]
           ELSE coalesce(sum(CASE kind WHEN 'cancel' THEN -value ELSE value END)
                             FILTER (WHERE status = 'sent'), 0)
       END AS units_sent,
       coalesce(sum(value) FILTER (WHERE status = 'sent' AND kind = 'cancel'), 0) AS units_canceled,
       count(*) FILTER (WHERE status = 'sent') AS submissions_sent,
       count(*) FILTER (WHERE status <> 'sent') AS submissions_unsent,
       min(sent_at) FILTER (WHERE status = 'sent') AS first_sent_at,
       max(sent_at) FILTER (WHERE status = 'sent') AS last_sent_at
FROM stripe_submissions
GROUP BY customer_id, meter, (slot_start AT TIME ZONE 'UTC')::date;

-- The same per UTC month (period = the month's first day): delta units added up, and for
-- 'last' the value last sent in the month.
CREATE VIEW finance_billed_monthly AS
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
       max(last_sent_at) AS last_sent_at
FROM finance_billed_daily
GROUP BY customer_id, meter, date_trunc('month', period::timestamp)::date, billed_as;

-- Usage that went down after it was billed, too late to cancel at Stripe: `overbilled` whole
-- units were billed above what the windows now hold, and the customer is owed a credit.
-- resolved_at is set by whoever issued the credit.
CREATE VIEW finance_corrections AS
SELECT correction_id,
       customer_id,
       meter,
       slot_start,
       (slot_start AT TIME ZONE 'UTC')::date AS day,
       overbilled,
       detail,
       created_at,
       resolved_at
FROM billing_corrections;

-- Stripe's invoices as the webhooks last described them (amounts in the currency's minor
-- unit). The webhook bodies themselves (stripe_webhook_events.payload) are not exposed.
CREATE VIEW finance_invoices AS
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
       updated_at
FROM stripe_invoices;

-- One row per customer, meter and UTC day: what `tally export --granularity day` writes.
--   aggregation  the meter's aggregation (finance_meters)
--   usage        the day's usage over all group keys, merged as the meter aggregates (sum and
--                count: added; max: the largest; latest: the value of the latest event;
--                unique_count: distinct values recounted over the day, not added up)
--   events       events counted
--   billed       finance_billed_daily.units_sent (0 when nothing was sent; NULL for meters
--                that are not billed, i.e. unique_count)
--   corrections  units overbilled for the day's slots (finance_corrections), 0 when none
-- The parts are stacked (UNION ALL) and grouped rather than joined, so a filter on period
-- reaches every table before anything is aggregated.
CREATE VIEW finance_statement_daily AS
WITH parts AS (
    SELECT d.customer_id,
           d.meter,
           d.day AS period,
           CASE m.aggregation
               WHEN 'max' THEN max(d.value)
               WHEN 'latest' THEN (array_agg(d.value ORDER BY d.latest_at DESC NULLS LAST, d.latest_id DESC))[1]
               WHEN 'unique_count' THEN (
                   SELECT count(DISTINCT v.value)::numeric
                   FROM usage_daily_values v
                   WHERE v.customer_id = d.customer_id AND v.meter = d.meter AND v.day = d.day)
               ELSE sum(d.value)
           END AS usage,
           sum(d.event_count)::bigint AS events,
           NULL::numeric AS billed,
           NULL::numeric AS corrections
    FROM usage_daily d
    JOIN meters m ON m.name = d.meter
    GROUP BY d.customer_id, d.meter, d.day, m.aggregation
    UNION ALL
    SELECT customer_id, meter, period, NULL, NULL, units_sent, NULL
    FROM finance_billed_daily
    UNION ALL
    SELECT customer_id, meter, day, NULL, NULL, NULL, sum(overbilled)
    FROM finance_corrections
    GROUP BY customer_id, meter, day
)
-- One row per part and key at most: max() picks it.
SELECT p.customer_id,
       p.meter,
       m.aggregation,
       p.period,
       coalesce(max(p.usage), 0) AS usage,
       coalesce(max(p.events), 0)::bigint AS events,
       CASE WHEN m.aggregation = 'unique_count' THEN NULL ELSE coalesce(max(p.billed), 0) END AS billed,
       coalesce(max(p.corrections), 0) AS corrections
FROM parts p
LEFT JOIN meters m ON m.name = p.meter
GROUP BY p.customer_id, p.meter, p.period, m.aggregation;

-- The same per UTC month (period = the month's first day): what `tally export --granularity
-- month` writes. Usage is merged over the month's days (max: the month's largest; latest: the
-- month's latest event; unique_count: distinct values over the whole month); billed is
-- finance_billed_monthly.units_sent.
CREATE VIEW finance_statement_monthly AS
WITH parts AS (
    SELECT d.customer_id,
           d.meter,
           d.month AS period,
           CASE m.aggregation
               WHEN 'max' THEN max(d.value)
               WHEN 'latest' THEN (array_agg(d.value ORDER BY d.latest_at DESC NULLS LAST, d.latest_id DESC))[1]
               WHEN 'unique_count' THEN (
                   SELECT count(DISTINCT v.value)::numeric
                   FROM usage_daily_values v
                   WHERE v.customer_id = d.customer_id AND v.meter = d.meter
                     AND v.day >= d.month AND v.day < d.month + interval '1 month')
               ELSE sum(d.value)
           END AS usage,
           sum(d.event_count)::bigint AS events,
           NULL::numeric AS billed,
           NULL::numeric AS corrections
    FROM (SELECT *, date_trunc('month', day::timestamp)::date AS month FROM usage_daily) d
    JOIN meters m ON m.name = d.meter
    GROUP BY d.customer_id, d.meter, d.month, m.aggregation
    UNION ALL
    SELECT customer_id, meter, period, NULL, NULL, units_sent, NULL
    FROM finance_billed_monthly
    UNION ALL
    SELECT customer_id, meter, date_trunc('month', day::timestamp)::date, NULL, NULL, NULL, sum(overbilled)
    FROM finance_corrections
    GROUP BY customer_id, meter, date_trunc('month', day::timestamp)::date
)
SELECT p.customer_id,
       p.meter,
       m.aggregation,
       p.period,
       coalesce(max(p.usage), 0) AS usage,
       coalesce(max(p.events), 0)::bigint AS events,
       CASE WHEN m.aggregation = 'unique_count' THEN NULL ELSE coalesce(max(p.billed), 0) END AS billed,
       coalesce(max(p.corrections), 0) AS corrections
FROM parts p
LEFT JOIN meters m ON m.name = p.meter
GROUP BY p.customer_id, p.meter, p.period, m.aggregation;
