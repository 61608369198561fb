//! The send pipeline: leased rows go to Stripe in requests, one row a call on v1, up to 100
//! rows of different pairs a request on the v2 stream, under the account's rate. Each request
//! is retried with capped, jittered backoff, and its answer becomes an [`Outcome`] for every
//! row it carried.
//!
//! A pair's rows go one request at a time, in submission order: a later revision must not
//! overtake an earlier one (a `last` meter's value is the one Stripe received last), so a
//! pair's next row waits until the request carrying the one before is answered, and once a
//! row is not sent the rest of its pair waits for a later pass. A cancel goes alone, and on the
//! v2 stream (which processes events after it answers) only once the event it cancels was sent
//! a minute ago.
//!
//! What an answer is about decides whom it marks: a refusal of the caller (the key, the
//! address, the session) marks no row and is retried later; a refusal of a request of many
//! rows is not blamed on all of them: each is sent again alone, to find the one at fault.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use rand::Rng;
use serde_json::{json, Value};
use stripe_billing::billing_meter_event::CreateBillingMeterEvent;
use stripe_billing::billing_meter_event_adjustment::{
    CreateBillingMeterEventAdjustment, CreateBillingMeterEventAdjustmentCancel,
};
use stripe_billing::BillingMeterEventAdjustmentType;
use tally_runtime::Dependency;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::SinkConfig;
use crate::limiter::RateLimiter;
use crate::owed::event_timestamp;
use crate::store::{Leased, Outcome, RowOutcome};
use crate::stream::{stream_event, MeterEventStream, MAX_EVENTS_PER_REQUEST};
use crate::stripe::{StripeCallError, StripeHttp};
use crate::telemetry as t;

/// Rows whose earlier attempt may have reached Stripe this long ago are not resent blindly:
/// Stripe recognises an identifier for about 24 hours, and this keeps an hour's margin.
const IDENTIFIER_MEMORY: TimeDelta = TimeDelta::hours(23);

/// On the v2 stream, a cancel waits this long after the event it withdraws was sent: Stripe
/// answers a stream request before it processes the events, and a cancel that arrives first
/// finds no event to cancel.
const CANCEL_AFTER_STREAMED: TimeDelta = TimeDelta::minutes(1);

/// A pair whose request panicked is not leased again for this long: the pass quarantines it
/// when it ends.
const AFTER_PANIC: TimeDelta = TimeDelta::minutes(5);

/// What every request needs.
pub(crate) struct SendContext {
    pub(crate) stripe: StripeHttp,
    /// The v2 stream, when the sink bills through it; `None`: v1, one event a call.
    pub(crate) stream: Option<Arc<MeterEventStream>>,
    /// Rows one request carries: 1 on v1; on the v2 stream up to 100, fewer when the events'
    /// rate is so low that a request of 100 would break it (a twentieth of a second's worth).
    pub(crate) rows_per_request: usize,
    /// The account's calls per second (v1 events and cancels, v2 sessions and cancels).
    pub(crate) limiter: Arc<RateLimiter>,
    /// The v2 stream's events per second.
    pub(crate) event_limiter: Arc<RateLimiter>,
    pub(crate) config: SinkConfig,
    pub(crate) stop: CancellationToken,
    pub(crate) dependency: &'static Dependency,
}

/// Rows a v2 stream request carries at `events_per_second`.
pub(crate) fn stream_rows_per_request(events_per_second: u32) -> usize {
    (events_per_second as usize / 20).clamp(1, MAX_EVENTS_PER_REQUEST)
}

/// What some rows came to (a request's, or rows released without one).
#[derive(Default)]
pub(crate) struct GroupResult {
    pub(crate) outcomes: Vec<RowOutcome>,
    pub(crate) retried: u64,
    pub(crate) rate_limited: u64,
}

/// One customer+meter pair's rows not yet sent, in submission order.
struct Pair {
    rows: VecDeque<Leased>,
    /// Send its next row in a request of its own: a request it was part of panicked, and
    /// alone it shows whether it is the cause.
    alone: bool,
}

/// A pair set aside because sending its row panicked: quarantined by the pass.
pub(crate) struct Panicked {
    pub(crate) customer_id: String,
    pub(crate) meter: String,
    pub(crate) detail: String,
}

