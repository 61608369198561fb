//! The sender: posts each pending delivery to its endpoint, signed (`signature.rs`), and
//! records the outcome.
//!
//! - **Leases, not transactions.** A delivery is claimed by pushing its next attempt past the
//!   request's time limit, so a sender that dies mid-request leaves it to be tried again when
//!   the lease ends (receivers dedupe on the event id).
//! - **Each delivery on its own.** Claimed deliveries are sent as separate tasks, at most
//!   [`CONCURRENT`] at once and at most [`PER_ENDPOINT`] per endpoint; each records its own
//!   outcome when it ends, and a freed slot is filled at once. A black-holed endpoint holds a
//!   few slots for the time limit, never everyone's round.
//! - **Bounded answers.** Of an answer only the first [`ANSWER_PREFIX`] bytes are read (kept in
//!   `last_error` when it is not a 2xx); the rest is dropped with the connection. An endpoint
//!   that streams forever costs a few KiB and the time limit.
//! - **Where it may go.** `destination.rs`: https and public addresses only, checked again at
//!   every connect after the name is resolved (unless the operator allows otherwise).
//! - **Retries.** Not accepted (no 2xx, or no answer): tried again after about 1 s, 5 s, 30 s,
//!   2 min, 10 min, 30 min, then hourly (each ±20 %, so endpoints that failed together do not
//!   retry together), until `retry_for` after the first attempt; then `failed`.
//! - **Circuit breaker.** After [`BREAKER_FAILURES`] failures in a row an endpoint is left
//!   alone (its pending deliveries wait) for 30 s, doubling with each further failure up to an
//!   hour; then one delivery at a time is tried until one succeeds.
//! - **Deleted endpoints.** A delivery whose endpoint was deleted while it was in flight stays
//!   `failed`: its outcome never puts it back to pending.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rand::Rng;
use sqlx::PgPool;
use tokio::sync::Semaphore;

use crate::config::AlertsConfig;
use crate::destination::{Destinations, GuardedResolver, Resolve};
use crate::signature;
use crate::telemetry;

/// Deliveries in flight at most.
pub const CONCURRENT: usize = 64;
/// Deliveries in flight to one endpoint at most.
pub const PER_ENDPOINT: i64 = 8;
/// How much of an answer is read (for the error record); the rest is never read.
pub const ANSWER_PREFIX: usize = 2048;
/// Failures in a row that open an endpoint's circuit breaker.
pub const BREAKER_FAILURES: i32 = 5;

/// Posts deliveries.
#[derive(Clone)]
pub struct Sender {
    client: Client<HttpsConnector<HttpConnector<GuardedResolver>>, Full<Bytes>>,
    timeout: Duration,
    retry_for: Duration,
    destinations: Destinations,
    /// The slots deliveries in flight hold ([`CONCURRENT`]).
    slots: Arc<Semaphore>,
    /// Deliveries in flight from this process, per endpoint ([`PER_ENDPOINT`]).
    in_flight: Arc<Mutex<HashMap<i64, i64>>>,
}

impl Sender {
    pub fn new(config: &AlertsConfig) -> Sender {
        Sender::with_resolver(config, None)
    }

    /// A sender that resolves names with `resolve` instead of the system's resolver (tests:
    /// a name that resolves to a private address at delivery time).
    pub fn with_resolver(config: &AlertsConfig, resolve: Option<Resolve>) -> Sender {
        let destinations = config.destinations();
        let mut http = HttpConnector::new_with_resolver(GuardedResolver {
            destinations,
            resolve,
        });
        http.enforce_http(false);
        http.set_connect_timeout(Some(config.delivery_timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Sender {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .build(connector),
            timeout: config.delivery_timeout,
            retry_for: config.retry_for,
            destinations,
            slots: Arc::new(Semaphore::new(CONCURRENT)),
            in_flight: Arc::default(),
        }
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<i64, i64>> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Slots free for more deliveries now.
    pub fn free_slots(&self) -> usize {
        self.slots.available_permits()
    }

    /// The slots deliveries in flight hold.
    pub(crate) fn slots(&self) -> &Arc<Semaphore> {
        &self.slots
    }
}

/// What one round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Round {
    pub delivered: usize,
    pub retrying: usize,
    pub failed: usize,
    /// Whether more were due than one round sends.
    pub more: bool,
}

/// A claimed delivery: what to send where, signed with which secrets.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    delivery_id: i64,
    endpoint_id: i64,
    attempts: i32,
    created_at: DateTime<Utc>,
    url: String,
    secret: String,
    /// The secret a rotation replaced, while it still signs.
    previous_secret: Option<String>,
    payload: serde_json::Value,
    fired_at: DateTime<Utc>,
}

/// The outcome of one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    Retrying,
    Failed,
}

