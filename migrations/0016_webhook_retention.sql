-- Stripe webhook events and meter error reports are kept for serve.webhook_retention (90 days
-- by default); `tally serve` deletes older ones by the time tally received them.
CREATE INDEX stripe_webhook_events_received ON stripe_webhook_events (received_at);
