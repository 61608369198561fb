//! The operator's commands as separate processes against Postgres and a Kafka-protocol broker:
//! `tally status` shows one screen and exits 1 exactly when something needs a person;
//! `tally submissions list` and `retry` replace hand-written SQL on the outbox.

use std::time::Duration;

use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use tally_tests::{runtime, Broker, Workdir};

/// Outbox rows: (identifier, slot minute, revision, status, created minutes ago).
async fn submissions(pool: &sqlx::PgPool, rows: &[(&str, i64, i32, &str, i64)]) {
    for (identifier, slot, revision, status, age) in rows {
        sqlx::query(
            "INSERT INTO stripe_submissions (identifier, customer_id, meter, slot_start, revision,
                 stripe_customer_id, event_name, kind, value, event_timestamp, status, created_at,
                 last_error)
             VALUES ($1, 'acme', 'api_calls', date_trunc('hour', now()) - make_interval(mins => $2::int),
                 $3, 'cus_acme', 'api_calls', 'last', 5, now(), $4, now() - make_interval(mins => $5::int),
                 CASE WHEN $4 = 'failed' THEN 'resource_missing: No such customer' END)",
        )
        .bind(identifier)
        .bind(*slot)
        .bind(*revision)
        .bind(*status)
        .bind(*age)
        .execute(pool)
        .await
        .unwrap();
    }
}

#[test]
fn status_shows_one_screen_and_exits_1_when_something_needs_a_person() {
    let runtime = runtime();
    let broker = Broker::start();
    let db = runtime.block_on(tally_db::testing::fresh_database());
    let work = Workdir::new(&broker.kafka, "http://127.0.0.1:9/", "");
    let status = || work.run(&db.url, &["status", "--kafka-timeout", "10s"]);

    // Three events on the topic; the aggregator took every partition and committed none.
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.kafka.brokers)
        .create()
        .unwrap();
    for i in 0..3 {
        producer
            .send(
                BaseRecord::to(&broker.kafka.topic)
                    .key("acme")
                    .payload(&format!("{i}")),
            )
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    let ends = tally_aggregator::end_offsets(&broker.kafka, Duration::from_secs(10)).unwrap();
    assert_eq!(ends.values().sum::<i64>(), 3);
    runtime.block_on(async {
        for partition in ends.keys() {
            sqlx::query(
                "INSERT INTO kafka_offsets (consumer_group, topic, partition, next_offset, owner)
                 VALUES ('tally-aggregator', $1, $2, 0, 'aggregator-1')",
            )
            .bind(&broker.kafka.topic)
            .bind(partition)
            .execute(&db.pool)
            .await
            .unwrap();
        }
    });
    let (ok, screen) = status();
    assert!(!ok, "never reconciled: a person must look\n{screen}");
    assert!(screen.contains("total lag 3 messages"), "{screen}");
    assert!(screen.contains("aggregator-1"), "{screen}");
    assert!(screen.contains("never been reconciled"), "{screen}");

    // Reconciled and healthy: exit 0.
    runtime.block_on(async {
        sqlx::query(
            "INSERT INTO reconcile_runs (range_from, range_to, ok, unbilled, unmapped, drift, quarantined, review, meter_error_reports)
             VALUES (now() - interval '48 hours', now(), 12, 0, 0, 0, 0, 0, 0)",
        )
        .execute(&db.pool)
        .await
        .unwrap();
    });
    let (ok, screen) = status();
    assert!(ok, "{screen}");
    assert!(screen.contains("nothing needs a person"), "{screen}");
    assert!(screen.contains("12 ok"), "{screen}");

    // A refused submission, one waiting 20 minutes, and rejects: each is named with its command.
    runtime.block_on(async {
        submissions(
            &db.pool,
            &[
                ("tally:failed-1", 10, 1, "failed", 30),
                ("tally:old-1", 5, 1, "pending", 20),
            ],
        )
        .await;
        sqlx::query(
            "INSERT INTO rejected_events (reason, detail, raw, received_via) VALUES
             ('unknown_meter', 'meter \"gpu\" is not defined', '\\x7b7d', 'http'),
             ('unknown_meter', 'meter \"gpu\" is not defined', '\\x7b7d', 'http')",
        )
        .execute(&db.pool)
        .await
        .unwrap();
    });
    let (ok, screen) = status();
    assert!(!ok, "{screen}");
    assert!(
        screen.contains("rejects in the last hour: unknown_meter 2"),
        "{screen}"
    );
    assert!(screen.contains("1 failed"), "{screen}");
    assert!(
        screen.contains("tally submissions list --status failed"),
        "{screen}"
    );
    assert!(screen.contains("has waited 20m"), "{screen}");

    // The failed one listed and retried; the old pending one is not a failed one.
    let (ok, listed) = work.run(&db.url, &["submissions", "list", "--status", "failed"]);
    assert!(ok, "{listed}");
    assert!(
        listed.contains("tally:failed-1") && listed.contains("No such customer"),
        "{listed}"
    );
    assert!(!listed.contains("tally:old-1"), "{listed}");
    let (ok, retried) = work.run(
        &db.url,
        &["submissions", "retry", "tally:failed-1", "tally:old-1"],
    );
    assert!(!ok, "one of two was not failed: {retried}");
    assert!(retried.contains("tally:failed-1 queued"), "{retried}");
    let (ok, listed) = work.run(&db.url, &["submissions", "list", "--status", "failed"]);
    assert!(ok && listed.contains("0 submission(s)"), "{listed}");

    // A failed revision whose slot has a later revision at Stripe is not sent again.
    runtime.block_on(submissions(
        &db.pool,
        &[
            ("tally:slot-r1", 60, 1, "failed", 90),
            ("tally:slot-r2", 60, 2, "sent", 80),
        ],
    ));
    let (ok, retried) = work.run(&db.url, &["submissions", "retry", "--all-failed"]);
    assert!(!ok, "{retried}");
    assert!(
        retried.contains("tally:slot-r1 stays failed: revision 2"),
        "{retried}"
    );
}
