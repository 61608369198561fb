//! The emulator is the referee of the sink's tests, so its rules are tested here: each one as
//! Stripe documents it, and the real async-stripe client must decode every response.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use stripe_billing::billing_meter::{
    CreateBillingMeter, CreateBillingMeterDefaultAggregation,
    CreateBillingMeterDefaultAggregationFormula, ListBillingMeter,
};
use stripe_billing::billing_meter_event::CreateBillingMeterEvent;
use stripe_billing::billing_meter_event_adjustment::{
    CreateBillingMeterEventAdjustment, CreateBillingMeterEventAdjustmentCancel,
};
use stripe_billing::billing_meter_event_summary::ListIdBillingMeterEventSummary;
use stripe_billing::BillingMeterEventAdjustmentType;
use stripe_core::customer::{CreateCustomer, RetrieveCustomer};
use stripe_emulator::testing::Answer;
use stripe_emulator::{Emulator, EmulatorConfig, Faults};

const TEST_KEY: &str = "sk_test_emulator";
const LIVE_KEY: &str = "sk_live_emulator";

async fn start(config: EmulatorConfig) -> Emulator {
    Emulator::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .expect("emulator starts")
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A plain HTTP call, for what the typed client hides (status codes, headers).
async fn call(
    emulator: &Emulator,
    method: &str,
    path: &str,
    key: Option<&str>,
    form: &[(&str, String)],
    idempotency_key: Option<&str>,
) -> Result<Answer, String> {
    stripe_emulator::testing::call(emulator.addr(), method, path, key, form, idempotency_key).await
}

fn event_form(
    customer: &str,
    value: &str,
    identifier: &str,
    timestamp: i64,
) -> Vec<(&'static str, String)> {
    vec![
        ("event_name", "api_calls".to_owned()),
        ("payload[stripe_customer_id]", customer.to_owned()),
        ("payload[value]", value.to_owned()),
        ("identifier", identifier.to_owned()),
        ("timestamp", timestamp.to_string()),
    ]
}

/// `POST /v1/billing/meter_events` with a test key.
async fn post_event(
    emulator: &Emulator,
    form: &[(&str, String)],
    idempotency_key: Option<&str>,
) -> Result<Answer, String> {
    call(
        emulator,
        "POST",
        "/v1/billing/meter_events",
        Some(TEST_KEY),
        form,
        idempotency_key,
    )
    .await
}

async fn send_event(
    emulator: &Emulator,
    customer: &str,
    value: &str,
    identifier: &str,
    timestamp: i64,
) -> Answer {
    post_event(
        emulator,
        &event_form(customer, value, identifier, timestamp),
        None,
    )
    .await
    .expect("a response")
}

fn stripe_client(emulator: &Emulator) -> stripe::Client {
    stripe::ClientBuilder::new(TEST_KEY)
        .url(emulator.url())
        .build()
        .unwrap()
}

#[tokio::test]
async fn async_stripe_decodes_every_endpoint() {
    let emulator = start(EmulatorConfig::default()).await;
    let client = stripe_client(&emulator);

    let customer = CreateCustomer::new()
        .name("Acme")
        .send(&client)
        .await
        .unwrap();
    let fetched = RetrieveCustomer::new(customer.id.clone())
        .send(&client)
        .await
        .unwrap();
    match fetched {
        stripe_core::customer::RetrieveCustomerReturned::Customer(c) => {
            assert_eq!(c.name.as_deref(), Some("Acme"))
        }
        _ => panic!("expected a customer"),
    }

    let meter = CreateBillingMeter::new(
        CreateBillingMeterDefaultAggregation::new(CreateBillingMeterDefaultAggregationFormula::Sum),
        "API calls",
        "api_calls",
    )
    .send(&client)
    .await
    .unwrap();
    let meters = ListBillingMeter::new().send(&client).await.unwrap();
    assert_eq!(meters.data.len(), 1);
    assert_eq!(meters.data[0].event_name, "api_calls");

    let at = now() / 60 * 60;
    for (identifier, value) in [("a-1", "25"), ("a-2", "17")] {
        let payload = HashMap::from([
            ("stripe_customer_id".to_owned(), customer.id.to_string()),
            ("value".to_owned(), value.to_owned()),
        ]);
        let event = CreateBillingMeterEvent::new("api_calls", payload)
            .identifier(identifier)
            .timestamp(at)
            .send(&client)
            .await
            .unwrap();
        assert_eq!(event.identifier, identifier);
        assert_eq!(event.payload["value"], value);
    }
    let adjustment = CreateBillingMeterEventAdjustment::new(
        "api_calls",
        BillingMeterEventAdjustmentType::Cancel,
    )
    .cancel(CreateBillingMeterEventAdjustmentCancel {
        identifier: Some("a-2".to_owned()),
    })
    .send(&client)
    .await
    .unwrap();
    assert_eq!(adjustment.event_name, "api_calls");

    let summaries =
        ListIdBillingMeterEventSummary::new(meter.id.clone(), customer.id.as_str(), at + 60, at)
            .send(&client)
            .await
            .unwrap();
    assert_eq!(summaries.data.len(), 1);
    assert_eq!(
        summaries.data[0].aggregated_value, 25.0,
        "the canceled event is not counted"
    );

    let error = CreateBillingMeterEvent::new(
        "api_calls",
        HashMap::from([
            ("stripe_customer_id".to_owned(), customer.id.to_string()),
            ("value".to_owned(), "1".to_owned()),
        ]),
    )
    .identifier("a-1")
    .send(&client)
    .await
    .unwrap_err();
    match error {
        stripe::StripeError::Stripe(api, 400) => {
            assert!(api
                .message
                .unwrap()
                .starts_with("An event already exists with identifier a-1"))
        }
        other => panic!("expected Stripe's duplicate error, got {other:?}"),
    }
    emulator.shutdown().await;
}

#[tokio::test]
async fn identifiers_are_unique_and_say_do_not_retry() {
    let emulator = start(EmulatorConfig::default()).await;
    let ok = send_event(&emulator, "cus_1", "3", "id-1", now()).await;
    assert_eq!(ok.status, 200);
    let again = send_event(&emulator, "cus_1", "3", "id-1", now()).await;
    assert_eq!(again.status, 400);
    assert_eq!(again.body["error"]["type"], "invalid_request_error");
    assert_eq!(
        again.body["error"]["message"],
        "An event already exists with identifier id-1."
    );
    assert_eq!(again.headers["stripe-should-retry"], "false");
    let totals = emulator.totals();
    assert_eq!((totals[0].sum, totals[0].events), (3, 1));
    assert_eq!(emulator.stats().duplicate_identifiers, 1);
}

#[tokio::test]
async fn timestamps_values_and_keys_are_validated() {
    let emulator = start(EmulatorConfig::default()).await;
    let day = 24 * 3600;
    let too_old = send_event(&emulator, "cus_1", "1", "old", now() - 36 * day).await;
    assert_eq!(
        (too_old.status, too_old.body["error"]["param"].as_str()),
        (400, Some("timestamp"))
    );
    let ahead = send_event(&emulator, "cus_1", "1", "ahead", now() + 600).await;
    assert_eq!(ahead.status, 400);
    assert_eq!(
        send_event(&emulator, "cus_1", "1", "edge", now() - 34 * day)
            .await
            .status,
        200
    );
    let fraction = send_event(&emulator, "cus_1", "1.5", "fraction", now()).await;
    assert_eq!(
        (fraction.status, fraction.body["error"]["param"].as_str()),
        (400, Some("payload[value]"))
    );
    let long_id = "x".repeat(101);
    assert_eq!(
        send_event(&emulator, "cus_1", "1", &long_id, now())
            .await
            .status,
        400
    );

    let no_key = call(
        &emulator,
        "POST",
        "/v1/billing/meter_events",
        None,
        &event_form("cus_1", "1", "k", now()),
        None,
    )
    .await
    .unwrap();
    assert_eq!(no_key.status, 401);
    let bad_key = call(
        &emulator,
        "POST",
        "/v1/billing/meter_events",
        Some("pk_test_x"),
        &event_form("cus_1", "1", "k", now()),
        None,
    )
    .await
    .unwrap();
    assert_eq!(bad_key.status, 401);
    let missing = call(
        &emulator,
        "POST",
        "/v1/billing/meter_events",
        Some(TEST_KEY),
        &[
            ("event_name", "api_calls".to_owned()),
            ("payload[value]", "1".to_owned()),
        ],
        None,
    )
    .await
    .unwrap();
    assert_eq!(missing.body["error"]["code"], "parameter_missing");
    assert_eq!(emulator.totals().iter().map(|t| t.events).sum::<u64>(), 1);
}

#[tokio::test]
async fn idempotency_keys_replay_refuse_other_parameters_and_lock_in_flight() {
    let emulator = start(EmulatorConfig::default()).await;
    let form = event_form("cus_1", "5", "idem-1", now());
    let first = post_event(&emulator, &form, Some("key-1")).await.unwrap();
    let replay = post_event(&emulator, &form, Some("key-1")).await.unwrap();
    assert_eq!((first.status, replay.status), (200, 200));
    assert_eq!(first.body, replay.body);
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    assert!(first.headers.get("idempotent-replayed").is_none());

    let other = event_form("cus_1", "6", "idem-1", now());
    let mismatch = post_event(&emulator, &other, Some("key-1")).await.unwrap();
    assert_eq!(
        (mismatch.status, mismatch.body["error"]["type"].as_str()),
        (400, Some("idempotency_error"))
    );

    // A stored 500 is replayed too: retrying with the same key cannot get past it.
    emulator
        .set_faults(Faults {
            error_500: 1.0,
            ..Faults::default()
        })
        .unwrap();
    let failed = post_event(
        &emulator,
        &event_form("cus_1", "1", "idem-2", now()),
        Some("key-2"),
    )
    .await
    .unwrap();
    emulator.set_faults(Faults::default()).unwrap();
    let replayed = post_event(
        &emulator,
        &event_form("cus_1", "1", "idem-2", now()),
        Some("key-2"),
    )
    .await
    .unwrap();
    assert_eq!((failed.status, replayed.status), (500, 500));
    assert_eq!(replayed.headers["idempotent-replayed"], "true");

    // Validation failures are not stored: the same key works once the request is fixed... with
    // the same parameters only, so a 400 followed by the same 400 is answered afresh.
    let bad = event_form("cus_1", "x", "idem-3", now());
    let first_bad = post_event(&emulator, &bad, Some("key-3")).await.unwrap();
    let second_bad = post_event(&emulator, &bad, Some("key-3")).await.unwrap();
    assert_eq!((first_bad.status, second_bad.status), (400, 400));
    assert!(second_bad.headers.get("idempotent-replayed").is_none());

    emulator
        .set_faults(Faults {
            delay: 1.0,
            delay_ms: 300,
            ..Faults::default()
        })
        .unwrap();
    let slow_form = event_form("cus_2", "1", "idem-4", now());
    let (a, b) = tokio::join!(post_event(&emulator, &slow_form, Some("key-4")), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        post_event(&emulator, &slow_form, Some("key-4")).await
    });
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!((a.status, b.status), (200, 409));
    assert_eq!(b.body["error"]["code"], "idempotency_key_in_use");
}

