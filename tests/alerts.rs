//! Usage alerts end to end, with `tally kafka` and `tally aggregate` as separate processes and
//! two webhook receivers that verify every `Tally-Signature` (one refuses its first two
//! deliveries). Thresholds crossed by a burst and by a late event fire once each; an
//! aggregator killed and restarted does not fire them again; a new billing period fires again
//! only once it is crossed in that period; a credit balance falling below its amount fires,
//! and again only after a top-up brought it back; the refusing receiver gets every event
//! through the retries.

use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use rust_decimal::Decimal;
use serde_json::Value;
use tally_billing::AlertRule;
use tally_core::UsageEvent;
use tally_credits::{grant, Actor, GrantKind, NewGrant};
use tally_tests::*;

const PLANS: &str = r#"
[credits]
burn_every = "100ms"
[[credits.rates]]
meter = "tokens"
credits_per_unit = "0.001"

[alerts]
evaluate_every = "100ms"
# The receivers listen on 127.0.0.1 over plain HTTP.
allow_http = true
allow_private_networks = true

[[plans]]
name = "PRO"
[plans.limits.api_calls]
limit = 100
period = "day"
[[plans.alerts]]
meter = "api_calls"
percent = 80
[[plans.alerts]]
meter = "api_calls"
percent = 100

[[plans]]
name = "BILLED"
[plans.limits.api_calls]
limit = 100
period = "billing_period"
[[plans.alerts]]
meter = "api_calls"
percent = 80
"#;

fn d(text: &str) -> Decimal {
    text.parse().unwrap()
}

/// The events a receiver took for a customer, as (type, percent or balance rule).
fn events_of(receiver: &AlertReceiver, customer: &str) -> Vec<Value> {
    receiver
        .taken()
        .into_iter()
        .filter(|e| e["customer"] == customer)
        .collect()
}

