-- The change feed: every write that changes what a quota check answers (usage committed, credits
-- granted or burned, a subscription, an override, a plan) notifies the channel `tally_changes`
-- in the same transaction, so `tally serve` reloads exactly the customers that changed, within
-- milliseconds of the commit, instead of reloading every active customer on a timer.
--
-- A payload is lines separated by '\n' (customer ids cannot hold control characters):
--   'customers' followed by one customer id a line: these customers changed;
--   'everyone': every customer may have changed (a plan's definition);
--   '' (empty): a listener's own heartbeat, proving its connection delivers.
-- Postgres refuses a payload of 8000 bytes or more, so customers come in chunks of at most
-- about 6000 bytes of ids (an id is at most 256 characters, 1 KiB).

CREATE FUNCTION notify_changed_customers(customers text[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    -- An id longer than a valid one (at most 256 characters, 1 KiB) may not fit a payload
    -- beside others: say "everyone" rather than fail the writer's transaction.
    IF EXISTS (SELECT 1 FROM unnest(customers) AS c WHERE octet_length(c) > 1024) THEN
        PERFORM pg_notify('tally_changes', 'everyone');
        RETURN;
    END IF;
    PERFORM pg_notify('tally_changes', 'customers' || E'\n' || string_agg(customer_id, E'\n'))
    FROM (
        SELECT customer_id,
               (sum(octet_length(customer_id) + 1) OVER (ORDER BY customer_id)
                - octet_length(customer_id) - 1) / 6000 AS chunk
        FROM (SELECT DISTINCT c AS customer_id FROM unnest(customers) AS c
              WHERE c IS NOT NULL) AS distinct_customers
    ) AS chunked
    GROUP BY chunk;
EXCEPTION WHEN OTHERS THEN
    -- A notification that cannot be queued (the queue full behind a listener that stopped
    -- reading) must not stop the writers: usage, credits and subscriptions go on committing.
    -- The quota caches notice within 3 s (their heartbeats cannot be queued either) and fall
    -- back to their refresh timer.
    RAISE WARNING 'tally_changes: cannot notify (%); quota caches fall back to their refresh timer', SQLERRM;
END
$$;

CREATE FUNCTION notify_changed_rows() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM notify_changed_customers(ARRAY(SELECT customer_id FROM old_rows));
    ELSE
        PERFORM notify_changed_customers(ARRAY(SELECT customer_id FROM new_rows));
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION notify_everyone() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    PERFORM pg_notify('tally_changes', 'everyone');
    RETURN NULL;
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'tally_changes: cannot notify (%); quota caches fall back to their refresh timer', SQLERRM;
    RETURN NULL;
END
$$;

-- Usage and credits: the aggregator's batches, burns, grants and voids already record the
-- customers they changed in `customer_changes` (for the alert evaluator).
CREATE TRIGGER customer_changes_notify AFTER INSERT ON customer_changes
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION notify_changed_rows();

CREATE TRIGGER subscriptions_notify_insert AFTER INSERT ON subscriptions
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION notify_changed_rows();
CREATE TRIGGER subscriptions_notify_update AFTER UPDATE ON subscriptions
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION notify_changed_rows();
CREATE TRIGGER subscriptions_notify_delete AFTER DELETE ON subscriptions
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION notify_changed_rows();

CREATE TRIGGER customer_overrides_notify_insert AFTER INSERT ON customer_overrides
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION notify_changed_rows();
CREATE TRIGGER customer_overrides_notify_update AFTER UPDATE ON customer_overrides
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION notify_changed_rows();
CREATE TRIGGER customer_overrides_notify_delete AFTER DELETE ON customer_overrides
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION notify_changed_rows();

-- A plan's definition is shared by its customers: all of them may have changed. (Not
-- `credit_rates`: every daemon rewrites it as it starts, and the quota cache reloads the rate
-- card on its own timer.)
CREATE TRIGGER plans_notify AFTER INSERT OR UPDATE OR DELETE ON plans
    FOR EACH STATEMENT EXECUTE FUNCTION notify_everyone();