#[tokio::test]
async fn account_rate_limit_answers_429_rate_limit() {
    let emulator = start(EmulatorConfig::default()).await;
    let mut statuses = Vec::new();
    for i in 0..40 {
        let answer = send_event(
            &emulator,
            &format!("cus_{i}"),
            "1",
            &format!("r-{i}"),
            now(),
        )
        .await;
        if answer.status == 429 {
            assert_eq!(answer.body["error"]["code"], "rate_limit");
        }
        statuses.push(answer.status);
    }
    let accepted = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(
        accepted, 25,
        "sk_test_ keys get 25 calls a second: {statuses:?}"
    );
    assert_eq!(emulator.stats().rate_limited, 15);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        send_event(&emulator, "cus_x", "1", "after", now())
            .await
            .status,
        200
    );

    // Live keys have their own, higher limit.
    let live = call(
        &emulator,
        "POST",
        "/v1/billing/meter_events",
        Some(LIVE_KEY),
        &event_form("cus_l", "1", "live-1", now()),
        None,
    )
    .await
    .unwrap();
    assert_eq!(live.status, 200);
    assert_eq!(live.body["livemode"], true);
}

#[tokio::test]
async fn one_call_at_a_time_per_customer_and_meter() {
    let emulator = start(EmulatorConfig {
        faults: Faults {
            delay: 1.0,
            delay_ms: 300,
            ..Faults::default()
        },
        ..EmulatorConfig::default()
    })
    .await;
    let (first, second, other) = tokio::join!(
        send_event(&emulator, "cus_1", "1", "c-1", now()),
        async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            send_event(&emulator, "cus_1", "1", "c-2", now()).await
        },
        async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            send_event(&emulator, "cus_2", "1", "c-3", now()).await
        }
    );
    assert_eq!((first.status, second.status, other.status), (200, 429, 200));
    assert_eq!(second.body["error"]["code"], "rate_limit");
    assert_eq!(emulator.stats().concurrency_limited, 1);
}