/// Sends the pairs that arrive on `groups` until it closes (or `stop`), `concurrency`
/// requests at a time, and reports every row's outcome on `results`. Returns the pairs whose
/// request panicked on its own.
pub(crate) async fn dispatch(
    mut groups: mpsc::Receiver<Vec<Leased>>,
    results: mpsc::Sender<GroupResult>,
    context: Arc<SendContext>,
) -> Vec<Panicked> {
    let per_request = context.rows_per_request;
    let v2 = context.stream.is_some();
    let waiting_room = per_request * context.config.concurrency * 2;
    let mut ready: VecDeque<Pair> = VecDeque::new();
    let mut requests: JoinSet<RequestDone> = JoinSet::new();
    let mut in_flight: HashMap<tokio::task::Id, Vec<Pair>> = HashMap::new();
    let mut panicked = Vec::new();
    let mut open = true;
    loop {
        if context.stop.is_cancelled() {
            let released = ready.drain(..).flat_map(|pair| pair.rows);
            report(&results, released_outcomes(released), 0, 0).await;
        }
        while requests.len() < context.config.concurrency && !context.stop.is_cancelled() {
            let (batch, reviews) = next_batch(&mut ready, per_request, v2, Utc::now());
            if !reviews.is_empty() {
                report(&results, reviews, 0, 0).await;
            }
            if batch.is_empty() {
                break;
            }
            let rows: Vec<Leased> = batch.iter().map(|pair| pair.rows[0].clone()).collect();
            let task = requests.spawn(send_request(rows, context.clone()));
            in_flight.insert(task.id(), batch);
        }
        if !open && requests.is_empty() && ready.is_empty() {
            return panicked;
        }
        tokio::select! {
            group = groups.recv(), if open && ready.len() < waiting_room => match group {
                Some(rows) => {
                    ready.push_back(Pair { rows: rows.into(), alone: false });
                    // Take what else has arrived, so the first requests go out full.
                    while ready.len() < waiting_room {
                        match groups.try_recv() {
                            Ok(rows) => ready.push_back(Pair { rows: rows.into(), alone: false }),
                            Err(_) => break,
                        }
                    }
                }
                None => open = false,
            },
            Some(joined) = requests.join_next_with_id(), if !requests.is_empty() => {
                let (id, done) = match joined {
                    Ok((id, done)) => (id, Ok(done)),
                    Err(error) => (error.id(), Err(error)),
                };
                let batch = in_flight.remove(&id).unwrap_or_default();
                match done {
                    Ok(done) if done.refused_together => {
                        tracing::warn!(pairs = batch.len(), outcome = ?done.outcome, "Stripe refused a request of several rows; sending each alone to find the one at fault");
                        ready.extend(batch.into_iter().map(|pair| Pair { alone: true, ..pair }));
                    }
                    Ok(done) => answered(batch, done, &mut ready, &results).await,
                    Err(error) => {
                        after_panic(batch, &error.to_string(), &mut ready, &mut panicked, &results)
                            .await
                    }
                }
            }
            _ = context.stop.cancelled(), if !ready.is_empty() => {}
            else => {
                let released = ready.drain(..).flat_map(|pair| pair.rows);
                report(&results, released_outcomes(released), 0, 0).await;
                return panicked;
            }
        }
    }
}

/// The next request's pairs, at most `per_request`, each pair's next row not yet answered for;
/// a cancel, or a pair that must go alone, is a request of its own. Rows too old to resend are
/// parked for review, and (v2) a cancel of an event streamed less than a minute ago waits; the
/// rest of such a pair is released.
fn next_batch(
    ready: &mut VecDeque<Pair>,
    per_request: usize,
    v2: bool,
    now: chrono::DateTime<Utc>,
) -> (Vec<Pair>, Vec<RowOutcome>) {
    let mut batch: Vec<Pair> = Vec::new();
    let mut reviews = Vec::new();
    while batch.len() < per_request {
        let Some(pair) = ready.pop_front() else { break };
        let head = &pair.rows[0];
        let held = match too_late_to_resend(head) {
            Some(error) => Some(Outcome::NeedsReview { error }),
            None => match head.cancels_sent_at {
                Some(sent) if v2 && head.cancels.is_some() && now < sent + CANCEL_AFTER_STREAMED => {
                    Some(Outcome::Retry {
                        error: "waits until Stripe has processed the event it cancels (a minute after it was streamed)".into(),
                        retry_at: sent + CANCEL_AFTER_STREAMED,
                        uncertain_at: None,
                    })
                }
                _ => None,
            },
        };
        if let Some(outcome) = held {
            let mut rows = pair.rows.into_iter();
            let head = rows.next().expect("a pair has rows");
            reviews.push(RowOutcome {
                submission_id: head.submission_id,
                attempts: 0,
                outcome,
            });
            reviews.extend(released_outcomes(rows));
            continue;
        }
        let goes_alone = pair.alone || head.cancels.is_some();
        if goes_alone && !batch.is_empty() {
            ready.push_front(pair);
            break;
        }
        batch.push(pair);
        if goes_alone {
            break;
        }
    }
    (batch, reviews)
}

