//! The send pipeline: one customer+meter pair's leased rows sent to Stripe in order, one call
//! at a time under the account's rate; each call retried with capped, jittered backoff, and
//! its answer classified into an [`Outcome`] (sent, retry later, failed, needs review).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use rand::Rng;
use stripe_billing::billing_meter_event::CreateBillingMeterEvent;
use stripe_billing::billing_meter_event_adjustment::{
    CreateBillingMeterEventAdjustment, CreateBillingMeterEventAdjustmentCancel,
};
use stripe_billing::BillingMeterEventAdjustmentType;
use tally_runtime::Dependency;
use tokio_util::sync::CancellationToken;

use crate::config::SinkConfig;
use crate::limiter::RateLimiter;
use crate::store::{Leased, Outcome, RowOutcome};
use crate::stripe::{StripeCallError, StripeHttp};
use crate::telemetry as t;

/// Rows whose earlier attempt may have reached Stripe this long ago are not resent blindly:
/// Stripe recognises an identifier for about 24 hours, and this keeps an hour's margin.
const IDENTIFIER_MEMORY: TimeDelta = TimeDelta::hours(23);

/// What every send task needs.
pub(crate) struct SendContext {
    pub(crate) stripe: StripeHttp,
    pub(crate) limiter: Arc<RateLimiter>,
    pub(crate) config: SinkConfig,
    pub(crate) stop: CancellationToken,
    pub(crate) dependency: &'static Dependency,
}

/// What one customer+meter pair's rows came to.
#[derive(Default)]
pub(crate) struct GroupResult {
    pub(crate) outcomes: Vec<RowOutcome>,
    pub(crate) retried: u64,
    pub(crate) rate_limited: u64,
}

/// Sends one pair's rows in order, one call at a time. Once a row is not sent, the rest wait:
/// a later revision must not overtake an earlier one.
pub(crate) async fn send_group(rows: Vec<Leased>, context: Arc<SendContext>) -> GroupResult {
    send_rows(rows, &context).await
}

async fn send_rows(rows: Vec<Leased>, context: &SendContext) -> GroupResult {
    let mut result = GroupResult::default();
    let mut blocked = false;
    for row in rows {
        if blocked || context.stop.is_cancelled() {
            result.outcomes.push(RowOutcome {
                submission_id: row.submission_id,
                attempts: 0,
                outcome: Outcome::Released,
            });
            continue;
        }
        let (attempts, outcome) = send_one(&row, context, &mut result).await;
        blocked = outcome != Outcome::Sent;
        result.outcomes.push(RowOutcome {
            submission_id: row.submission_id,
            attempts,
            outcome,
        });
    }
    result
}

/// Sends one row, retrying within the pass; returns the attempts made and the outcome.
async fn send_one(row: &Leased, context: &SendContext, result: &mut GroupResult) -> (u32, Outcome) {
    if let Some(since) = row.first_uncertain_at {
        if Utc::now() - since > IDENTIFIER_MEMORY {
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
            return (0, Outcome::NeedsReview { error });
        }
    }
    let call = Call::of(row);
    let config = &context.config;
    let mut attempt: u32 = 0;
    let mut uncertain_at = None;
    loop {
        context.limiter.acquire().await;
        attempt += 1;
        let started = Instant::now();
        let sent_at = Utc::now();
        let answer = call.send(&context.stripe).await;
        metrics::histogram!(t::STRIPE_REQUEST_SECONDS).record(started.elapsed().as_secs_f64());
        let error = match answer {
            Ok(_) => {
                context.dependency.up();
                metrics::counter!(t::SUBMISSIONS_SENT).increment(1);
                return (attempt, Outcome::Sent);
            }
            // Stripe holds an event with this identifier (or has canceled the event), and only
            // this row does that: an earlier attempt (whose answer was lost) or another sink
            // process sent it.
            Err(error) if error.is_duplicate_identifier() || error.is_already_canceled() => {
                context.dependency.up();
                metrics::counter!(t::SUBMISSIONS_SENT).increment(1);
                return (attempt, Outcome::Sent);
            }
            Err(error) => error,
        };
        if error.may_have_reached_stripe() {
            uncertain_at.get_or_insert(sent_at);
        }
        if error.is_rate_limit() {
            result.rate_limited += 1;
            metrics::counter!(t::STRIPE_RATE_LIMITED).increment(1);
        }
        if !error.is_retryable() {
            context.dependency.up();
            metrics::counter!(t::SUBMISSIONS_FAILED, "reason" => error.reason()).increment(1);
            tracing::error!(identifier = row.identifier, customer = row.customer_id, meter = row.meter, %error, "Stripe refused a submission; it is marked failed in stripe_submissions");
            return (
                attempt,
                Outcome::Failed {
                    error: error.to_string(),
                },
            );
        }
        if error.status.is_none() || error.status.is_some_and(|s| s >= 500) {
            context.dependency.down(&error);
        }
        result.retried += 1;
        metrics::counter!(t::SUBMISSIONS_RETRIED, "reason" => error.reason()).increment(1);
        let total_attempts = row.attempts as u32 + attempt;
        if attempt >= config.attempts_per_pass {
            let wait = backoff(config, total_attempts);
            tracing::debug!(identifier = row.identifier, %error, retry_in = ?wait, "Stripe call failed; will retry");
            let retry_at = Utc::now() + TimeDelta::from_std(wait).unwrap_or(TimeDelta::MAX);
            return (
                attempt,
                Outcome::Retry {
                    error: error.to_string(),
                    retry_at,
                    uncertain_at,
                },
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff(config, attempt)) => {}
            _ = context.stop.cancelled() => {
                return (attempt, Outcome::Retry { error: error.to_string(), retry_at: Utc::now(), uncertain_at });
            }
        }
    }
}

/// One outbox row as a Stripe call.
enum Call {
    Event(CreateBillingMeterEvent),
    Cancel(CreateBillingMeterEventAdjustment),
}

impl Call {
    fn of(row: &Leased) -> Call {
        if let Some(target) = &row.cancels {
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
        let payload = HashMap::from([
            (
                "stripe_customer_id".to_owned(),
                row.stripe_customer_id.clone(),
            ),
            (
                "value".to_owned(),
                row.value.trunc().normalize().to_string(),
            ),
        ]);
        Call::Event(
            CreateBillingMeterEvent::new(row.event_name.as_str(), payload)
                .identifier(row.identifier.as_str())
                .timestamp(row.event_timestamp.timestamp()),
        )
    }

    async fn send(&self, stripe: &StripeHttp) -> Result<(), StripeCallError> {
        match self {
            Call::Event(request) => request.send(stripe).await.map(drop),
            Call::Cancel(request) => request.send(stripe).await.map(drop),
        }
    }
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
}
