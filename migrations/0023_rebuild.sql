-- `tally rebuild`: windows recomputed from the event archive (docs/rebuild.md).
--
-- A meter's definition version. `tally rebuild` bumps it when it swaps in windows recomputed
-- under a new definition, in the same transaction. Every aggregator batch takes a shared
-- advisory lock per meter it counts and checks their versions first (the swap takes the
-- meter's lock exclusively): a batch checked under the old definition rolls back, is checked
-- again under the new one, and commits on top of the rebuilt windows. So no window is ever
-- updated under two definitions.
ALTER TABLE meters ADD COLUMN version bigint NOT NULL DEFAULT 1;

-- One row per rebuild (dry runs included): what it covered and what it found.
CREATE TABLE rebuilds (
    rebuild_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    meter        text COLLATE "C" NOT NULL,
    -- NULL: every customer.
    customer_id  text COLLATE "C",
    from_day     date NOT NULL,
    to_day       date NOT NULL CHECK (to_day > from_day),
    dry_run      boolean NOT NULL,
    -- The definition the windows were recomputed with (aggregation, group_by, unique_dimension).
    definition   jsonb NOT NULL,
    state        text NOT NULL DEFAULT 'running'
                 CHECK (state IN ('running', 'swapped', 'dry_run', 'failed', 'abandoned')),
    -- Events counted into the recomputed windows, and the windows before and after.
    events       bigint,
    windows_before bigint,
    windows_after  bigint,
    detail       text,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);

-- Billing slots whose usage a rebuild changed but whose start is more than 35 days back (less
-- an hour), older than Stripe takes a meter event's timestamp: the sink bills the difference as
-- it bills any late change to such a slot, with the oldest timestamp Stripe takes rather than in
-- the slot's own period (or, for a decrease too old to cancel, in billing_corrections). Listed
-- here for finance.
--   usage_before, usage_after: the slot's usage as the sink bills it (the sum of its windows'
--   values for sum and count meters, the largest for max, the latest window's for latest)
CREATE TABLE rebuild_backdated_slots (
    rebuild_id   bigint NOT NULL REFERENCES rebuilds,
    customer_id  text COLLATE "C" NOT NULL,
    meter        text COLLATE "C" NOT NULL,
    slot_start   timestamptz NOT NULL,
    usage_before numeric NOT NULL,
    usage_after  numeric NOT NULL,
    PRIMARY KEY (rebuild_id, customer_id, slot_start)
);