/// A request answered: each pair's head row takes the request's outcome; a pair whose head was
/// sent queues its next row, the others release the rest of their rows.
async fn answered(
    batch: Vec<Pair>,
    done: RequestDone,
    ready: &mut VecDeque<Pair>,
    results: &mpsc::Sender<GroupResult>,
) {
    let mut outcomes = Vec::new();
    for mut pair in batch {
        let head = pair.rows.pop_front().expect("a pair has rows");
        outcomes.push(RowOutcome {
            submission_id: head.submission_id,
            attempts: done.attempts,
            outcome: done.outcome.clone(),
        });
        if pair.rows.is_empty() {
            continue;
        }
        if done.outcome == Outcome::Sent {
            ready.push_back(pair);
        } else {
            outcomes.extend(released_outcomes(pair.rows));
        }
    }
    report(results, outcomes, done.retried, done.rate_limited).await;
}

/// A request that panicked. Alone, its pair is set aside (quarantined by the pass), its rows
/// released as possibly sent (see [`IDENTIFIER_MEMORY`]); with others, each of its pairs is
/// sent again in a request of its own, with the same identifiers, to find the one at fault.
async fn after_panic(
    batch: Vec<Pair>,
    error: &str,
    ready: &mut VecDeque<Pair>,
    panicked: &mut Vec<Panicked>,
    results: &mpsc::Sender<GroupResult>,
) {
    if batch.len() > 1 {
        tracing::error!(
            pairs = batch.len(),
            error,
            "a send request panicked; sending each of its pairs alone to find the one at fault"
        );
        ready.extend(batch.into_iter().map(|pair| Pair {
            alone: true,
            ..pair
        }));
        return;
    }
    let detail = format!("sending its submissions failed: {error}");
    let now = Utc::now();
    let retry_at = now + AFTER_PANIC;
    let mut outcomes = Vec::new();
    for pair in batch {
        let head = &pair.rows[0];
        panicked.push(Panicked {
            customer_id: head.customer_id.clone(),
            meter: head.meter.clone(),
            detail: detail.clone(),
        });
        // Its row may have reached Stripe before the panic: from now on it counts as
        // attempted with an unknown outcome.
        outcomes.extend(pair.rows.iter().map(|row| RowOutcome {
            submission_id: row.submission_id,
            attempts: 0,
            outcome: Outcome::Retry {
                error: detail.clone(),
                retry_at,
                uncertain_at: Some(now),
            },
        }));
    }
    report(results, outcomes, 0, 0).await;
}

fn released_outcomes(rows: impl IntoIterator<Item = Leased>) -> Vec<RowOutcome> {
    rows.into_iter()
        .map(|row| RowOutcome {
            submission_id: row.submission_id,
            attempts: 0,
            outcome: Outcome::Released,
        })
        .collect()
}

async fn report(
    results: &mpsc::Sender<GroupResult>,
    outcomes: Vec<RowOutcome>,
    retried: u64,
    rate_limited: u64,
) {
    if outcomes.is_empty() && retried == 0 && rate_limited == 0 {
        return;
    }
    let _ = results
        .send(GroupResult {
            outcomes,
            retried,
            rate_limited,
        })
        .await;
}