/// Claims up to `most` due deliveries (leased for the time limit): oldest first, at most
/// [`PER_ENDPOINT`] in flight per endpoint (counting this process's), one per endpoint whose
/// breaker tripped, none for an endpoint whose breaker is open or that was deleted. Each counts
/// as in flight until [`deliver`] is done with it.
pub async fn claim(
    pool: &PgPool,
    sender: &Sender,
    most: usize,
) -> Result<Vec<Claimed>, sqlx::Error> {
    let lease = sender.timeout + Duration::from_secs(5);
    let (busy_endpoints, busy): (Vec<i64>, Vec<i64>) = sender
        .in_flight()
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(e, n)| (*e, *n))
        .unzip();
    let claimed: Vec<Claimed> = sqlx::query_as(
        "WITH candidates AS (
             SELECT delivery_id, next_attempt_at FROM (
                 SELECT d.delivery_id, d.endpoint_id, d.next_attempt_at, e.consecutive_failures,
                        row_number() OVER (PARTITION BY d.endpoint_id
                                           ORDER BY d.next_attempt_at, d.delivery_id) AS n
                 FROM alert_deliveries d JOIN alert_endpoints e USING (endpoint_id)
                 WHERE d.status = 'pending' AND d.next_attempt_at <= now()
                   AND e.deleted_at IS NULL AND (e.open_until IS NULL OR e.open_until <= now())
             ) ranked
             LEFT JOIN unnest($5::bigint[], $6::bigint[]) AS busy(endpoint_id, n)
                 USING (endpoint_id)
             WHERE ranked.n + coalesce(busy.n, 0)
                   <= CASE WHEN consecutive_failures >= $3 THEN 1 ELSE $4 END
             ORDER BY next_attempt_at LIMIT $1
         ), locked AS (
             SELECT delivery_id FROM alert_deliveries
             -- Checked again on the row as locked (another sender may have claimed it since
             -- the candidates were read: its claim moved next_attempt_at ahead).
             WHERE delivery_id IN (SELECT delivery_id FROM candidates) AND status = 'pending'
               AND next_attempt_at <= now()
             FOR UPDATE SKIP LOCKED
         )
         UPDATE alert_deliveries d
         SET attempts = d.attempts + 1, next_attempt_at = now() + make_interval(secs => $2)
         FROM locked, alert_firings f, alert_endpoints e
         WHERE d.delivery_id = locked.delivery_id AND f.firing_id = d.firing_id
           AND e.endpoint_id = d.endpoint_id
         RETURNING d.delivery_id, d.endpoint_id, d.attempts, d.created_at, e.url, e.secret,
                   CASE WHEN e.previous_secret_expires_at > now() THEN e.previous_secret END
                       AS previous_secret,
                   f.payload, f.fired_at",
    )
    .bind(i64::try_from(most).unwrap_or(i64::MAX))
    .bind(lease.as_secs_f64())
    .bind(BREAKER_FAILURES)
    .bind(PER_ENDPOINT)
    .bind(&busy_endpoints)
    .bind(&busy)
    .fetch_all(pool)
    .await?;
    let mut in_flight = sender.in_flight();
    for delivery in &claimed {
        *in_flight.entry(delivery.endpoint_id).or_default() += 1;
    }
    Ok(claimed)
}

/// Sends the deliveries that are due, up to a round's worth, and waits for all of them (for
/// `--once` and tests; the daemon sends each as a slot frees, `run.rs`).
pub async fn deliver_due(pool: &PgPool, sender: &Sender) -> Result<Round, sqlx::Error> {
    let claimed = claim(pool, sender, CONCURRENT).await?;
    let mut round = Round {
        more: claimed.len() >= CONCURRENT,
        ..Round::default()
    };
    let outcomes =
        futures_util::future::join_all(claimed.into_iter().map(|c| deliver(pool, sender, c))).await;
    for outcome in outcomes {
        match outcome? {
            Outcome::Delivered => round.delivered += 1,
            Outcome::Retrying => round.retrying += 1,
            Outcome::Failed => round.failed += 1,
        }
    }
    Ok(round)
}

