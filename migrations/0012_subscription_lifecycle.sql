-- Subscriptions tally manages itself (the admin API, `tally subscriptions`, the scheduler in
-- `tally serve`) beside those that follow Stripe, their history, and the business figures
-- finance reads from it.

-- Who changes a subscription: `stripe` (webhooks only; the API refuses to edit it), `tally`
-- (the admin API and the CLI), `fallback` (the scheduler put a canceled customer on
-- `[subscriptions] fallback_plan`; a new subscription replaces it).
ALTER TABLE subscriptions
    ADD COLUMN source text NOT NULL DEFAULT 'tally'
        CHECK (source IN ('tally', 'stripe', 'fallback')),
    -- How periods follow each other: a month or a year from billing_anchor (clamped to the
    -- month's last day, as Stripe does), or `fixed`: one term that ends at current_period_end.
    ADD COLUMN billing_interval text NOT NULL DEFAULT 'month'
        CHECK (billing_interval IN ('month', 'year', 'fixed')),
    -- Period n ends at billing_anchor + n intervals (never chained from the previous end, so
    -- Jan 31 gives Feb 28, then Mar 31).
    ADD COLUMN billing_anchor timestamptz,
    ADD COLUMN started_at timestamptz,
    ADD COLUMN trial_end timestamptz,
    -- Whether a payment method is on record (a trial on a plan that requires one ends in
    -- cancellation without it). tally takes no payments: the caller records the fact.
    ADD COLUMN payment_method boolean NOT NULL DEFAULT false,
    -- A plan change that takes effect at the end of the current period.
    ADD COLUMN pending_plan text COLLATE "C" REFERENCES plans (name),
    ADD COLUMN ended_at timestamptz,
    -- When the current plan and status took effect (a transition the scheduler catches up on
    -- took effect at the period's end, not when it ran); subscription_history reads it.
    ADD COLUMN status_since timestamptz NOT NULL DEFAULT now(),
    -- When the fallback scheduler looked at this ended subscription (NULL: not yet).
    ADD COLUMN fallback_checked_at timestamptz;

UPDATE subscriptions
SET source = CASE WHEN stripe_subscription_id IS NULL THEN 'tally' ELSE 'stripe' END,
    billing_anchor = current_period_start,
    started_at = created_at,
    status_since = created_at,
    ended_at = CASE WHEN status = 'canceled' THEN updated_at END;

ALTER TABLE subscriptions
    ALTER COLUMN billing_anchor SET NOT NULL,
    ALTER COLUMN started_at SET NOT NULL,
    ADD CONSTRAINT subscriptions_stripe_source
        CHECK ((source = 'stripe') = (stripe_subscription_id IS NOT NULL));

-- What the scheduler must look at: live tally-managed subscriptions by period end, and ended
-- subscriptions the fallback has not considered yet.
CREATE INDEX subscriptions_due ON subscriptions (current_period_end)
    WHERE status IN ('active', 'trialing') AND source <> 'stripe';
CREATE INDEX subscriptions_fallback_unchecked ON subscriptions (subscription_id)
    WHERE status = 'canceled' AND fallback_checked_at IS NULL;

-- Every plan and status a subscription had, and when. Kept by the database, so that no
-- writer (webhooks, the API, the scheduler, an operator's SQL) can forget it.
CREATE TABLE subscription_history (
    history_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subscription_id bigint NOT NULL REFERENCES subscriptions (subscription_id),
    customer_id     text COLLATE "C" NOT NULL,
    plan            text COLLATE "C" NOT NULL,
    status          text NOT NULL,
    valid_from      timestamptz NOT NULL,
    -- NULL: the subscription's current plan and status.
    valid_to        timestamptz
);
CREATE INDEX subscription_history_subscription ON subscription_history (subscription_id, valid_from);
CREATE INDEX subscription_history_valid_from ON subscription_history (valid_from);

INSERT INTO subscription_history (subscription_id, customer_id, plan, status, valid_from)
SELECT subscription_id, customer_id, plan, status, status_since FROM subscriptions;

CREATE FUNCTION subscriptions_record_history() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    effective timestamptz := NEW.status_since;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF NEW.plan = OLD.plan AND NEW.status = OLD.status THEN
            RETURN NEW;
        END IF;
        -- A writer that did not say when the change took effect: now.
        IF NEW.status_since = OLD.status_since THEN
            effective := now();
        END IF;
        UPDATE subscription_history SET valid_to = effective
        WHERE subscription_id = NEW.subscription_id AND valid_to IS NULL;
    END IF;
    INSERT INTO subscription_history (subscription_id, customer_id, plan, status, valid_from)
    VALUES (NEW.subscription_id, NEW.customer_id, NEW.plan, NEW.status, effective);
    RETURN NEW;
END;
$$;

CREATE TRIGGER subscriptions_history AFTER INSERT OR UPDATE OF plan, status ON subscriptions
    FOR EACH ROW EXECUTE FUNCTION subscriptions_record_history();

-- The lifecycle's own audit actions beside create, update and delete.
ALTER TABLE entitlement_audit DROP CONSTRAINT entitlement_audit_action_check;
ALTER TABLE entitlement_audit ADD CONSTRAINT entitlement_audit_action_check
    CHECK (action IN ('create', 'update', 'delete', 'change_plan', 'schedule_change', 'cancel',
                      'schedule_cancel', 'reactivate', 'payment_method', 'renew',
                      'trial_converted', 'trial_expired', 'term_ended', 'replace'));

-- (contract) Live subscriptions per plan at the end of each UTC day, from the first
-- subscription to today.
CREATE VIEW finance_subscriptions_daily AS
WITH days AS (
    SELECT day::date AS day
    FROM generate_series(((SELECT min(valid_from) FROM subscription_history) AT TIME ZONE 'UTC')::date,
                         (now() AT TIME ZONE 'UTC')::date, interval '1 day') AS day
)
SELECT d.day,
       h.plan,
       count(*) FILTER (WHERE h.status = 'active')   AS active,
       count(*) FILTER (WHERE h.status = 'trialing') AS trialing,
       count(*) FILTER (WHERE h.status = 'past_due') AS past_due
FROM days d
JOIN subscription_history h
  ON h.valid_from < ((d.day + 1)::timestamp AT TIME ZONE 'UTC')
 AND (h.valid_to IS NULL OR h.valid_to >= ((d.day + 1)::timestamp AT TIME ZONE 'UTC'))
WHERE h.status <> 'canceled'
GROUP BY d.day, h.plan;

-- (contract) What happened per UTC day, under the plan the subscription was on before the
-- change (for a start, its plan): subscriptions started, trials started, converted (to
-- active) and expired (ended without converting), cancellations of paying subscriptions, and
-- plan changes (a move from PRO to ENTERPRISE counts under PRO).
CREATE VIEW finance_subscription_events_daily AS
WITH steps AS (
    SELECT h.*,
           lag(h.status) OVER w AS previous_status,
           lag(h.plan) OVER w AS previous_plan
    FROM subscription_history h
    WINDOW w AS (PARTITION BY h.subscription_id ORDER BY h.valid_from, h.history_id)
)
SELECT (valid_from AT TIME ZONE 'UTC')::date AS day,
       coalesce(previous_plan, plan) AS plan,
       count(*) FILTER (WHERE previous_status IS NULL AND status <> 'canceled') AS started,
       count(*) FILTER (WHERE status = 'trialing' AND previous_status IS DISTINCT FROM 'trialing') AS trials_started,
       count(*) FILTER (WHERE status = 'active' AND previous_status = 'trialing') AS trials_converted,
       count(*) FILTER (WHERE status IN ('canceled', 'past_due') AND previous_status = 'trialing') AS trials_expired,
       count(*) FILTER (WHERE status = 'canceled' AND previous_status IN ('active', 'past_due')) AS cancellations,
       count(*) FILTER (WHERE previous_plan IS NOT NULL AND plan <> previous_plan) AS plan_changes
FROM steps
GROUP BY 1, 2;

-- (contract) Monthly and annual recurring revenue per UTC day, plan and currency, from the
-- plans' prices as `tally plans apply` last wrote them: active subscriptions (not trialing) at
-- the end of the day × the plan's price. A monthly price gives MRR exactly and ARR = 12 × MRR;
-- a yearly price gives ARR exactly and MRR = ARR / 12, to 6 decimal places.
CREATE VIEW finance_mrr_daily AS
SELECT s.day,
       s.plan,
       price.currency,
       s.active AS paying_subscriptions,
       CASE price.period WHEN 'year' THEN round(s.active * price.amount / 12, 6)
                         ELSE s.active * price.amount END AS mrr,
       CASE price.period WHEN 'year' THEN s.active * price.amount
                         ELSE s.active * price.amount * 12 END AS arr
FROM finance_subscriptions_daily s
JOIN plans p ON p.name = s.plan
CROSS JOIN LATERAL (
    SELECT p.definition #>> '{price,currency}' AS currency,
           p.definition #>> '{price,interval}' AS period,
           (p.definition #>> '{price,amount}')::numeric AS amount
) price
WHERE p.definition ? 'price' AND s.active > 0;
