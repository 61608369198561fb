//! The sink against the Stripe emulator over real HTTP.

mod common;

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use common::Setup;
use common::*;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use stripe_emulator::{EmulatorConfig, Faults};
use tally_core::window::slot_start;
use tally_sink::{MeterEventsApi, RunMode, Verdict};
use tokio_util::sync::CancellationToken;

fn d(text: &str) -> Decimal {
    text.parse().unwrap()
}

#[tokio::test]
async fn bills_each_slot_once_carrying_fractions_and_revising_late_slots_v2() {
    bills_each_slot_once(MeterEventsApi::V2).await;
}

#[tokio::test]
async fn bills_each_slot_once_carrying_fractions_and_revising_late_slots_v1() {
    bills_each_slot_once(MeterEventsApi::V1).await;
}

async fn bills_each_slot_once(api: MeterEventsApi) {
    let setup = setup_api(EmulatorConfig::default(), Some(api)).await;
    let pool = &setup.db.pool;
    let base = slot_start(Utc::now() - TimeDelta::hours(3));
    let minute = |slot: i64, m: i64| base + TimeDelta::minutes(5 * slot + m);
    let customers: Vec<String> = (0..20).map(|i| format!("c{i:02}")).collect();
    map_all(pool, &customers).await;
    for (i, customer) in customers.iter().enumerate() {
        for slot in 0..3 {
            add_usage(
                pool,
                customer,
                "api_calls",
                minute(slot, 1),
                d("2.5"),
                minute(slot, 1),
            )
            .await;
            add_usage(
                pool,
                customer,
                "api_calls",
                minute(slot, 3),
                Decimal::from(i),
                minute(slot, 3),
            )
            .await;
            add_usage(
                pool,
                customer,
                "storage_gb",
                minute(slot, 0),
                d("3.2"),
                minute(slot, 0),
            )
            .await;
            add_usage(
                pool,
                customer,
                "storage_gb",
                minute(slot, 4),
                d("1"),
                minute(slot, 4),
            )
            .await;
            add_usage(
                pool,
                customer,
                "seats",
                minute(slot, 2),
                Decimal::from(10 + slot),
                minute(slot, 2),
            )
            .await;
        }
    }
    let sink = sink(&setup, sink_config());
    let stop = CancellationToken::new();
    let summary = sink.run(RunMode::Once, &stop).await.unwrap();
    assert_eq!(summary.failed, 0);
    assert_eq!(summary.pending, 0);
    for (i, customer) in customers.iter().enumerate() {
        let stripe_customer = format!("cus_{customer}");
        // 3 slots × (2.5 + i): the half units carry from slot to slot.
        let exact = d("7.5") + Decimal::from(3 * i);
        assert_eq!(
            Decimal::from(setup.emulator.sum(&stripe_customer, "api_calls")),
            exact.floor()
        );
        assert_eq!(
            setup.emulator.last(&stripe_customer, "storage_gb"),
            Some(4),
            "max 3.2 rounds up"
        );
        assert_eq!(setup.emulator.last(&stripe_customer, "seats"), Some(12));
    }
    assert_eq!(
        setup.emulator.sum("cus_c00", "active_users"),
        0,
        "unique_count is not billed"
    );

    // Nothing changed: a second pass sends nothing.
    let before = setup.emulator.stats().meter_events_created;
    let again = sink.run(RunMode::Once, &stop).await.unwrap();
    assert_eq!((again.accounted.submissions, again.sent), (0, 0));
    assert_eq!(setup.emulator.stats().meter_events_created, before);

    // A late event in a billed slot: a new revision carrying the delta.
    add_usage(pool, "c05", "api_calls", minute(0, 2), d("4"), minute(0, 2)).await;
    add_usage(pool, "c05", "seats", minute(2, 4), d("3"), minute(2, 4)).await;
    let late = sink.run(RunMode::Once, &stop).await.unwrap();
    assert_eq!((late.accounted.submissions, late.sent), (2, 2));
    assert_eq!(setup.emulator.sum("cus_c05", "api_calls"), 26);
    assert_eq!(setup.emulator.last("cus_c05", "seats"), Some(3));
    let revisions: Vec<String> = sqlx::query_scalar("SELECT identifier FROM stripe_submissions WHERE customer_id = 'c05' AND meter = 'api_calls' ORDER BY submission_id")
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(revisions.len(), 4);
    assert_eq!(
        revisions[3],
        format!("tally:api_calls:c05:{}:2", base.timestamp())
    );

    // Reconcile over the three slots: every row agrees.
    let rows = tally_sink::reconcile(
        pool,
        &tally_sink::StripeHttp::new(&setup.stripe).unwrap(),
        900,
        base,
        base + TimeDelta::minutes(15),
    )
    .await
    .unwrap();
    assert_eq!(rows.len(), 20 * 3);
    for row in &rows {
        assert_eq!(row.verdict, Verdict::Ok, "{row:?}");
    }
}

