//! The sender against receivers that misbehave, as an attacker's or a broken one would: an
//! answer that never ends, an endpoint that never answers, one that always fails, a name that
//! resolves to a private address, an endpoint deleted while its delivery is in flight. Every
//! receiver here is a raw TCP server on 127.0.0.1 (no traffic leaves loopback); firings and
//! deliveries are written as the evaluator writes them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tally_alerts::deliver::{claim, deliver, deliver_due, Outcome, ANSWER_PREFIX};
use tally_alerts::store::{create_endpoint, delete_endpoint, NewEndpoint};
use tally_alerts::{AlertsConfig, Destinations, Sender};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What a test receiver does with each request.
#[derive(Clone, Copy)]
enum Answer {
    Ok,
    Fail,
    /// Status 500, then a body that never ends.
    Endless,
    /// Reads the request and never answers.
    Silent,
}

/// A receiver on 127.0.0.1: its port, the connections it accepted, the bytes it wrote.
struct Receiver {
    port: u16,
    accepted: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
    answer: Arc<std::sync::Mutex<Answer>>,
}

impl Receiver {
    async fn start(answer: Answer) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicU64::new(0));
        let written = Arc::new(AtomicU64::new(0));
        let answer = Arc::new(std::sync::Mutex::new(answer));
        let (a, w, mode) = (accepted.clone(), written.clone(), answer.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                a.fetch_add(1, Ordering::SeqCst);
                let (w, answer) = (w.clone(), *mode.lock().unwrap());
                tokio::spawn(async move {
                    // The request: headers, then Content-Length bytes of body.
                    let mut request = Vec::new();
                    let mut buffer = [0u8; 4096];
                    loop {
                        let Ok(n) = stream.read(&mut buffer).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        request.extend_from_slice(&buffer[..n]);
                        let text = String::from_utf8_lossy(&request);
                        if let Some(end) = text.find("\r\n\r\n") {
                            let length: usize = text[..end]
                                .lines()
                                .find_map(|l| {
                                    l.to_ascii_lowercase()
                                        .strip_prefix("content-length:")
                                        .map(|v| v.trim().parse().unwrap_or(0))
                                })
                                .unwrap_or(0);
                            if request.len() >= end + 4 + length {
                                break;
                            }
                        }
                    }
                    let head: &[u8] = match answer {
                        Answer::Ok => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                        Answer::Fail => b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\n\r\ndown",
                        Answer::Endless => b"HTTP/1.1 500 Internal Server Error\r\ntransfer-encoding: chunked\r\n\r\n",
                        Answer::Silent => {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            return;
                        }
                    };
                    if stream.write_all(head).await.is_err() {
                        return;
                    }
                    if let Answer::Endless = answer {
                        let chunk = format!("{:x}\r\n{}\r\n", 65536, "x".repeat(65536));
                        while stream.write_all(chunk.as_bytes()).await.is_ok() {
                            w.fetch_add(65536, Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        Receiver {
            port,
            accepted,
            written,
            answer,
        }
    }

    fn url(&self, host: &str) -> String {
        format!("http://{host}:{}/hook", self.port)
    }

    fn set(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }
}

const ON_PREMISES: Destinations = Destinations {
    allow_http: true,
    allow_private_networks: true,
};

fn config(on_premises: bool, timeout: Duration) -> AlertsConfig {
    AlertsConfig {
        delivery_timeout: timeout,
        allow_http: on_premises,
        allow_private_networks: on_premises,
        ..AlertsConfig::default()
    }
}

async fn endpoint(pool: &PgPool, destinations: &Destinations, url: &str) -> i64 {
    let new = NewEndpoint {
        url,
        ..Default::default()
    };
    create_endpoint(pool, destinations, &new, "test")
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
        .0
        .endpoint_id
}

/// `count` firings, each with a pending delivery to `endpoint`, due now.
async fn firings(pool: &PgPool, endpoint: i64, count: usize) {
    for i in 0..count {
        let id = format!("evt_{}_{i}", uuid::Uuid::now_v7().simple());
        let firing: i64 = sqlx::query_scalar(
            "INSERT INTO alert_firings (event_id, rule_key, customer_id, period_start, event_type, payload)
             VALUES ($1, 'customer:1', 'acme', now(), 'usage.threshold_crossed',
                     jsonb_build_object('id', $1::text, 'type', 'usage.threshold_crossed'))
             RETURNING firing_id",
        )
        .bind(&id)
        .fetch_one(pool)
        .await
        .unwrap();
        sqlx::query("INSERT INTO alert_deliveries (firing_id, endpoint_id) VALUES ($1, $2)")
            .bind(firing)
            .bind(endpoint)
            .execute(pool)
            .await
            .unwrap();
    }
}

/// (status, last_error) of every delivery to `endpoint`.
async fn outcomes(pool: &PgPool, endpoint: i64) -> Vec<(String, Option<String>)> {
    sqlx::query_as(
        "SELECT status, last_error FROM alert_deliveries WHERE endpoint_id = $1 ORDER BY delivery_id",
    )
    .bind(endpoint)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn an_answer_that_never_ends_is_read_only_up_to_a_bound() {
    let db = tally_db::testing::fresh_database().await;
    let endless = Receiver::start(Answer::Endless).await;
    let id = endpoint(&db.pool, &ON_PREMISES, &endless.url("127.0.0.1")).await;
    firings(&db.pool, id, 8).await;
    let sender = Sender::new(&config(true, Duration::from_secs(20)));
    let started = Instant::now();
    let round = deliver_due(&db.pool, &sender).await.unwrap();
    // Not the time limit: the sender stops reading after the prefix.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(round.retrying, 8, "{round:?}");
    for (status, error) in outcomes(&db.pool, id).await {
        assert_eq!(status, "pending");
        let error = error.unwrap();
        assert!(
            error.starts_with("the endpoint answered 500: xxxx"),
            "{error}"
        );
        assert!(error.len() <= ANSWER_PREFIX + 40, "{}", error.len());
    }
    // The receiver could write little more than its buffers hold before the connection went.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let written = endless.written.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        endless.written.load(Ordering::SeqCst),
        written,
        "it still streams"
    );
    assert!(written < (8 * 16) << 20, "{written} bytes");
}

#[tokio::test]
async fn a_name_that_resolves_to_a_private_address_is_never_connected_to() {
    let db = tally_db::testing::fresh_database().await;
    let receiver = Receiver::start(Answer::Ok).await;
    // Registered as a public name (it passes), resolving to loopback at delivery time (a DNS
    // answer that changed, or rebinding).
    let url = format!("https://hooks.example.com:{}/hook", receiver.port);
    let id = endpoint(&db.pool, &Destinations::default(), &url).await;
    firings(&db.pool, id, 2).await;
    let resolver: tally_alerts::destination::Resolve = Arc::new(|host: &str| {
        assert_eq!(host, "hooks.example.com");
        Ok(vec!["127.0.0.1".parse().unwrap()])
    });
    let sender = Sender::with_resolver(&config(false, Duration::from_secs(5)), Some(resolver));
    let round = deliver_due(&db.pool, &sender).await.unwrap();
    assert_eq!(round.retrying, 2, "{round:?}");
    for (_, error) in outcomes(&db.pool, id).await {
        let error = error.unwrap();
        assert!(
            error.contains("hooks.example.com resolves only to addresses that are not public")
                && !error.contains("127.0.0.1"),
            "{error}"
        );
    }
    assert_eq!(receiver.accepted.load(Ordering::SeqCst), 0);

    // An endpoint registered while the operator allowed private networks, refused once the
    // setting is off again: before any connection.
    let loopback = endpoint(&db.pool, &ON_PREMISES, &receiver.url("127.0.0.1")).await;
    firings(&db.pool, loopback, 1).await;
    sqlx::query("UPDATE alert_deliveries SET next_attempt_at = now() WHERE endpoint_id = $1")
        .bind(loopback)
        .execute(&db.pool)
        .await
        .unwrap();
    deliver_due(
        &db.pool,
        &Sender::new(&config(false, Duration::from_secs(5))),
    )
    .await
    .unwrap();
    let error = outcomes(&db.pool, loopback).await[0].1.clone().unwrap();
    assert!(error.starts_with("not sent: "), "{error}");
    assert_eq!(receiver.accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_endpoint_that_never_answers_holds_up_no_other_delivery() {
    let db = tally_db::testing::fresh_database().await;
    let silent = Receiver::start(Answer::Silent).await;
    let ok = Receiver::start(Answer::Ok).await;
    let black_hole = endpoint(&db.pool, &ON_PREMISES, &silent.url("127.0.0.1")).await;
    let healthy = endpoint(&db.pool, &ON_PREMISES, &ok.url("127.0.0.1")).await;
    firings(&db.pool, black_hole, 40).await;
    firings(&db.pool, healthy, 40).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let tasks = tally_alerts::start_alerts(
        db.pool.clone(),
        AlertsConfig {
            evaluate_every: Duration::from_millis(50),
            ..config(true, Duration::from_secs(30))
        },
        stop.clone(),
    );
    let started = Instant::now();
    loop {
        let delivered = outcomes(&db.pool, healthy)
            .await
            .iter()
            .filter(|(s, _)| s == "delivered")
            .count();
        if delivered == 40 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{delivered} of 40 delivered while the black hole holds its slots"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The black hole holds at most its share of the slots.
    assert!(
        silent.accepted.load(Ordering::SeqCst) <= tally_alerts::deliver::PER_ENDPOINT as u64,
        "{}",
        silent.accepted.load(Ordering::SeqCst)
    );
    stop.cancel();
    for task in tasks {
        let _ = task.await;
    }
}

#[tokio::test]
async fn an_endpoint_that_keeps_failing_rests_then_is_probed_one_delivery_at_a_time() {
    let db = tally_db::testing::fresh_database().await;
    let receiver = Receiver::start(Answer::Fail).await;
    let id = endpoint(&db.pool, &ON_PREMISES, &receiver.url("127.0.0.1")).await;
    firings(&db.pool, id, 20).await;
    let sender = Sender::new(&config(true, Duration::from_secs(5)));
    let due_now = || async {
        sqlx::query("UPDATE alert_deliveries SET next_attempt_at = now() WHERE status = 'pending'")
            .execute(&db.pool)
            .await
            .unwrap();
    };
    // 8 at once (its share of the slots): 8 failures in a row trip the breaker.
    let first = deliver_due(&db.pool, &sender).await.unwrap();
    assert_eq!(first.retrying, 8, "{first:?}");
    let (failures, open_until): (i32, Option<chrono::DateTime<chrono::Utc>>) = sqlx::query_as(
        "SELECT consecutive_failures, open_until FROM alert_endpoints WHERE endpoint_id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(failures, 8);
    let open_until = open_until.expect("the breaker is open");
    assert!(open_until > chrono::Utc::now() + chrono::TimeDelta::seconds(20));
    // Its pending deliveries wait for the breaker, and nothing is claimed while it is open.
    let early: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM alert_deliveries WHERE status = 'pending' AND next_attempt_at < $1",
    )
    .bind(open_until)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(early, 0);
    sqlx::query("UPDATE alert_deliveries SET next_attempt_at = now() WHERE status = 'pending'")
        .execute(&db.pool)
        .await
        .unwrap();
    assert!(claim(&db.pool, &sender, 64).await.unwrap().is_empty());
    // Once it has rested: one delivery at a time (half open).
    sqlx::query("UPDATE alert_endpoints SET open_until = now() - interval '1 second'")
        .execute(&db.pool)
        .await
        .unwrap();
    due_now().await;
    let probe = deliver_due(&db.pool, &sender).await.unwrap();
    assert_eq!(probe.retrying, 1, "{probe:?}");
    // The receiver recovers: the next probe succeeds and closes the breaker.
    receiver.set(Answer::Ok);
    sqlx::query("UPDATE alert_endpoints SET open_until = now() - interval '1 second'")
        .execute(&db.pool)
        .await
        .unwrap();
    due_now().await;
    assert_eq!(deliver_due(&db.pool, &sender).await.unwrap().delivered, 1);
    due_now().await;
    let after = deliver_due(&db.pool, &sender).await.unwrap();
    assert_eq!(after.delivered, 8, "{after:?}");
    let (failures, open_until): (i32, Option<chrono::DateTime<chrono::Utc>>) = sqlx::query_as(
        "SELECT consecutive_failures, open_until FROM alert_endpoints WHERE endpoint_id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((failures, open_until), (0, None));
}

#[tokio::test]
async fn a_delivery_in_flight_when_its_endpoint_is_deleted_stays_failed() {
    let db = tally_db::testing::fresh_database().await;
    let receiver = Receiver::start(Answer::Fail).await;
    let id = endpoint(&db.pool, &ON_PREMISES, &receiver.url("127.0.0.1")).await;
    firings(&db.pool, id, 1).await;
    let sender = Sender::new(&config(true, Duration::from_secs(5)));
    let claimed = claim(&db.pool, &sender, 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    delete_endpoint(&db.pool, id).await.unwrap();
    let outcome = deliver(&db.pool, &sender, claimed.into_iter().next().unwrap())
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Retrying);
    let after = outcomes(&db.pool, id).await;
    assert_eq!(after[0].0, "failed", "{after:?}");
    assert_eq!(after[0].1.as_deref(), Some("the endpoint was deleted"));
    // And it is never claimed again.
    sqlx::query("UPDATE alert_deliveries SET next_attempt_at = now()")
        .execute(&db.pool)
        .await
        .unwrap();
    assert!(claim(&db.pool, &sender, 10).await.unwrap().is_empty());
}

/// One delivery that cannot even be sent (its endpoint's URL, written before today's checks,
/// no longer parses) fails on its own; every other delivery of the round is delivered.
#[tokio::test]
async fn a_delivery_that_cannot_be_sent_fails_alone_and_the_round_goes_on() {
    let db = tally_db::testing::fresh_database().await;
    let ok = Receiver::start(Answer::Ok).await;
    let good = endpoint(&db.pool, &ON_PREMISES, &ok.url("127.0.0.1")).await;
    let bad = endpoint(&db.pool, &ON_PREMISES, &ok.url("127.0.0.1")).await;
    sqlx::query(
        "UPDATE alert_endpoints SET url = 'http://exa mple.com/ hook' WHERE endpoint_id = $1",
    )
    .bind(bad)
    .execute(&db.pool)
    .await
    .unwrap();
    firings(&db.pool, good, 5).await;
    firings(&db.pool, bad, 5).await;
    let round = deliver_due(
        &db.pool,
        &Sender::new(&config(true, Duration::from_secs(5))),
    )
    .await
    .unwrap();
    assert_eq!((round.delivered, round.retrying), (5, 5), "{round:?}");
    for (status, error) in outcomes(&db.pool, bad).await {
        assert_eq!(status, "pending");
        assert!(error.unwrap().starts_with("not sent: url"));
    }
}