/// An earlier attempt at `row` may have reached Stripe more than 23 hours ago: sending it again
/// could bill twice, so an operator decides.
fn too_late_to_resend(row: &Leased) -> Option<String> {
    let since = row.first_uncertain_at?;
    if Utc::now() - since <= IDENTIFIER_MEMORY {
        return None;
    }
    metrics::counter!(t::SUBMISSIONS_NEEDS_REVIEW).increment(1);
    let error = format!(
        "an attempt at {since} may have reached Stripe, and Stripe recognises an identifier for only about 24 hours, so sending it again could bill twice; check Stripe for identifier {:?}, then `tally submissions resolve {} --sent` or `--resend`",
        row.identifier, row.identifier
    );
    tracing::error!(
        identifier = row.identifier,
        customer = row.customer_id,
        meter = row.meter,
        "{error}"
    );
    Some(error)
}

/// What one request came to, for every row it carried.
struct RequestDone {
    attempts: u32,
    outcome: Outcome,
    retried: u64,
    rate_limited: u64,
    /// Stripe refused the request as a whole, and it carried several rows: none is marked;
    /// each is sent again alone.
    refused_together: bool,
}

/// Sends one request (one v1 call, or up to 100 rows on the v2 stream), retrying within the
/// pass with the same identifiers.
async fn send_request(rows: Vec<Leased>, context: Arc<SendContext>) -> RequestDone {
    let call = Call::of(&rows, context.stream.is_some());
    let config = &context.config;
    let first = &rows[0];
    let mut done = RequestDone {
        attempts: 0,
        outcome: Outcome::Released,
        retried: 0,
        rate_limited: 0,
        refused_together: false,
    };
    let mut uncertain_at = None;
    loop {
        done.attempts += 1;
        let started = Instant::now();
        let sent_at = Utc::now();
        let answer = call.send(&context).await;
        metrics::histogram!(t::STRIPE_REQUEST_SECONDS).record(started.elapsed().as_secs_f64());
        let error = match answer {
            // Stripe holds an event with this identifier (or has canceled the event), and only
            // this row does that: an earlier attempt (whose answer was lost) or another sink
            // process sent it. (v1 only: the v2 stream drops a repeat and answers 200.)
            Err(error) if !(error.is_duplicate_identifier() || error.is_already_canceled()) => {
                error
            }
            _ => {
                context.dependency.up();
                metrics::counter!(t::SUBMISSIONS_SENT).increment(rows.len() as u64);
                done.outcome = Outcome::Sent;
                return done;
            }
        };
        if error.may_have_reached_stripe() {
            uncertain_at.get_or_insert(sent_at);
        }
        if error.is_rate_limit() {
            done.rate_limited += 1;
            metrics::counter!(t::STRIPE_RATE_LIMITED).increment(1);
        }
        let earlier = rows.iter().map(|row| row.attempts).min().unwrap_or(0);
        let total_attempts = earlier.max(0) as u32 + done.attempts;
        if error.refuses_the_caller() {
            // The key, the address or the session, not the rows: wait, say so, mark nothing.
            context.dependency.down(&error);
            done.retried += 1;
            metrics::counter!(t::SUBMISSIONS_RETRIED, "reason" => error.reason()).increment(1);
            let wait = backoff(config, total_attempts.max(config.attempts_per_pass));
            done.outcome = Outcome::Retry {
                error: error.to_string(),
                retry_at: Utc::now() + TimeDelta::from_std(wait).unwrap_or(TimeDelta::MAX),
                uncertain_at,
            };
            return done;
        }
        if !error.is_retryable() && rows.len() > 1 {
            done.refused_together = true;
            done.outcome = Outcome::Failed {
                error: error.to_string(),
            };
            return done;
        }
        if !error.is_retryable() {
            context.dependency.up();
            metrics::counter!(t::SUBMISSIONS_FAILED, "reason" => error.reason())
                .increment(rows.len() as u64);
            tracing::error!(identifier = first.identifier, customer = first.customer_id, meter = first.meter, rows = rows.len(), %error, "Stripe refused a submission; it is marked failed in stripe_submissions");
            done.outcome = Outcome::Failed {
                error: error.to_string(),
            };
            return done;
        }
        if error.status.is_none() || error.status.is_some_and(|s| s >= 500) {
            context.dependency.down(&error);
        }
        done.retried += 1;
        metrics::counter!(t::SUBMISSIONS_RETRIED, "reason" => error.reason()).increment(1);
        if done.attempts >= config.attempts_per_pass {
            let wait = backoff(config, total_attempts);
            tracing::debug!(identifier = first.identifier, %error, retry_in = ?wait, "Stripe call failed; will retry");
            let retry_at = Utc::now() + TimeDelta::from_std(wait).unwrap_or(TimeDelta::MAX);
            done.outcome = Outcome::Retry {
                error: error.to_string(),
                retry_at,
                uncertain_at,
            };
            return done;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff(config, done.attempts)) => {}
            _ = context.stop.cancelled() => {
                done.outcome = Outcome::Retry { error: error.to_string(), retry_at: Utc::now(), uncertain_at };
                return done;
            }
        }
    }
}

