-- Each `tally reconcile` run's verdict counts, so `tally status` (and people) can see when tally
-- was last compared with Stripe and what it found.
CREATE TABLE reconcile_runs (
    run_id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ran_at              timestamptz NOT NULL DEFAULT now(),
    range_from          timestamptz NOT NULL,
    range_to            timestamptz NOT NULL,
    ok                  integer NOT NULL,
    unbilled            integer NOT NULL,
    unmapped            integer NOT NULL,
    drift               integer NOT NULL,
    quarantined         integer NOT NULL,
    review              integer NOT NULL,
    meter_error_reports integer NOT NULL
);
CREATE INDEX reconcile_runs_ran_at ON reconcile_runs (ran_at);