#[tokio::test]
async fn unmapped_customers_wait_and_are_billed_once_mapped() {
    let setup = setup(EmulatorConfig::default()).await;
    let pool = &setup.db.pool;
    let base = slot_start(Utc::now() - TimeDelta::hours(1));
    add_usage(pool, "mapped", "api_calls", base, d("5"), base).await;
    add_usage(pool, "newcomer", "api_calls", base, d("7"), base).await;
    map_all(pool, &["mapped".to_owned()]).await;
    let sink = sink(&setup, sink_config());
    let stop = CancellationToken::new();
    let first = sink.run(RunMode::Once, &stop).await.unwrap();
    assert_eq!((first.sent, first.unmapped_slots), (1, 1));
    let waiting: (String, i64) =
        sqlx::query_as("SELECT customer_id, slots FROM stripe_unmapped_usage")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(waiting, ("newcomer".to_owned(), 1));
    let rows = reconcile_one_slot(&setup, base).await;
    assert_eq!(
        rows.iter().map(|r| r.verdict).collect::<Vec<_>>(),
        vec![Verdict::Ok, Verdict::Unmapped]
    );

    map_all(pool, &["newcomer".to_owned()]).await;
    let second = sink.run(RunMode::Once, &stop).await.unwrap();
    assert_eq!((second.sent, second.unmapped_slots), (1, 0));
    assert_eq!(setup.emulator.sum("cus_newcomer", "api_calls"), 7);
}

#[tokio::test]
async fn refused_submissions_are_marked_failed_with_stripes_error() {
    // v1 validates at once; the v2 stream validates later (the test after this one).
    let (setup, summary) = billed_40_days_late(MeterEventsApi::V1).await;
    let pool = &setup.db.pool;
    assert_eq!((summary.sent, summary.failed), (0, 1));
    let (status, error): (String, String) =
        sqlx::query_as("SELECT status, last_error FROM stripe_submissions")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(status, "failed");
    assert!(
        error.contains("Stripe answered 400") && error.contains("Timestamp"),
        "{error}"
    );
}

/// One customer's 5 units billed by one pass while Stripe's clock is 40 days ahead: the
/// event's timestamp is too old for Stripe.
async fn billed_40_days_late(api: MeterEventsApi) -> (Setup, tally_sink::SinkSummary) {
    let setup = setup_api(EmulatorConfig::default(), Some(api)).await;
    let base = slot_start(Utc::now() - TimeDelta::hours(1));
    add_usage(&setup.db.pool, "c1", "api_calls", base, d("5"), base).await;
    map_all(&setup.db.pool, &["c1".to_owned()]).await;
    setup
        .emulator
        .advance_clock(Duration::from_secs(40 * 24 * 3600));
    let summary = sink(&setup, sink_config())
        .run(RunMode::Once, &CancellationToken::new())
        .await
        .unwrap();
    (setup, summary)
}