/// One request to Stripe.
enum Call {
    Event(CreateBillingMeterEvent),
    Cancel(CreateBillingMeterEventAdjustment),
    /// `{"events": [...]}` for the v2 stream, and how many.
    Stream(Value, u32),
    CancelV2 {
        event_name: String,
        identifier: String,
    },
}

impl Call {
    /// `rows` hold one row, or (v2) up to 100 event rows of different pairs.
    fn of(rows: &[Leased], v2: bool) -> Call {
        let row = &rows[0];
        if let Some(target) = &row.cancels {
            if v2 {
                return Call::CancelV2 {
                    event_name: row.event_name.clone(),
                    identifier: target.clone(),
                };
            }
            let cancel = CreateBillingMeterEventAdjustmentCancel {
                identifier: Some(target.clone()),
            };
            return Call::Cancel(
                CreateBillingMeterEventAdjustment::new(
                    row.event_name.as_str(),
                    BillingMeterEventAdjustmentType::Cancel,
                )
                .cancel(cancel),
            );
        }
        // Stripe takes timestamps 35 days back: a row that waited past that (an outage, a
        // backlog) is sent at the oldest time Stripe takes, as accounting would have written it
        // now, rather than refused (v1) or dropped after the answer (v2).
        let now = Utc::now();
        if v2 {
            let events: Vec<Value> = rows
                .iter()
                .map(|row| {
                    stream_event(
                        &row.event_name,
                        &row.identifier,
                        &row.stripe_customer_id,
                        &payload_value(row),
                        event_timestamp(row.event_timestamp, now),
                    )
                })
                .collect();
            return Call::Stream(json!({ "events": events }), rows.len() as u32);
        }
        let payload = HashMap::from([
            (
                "stripe_customer_id".to_owned(),
                row.stripe_customer_id.clone(),
            ),
            ("value".to_owned(), payload_value(row)),
        ]);
        Call::Event(
            CreateBillingMeterEvent::new(row.event_name.as_str(), payload)
                .identifier(row.identifier.as_str())
                .timestamp(event_timestamp(row.event_timestamp, now).timestamp()),
        )
    }

    /// One attempt, once the rate allows it.
    async fn send(&self, context: &SendContext) -> Result<(), StripeCallError> {
        let stream = context.stream.as_deref();
        match (self, stream) {
            (Call::Event(request), _) => {
                context.limiter.acquire().await;
                request.send(&context.stripe).await.map(drop)
            }
            (Call::Cancel(request), _) => {
                context.limiter.acquire().await;
                request.send(&context.stripe).await.map(drop)
            }
            (Call::Stream(body, count), Some(stream)) => {
                context.event_limiter.acquire_many(*count).await;
                stream.send(body).await
            }
            (
                Call::CancelV2 {
                    event_name,
                    identifier,
                },
                Some(stream),
            ) => stream.cancel(event_name, identifier).await,
            (Call::Stream(..) | Call::CancelV2 { .. }, None) => Err(StripeCallError::transport(
                "a v2 request without the v2 stream",
            )),
        }
    }
}

/// A row's value as Stripe's payload takes it: a whole number, as a string.
fn payload_value(row: &Leased) -> String {
    row.value.trunc().normalize().to_string()
}