#[tokio::test]
async fn committed_then_dropped_keeps_the_event_and_a_retry_finds_it() {
    let emulator = start(EmulatorConfig {
        faults: Faults {
            drop_after_commit: 1.0,
            ..Faults::default()
        },
        ..EmulatorConfig::default()
    })
    .await;
    let lost = post_event(&emulator, &event_form("cus_1", "7", "drop-1", now()), None).await;
    assert!(lost.is_err(), "the connection closes without a response");
    assert_eq!(emulator.totals()[0].sum, 7, "but Stripe has the event");
    emulator.set_faults(Faults::default()).unwrap();
    let retry = send_event(&emulator, "cus_1", "7", "drop-1", now()).await;
    assert_eq!(retry.status, 400);
    assert!(retry.body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("An event already exists"));
    assert_eq!(emulator.stats().dropped_after_commit, 1);

    emulator
        .set_faults(Faults {
            error_503: 1.0,
            ..Faults::default()
        })
        .unwrap();
    assert_eq!(
        send_event(&emulator, "cus_1", "1", "drop-2", now())
            .await
            .status,
        503
    );
    assert_eq!(
        emulator.totals()[0].events,
        1,
        "an injected 5xx commits nothing"
    );
}

#[tokio::test]
async fn cancel_only_within_24_hours_and_summaries_follow() {
    let emulator = start(EmulatorConfig::default()).await;
    let client = stripe_client(&emulator);
    let meter = CreateBillingMeter::new(
        CreateBillingMeterDefaultAggregation::new(CreateBillingMeterDefaultAggregationFormula::Sum),
        "API calls",
        "api_calls",
    )
    .send(&client)
    .await
    .unwrap();
    let hour = now() / 3600 * 3600 - 3 * 3600;
    for (i, offset) in [0, 60, 3600, 7200 + 59].into_iter().enumerate() {
        assert_eq!(
            send_event(
                &emulator,
                "cus_1",
                &(10 * (i + 1)).to_string(),
                &format!("s-{i}"),
                hour + offset
            )
            .await
            .status,
            200
        );
    }
    let cancel = |identifier: &'static str| {
        let emulator = &emulator;
        async move {
            call(
                emulator,
                "POST",
                "/v1/billing/meter_event_adjustments",
                Some(TEST_KEY),
                &[
                    ("event_name", "api_calls".to_owned()),
                    ("type", "cancel".to_owned()),
                    ("cancel[identifier]", identifier.to_owned()),
                ],
                None,
            )
            .await
            .unwrap()
        }
    };
    assert_eq!(cancel("s-1").await.status, 200);
    assert_eq!(cancel("s-1").await.status, 400, "already canceled");
    assert_eq!(cancel("nope").await.status, 400);

    let hourly = ListIdBillingMeterEventSummary::new(meter.id.clone(), "cus_1", hour + 3 * 3600, hour)
        .value_grouping_window(stripe_billing::billing_meter_event_summary::ListIdBillingMeterEventSummaryValueGroupingWindow::Hour)
        .send(&client)
        .await
        .unwrap();
    let values: Vec<f64> = hourly.data.iter().map(|s| s.aggregated_value).collect();
    assert_eq!(values, vec![10.0, 30.0, 40.0]);
    let misaligned = call(
        &emulator,
        "GET",
        &format!(
            "/v1/billing/meters/{}/event_summaries?customer=cus_1&start_time={}&end_time={}",
            meter.id,
            hour + 1,
            hour + 3600
        ),
        Some(TEST_KEY),
        &[],
        None,
    )
    .await
    .unwrap();
    assert_eq!(misaligned.status, 400);

    emulator.advance_clock(Duration::from_secs(25 * 3600));
    let late = cancel("s-0").await;
    assert_eq!(late.status, 400);
    assert!(late.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("within 24 hours"));
    assert_eq!(emulator.totals()[0].sum, 10 + 30 + 40);
}

