//! The sender: posts each pending delivery to its endpoint, signed (`signature.rs`), and
//! records the outcome. A delivery is claimed with a lease (its next attempt pushed past the
//! request's time limit) rather than held in a transaction while the request runs, so a
//! sender that dies mid-request leaves it to be tried again when the lease ends. Not accepted
//! (no 2xx, or no answer): tried again after 1 s, 5 s, 30 s, 2 min, 10 min, 30 min, then hourly,
//! until `retry_for` after the first attempt; then `failed`. Receivers dedupe on the event id:
//! a retry of a delivery the receiver took but did not answer in time comes again.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sqlx::PgPool;

use crate::config::AlertsConfig;
use crate::signature;
use crate::telemetry;

/// Deliveries one round sends at most (concurrently).
const BATCH: i64 = 64;

/// Posts deliveries.
#[derive(Clone)]
pub struct Sender {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
    retry_for: Duration,
}

impl Sender {
    pub fn new(config: &AlertsConfig) -> Sender {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        Sender {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .build(connector),
            timeout: config.delivery_timeout,
            retry_for: config.retry_for,
        }
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

type Claimed = (
    i64,
    i32,
    DateTime<Utc>,
    String,
    String,
    serde_json::Value,
    DateTime<Utc>,
);

/// Sends the deliveries that are due, up to a round's worth.
pub async fn deliver_due(pool: &PgPool, sender: &Sender) -> Result<Round, sqlx::Error> {
    let lease = sender.timeout + Duration::from_secs(5);
    let claimed: Vec<Claimed> = sqlx::query_as(
        "UPDATE alert_deliveries d
         SET attempts = d.attempts + 1, next_attempt_at = now() + make_interval(secs => $2)
         FROM (SELECT delivery_id FROM alert_deliveries
               WHERE status = 'pending' AND next_attempt_at <= now()
               ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED) due,
              alert_firings f, alert_endpoints e
         WHERE d.delivery_id = due.delivery_id AND f.firing_id = d.firing_id
           AND e.endpoint_id = d.endpoint_id
         RETURNING d.delivery_id, d.attempts, d.created_at, e.url, e.secret, f.payload, f.fired_at",
    )
    .bind(BATCH)
    .bind(lease.as_secs_f64())
    .fetch_all(pool)
    .await?;
    let mut round = Round {
        more: claimed.len() as i64 >= BATCH,
        ..Round::default()
    };
    let sends = claimed
        .iter()
        .map(|(_, _, _, url, secret, payload, _)| send(sender, url, secret, payload));
    let outcomes = futures_util::future::join_all(sends).await;
    for ((delivery_id, attempts, created_at, _, _, _, fired_at), outcome) in
        claimed.iter().zip(outcomes)
    {
        let now = Utc::now();
        match outcome {
            Ok(status) => {
                sqlx::query(
                    "UPDATE alert_deliveries SET status = 'delivered', delivered_at = now(),
                            last_status = $2, last_error = NULL
                     WHERE delivery_id = $1",
                )
                .bind(delivery_id)
                .bind(i32::from(status))
                .execute(pool)
                .await?;
                round.delivered += 1;
                telemetry::delivered((now - *fired_at).to_std().unwrap_or_default());
            }
            Err((status, error)) => {
                let give_up = (now - *created_at).to_std().unwrap_or_default() >= sender.retry_for;
                let wait = backoff(*attempts);
                sqlx::query(
                    "UPDATE alert_deliveries
                     SET status = CASE WHEN $2 THEN 'failed' ELSE 'pending' END,
                         next_attempt_at = now() + make_interval(secs => $3),
                         last_status = $4, last_error = $5
                     WHERE delivery_id = $1",
                )
                .bind(delivery_id)
                .bind(give_up)
                .bind(wait.as_secs_f64())
                .bind(status.map(i32::from))
                .bind(&error)
                .execute(pool)
                .await?;
                if give_up {
                    round.failed += 1;
                    tracing::warn!(delivery_id, attempts, %error, "an alert delivery was given up after retrying for alerts.retry_for");
                } else {
                    round.retrying += 1;
                }
                telemetry::not_delivered(give_up);
            }
        }
    }
    Ok(round)
}

/// How long after attempt `attempts` (1 = the first) the next one is made.
fn backoff(attempts: i32) -> Duration {
    const STEPS: [u64; 6] = [1, 5, 30, 120, 600, 1800];
    let seconds = usize::try_from(attempts - 1)
        .ok()
        .and_then(|i| STEPS.get(i).copied())
        .unwrap_or(3600);
    Duration::from_secs(seconds)
}

/// One POST: `Ok(status)` for a 2xx, else the status (if any) and what went wrong.
async fn send(
    sender: &Sender,
    url: &str,
    secret: &str,
    payload: &serde_json::Value,
) -> Result<u16, (Option<u16>, String)> {
    let body = serde_json::to_vec(payload).map_err(|e| (None, e.to_string()))?;
    let signature = signature::sign(secret, Utc::now().timestamp(), &body);
    let event_id = payload["id"].as_str().unwrap_or_default();
    let request = http::Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, "tally-alerts/1")
        .header(signature::HEADER, signature)
        .header("tally-event-id", event_id)
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| (None, format!("the request could not be built: {e}")))?;
    let answer = tokio::time::timeout(sender.timeout, async {
        let response = sender.client.request(request).await?;
        let status = response.status().as_u16();
        // Read (and drop) the answer, so the connection can be reused.
        let _ = response.into_body().collect().await;
        Ok::<u16, hyper_util::client::legacy::Error>(status)
    })
    .await;
    match answer {
        Ok(Ok(status)) if (200..300).contains(&status) => Ok(status),
        Ok(Ok(status)) => Err((Some(status), format!("the endpoint answered {status}"))),
        Ok(Err(error)) => Err((None, format!("the request failed: {error}"))),
        Err(_) => Err((None, format!("no answer within {:?}", sender.timeout))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_hourly() {
        let waits: Vec<u64> = (1..=9).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(waits, [1, 5, 30, 120, 600, 1800, 3600, 3600, 3600]);
        assert_eq!(backoff(0).as_secs(), 3600);
    }
}
