//! One bad pair stays one bad pair, no path bills twice, outages are waited out: the sink
//! against the emulator over real HTTP, with data and faults no friendly test would send.

mod common;

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use common::*;
use rust_decimal::Decimal;
use stripe_emulator::{EmulatorConfig, Faults};
use tally_core::window::slot_start;
use tally_sink::store::{needs_review, quarantined_pairs, release_quarantine, resolve_review};
use tally_sink::{RunMode, Verdict};
use tokio_util::sync::CancellationToken;

fn d(text: &str) -> Decimal {
    text.parse().unwrap()
}

/// A window whose value no decimal holds (Postgres sums exactly, without bound), written as
/// the aggregator would have written it after enough events.
async fn add_huge_window(pool: &sqlx::PgPool, customer: &str, minute: chrono::DateTime<Utc>) {
    sqlx::query(
        "INSERT INTO usage_minute (customer_id, meter, window_start, group_key, value, event_count, first_updated, last_updated)
         VALUES ($1, 'api_calls', $2, '', 100000000000000000000000000000000, 1, now(), now())",
    )
    .bind(customer)
    .bind(minute)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO usage_slot_changes (customer_id, meter, slot_start) VALUES ($1, 'api_calls', $2)",
    )
    .bind(customer)
    .bind(slot_start(minute))
    .execute(pool)
    .await
    .unwrap();
}