#[tokio::test]
async fn last_and_count_meters_and_the_control_api() {
    let emulator = start(EmulatorConfig::default()).await;
    for (name, formula) in [("seats", "last"), ("logins", "count")] {
        let created = call(
            &emulator,
            "POST",
            "/v1/billing/meters",
            Some(TEST_KEY),
            &[
                ("display_name", name.to_owned()),
                ("event_name", name.to_owned()),
                ("default_aggregation[formula]", formula.to_owned()),
            ],
            None,
        )
        .await
        .unwrap();
        assert_eq!(created.status, 200);
    }
    let duplicate = call(
        &emulator,
        "POST",
        "/v1/billing/meters",
        Some(TEST_KEY),
        &[
            ("display_name", "x".to_owned()),
            ("event_name", "seats".to_owned()),
            ("default_aggregation[formula]", "sum".to_owned()),
        ],
        None,
    )
    .await
    .unwrap();
    assert_eq!(duplicate.status, 400);
    let meters = call(
        &emulator,
        "GET",
        "/v1/billing/meters?limit=1",
        Some(TEST_KEY),
        &[],
        None,
    )
    .await
    .unwrap();
    assert_eq!(meters.body["has_more"], true);

    let t = now() / 60 * 60 - 600;
    for (i, (ts, value)) in [(t + 120, "7"), (t + 60, "9"), (t + 120, "4")]
        .into_iter()
        .enumerate()
    {
        for meter in ["seats", "logins"] {
            let mut form = event_form("cus_1", value, &format!("{meter}-{i}"), ts);
            form[0].1 = meter.to_owned();
            assert_eq!(
                post_event(&emulator, &form, None).await.unwrap().status,
                200
            );
        }
    }
    let ids: Vec<String> = meters_ids(&emulator).await;
    let summary = |id: String| {
        let emulator = &emulator;
        async move {
            call(emulator, "GET", &format!("/v1/billing/meters/{id}/event_summaries?customer=cus_1&start_time={t}&end_time={}", t + 600), Some(TEST_KEY), &[], None).await.unwrap().body["data"][0]["aggregated_value"].as_f64().unwrap()
        }
    };
    assert_eq!(
        summary(ids[0].clone()).await,
        4.0,
        "last: latest timestamp, ties to the last received"
    );
    assert_eq!(summary(ids[1].clone()).await, 3.0, "count");

    let state = call(&emulator, "GET", "/_emulator/state", None, &[], None)
        .await
        .unwrap();
    assert_eq!(state.body["stats"]["meter_events_created"], 6);
    let set = call(&emulator, "POST", "/_emulator/faults", None, &[], None)
        .await
        .unwrap();
    assert_eq!(set.status, 400, "the faults body is JSON");
}

async fn meters_ids(emulator: &Emulator) -> Vec<String> {
    let meters = call(
        emulator,
        "GET",
        "/v1/billing/meters",
        Some(TEST_KEY),
        &[],
        None,
    )
    .await
    .unwrap();
    meters.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}