/// The v2 stream answers before it validates: an event Stripe then refuses is not billed, and
/// arrives later as a `v1.billing.meter.error_report_triggered` thin event naming its
/// identifier, which `tally reconcile` lists.
#[tokio::test]
async fn the_streams_refusals_arrive_later_as_error_reports() {
    let (setup, summary) = billed_40_days_late(MeterEventsApi::V2).await;
    let base = slot_start(Utc::now() - TimeDelta::hours(1));
    assert_eq!(
        (summary.sent, summary.failed),
        (1, 0),
        "Stripe took the request"
    );
    assert_eq!(
        setup.emulator.sum("cus_c1", "api_calls"),
        0,
        "and billed nothing"
    );
    let stats = setup.emulator.stats();
    assert_eq!((stats.stream_requests, stats.stream_events_refused), (1, 1));
    let report = setup
        .emulator
        .events()
        .into_iter()
        .find(|e| e.event_type == "v1.billing.meter.error_report_triggered")
        .expect("an error report");
    let full = tally_sink::StripeHttp::new(&setup.stripe)
        .unwrap()
        .get_json(&format!("v2/core/events/{}", report.id))
        .await
        .unwrap();
    let sample = &full["data"]["reason"]["error_types"][0];
    assert_eq!(sample["code"], "timestamp_too_far_in_past");
    assert_eq!(
        sample["sample_errors"][0]["request"]["identifier"],
        format!("tally:api_calls:c1:{}:1", base.timestamp())
    );
}

/// A session's token lasts 15 minutes: one that expires between passes (or mid-pass) is
/// renewed, and the request sent again with the same identifiers.
#[tokio::test]
async fn an_expired_stream_session_is_renewed() {
    let setup = setup_api(EmulatorConfig::default(), Some(MeterEventsApi::V2)).await;
    let pool = &setup.db.pool;
    let base = slot_start(Utc::now() - TimeDelta::hours(2));
    map_all(pool, &["c1".to_owned()]).await;
    add_usage(pool, "c1", "api_calls", base, d("5"), base).await;
    let sink = sink(&setup, sink_config());
    let stop = CancellationToken::new();
    sink.run(RunMode::Once, &stop).await.unwrap();
    // Stripe's clock moves past the token's 15 minutes; the sink's does not know.
    setup.emulator.advance_clock(Duration::from_secs(16 * 60));
    let later = base + TimeDelta::minutes(5);
    add_usage(pool, "c1", "api_calls", later, d("7"), later).await;
    let summary = sink.run(RunMode::Once, &stop).await.unwrap();
    assert_eq!((summary.sent, summary.failed, summary.pending), (1, 0, 0));
    assert_eq!(setup.emulator.sum("cus_c1", "api_calls"), 12);
    assert_eq!(setup.emulator.stats().meter_event_sessions, 2);
}

#[tokio::test]
async fn usage_that_goes_down_is_canceled_and_resent_within_a_day_else_recorded_v2() {
    usage_that_goes_down(MeterEventsApi::V2).await;
}

#[tokio::test]
async fn usage_that_goes_down_is_canceled_and_resent_within_a_day_else_recorded_v1() {
    usage_that_goes_down(MeterEventsApi::V1).await;
}