/// Sends one claimed delivery and records its outcome (and its endpoint's breaker).
pub async fn deliver(
    pool: &PgPool,
    sender: &Sender,
    claimed: Claimed,
) -> Result<Outcome, sqlx::Error> {
    let _done = Landed {
        sender,
        endpoint_id: claimed.endpoint_id,
    };
    let answer = send(sender, &claimed).await;
    record(pool, sender, &claimed, answer).await
}

/// A delivery no longer in flight (however it ended, cancelled too).
struct Landed<'a> {
    sender: &'a Sender,
    endpoint_id: i64,
}

impl Drop for Landed<'_> {
    fn drop(&mut self) {
        let mut in_flight = self.sender.in_flight();
        if let Some(n) = in_flight.get_mut(&self.endpoint_id) {
            *n -= 1;
            if *n <= 0 {
                in_flight.remove(&self.endpoint_id);
            }
        }
    }
}

async fn record(
    pool: &PgPool,
    sender: &Sender,
    claimed: &Claimed,
    answer: Result<u16, (Option<u16>, String)>,
) -> Result<Outcome, sqlx::Error> {
    let now = Utc::now();
    let mut tx = pool.begin().await?;
    let outcome = match answer {
        Ok(status) => {
            // Locks in one order everywhere: the endpoint's row, then its deliveries'.
            sqlx::query(
                "UPDATE alert_endpoints SET consecutive_failures = 0, open_until = NULL
                 WHERE endpoint_id = $1",
            )
            .bind(claimed.endpoint_id)
            .execute(&mut *tx)
            .await?;
            // `status = 'pending'`: a delivery failed meanwhile (its endpoint deleted) stays so.
            sqlx::query(
                "UPDATE alert_deliveries SET status = 'delivered', delivered_at = now(),
                        last_status = $2, last_error = NULL
                 WHERE delivery_id = $1 AND status = 'pending'",
            )
            .bind(claimed.delivery_id)
            .bind(i32::from(status))
            .execute(&mut *tx)
            .await?;
            telemetry::delivered((now - claimed.fired_at).to_std().unwrap_or_default());
            Outcome::Delivered
        }
        Err((status, error)) => {
            let give_up =
                (now - claimed.created_at).to_std().unwrap_or_default() >= sender.retry_for;
            let wait = jittered(backoff(claimed.attempts));
            // The breaker first (locks in one order everywhere: the endpoint's row, then its
            // deliveries'): open for 30 s at BREAKER_FAILURES in a row, doubling up to an hour;
            // the endpoint's pending deliveries wait for it to close.
            let opened: Option<DateTime<Utc>> = sqlx::query_scalar(
                "UPDATE alert_endpoints
                 SET consecutive_failures = consecutive_failures + 1,
                     open_until = CASE WHEN consecutive_failures + 1 >= $2
                         THEN now() + make_interval(secs => least(3600, 30 * power(2, least(consecutive_failures + 1 - $2, 7))))
                         ELSE open_until END
                 WHERE endpoint_id = $1
                 RETURNING open_until",
            )
            .bind(claimed.endpoint_id)
            .bind(BREAKER_FAILURES)
            .fetch_optional(&mut *tx)
            .await?
            .flatten();
            sqlx::query(
                "UPDATE alert_deliveries
                 SET status = CASE WHEN $2 THEN 'failed' ELSE 'pending' END,
                     next_attempt_at = now() + make_interval(secs => $3),
                     last_status = $4, last_error = $5
                 WHERE delivery_id = $1 AND status = 'pending'",
            )
            .bind(claimed.delivery_id)
            .bind(give_up)
            .bind(wait.as_secs_f64())
            .bind(status.map(i32::from))
            .bind(&error)
            .execute(&mut *tx)
            .await?;
            if let Some(until) = opened.filter(|until| *until > now) {
                sqlx::query(
                    "UPDATE alert_deliveries SET next_attempt_at = $2
                     WHERE endpoint_id = $1 AND status = 'pending' AND next_attempt_at < $2",
                )
                .bind(claimed.endpoint_id)
                .bind(until)
                .execute(&mut *tx)
                .await?;
            }
            if give_up {
                tracing::warn!(delivery_id = claimed.delivery_id, attempts = claimed.attempts, %error, "an alert delivery was given up after retrying for alerts.retry_for");
            }
            telemetry::not_delivered(give_up);
            if give_up {
                Outcome::Failed
            } else {
                Outcome::Retrying
            }
        }
    };
    tx.commit().await?;
    Ok(outcome)
}