/// Exponential backoff with jitter: a random delay between half and all of
/// `backoff_initial * 2^(attempt-1)`, capped at `backoff_max`.
fn backoff(config: &SinkConfig, attempt: u32) -> Duration {
    let exponent = attempt.saturating_sub(1).min(20);
    let ceiling = config
        .backoff_initial
        .saturating_mul(1 << exponent)
        .min(config.backoff_max);
    let fraction = rand::rng().random_range(0.5..=1.0);
    ceiling.mul_f64(fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_stops_at_the_cap() {
        let config = SinkConfig::default();
        for attempt in 1..30 {
            let wait = backoff(&config, attempt);
            let ceiling = config
                .backoff_initial
                .saturating_mul(1 << (attempt - 1).min(20))
                .min(config.backoff_max);
            assert!(
                wait <= ceiling && wait >= ceiling / 2,
                "attempt {attempt}: {wait:?}"
            );
        }
    }

    fn row(id: i64, customer: &str, cancels: Option<&str>) -> Leased {
        Leased {
            submission_id: id,
            identifier: format!("tally:m:{customer}:0:{id}"),
            customer_id: customer.into(),
            meter: "m".into(),
            stripe_customer_id: format!("cus_{customer}"),
            event_name: "m".into(),
            kind: "delta".into(),
            value: 1.into(),
            event_timestamp: Utc::now(),
            attempts: 0,
            cancels: cancels.map(str::to_owned),
            cancels_sent_at: None,
            first_uncertain_at: None,
        }
    }

    fn pair(rows: Vec<Leased>) -> Pair {
        Pair {
            rows: rows.into(),
            alone: false,
        }
    }

    #[test]
    fn a_batch_takes_one_row_a_pair_and_a_cancel_goes_alone() {
        let mut ready: VecDeque<Pair> = VecDeque::from([
            pair(vec![row(1, "a", None), row(2, "a", None)]),
            pair(vec![row(3, "b", None)]),
            pair(vec![row(4, "c", Some("x"))]),
            pair(vec![row(5, "d", None)]),
        ]);
        let now = Utc::now();
        let (batch, reviews) = next_batch(&mut ready, 100, true, now);
        assert!(reviews.is_empty());
        let heads: Vec<i64> = batch.iter().map(|p| p.rows[0].submission_id).collect();
        assert_eq!(
            heads,
            [1, 3],
            "one row of each pair; the cancel waits for a request of its own"
        );
        let (batch, _) = next_batch(&mut ready, 100, true, now);
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].rows[0].cancels.as_deref(), Some("x"));
        let (batch, _) = next_batch(&mut ready, 100, true, now);
        assert_eq!(batch[0].rows[0].submission_id, 5);
    }

    #[test]
    fn a_row_too_old_to_resend_is_parked_and_its_pair_waits() {
        let mut old = row(1, "a", None);
        old.first_uncertain_at = Some(Utc::now() - TimeDelta::hours(24));
        let mut ready = VecDeque::from([
            pair(vec![old, row(2, "a", None)]),
            pair(vec![row(3, "b", None)]),
        ]);
        let (batch, reviews) = next_batch(&mut ready, 100, true, Utc::now());
        assert_eq!(batch.len(), 1);
        assert!(matches!(reviews[0].outcome, Outcome::NeedsReview { .. }));
        assert_eq!(reviews[1].outcome, Outcome::Released);
        assert_eq!(reviews[1].submission_id, 2);
    }

    #[test]
    fn on_the_stream_a_cancel_waits_a_minute_after_its_event_was_sent() {
        let now = Utc::now();
        let mut cancel = row(1, "a", Some("tally:m:a:0:1"));
        cancel.cancels_sent_at = Some(now - TimeDelta::seconds(10));
        let mut ready = VecDeque::from([pair(vec![cancel.clone(), row(2, "a", None)])]);
        let (batch, held) = next_batch(&mut ready, 100, true, now);
        assert!(batch.is_empty());
        match &held[0].outcome {
            Outcome::Retry { retry_at, .. } => {
                assert_eq!(
                    *retry_at,
                    now - TimeDelta::seconds(10) + CANCEL_AFTER_STREAMED
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(held[1].outcome, Outcome::Released);
        // On v1 (answered once recorded), or a minute later, it goes.
        let mut ready = VecDeque::from([pair(vec![cancel.clone()])]);
        assert_eq!(next_batch(&mut ready, 1, false, now).0.len(), 1);
        let mut ready = VecDeque::from([pair(vec![cancel])]);
        let later = now + TimeDelta::seconds(51);
        assert_eq!(next_batch(&mut ready, 100, true, later).0.len(), 1);
    }

    #[test]
    fn a_slow_stream_sends_small_requests() {
        assert_eq!(stream_rows_per_request(9_500), 100);
        assert_eq!(stream_rows_per_request(1_000), 50);
        assert_eq!(stream_rows_per_request(50), 2);
        assert_eq!(stream_rows_per_request(1), 1);
    }
}