async fn usage_that_goes_down(api: MeterEventsApi) {
    let setup = setup_api(EmulatorConfig::default(), Some(api)).await;
    let pool = &setup.db.pool;
    let base = slot_start(Utc::now() - TimeDelta::hours(1));
    add_usage(pool, "c1", "api_calls", base, d("10"), base).await;
    map_all(pool, &["c1".to_owned()]).await;
    let sink = sink(&setup, sink_config());
    let stop = CancellationToken::new();
    sink.run(RunMode::Once, &stop).await.unwrap();
    add_usage(
        pool,
        "c1",
        "api_calls",
        base + TimeDelta::minutes(1),
        d("5"),
        base,
    )
    .await;
    sink.run(RunMode::Once, &stop).await.unwrap();
    assert_eq!(setup.emulator.sum("cus_c1", "api_calls"), 15);
    // A while later (on the v2 stream a cancel waits a minute after its event was sent).
    sqlx::query("UPDATE stripe_submissions SET sent_at = sent_at - interval '2 minutes'")
        .execute(pool)
        .await
        .unwrap();

    // Someone corrects the windows by hand, within a day: both revisions are canceled at
    // Stripe and the slot's new total is sent as one new revision.
    let lower_to = |value: &'static str| async move {
        sqlx::query("UPDATE usage_minute SET value = 0")
            .execute(pool)
            .await
            .unwrap();
        add_usage(pool, "c1", "api_calls", base, d(value), base).await;
    };
    lower_to("12").await;
    let summary = sink.run(RunMode::Once, &stop).await.unwrap();
    assert_eq!(
        (
            summary.accounted.submissions,
            summary.sent,
            summary.accounted.corrections
        ),
        (3, 3, 0)
    );
    assert_eq!(setup.emulator.stats().adjustments, 2);
    assert_eq!(setup.emulator.sum("cus_c1", "api_calls"), 12);
    let kinds: Vec<String> =
        sqlx::query_scalar("SELECT kind FROM stripe_submissions ORDER BY revision")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(kinds, ["delta", "delta", "cancel", "cancel", "delta"]);
    let rows = reconcile_one_slot(&setup, base).await;
    assert_eq!(
        (rows[0].sent, rows[0].stripe, rows[0].verdict),
        (d("12"), Some(d("12")), Verdict::Ok)
    );

    // A day later, Stripe no longer takes cancels: the difference is recorded for finance.
    sqlx::query("UPDATE stripe_submissions SET sent_at = now() - interval '2 days'")
        .execute(pool)
        .await
        .unwrap();
    lower_to("9").await;
    let summary = sink.run(RunMode::Once, &stop).await.unwrap();
    assert_eq!(
        (summary.accounted.submissions, summary.accounted.corrections),
        (0, 1)
    );
    let overbilled: Decimal = sqlx::query_scalar("SELECT overbilled FROM billing_corrections")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(overbilled, d("3"));
    assert_eq!(setup.emulator.sum("cus_c1", "api_calls"), 12);
    // Later usage is billed normally, not swallowed by the correction.
    add_usage(
        pool,
        "c1",
        "api_calls",
        base + TimeDelta::minutes(5),
        d("3"),
        base,
    )
    .await;
    sink.run(RunMode::Once, &stop).await.unwrap();
    assert_eq!(setup.emulator.sum("cus_c1", "api_calls"), 15);
}

/// Stripe failing in every way it can (5xx, committed-then-dropped, delays, 429s from an
/// account limit of 150/s below the sink's 950/s) while the sink is killed at random moments: Stripe
/// ends up holding exactly the windows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_through_faults_and_kills_v2() {
    exactly_once_through_faults_and_kills(MeterEventsApi::V2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_through_faults_and_kills_v1() {
    exactly_once_through_faults_and_kills(MeterEventsApi::V1).await;
}

async fn exactly_once_through_faults_and_kills(api: MeterEventsApi) {
    // The stream carries up to 100 events a request, so it makes ~50 times fewer requests:
    // each fails more often, for as many faults in all.
    let scale = match api {
        MeterEventsApi::V1 => 1.0,
        MeterEventsApi::V2 => 6.0,
    };
    let faults = Faults {
        error_500: 0.05 * scale,
        error_503: 0.02 * scale,
        drop_after_commit: 0.02 * scale,
        delay: 0.05 * scale,
        delay_ms: 30,
    };
    let setup = setup_api(
        EmulatorConfig {
            live_rate_per_second: 150,
            // Below the sink's 9,500 events/s: the stream answers 429s too.
            stream_events_per_second: 300,
            faults,
            ..EmulatorConfig::default()
        },
        Some(api),
    )
    .await;
    let pool = &setup.db.pool;
    let base = slot_start(Utc::now() - TimeDelta::hours(2));
    let customers: Vec<String> = (0..60).map(|i| format!("k{i:02}")).collect();
    map_all(pool, &customers).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut expected = std::collections::BTreeMap::new();
    for round in 0..3 {
        for customer in &customers {
            for slot in 0..4 {
                let value = Decimal::new(rng.random_range(0..2000), 1);
                let minute = base + TimeDelta::minutes(5 * slot + round);
                add_usage(pool, customer, "api_calls", minute, value, minute).await;
                *expected.entry(customer.clone()).or_insert(Decimal::ZERO) += value;
            }
        }
        // Kill the sink at random moments while it works through this round.
        for _ in 0..4 {
            let mut config = sink_config();
            config.concurrency = 16;
            let sink = sink(&setup, config);
            let task =
                tokio::spawn(
                    async move { sink.run(RunMode::Daemon, &CancellationToken::new()).await },
                );
            tokio::time::sleep(Duration::from_millis(rng.random_range(50..400))).await;
            task.abort();
            let _ = task.await;
        }
    }
    // Then let one run finish the work.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let sink = sink(&setup, sink_config());
    loop {
        tokio::time::sleep(Duration::from_millis(1100)).await; // leases of killed runs expire
        sink.run(RunMode::Once, &CancellationToken::new())
            .await
            .unwrap();
        let (pending, _, failed) = outbox_counts(pool).await;
        assert_eq!(failed, 0);
        if pending == 0 && changes_left(pool).await == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "outbox not drained: {pending} pending"
        );
    }
    for (customer, exact) in &expected {
        assert_eq!(
            Decimal::from(setup.emulator.sum(&format!("cus_{customer}"), "api_calls")),
            exact.floor(),
            "customer {customer}"
        );
    }
    let stats = setup.emulator.stats();
    eprintln!("emulator: {stats:?}");
    assert!(stats.injected_500 > 0, "{stats:?}");
    assert!(
        stats.rate_limited + stats.concurrency_limited > 0,
        "the sink met 429s: {stats:?}"
    );
    // The stream's dozen requests may all escape the dropped answer: its own test is
    // `a_stream_request_whose_answer_is_lost_is_sent_again_and_billed_once`.
    if api == MeterEventsApi::V1 {
        assert!(stats.dropped_after_commit > 0, "{stats:?}");
        assert!(
            stats.duplicate_identifiers > 0,
            "a dropped response was retried and found: {stats:?}"
        );
    }
}