/// Before: decoding the huge sum panicked inside sqlx, the pass died, and the sink died on the
/// same change row at every start, so nobody was billed. Now that pair (and one with a meter
/// nobody knows) is quarantined, and everybody else is billed.
#[tokio::test]
async fn a_pair_that_cannot_be_billed_is_quarantined_while_everyone_else_is_billed() {
    let setup = setup(EmulatorConfig::default()).await;
    let pool = &setup.db.pool;
    let base = slot_start(Utc::now() - TimeDelta::hours(1));
    let mut customers: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
    customers.push("huge".into());
    map_all(pool, &customers).await;
    for customer in &customers[..10] {
        add_usage(pool, customer, "api_calls", base, d("7.5"), base).await;
    }
    add_huge_window(pool, "huge", base).await;
    // Usage under a meter that is neither configured nor recorded.
    sqlx::query(
        "INSERT INTO usage_slot_changes (customer_id, meter, slot_start) VALUES ('c0', 'ghost', $1)",
    )
    .bind(base)
    .execute(pool)
    .await
    .unwrap();

    let sink = sink(&setup, sink_config());
    let summary = sink
        .run(RunMode::Once, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(summary.quarantined_pairs, 2, "{summary:?}");
    for customer in &customers[..10] {
        assert_eq!(
            setup.emulator.sum(&format!("cus_{customer}"), "api_calls"),
            7
        );
    }
    let quarantined = quarantined_pairs(pool).await.unwrap();
    let pairs: Vec<(&str, &str, &str)> = quarantined
        .iter()
        .map(|q| (q.customer_id.as_str(), q.meter.as_str(), q.reason.as_str()))
        .collect();
    assert!(
        pairs.contains(&("huge", "api_calls", "postgres_refused")),
        "{quarantined:?}"
    );
    assert!(
        pairs.contains(&("c0", "ghost", "unbillable")),
        "{quarantined:?}"
    );
    let huge = quarantined
        .iter()
        .find(|q| q.customer_id == "huge")
        .unwrap();
    assert!(huge.detail.contains("does not fit"), "{}", huge.detail);

    // Later passes go on for everybody else and leave the pair alone.
    add_usage(
        pool,
        "c1",
        "api_calls",
        base + TimeDelta::minutes(5),
        d("1"),
        base,
    )
    .await;
    let summary = sink
        .run(RunMode::Once, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((summary.sent, summary.quarantined_pairs), (1, 2));
    let rows = reconcile_one_slot(&setup, base).await;
    let huge_row = rows.iter().find(|r| r.customer == "huge").unwrap();
    assert_eq!(huge_row.verdict, Verdict::Quarantined);
    assert!(huge_row
        .quarantined
        .as_deref()
        .unwrap()
        .contains("postgres_refused"));

    // The operator fixes the data and releases the pair: it is billed from the next pass.
    sqlx::query("UPDATE usage_minute SET value = 4 WHERE customer_id = 'huge'")
        .execute(pool)
        .await
        .unwrap();
    assert!(release_quarantine(pool, "huge", "api_calls").await.unwrap());
    assert!(!release_quarantine(pool, "huge", "api_calls").await.unwrap());
    let summary = sink
        .run(RunMode::Once, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(summary.quarantined_pairs, 1);
    assert_eq!(setup.emulator.sum("cus_huge", "api_calls"), 4);
}

/// Before: a row whose earlier attempt's answer was lost was sent again whenever it came due,
/// and "already exists" counted as proof; but Stripe remembers identifiers for about a day, so
/// a resend after that could bill twice. Now such a row is parked for review, and an operator
/// resolves it.
#[tokio::test]
async fn an_uncertain_attempt_over_23_hours_old_is_parked_not_resent() {
    let setup = setup(EmulatorConfig::default()).await;
    let pool = &setup.db.pool;
    let base = slot_start(Utc::now() - TimeDelta::hours(1));
    map_all(pool, &["c1".to_owned(), "c2".to_owned()]).await;
    add_usage(pool, "c1", "api_calls", base, d("5"), base).await;

    // Stripe commits the event, and the answer is lost: the attempt's outcome is unknown.
    setup
        .emulator
        .set_faults(Faults {
            drop_after_commit: 1.0,
            ..Faults::default()
        })
        .unwrap();
    let mut config = sink_config();
    config.attempts_per_pass = 1;
    let summary = sink(&setup, config.clone())
        .run(RunMode::Once, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((summary.sent, summary.pending), (0, 1));
    assert_eq!(setup.emulator.sum("cus_c1", "api_calls"), 5);
    let uncertain: Option<chrono::DateTime<Utc>> =
        sqlx::query_scalar("SELECT first_uncertain_at FROM stripe_submissions")
            .fetch_one(pool)
            .await
            .unwrap();
    assert!(uncertain.is_some());

    // A day goes by before the row is tried again.
    setup.emulator.set_faults(Faults::default()).unwrap();
    sqlx::query("UPDATE stripe_submissions SET first_uncertain_at = now() - interval '24 hours'")
        .execute(pool)
        .await
        .unwrap();
    // A sink that died mid-call a day ago (its lease expired unrecorded) counts as uncertain too.
    add_usage(pool, "c2", "api_calls", base, d("3"), base).await;
    let sink = sink(&setup, config);
    sink.run(RunMode::Once, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(setup.emulator.sum("cus_c2", "api_calls"), 3);
    sqlx::query(
        "UPDATE stripe_submissions SET status = 'pending', leased_at = now() - interval '25 hours',
                leased_until = now() - interval '1 second'
         WHERE customer_id = 'c2'",
    )
    .execute(pool)
    .await
    .unwrap();

    let summary = sink
        .run(RunMode::Once, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((summary.sent, summary.needs_review), (0, 2), "{summary:?}");
    assert_eq!(
        setup.emulator.stats().meter_events_created,
        2,
        "nothing resent"
    );
    let parked = needs_review(pool).await.unwrap();
    assert_eq!(parked.len(), 2);
    assert!(parked[0]
        .last_error
        .as_deref()
        .unwrap()
        .contains("could bill twice"));
    let rows = reconcile_one_slot(&setup, base).await;
    assert!(
        rows.iter().all(|r| r.verdict == Verdict::Review),
        "{rows:?}"
    );

    // The operator finds both in Stripe and resolves them as sent.
    for row in &parked {
        assert!(
            resolve_review(pool, &row.identifier, tally_sink::store::Resolution::Sent)
                .await
                .unwrap()
        );
    }
    let rows = reconcile_one_slot(&setup, base).await;
    assert!(rows.iter().all(|r| r.verdict == Verdict::Ok), "{rows:?}");
    assert_eq!(setup.emulator.sum("cus_c1", "api_calls"), 5);
}

/// Before: a lease (here 1 s) ran out while its sink was still sending a slow pair, and a
/// second sink leased the same rows and sent them again. Now leases are renewed while a pair
/// is being sent: each row reaches Stripe once, and no two calls for a pair overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_renewed_while_a_slow_pair_is_sent() {
    let setup = setup(EmulatorConfig {
        faults: Faults {
            delay: 1.0,
            delay_ms: 600,
            ..Faults::default()
        },
        ..EmulatorConfig::default()
    })
    .await;
    let pool = &setup.db.pool;
    let base = slot_start(Utc::now() - TimeDelta::hours(1));
    let customers: Vec<String> = (0..4).map(|i| format!("s{i}")).collect();
    map_all(pool, &customers).await;
    for customer in &customers {
        for slot in 0..3 {
            let minute = base + TimeDelta::minutes(5 * slot);
            add_usage(pool, customer, "api_calls", minute, d("2"), minute).await;
        }
    }
    let config = sink_config(); // lease 1 s; each pair takes about 3 × 600 ms to send
    let first = sink(&setup, config.clone());
    let second = sink(&setup, config);
    let stop = CancellationToken::new();
    let (a, b) = tokio::join!(first.run(RunMode::Daemon, &stop), async {
        // The second sink keeps looking for due rows while the first is sending.
        let stopper = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(4)).await;
            stopper.cancel();
        });
        second.run(RunMode::Daemon, &stop).await
    });
    a.unwrap();
    b.unwrap();
    let stats = setup.emulator.stats();
    assert_eq!(stats.meter_events_created, 12);
    assert_eq!(
        (stats.duplicate_identifiers, stats.concurrency_limited),
        (0, 0),
        "{stats:?}"
    );
    for customer in &customers {
        assert_eq!(
            setup.emulator.sum(&format!("cus_{customer}"), "api_calls"),
            6
        );
    }
}

/// Stripe answering nothing but 503 for a while: the daemon keeps going (retrying with
/// backoff) and bills everything once Stripe is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stripe_outage_is_waited_out() {
    let setup = setup(EmulatorConfig::default()).await;
    let pool = &setup.db.pool;
    let base = slot_start(Utc::now() - TimeDelta::hours(1));
    map_all(pool, &["c1".to_owned()]).await;
    add_usage(pool, "c1", "api_calls", base, d("9"), base).await;
    setup
        .emulator
        .set_faults(Faults {
            error_503: 1.0,
            ..Faults::default()
        })
        .unwrap();
    let stop = CancellationToken::new();
    let daemon = {
        let sink = sink(&setup, sink_config());
        let stop = stop.clone();
        tokio::spawn(async move { sink.run(RunMode::Daemon, &stop).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!daemon.is_finished(), "the daemon waits");
    assert_eq!(setup.emulator.sum("cus_c1", "api_calls"), 0);
    // The readiness registry is one per process, and the tests beside this one mark Stripe up
    // whenever their own calls succeed: this daemon's failures mark it down again each time.
    let watching = std::time::Instant::now();
    while tally_runtime::dependency("stripe").is_up() {
        assert!(
            watching.elapsed() < Duration::from_secs(10),
            "Stripe never reported down during the outage"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    setup.emulator.set_faults(Faults::default()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while setup.emulator.sum("cus_c1", "api_calls") < 9 {
        assert!(
            std::time::Instant::now() < deadline,
            "not billed after the outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    let summary = daemon.await.unwrap().unwrap();
    assert!(summary.retried > 0, "{summary:?}");
    assert!(tally_runtime::dependency("stripe").is_up());
}