#[test]
fn alerts_fire_once_per_crossing_signed_and_retried() {
    let runtime = runtime();
    let db = runtime.block_on(tally_db::testing::fresh_database());
    let (work, kafka, _broker) = broker_process(
        &db.url,
        2,
        &format!("[aggregator]\nsession_timeout = \"6s\"\nbatch_max_wait = \"100ms\"\n{PLANS}"),
    );
    for args in [&["migrate"][..], &["plans", "apply"]] {
        let (ok, output) = work.run(&db.url, args);
        assert!(ok, "{args:?}: {output}");
    }
    let started = Utc::now() - TimeDelta::days(2);
    runtime.block_on(async {
        for customer in ["acme", "globex"] {
            tally_billing::testing::subscribe(&db.pool, customer, "PRO", started).await;
        }
        tally_billing::testing::subscribe(
            &db.pool,
            "initech",
            "BILLED",
            Utc::now() - TimeDelta::days(3),
        )
        .await;
        let rule = AlertRule {
            meter: None,
            percent: None,
            credit_balance_below: Some(d("5")),
        };
        tally_alerts::store::create_rule(&db.pool, "acme", &rule, &[], "test")
            .await
            .unwrap();
    });
    let top_up = |key: &str| {
        let new = NewGrant {
            customer: "acme".into(),
            kind: GrantKind::Purchased,
            amount: d("10"),
            priority: None,
            effective_at: Some(Utc::now() - TimeDelta::hours(1)),
            expires_at: None,
            idempotency_key: key.into(),
            description: None,
        };
        runtime
            .block_on(grant(
                &db.pool,
                &new,
                &Actor::new("test", "top-up").unwrap(),
            ))
            .unwrap();
    };
    top_up("first");
    let healthy = runtime.block_on(AlertReceiver::start(0));
    let flaky = runtime.block_on(AlertReceiver::start(2));
    for receiver in [&healthy, &flaky] {
        let secret = runtime.block_on(receiver.register(&db.pool));
        receiver.set_secret(&secret);
    }
    let mut aggregate = work.spawn("aggregate-1", &db.url, &["aggregate"]);
    let emitter = TestEmitter::start(&kafka);
    let mut next_id = 0;
    let mut emit = |customer: &str, meter: &str, quantity: &str, count: usize, ago: TimeDelta| {
        for _ in 0..count {
            next_id += 1;
            let mut event = UsageEvent::new(customer, meter, d(quantity))
                .with_id(format!("a-{next_id}"))
                .at(Utc::now() - ago);
            if meter == "tokens" {
                event = event.with_dimension("model", "small");
            }
            emitter.emit(event).unwrap();
        }
        emitter.flush(Duration::from_secs(30)).unwrap();
    };
    let wait_for = |what: &str, receiver: &AlertReceiver, customer: &str, count: usize| {
        wait_until(what, Duration::from_secs(60), || {
            events_of(receiver, customer).len() >= count
        });
    };
    // A quiet moment: what is committed has been evaluated (nothing left to take).
    let settled = || {
        std::thread::sleep(Duration::from_millis(1500));
        wait_until("every change is evaluated", Duration::from_secs(30), || {
            runtime
                .block_on(
                    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM customer_changes")
                        .fetch_one(&db.pool),
                )
                .unwrap()
                == 0
        });
    };

    // A burst crosses 80 %, then more crosses 100 %: one event each.
    let burst = Instant::now();
    emit("acme", "api_calls", "1", 85, TimeDelta::zero());
    wait_for("acme's 80 % alert", &healthy, "acme", 1);
    println!("burst to delivery: {} ms", burst.elapsed().as_millis());
    emit("acme", "api_calls", "1", 20, TimeDelta::zero());
    wait_for("acme's 100 % alert", &healthy, "acme", 2);
    let acme = events_of(&healthy, "acme");
    let percents: Vec<&Value> = acme.iter().map(|e| &e["data"]["percent"]).collect();
    assert_eq!(percents.len(), 2, "{acme:#?}");
    assert!(acme.iter().all(|e| e["type"] == "usage.threshold_crossed"));
    assert_eq!(
        acme[1]["data"]["usage"].as_str().map(d),
        Some(d("105")),
        "{acme:#?}"
    );

    // A late event crosses it for globex.
    emit("globex", "api_calls", "1", 79, TimeDelta::zero());
    settled();
    assert!(
        events_of(&healthy, "globex").is_empty(),
        "79 of 100 is below 80 %"
    );
    let today = Utc::now()
        - Utc::now()
            .date_naive()
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc();
    emit(
        "globex",
        "api_calls",
        "1",
        1,
        TimeDelta::minutes(10).min(today),
    );
    wait_for("globex's alert after a late event", &healthy, "globex", 1);

    // Killed and restarted: nothing fires again, however the usage moves.
    kill(&mut aggregate.0);
    aggregate = work.spawn("aggregate-2", &db.url, &["aggregate"]);
    emit("acme", "api_calls", "1", 3, TimeDelta::zero());
    emit("globex", "api_calls", "1", 3, TimeDelta::zero());
    settled();
    assert_eq!(events_of(&healthy, "acme").len(), 2);
    assert_eq!(events_of(&healthy, "globex").len(), 1);

    // A billing period: crossed in it, fires; the next period fires again once crossed there.
    emit("initech", "api_calls", "1", 90, TimeDelta::days(2));
    wait_for(
        "initech's alert in its first period",
        &healthy,
        "initech",
        1,
    );
    runtime.block_on(async {
        sqlx::query(
            "UPDATE subscriptions SET current_period_start = now(),
                    current_period_end = now() + interval '30 days'
             WHERE customer_id = 'initech'",
        )
        .execute(&db.pool)
        .await
        .unwrap();
    });
    emit("initech", "api_calls", "1", 10, TimeDelta::zero());
    settled();
    assert_eq!(
        events_of(&healthy, "initech").len(),
        1,
        "10 of 100 in the new period"
    );
    emit("initech", "api_calls", "1", 75, TimeDelta::zero());
    wait_for(
        "initech's alert in its second period",
        &healthy,
        "initech",
        2,
    );
    let initech = events_of(&healthy, "initech");
    assert_ne!(initech[0]["id"], initech[1]["id"]);
    assert_ne!(
        initech[0]["data"]["period_start"],
        initech[1]["data"]["period_start"]
    );

    // Credits: 10 granted, 6 burned: below 5 fires; a top-up re-arms; below again fires again.
    emit("acme", "tokens", "6000", 1, TimeDelta::zero());
    let balance_events = || -> Vec<Value> {
        events_of(&healthy, "acme")
            .into_iter()
            .filter(|e| e["type"] == "credits.balance_below")
            .collect()
    };
    wait_until("acme's balance alert", Duration::from_secs(60), || {
        balance_events().len() == 1
    });
    assert_eq!(
        balance_events()[0]["data"]["balance"].as_str().map(d),
        Some(d("4"))
    );
    top_up("second");
    settled();
    assert_eq!(
        balance_events().len(),
        1,
        "14 credits: above the amount, re-armed, not fired"
    );
    emit("acme", "tokens", "10000", 1, TimeDelta::zero());
    wait_until(
        "acme's second balance alert",
        Duration::from_secs(60),
        || balance_events().len() == 2,
    );

    // The refusing receiver got everything through the retries; every delivery was signed.
    let all: Vec<String> = healthy
        .taken()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    wait_until(
        "the flaky receiver took every event",
        Duration::from_secs(90),
        || {
            let taken: Vec<String> = flaky
                .taken()
                .iter()
                .map(|e| e["id"].as_str().unwrap().to_owned())
                .collect();
            all.iter().all(|id| taken.contains(id))
        },
    );
    assert_eq!(flaky.received().iter().filter(|r| r.refused).count(), 2);
    assert!(healthy
        .received()
        .iter()
        .chain(flaky.received().iter())
        .all(|r| r.signed));
    assert_eq!(
        healthy.received().len(),
        all.len(),
        "each event delivered once to a receiver that takes it"
    );
    // A receiver records an event before its answer reaches the deliverer, which then marks the
    // delivery: the last marks may land a moment after the receiver took the event.
    let deliveries = || -> (i64, i64) {
        runtime
            .block_on(
                sqlx::query_as(
                    "SELECT count(*) FILTER (WHERE attempts > 1), count(*) FILTER (WHERE status <> 'delivered')
                     FROM alert_deliveries",
                )
                .fetch_one(&db.pool),
            )
            .unwrap()
    };
    wait_until(
        "every delivery marked delivered",
        Duration::from_secs(30),
        || deliveries().1 == 0,
    );
    assert!(deliveries().0 >= 1, "deliveries were retried");
    drop(aggregate);
    emitter.shutdown(Duration::from_secs(5));
}