/// Stripe takes a stream request and the answer is lost: the sink sends the same events
/// again, Stripe drops every one as a repeat of its identifier, and each is billed once.
#[tokio::test]
async fn a_stream_request_whose_answer_is_lost_is_sent_again_and_billed_once() {
    let setup = setup_api(EmulatorConfig::default(), Some(MeterEventsApi::V2)).await;
    setup
        .emulator
        .set_faults(Faults {
            drop_after_commit: 1.0,
            ..Faults::default()
        })
        .unwrap();
    let customers = usage_for(&setup, "l", 150).await;
    let summary = sink(&setup, sink_config())
        .run(RunMode::Once, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((summary.sent, summary.failed, summary.pending), (150, 0, 0));
    for (i, customer) in customers.iter().enumerate() {
        assert_eq!(
            setup.emulator.sum(&format!("cus_{customer}"), "api_calls"),
            i as i64 + 1
        );
    }
    let stats = setup.emulator.stats();
    assert!(
        stats.dropped_after_commit >= 2,
        "150 events take 2 requests or more: {stats:?}"
    );
    assert_eq!(
        stats.stream_requests,
        2 * stats.dropped_after_commit,
        "each request sent twice: {stats:?}"
    );
    assert_eq!(
        (stats.meter_events_created, stats.duplicate_identifiers),
        (150, 150)
    );
}

/// Usage for `n` mapped customers, one slot each, an hour ago.
async fn usage_for(setup: &Setup, prefix: &str, n: usize) -> Vec<String> {
    let pool = &setup.db.pool;
    let base = slot_start(Utc::now() - TimeDelta::hours(1));
    let customers: Vec<String> = (0..n).map(|i| format!("{prefix}{i:03}")).collect();
    map_all(pool, &customers).await;
    for (i, customer) in customers.iter().enumerate() {
        add_usage(
            pool,
            customer,
            "api_calls",
            base,
            Decimal::from(i + 1),
            base,
        )
        .await;
    }
    customers
}

/// Stripe stops taking the session's token (revoked, or the server restarted): the sink opens
/// a new session and sends the same events; no row is marked failed.
#[tokio::test]
async fn a_refused_stream_token_is_replaced_not_blamed_on_the_rows() {
    let setup = setup_api(EmulatorConfig::default(), Some(MeterEventsApi::V2)).await;
    let sink = sink(&setup, sink_config());
    let stop = CancellationToken::new();
    usage_for(&setup, "r", 1).await;
    sink.run(RunMode::Once, &stop).await.unwrap();
    setup.emulator.revoke_meter_event_sessions();
    let later = slot_start(Utc::now() - TimeDelta::minutes(30));
    let customers: Vec<String> = (0..150).map(|i| format!("t{i:03}")).collect();
    map_all(&setup.db.pool, &customers).await;
    for customer in &customers {
        add_usage(&setup.db.pool, customer, "api_calls", later, d("3"), later).await;
    }
    let summary = sink.run(RunMode::Once, &stop).await.unwrap();
    assert_eq!((summary.sent, summary.failed, summary.pending), (150, 0, 0));
    assert_eq!(setup.emulator.stats().meter_event_sessions, 2);
    for customer in &customers {
        assert_eq!(
            setup.emulator.sum(&format!("cus_{customer}"), "api_calls"),
            3
        );
    }
}

/// The stream's address answers 404 (a wrong `stripe.meter_events_base`, a proxy): Stripe's
/// "no such thing" is about the address, not the events, so no row is failed; they wait.
#[tokio::test]
async fn a_wrong_stream_address_fails_no_row() {
    let mut setup = setup_api(EmulatorConfig::default(), Some(MeterEventsApi::V2)).await;
    setup.stripe.meter_events_base = format!("{}nowhere/", setup.emulator.url());
    usage_for(&setup, "w", 120).await;
    let summary = sink(&setup, sink_config())
        .run(RunMode::Once, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((summary.sent, summary.failed, summary.pending), (0, 0, 120));
    let (pending, _, failed) = outbox_counts(&setup.db.pool).await;
    assert_eq!((pending, failed), (120, 0));
}

/// A server that answers every request 400 with 8 MiB of control bytes: each row is refused
/// alone (a refusal of a request of many rows is not blamed on all of them) and what is kept
/// of the answer is bounded.
#[tokio::test]
async fn an_endless_refusal_is_cut_and_pinned_on_each_row_alone() {
    let mut setup = setup_api(EmulatorConfig::default(), Some(MeterEventsApi::V2)).await;
    let hostile = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = hostile.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut socket, _)) = hostile.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut request = vec![0u8; 1 << 16];
                loop {
                    let Ok(n) = socket.read(&mut request).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    let body = vec![1u8; 8 << 20];
                    let head = format!(
                        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
                        body.len()
                    );
                    if socket.write_all(head.as_bytes()).await.is_err()
                        || socket.write_all(&body).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    setup.stripe.meter_events_base = format!("http://{address}/");
    usage_for(&setup, "e", 3).await;
    let summary = sink(&setup, sink_config())
        .run(RunMode::Once, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((summary.sent, summary.failed), (0, 3), "{summary:?}");
    let longest: i32 = sqlx::query_scalar("SELECT max(length(last_error)) FROM stripe_submissions")
        .fetch_one(&setup.db.pool)
        .await
        .unwrap();
    assert!(
        longest <= 8_000,
        "{longest} characters kept of an 8 MiB answer"
    );
}

/// A stream rate below a request of 100 events: requests shrink to a twentieth of a second's
/// worth, so every event gets through and the account's limit is never broken.
#[tokio::test]
async fn a_low_stream_rate_sends_small_requests_and_gets_through() {
    let mut setup = setup_api(
        EmulatorConfig {
            stream_events_per_second: 60,
            ..EmulatorConfig::default()
        },
        Some(MeterEventsApi::V2),
    )
    .await;
    setup.stripe.max_meter_events_per_second = 50;
    usage_for(&setup, "s", 120).await;
    let summary = sink(&setup, sink_config())
        .run(RunMode::Once, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((summary.sent, summary.failed, summary.pending), (120, 0, 0));
    let stats = setup.emulator.stats();
    assert_eq!(stats.rate_limited, 0, "{stats:?}");
    assert!(
        stats.stream_requests >= 40,
        "2 or 3 events a request: {stats:?}"
    );
}

/// A pass with nothing to bill asks Stripe nothing (not even for a v2 session): `tally sink
/// --once` on a timer succeeds while Stripe is away.
#[tokio::test]
async fn a_pass_with_nothing_to_send_asks_stripe_nothing() {
    let setup = setup_api(EmulatorConfig::default(), None).await;
    setup
        .emulator
        .set_faults(Faults {
            error_503: 1.0,
            ..Faults::default()
        })
        .unwrap();
    let before = setup.emulator.stats().requests;
    let summary = sink(&setup, sink_config())
        .run(RunMode::Once, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((summary.sent, summary.failed_passes), (0, 0));
    assert_eq!(setup.emulator.stats().requests, before);
}
