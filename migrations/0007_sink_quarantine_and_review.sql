-- One bad customer+meter pair stays one bad pair, and no path bills twice.

-- Pairs the sink could not account for (a sum beyond a decimal's range, a meter nobody knows,
-- data Postgres refuses) are set aside here while every other pair is billed. Their changes
-- wait in usage_slot_changes. `tally reconcile` shows them; `tally quarantine release` bills
-- them again once the cause is fixed.
CREATE TABLE billing_quarantine (
    customer_id text COLLATE "C" NOT NULL,
    meter       text COLLATE "C" NOT NULL,
    reason      text NOT NULL,
    detail      text NOT NULL,
    since       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, meter)
);

-- Stripe dedupes meter event identifiers for about 24 hours. A submission whose earlier
-- attempt may have reached Stripe (no answer, a 5xx) is not resent blindly more than 23 hours
-- after that attempt: it is parked as 'needs_review' for an operator, who checks Stripe and
-- resolves it (`tally submissions resolve`).
-- A lease that expired without an outcome recorded means its sink died, perhaps mid-call: the
-- next lease counts that lease's start (leased_at) as an uncertain attempt.
ALTER TABLE stripe_submissions
    ADD COLUMN first_uncertain_at timestamptz,
    ADD COLUMN leased_at timestamptz,
    DROP CONSTRAINT stripe_submissions_status_check,
    ADD CONSTRAINT stripe_submissions_status_check
        CHECK (status IN ('pending', 'sent', 'failed', 'needs_review'));
