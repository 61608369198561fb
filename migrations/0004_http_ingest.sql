-- Events refused by `POST /v1/events` on `tally serve` never reached Kafka, so they have no
-- topic, partition or offset. They are stored all the same (invariant 1: every invalid event
-- ends up in rejected_events), marked by where they came in.
ALTER TABLE rejected_events
    ALTER COLUMN topic DROP NOT NULL,
    ALTER COLUMN partition DROP NOT NULL,
    ALTER COLUMN "offset" DROP NOT NULL,
    ADD COLUMN received_via text NOT NULL DEFAULT 'kafka' CHECK (received_via IN ('kafka', 'http')),
    ADD CONSTRAINT rejected_events_kafka_position CHECK (
        received_via <> 'kafka' OR (topic IS NOT NULL AND partition IS NOT NULL AND "offset" IS NOT NULL)
    );