/// How long after attempt `attempts` (1 = the first) the next one is made, before jitter.
fn backoff(attempts: i32) -> Duration {
    const STEPS: [u64; 6] = [1, 5, 30, 120, 600, 1800];
    let seconds = usize::try_from(attempts - 1)
        .ok()
        .and_then(|i| STEPS.get(i).copied())
        .unwrap_or(3600);
    Duration::from_secs(seconds)
}

/// `wait` ±20 %.
fn jittered(wait: Duration) -> Duration {
    wait.mul_f64(rand::rng().random_range(0.8..1.2))
}

/// One POST: `Ok(status)` for a 2xx, else the status (if any) and what went wrong.
async fn send(sender: &Sender, claimed: &Claimed) -> Result<u16, (Option<u16>, String)> {
    // Again at every delivery: the policy may have changed since the endpoint was registered.
    // (Names are checked after resolution, by the connector.)
    sender
        .destinations
        .check_url(&claimed.url)
        .map_err(|refused| (None, format!("not sent: {refused}")))?;
    let body = serde_json::to_vec(&claimed.payload).map_err(|e| (None, e.to_string()))?;
    let now = Utc::now().timestamp();
    let mut signatures = signature::sign(&claimed.secret, now, &body);
    if let Some(previous) = &claimed.previous_secret {
        signatures = signature::add_v1(&signatures, previous, now, &body);
    }
    let event_id = claimed.payload["id"].as_str().unwrap_or_default();
    let request = http::Request::post(&claimed.url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, "tally-alerts/1")
        .header(signature::HEADER, signatures)
        .header("tally-event-id", event_id)
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| (None, format!("the request could not be built: {e}")))?;
    let answer = tokio::time::timeout(sender.timeout, async {
        let response = sender.client.request(request).await?;
        let status = response.status().as_u16();
        let prefix = read_prefix(response.into_body(), ANSWER_PREFIX).await;
        Ok::<(u16, String), hyper_util::client::legacy::Error>((status, prefix))
    })
    .await;
    match answer {
        Ok(Ok((status, _))) if (200..300).contains(&status) => Ok(status),
        Ok(Ok((status, prefix))) if prefix.is_empty() => {
            Err((Some(status), format!("the endpoint answered {status}")))
        }
        Ok(Ok((status, prefix))) => Err((
            Some(status),
            format!("the endpoint answered {status}: {prefix}"),
        )),
        Ok(Err(error)) => Err((None, format!("the request failed: {}", error_chain(&error)))),
        Err(_) => Err((
            None,
            format!("no answer within {} s", sender.timeout.as_secs_f64()),
        )),
    }
}

/// The first `most` bytes of an answer's body, made printable; the rest is not read (the
/// connection is dropped with it).
async fn read_prefix(mut body: hyper::body::Incoming, most: usize) -> String {
    let mut prefix: Vec<u8> = Vec::new();
    while prefix.len() < most {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    let take = data.len().min(most - prefix.len());
                    prefix.extend_from_slice(&data[..take]);
                }
            }
            _ => break,
        }
    }
    String::from_utf8_lossy(&prefix)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

/// An error with its causes ("connection refused" is in the source, not the top).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_hourly_with_jitter() {
        let waits: Vec<u64> = (1..=9).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(waits, [1, 5, 30, 120, 600, 1800, 3600, 3600, 3600]);
        assert_eq!(backoff(0).as_secs(), 3600);
        for _ in 0..100 {
            let wait = jittered(Duration::from_secs(100));
            assert!(wait >= Duration::from_secs(80) && wait <= Duration::from_secs(120));
        }
    }
}