/// A receiver that answers 500 and then streams a body that never ends, on 127.0.0.1 over
/// plain HTTP; returns its URL and the bytes it managed to write.
fn endless_receiver(
    runtime: &tokio::runtime::Runtime,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = written.clone();
    runtime.spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buffer = [0u8; 8192];
                // The request's headers are all a small POST needs to have arrived.
                let _ = stream.read(&mut buffer).await;
                let head =
                    b"HTTP/1.1 500 Internal Server Error\r\ntransfer-encoding: chunked\r\n\r\n";
                if stream.write_all(head).await.is_err() {
                    return;
                }
                let chunk = format!("{:x}\r\n{}\r\n", 1 << 20, "x".repeat(1 << 20));
                while stream.write_all(chunk.as_bytes()).await.is_ok() {
                    counter.fetch_add(1 << 20, Ordering::Relaxed);
                }
            });
        }
    });
    (url, written)
}

/// Resident memory of a process, in MiB (Linux).
fn rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

/// Eight endpoints whose receivers stream an endless answer, 64 deliveries at once, in the
/// process that also aggregates and burns credits: `tally aggregate` reads a small prefix of
/// each answer and drops the rest, so its memory stays flat (it grew by the streams' speed
/// before: gigabytes within the time limit, until the process was killed).
#[test]
fn a_receiver_that_streams_forever_cannot_exhaust_tally_aggregate() {
    let runtime = runtime();
    let db = runtime.block_on(tally_db::testing::fresh_database());
    let (work, _kafka, _broker) = broker_process(
        &db.url,
        1,
        "[alerts]\nevaluate_every = \"100ms\"\ndelivery_timeout = \"10s\"\nallow_http = true\nallow_private_networks = true\n",
    );
    let (ok, output) = work.run(&db.url, &["migrate"]);
    assert!(ok, "{output}");
    let mut streams = Vec::new();
    for _ in 0..8 {
        let (url, written) = endless_receiver(&runtime);
        let receiver_endpoint = runtime.block_on(async {
            let on_premises = tally_alerts::Destinations {
                allow_http: true,
                allow_private_networks: true,
            };
            let new = tally_alerts::store::NewEndpoint {
                url: &url,
                ..Default::default()
            };
            tally_alerts::store::create_endpoint(&db.pool, &on_premises, &new, "test")
                .await
                .unwrap()
                .0
                .endpoint_id
        });
        streams.push((receiver_endpoint, written));
    }
    // 8 firings, each delivered to every endpoint: 64 at once.
    runtime.block_on(async {
        for i in 0..8 {
            let firing: i64 = sqlx::query_scalar(
                "INSERT INTO alert_firings (event_id, rule_key, customer_id, period_start, event_type, payload)
                 VALUES ($1, 'customer:1', 'acme', now(), 'usage.threshold_crossed', jsonb_build_object('id', $1::text))
                 RETURNING firing_id",
            )
            .bind(format!("evt_stream_{i}"))
            .fetch_one(&db.pool)
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO alert_deliveries (firing_id, endpoint_id) SELECT $1, endpoint_id FROM alert_endpoints",
            )
            .bind(firing)
            .execute(&db.pool)
            .await
            .unwrap();
        }
    });
    let mut aggregate = work.spawn("aggregate", &db.url, &["aggregate"]);
    let pid = aggregate.id();
    let started = Instant::now();
    let mut peak = 0;
    while started.elapsed() < Duration::from_secs(12) {
        assert!(
            alive(&mut aggregate),
            "tally aggregate died:\n{}",
            work.log("aggregate")
        );
        peak = peak.max(rss_mib(pid));
        std::thread::sleep(Duration::from_millis(100));
    }
    let streamed: u64 = streams
        .iter()
        .map(|(_, w)| w.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    println!(
        "peak RSS {peak} MiB; the receivers wrote {} MiB",
        streamed >> 20
    );
    let attempted: Vec<(i32, Option<String>)> = runtime
        .block_on(
            sqlx::query_as("SELECT attempts, last_error FROM alert_deliveries").fetch_all(&db.pool),
        )
        .unwrap();
    assert_eq!(attempted.len(), 64);
    for (attempts, error) in &attempted {
        assert!(*attempts >= 1);
        let error = error.as_deref().unwrap_or_default();
        assert!(
            error.starts_with("the endpoint answered 500: xxx"),
            "{error:?}"
        );
        assert!(error.len() < 2_100, "{}", error.len());
    }
    assert!(peak < 250, "tally aggregate grew to {peak} MiB");
}
