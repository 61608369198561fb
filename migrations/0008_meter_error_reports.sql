-- Stripe validates meter events asynchronously: an event it accepted but cannot bill (no meter
-- for its event name, an unknown customer, ...) is reported later with the thin events
-- `v1.billing.meter.no_meter_found` and `v1.billing.meter.error_report_triggered`, delivered to
-- the webhook endpoint. tally records each; `tally reconcile` fetches their details from Stripe
-- and shows them, since the usage they name was accepted and will never be billed.
CREATE TABLE stripe_meter_error_reports (
    event_id    text PRIMARY KEY,
    type        text NOT NULL,
    created     timestamptz NOT NULL,
    livemode    boolean NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stripe_meter_error_reports_created ON stripe_meter_error_reports (created);
