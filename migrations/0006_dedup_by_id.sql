-- Dedup by the id alone. 0001 keyed claims by (id, UTC day of the event), so a copy of an id
-- whose timestamp fell on another day (a client retrying across midnight, HTTP ingest filling
-- an omitted timestamp with "now") was counted again. Now an id counts once within the dedup
-- retention, whatever timestamps its copies carry.
--
-- One table keyed by id: each claim is one index probe, wherever the first copy's timestamp
-- fell. `claimed_on` is the UTC day the id was first claimed; the aggregator's maintenance
-- deletes claims older than the retention in bounded chunks, found through a BRIN index (rows
-- arrive in claim order, so the oldest days sit in the oldest blocks). Autovacuum is told to
-- follow those deletes closely, so the freed space is reused rather than grown.
CREATE TABLE event_claims (
    id           text COLLATE "C" PRIMARY KEY,
    claimed_on   date NOT NULL,
    -- xxh3 of the canonical payload: a re-sent id with another payload is a conflict.
    payload_hash bigint NOT NULL
) WITH (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_insert_scale_factor = 0.05);
CREATE INDEX event_claims_claimed_on ON event_claims USING brin (claimed_on);

-- Keep what is remembered: the earliest claim of each id. (Ids already counted on two days
-- by the old rule stay counted; from now on no id is.)
INSERT INTO event_claims (id, claimed_on, payload_hash)
SELECT DISTINCT ON (id) id, event_day, payload_hash
FROM event_ids
ORDER BY id, event_day;

DROP TABLE event_ids;
ALTER TABLE event_claims RENAME TO event_ids;
ALTER INDEX event_claims_pkey RENAME TO event_ids_pkey;
ALTER INDEX event_claims_claimed_on RENAME TO event_ids_claimed_on;
