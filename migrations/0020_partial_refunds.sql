-- A pack's payment partly refunded or disputed takes back the same share of its credits (what is
-- left of them at most), not all of them. What went back so far, in the currency's smallest
-- unit: refunds (charge.refunded says the charge's total refunded) and disputes (their amount)
-- apart, each the largest Stripe has said, so a repeated or late event takes nothing twice.
ALTER TABLE checkout_sessions
    ADD COLUMN refunded_amount bigint NOT NULL DEFAULT 0 CHECK (refunded_amount >= 0),
    ADD COLUMN disputed_amount bigint NOT NULL DEFAULT 0 CHECK (disputed_amount >= 0);

-- Before the payment's completion is seen: the same two, kept apart (disputes were written to
-- amount_refunded until now; they stay counted there).
ALTER TABLE stripe_refunds
    ADD COLUMN disputed_amount bigint NOT NULL DEFAULT 0 CHECK (disputed_amount >= 0);
