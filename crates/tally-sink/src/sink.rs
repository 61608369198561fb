//! The billing loop (`Sink::run`) and its pass. A pass has two halves:
//! 1. account: each changed slot that has settled becomes, in one Postgres transaction with
//!    its bookkeeping, an outbox row with a deterministic identifier;
//! 2. send: pending outbox rows are leased, sent to Stripe (through the v2 meter event stream,
//!    100 rows of different pairs a request, or one v1 call a row; a pair's rows one request at
//!    a time, in order; under the account's rate), and marked sent, retried later, or failed.
//!
//! A crash anywhere leaves either no outbox row (the slot is accounted again) or an outbox row
//! that is sent again with the same identifier; Stripe answers "already exists" for one it
//! has, which counts as sent. So Stripe holds each submission exactly once. Stripe recognises
//! an identifier for about 24 hours only: a row whose earlier attempt may have reached Stripe
//! more than 23 hours ago is parked as `needs_review` instead of being sent again.
//!
//! One bad pair stays one bad pair: when an accounting transaction fails because of the data
//! (a sum beyond a decimal, a meter nobody knows, a value Postgres refuses), the work is redone
//! pair by pair and the pairs that fail on their own are quarantined (`billing_quarantine`);
//! a send task that panics quarantines its pair too. Postgres or Stripe away: the daemon waits,
//! retrying with capped backoff, and says so once (`tally_dependency_up`).
//!
//! This file runs the pass: it accounts, then leases the outbox, hands the customer+meter pairs
//! to the dispatcher and records the outcomes. Putting rows into requests and sending them
//! (retries, backoff, what an answer means) is `send.rs`; the v2 API is `stream.rs`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use sqlx::PgPool;
use tally_core::window::SLOT;
use tally_runtime::{Backoff, Dependency, RunMode};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{MeterEventsApi, SinkConfig, StripeConfig};
use crate::limiter::RateLimiter;
use crate::send::{dispatch, stream_rows_per_request, GroupResult, SendContext};
use crate::store::{
    self, Accounting, AccountingReport, Leased, Outcome, RowOutcome, SinkStoreError,
};
use crate::stream::MeterEventStream;
use crate::stripe::{retrying, StripeCallError, StripeHttp};
use crate::telemetry as t;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] SinkStoreError),
    #[error("a send task failed: {0}")]
    Task(String),
    #[error("cannot call Stripe: {0}")]
    Stripe(#[from] StripeCallError),
}

impl SinkError {
    /// A configuration error: the daemon cannot go on and says what to fix.
    pub fn is_config(&self) -> bool {
        matches!(self, SinkError::Config(_))
    }
}

/// What passes did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SinkSummary {
    pub passes: u64,
    pub accounted: AccountingReport,
    pub sent: u64,
    /// Attempts that failed retryably (each retried, in this pass or a later one).
    pub retried: u64,
    pub rate_limited: u64,
    pub failed: u64,
    /// Outbox rows still pending after the last pass (waiting for a retry).
    pub pending: i64,
    /// Outbox rows parked for an operator (their outcome unknown for longer than Stripe remembers an identifier, 23 h).
    pub needs_review: i64,
    /// Changed slots waiting for a customer mapping.
    pub unmapped_slots: i64,
    /// Customer+meter pairs set aside (`billing_quarantine`).
    pub quarantined_pairs: i64,
    /// Passes that failed (Postgres or Stripe away) and were tried again.
    pub failed_passes: u64,
    /// Time spent accounting (Postgres) and sending (Stripe).
    pub accounting: Duration,
    pub sending: Duration,
}

pub struct Sink {
    config: SinkConfig,
    pool: PgPool,
    stripe: StripeHttp,
    limiter: Arc<RateLimiter>,
    event_limiter: Arc<RateLimiter>,
    /// `stripe.meter_events` as set (`None`: v2 where the account has it).
    meter_events: Option<MeterEventsApi>,
    /// The v2 stream, where the account has it and v1 is not asked for, and when that was
    /// decided (by the first pass that reached Stripe).
    stream: tokio::sync::Mutex<Option<(Option<Arc<MeterEventStream>>, Instant)>>,
    /// `stripe.max_meter_events_per_second`, or its default.
    meter_events_per_second: u32,
    meter_events_base: String,
    /// Attempts at opening the stream that failed retryably, for the pass's `retried`.
    open_retries: std::sync::atomic::AtomicU64,
    postgres: &'static Dependency,
}

impl Sink {
    pub fn new(config: SinkConfig, stripe: &StripeConfig, pool: PgPool) -> Result<Sink, SinkError> {
        config.validate().map_err(SinkError::Config)?;
        let client = StripeHttp::new(stripe).map_err(SinkError::Config)?;
        t::describe();
        Ok(Sink {
            limiter: Arc::new(RateLimiter::new(stripe.requests_per_second())),
            event_limiter: Arc::new(RateLimiter::with_burst(
                stripe.meter_events_per_second(),
                stream_rows_per_request(stripe.meter_events_per_second()) as u32,
            )),
            meter_events_per_second: stripe.meter_events_per_second(),
            meter_events: stripe.meter_events,
            stream: tokio::sync::Mutex::new(None),
            meter_events_base: stripe.meter_events_base().to_owned(),
            open_retries: Default::default(),
            config,
            pool,
            stripe: client,
            postgres: tally_runtime::dependency("postgres"),
        })
    }

    /// The v2 stream to bill through, or `None` for v1. Unset, v2 is used where a meter event
    /// session can be created; an account without it (Stripe answers 4xx) bills through v1 and
    /// is asked again every hour. A Stripe that cannot be reached fails the pass, which is
    /// tried again.
    async fn stream(&self) -> Result<Option<Arc<MeterEventStream>>, SinkError> {
        let mut decided = self.stream.lock().await;
        if let Some((stream, at)) = &*decided {
            let ask_again =
                self.meter_events.is_none() && stream.is_none() && at.elapsed() >= ASK_FOR_V2_EVERY;
            if !ask_again {
                return Ok(stream.clone());
            }
        }
        let stream = self.decide_api().await?;
        metrics::gauge!(t::METER_EVENTS_V2).set(if stream.is_some() { 1.0 } else { 0.0 });
        *decided = Some((stream.clone(), Instant::now()));
        Ok(stream)
    }

    async fn decide_api(&self) -> Result<Option<Arc<MeterEventStream>>, SinkError> {
        if self.meter_events == Some(MeterEventsApi::V1) {
            tracing::info!(
                "billing through Stripe's v1 meter events (stripe.meter_events = \"v1\")"
            );
            return Ok(None);
        }
        let stream = MeterEventStream::new(
            self.stripe.clone(),
            &self.meter_events_base,
            self.limiter.clone(),
        );
        match self.open_stream(&stream).await {
            Ok(()) => {
                tracing::info!(base = self.meter_events_base, "billing through Stripe's v2 meter event stream");
                Ok(Some(Arc::new(stream)))
            }
            Err(error)
                if self.meter_events.is_none()
                    && error.status.is_some_and(|s| (400..500).contains(&s) && s != 429 && s != 409) =>
            {
                tracing::warn!(%error, "the Stripe account has no v2 meter event stream; billing through v1 meter events and asking again in an hour (set stripe.meter_events = \"v1\" to skip this check)");
                Ok(None)
            }
            Err(error) if error.status.is_some_and(|s| s == 401 || s == 403 || s == 404) => {
                Err(SinkError::Config(format!("stripe.meter_events = \"v2\", but Stripe refuses a meter event session: {error}; set stripe.meter_events = \"v1\", or use a key whose account has the v2 meter event stream")))
            }
            Err(error) => Err(SinkError::Stripe(error)),
        }
    }

    /// Runs passes until `stop` (daemon) or once. A pass interrupted by `stop` records what it
    /// sent and frees the rest. The daemon waits out a pass that fails (Postgres or Stripe
    /// away): it tries again after a capped backoff, and returns only on `stop` or for a
    /// configuration error.
    pub async fn run(
        &self,
        mode: RunMode,
        stop: &CancellationToken,
    ) -> Result<SinkSummary, SinkError> {
        let mut total = SinkSummary::default();
        let mut backoff = Backoff::new(
            Duration::from_secs(1),
            self.config.interval.max(Duration::from_secs(1)),
        );
        loop {
            let pass = match self.pass(stop).await {
                Ok(pass) => {
                    backoff.reset();
                    pass
                }
                Err(error) if mode == RunMode::Once || error.is_config() => return Err(error),
                Err(error) => {
                    total.failed_passes += 1;
                    match &error {
                        SinkError::Store(e) if e.is_retryable() => self.postgres.down(e),
                        SinkError::Stripe(e) if e.is_retryable() => {
                            tally_runtime::dependency("stripe").down(e)
                        }
                        _ => tracing::error!(%error, "billing pass failed; trying again"),
                    }
                    if tally_runtime::sleep_unless_stopped(backoff.next_wait(), stop).await {
                        return Ok(total);
                    }
                    continue;
                }
            };
            self.postgres.up();
            total.passes += 1;
            total.accounted.add(pass.accounted);
            total.sent += pass.sent;
            total.retried += pass.retried;
            total.rate_limited += pass.rate_limited;
            total.failed += pass.failed;
            total.accounting += pass.accounting;
            total.sending += pass.sending;
            total.pending = pass.pending;
            total.needs_review = pass.needs_review;
            total.unmapped_slots = pass.unmapped_slots;
            total.quarantined_pairs = pass.quarantined_pairs;
            if mode == RunMode::Once || stop.is_cancelled() {
                return Ok(total);
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.interval) => {}
                _ = stop.cancelled() => return Ok(total),
            }
        }
    }

    /// One pass: account for every settled change and send the outbox, at once: rows are sent
    /// as soon as their accounting transaction commits, so a large pass takes as long as the
    /// slower half, not both.
    pub async fn pass(&self, stop: &CancellationToken) -> Result<SinkSummary, SinkError> {
        let started = Instant::now();
        let accounting_done = CancellationToken::new();
        let account = async {
            let accounted = self.account(stop).await;
            accounting_done.cancel();
            accounted
        };
        let send = async {
            let mut sent = SinkSummary::default();
            let sending = Instant::now();
            let result = self.send_outbox(stop, &accounting_done, &mut sent).await;
            sent.sending = sending.elapsed();
            result.map(|()| sent)
        };
        let (accounted, sent) = tokio::join!(account, send);
        let (mut summary, sent) = (accounted?, sent?);
        summary.sent = sent.sent;
        summary.failed = sent.failed;
        summary.retried = sent.retried;
        summary.rate_limited = sent.rate_limited;
        summary.sending = sent.sending;
        let backlog = retry_postgres(|| store::backlog(&self.pool)).await?;
        metrics::gauge!(t::OUTBOX_PENDING).set(backlog.pending as f64);
        metrics::gauge!(t::OUTBOX_OLDEST_SECONDS).set(backlog.oldest_pending_seconds);
        metrics::gauge!(t::OUTBOX_NEEDS_REVIEW).set(backlog.needs_review as f64);
        metrics::gauge!(t::UNMAPPED_SLOTS).set(backlog.unmapped_slots as f64);
        metrics::gauge!(t::QUARANTINED_PAIRS).set(backlog.quarantined_pairs as f64);
        metrics::histogram!(t::PASS_SECONDS).record(started.elapsed().as_secs_f64());
        summary.pending = backlog.pending;
        summary.needs_review = backlog.needs_review;
        summary.unmapped_slots = backlog.unmapped_slots;
        summary.quarantined_pairs = backlog.quarantined_pairs;
        if backlog.unmapped_slots > 0 {
            tracing::warn!(unmapped_slots = backlog.unmapped_slots, "usage of customers without a Stripe customer id is waiting; see the view stripe_unmapped_usage and map them with `tally customers map`");
        }
        if backlog.needs_review > 0 {
            tracing::error!(submissions = backlog.needs_review, "submissions wait for an operator: an earlier attempt may have reached Stripe more than 23 hours ago; see `tally submissions review`");
        }
        tracing::info!(
            slots = summary.accounted.slots,
            planned = summary.accounted.submissions,
            sent = summary.sent,
            retried = summary.retried,
            failed = summary.failed,
            pending = backlog.pending,
            quarantined_pairs = backlog.quarantined_pairs,
            seconds = started.elapsed().as_secs_f64(),
            "billing pass done"
        );
        Ok(summary)
    }

    /// Opens the stream's first session, retrying (with the `stripe` dependency marked down)
    /// while Stripe answers that a retry may succeed.
    async fn open_stream(&self, stream: &MeterEventStream) -> Result<(), StripeCallError> {
        let stripe = tally_runtime::dependency("stripe");
        // The session call waits for the account's rate itself.
        retrying(
            None,
            || stream.open(),
            |error| {
                stripe.down(error);
                self.open_retries
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            },
        )
        .await?;
        stripe.up();
        Ok(())
    }

    /// Accounts for every settled change, `slots_per_transaction` slots a transaction.
    async fn account(&self, stop: &CancellationToken) -> Result<SinkSummary, SinkError> {
        let started = Instant::now();
        let mut summary = SinkSummary::default();
        let meters = retry_postgres(|| store::billed_meters(&self.pool)).await?;
        let settle = TimeDelta::from_std(self.config.settle_delay).unwrap_or(TimeDelta::MAX);
        let settled_before = Utc::now() - settle - SLOT;
        let all = Accounting {
            settled_before,
            limit: self.config.slots_per_transaction,
            pair: None,
        };
        while !stop.is_cancelled() {
            let report = match retry_postgres(|| store::account_slots(&self.pool, &meters, all))
                .await
            {
                Ok(report) => report,
                Err(error) if error.is_data() => {
                    tracing::error!(%error, "an accounting transaction failed because of its data; accounting pair by pair to find the pairs at fault");
                    self.account_pair_by_pair(&meters, settled_before, &mut summary)
                        .await?;
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            record_accounted(&mut summary, report);
            if (report.changes as usize) < self.config.slots_per_transaction {
                break;
            }
        }
        summary.accounting = started.elapsed();
        Ok(summary)
    }

    /// After an accounting transaction failed because of its data: accounts each pair with
    /// settled changes in its own transactions, and quarantines the pairs that fail on their
    /// own, so that every other pair is billed.
    async fn account_pair_by_pair(
        &self,
        meters: &HashMap<String, store::BilledMeter>,
        settled_before: chrono::DateTime<Utc>,
        summary: &mut SinkSummary,
    ) -> Result<(), SinkError> {
        let pairs = retry_postgres(|| {
            store::pairs_with_changes(&self.pool, settled_before, PAIRS_PER_SPLIT)
        })
        .await?;
        for (customer, meter) in &pairs {
            let one = Accounting {
                settled_before,
                limit: self.config.slots_per_transaction,
                pair: Some((customer, meter)),
            };
            loop {
                match retry_postgres(|| store::account_slots(&self.pool, meters, one)).await {
                    Ok(report) => {
                        record_accounted(summary, report);
                        if (report.changes as usize) < self.config.slots_per_transaction {
                            break;
                        }
                    }
                    Err(error) if error.is_data() => {
                        let reason = match &error {
                            SinkStoreError::Unbillable { .. } => "unbillable",
                            SinkStoreError::Postgres(_) => "postgres_refused",
                        };
                        quarantine(&self.pool, customer, meter, reason, &error.to_string()).await?;
                        break;
                    }
                    Err(error) => return Err(error.into()),
                }
            }
        }
        Ok(())
    }

    /// Sends due outbox rows until none are left. Three stages run at once, so that neither
    /// Postgres round trip stalls the calls to Stripe: a leaser (whole customer+meter pairs,
    /// into a bounded channel), the dispatcher (`concurrency` requests at a time, `send.rs`),
    /// and a recorder that writes outcomes in batches. A fourth renews the leases of every row leased and not yet
    /// recorded, from the moment it is leased: a row waiting its turn, or a slow pair, is
    /// never leased by another sink meanwhile.
    async fn send_outbox(
        &self,
        stop: &CancellationToken,
        accounting_done: &CancellationToken,
        summary: &mut SinkSummary,
    ) -> Result<(), SinkError> {
        // A pass with nothing to send asks Stripe nothing, not even for a session: `--once`
        // with nothing to bill succeeds while Stripe is away.
        loop {
            let last = accounting_done.is_cancelled();
            if retry_postgres(|| store::has_rows_due(&self.pool)).await? {
                break;
            }
            if last || stop.is_cancelled() {
                return Ok(());
            }
            tokio::select! {
                _ = accounting_done.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        let stream = self.stream().await;
        summary.retried += self
            .open_retries
            .swap(0, std::sync::atomic::Ordering::Relaxed);
        let stream = stream?;
        let concurrency = self.config.concurrency;
        let rows_per_request = match stream {
            Some(_) => stream_rows_per_request(self.meter_events_per_second),
            None => 1,
        };
        // Pairs leased at a time: enough for every request in flight, twice over.
        let lease_batch = (concurrency * rows_per_request * 2)
            .max(concurrency * 32)
            .max(512);
        let (groups_tx, groups_rx) = tokio::sync::mpsc::channel::<Vec<Leased>>(concurrency * 8);
        let (results_tx, results_rx) = tokio::sync::mpsc::channel::<GroupResult>(concurrency * 2);
        let held: Held = Arc::default();
        // In a JoinSet, so that it ends with this pass however the pass ends (a sink killed
        // mid-pass must let its leases expire).
        let mut renewer = JoinSet::new();
        {
            let (pool, held, lease) = (self.pool.clone(), held.clone(), self.config.lease);
            renewer.spawn(async move {
                loop {
                    tokio::time::sleep(lease / 3).await;
                    let ids: Vec<i64> = lock(&held).iter().copied().collect();
                    if ids.is_empty() {
                        continue;
                    }
                    if let Err(error) = store::renew_leases(&pool, &ids, lease).await {
                        tracing::warn!(%error, "cannot renew the leases of rows being sent");
                    }
                }
            });
        }

        let leaser = {
            let pool = self.pool.clone();
            let lease = self.config.lease;
            let stop = stop.clone();
            let batch = lease_batch;
            let held = held.clone();
            let accounting_done = accounting_done.clone();
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    // Read before leasing: once accounting is done, an empty lease means
                    // nothing is left.
                    let last = accounting_done.is_cancelled();
                    let rows = store::lease_pending(&pool, batch, lease).await?;
                    if rows.is_empty() {
                        if last {
                            break;
                        }
                        tokio::select! {
                            _ = accounting_done.cancelled() => {}
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        }
                        continue;
                    }
                    lock(&held).extend(rows.iter().map(|row| row.submission_id));
                    for group in group_by_pair(rows) {
                        if groups_tx.send(group).await.is_err() {
                            return Ok(()); // the pass is gone (stopped or killed)
                        }
                    }
                }
                Ok::<(), SinkStoreError>(())
            })
        };
        let recorder = {
            let pool = self.pool.clone();
            tokio::spawn(record_results(pool, results_rx, held.clone()))
        };

        let context = Arc::new(SendContext {
            stripe: self.stripe.clone(),
            stream,
            rows_per_request,
            limiter: self.limiter.clone(),
            event_limiter: self.event_limiter.clone(),
            config: self.config.clone(),
            stop: stop.clone(),
            dependency: tally_runtime::dependency("stripe"),
        });
        let panicked = dispatch(groups_rx, results_tx.clone(), context).await;
        for pair in &panicked {
            quarantine(
                &self.pool,
                &pair.customer_id,
                &pair.meter,
                "send_failed",
                &pair.detail,
            )
            .await?;
        }
        drop(results_tx);
        let leased = leaser.await.map_err(|e| SinkError::Task(e.to_string()));
        let recorded = recorder.await.map_err(|e| SinkError::Task(e.to_string()));
        renewer.abort_all();
        let recorded = recorded??;
        leased??;
        summary.sent += recorded.sent;
        summary.failed += recorded.failed;
        summary.retried += recorded.retried;
        summary.rate_limited += recorded.rate_limited;
        Ok(())
    }
}

/// How often an account found without the v2 stream is asked again.
const ASK_FOR_V2_EVERY: Duration = Duration::from_secs(3600);

/// How many pairs one split of a failed accounting transaction takes on.
const PAIRS_PER_SPLIT: usize = 10_000;

fn record_accounted(summary: &mut SinkSummary, report: AccountingReport) {
    summary.accounted.add(report);
    metrics::counter!(t::SLOTS_ACCOUNTED).increment(report.slots);
    metrics::counter!(t::SUBMISSIONS_PLANNED).increment(report.submissions);
    metrics::counter!(t::CORRECTIONS).increment(report.corrections);
}

/// Sets a pair aside: one ERROR line and a metric, then every other pair goes on.
async fn quarantine(
    pool: &PgPool,
    customer: &str,
    meter: &str,
    reason: &str,
    detail: &str,
) -> Result<(), SinkStoreError> {
    if retry_postgres(|| store::quarantine(pool, customer, meter, reason, detail)).await? {
        metrics::counter!(t::PAIRS_QUARANTINED, "reason" => reason.to_owned()).increment(1);
        tracing::error!(customer, meter, reason, detail, "customer+meter pair quarantined: its usage waits while every other pair is billed; fix the cause, then `tally quarantine release {customer} {meter}`");
    }
    Ok(())
}

/// Outbox rows this process has leased and not yet recorded: their leases are renewed.
type Held = Arc<std::sync::Mutex<std::collections::HashSet<i64>>>;

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Leased rows grouped per customer and meter, each group in submission order.
fn group_by_pair(rows: Vec<Leased>) -> Vec<Vec<Leased>> {
    let mut groups: Vec<Vec<Leased>> = Vec::new();
    let mut index: HashMap<(String, String), usize> = HashMap::new();
    for row in rows {
        let key = (row.customer_id.clone(), row.meter.clone());
        match index.get(&key) {
            Some(&i) => groups[i].push(row),
            None => {
                index.insert(key, groups.len());
                groups.push(vec![row]);
            }
        }
    }
    groups
}

/// What the recorder wrote.
#[derive(Default)]
struct Recorded {
    sent: u64,
    failed: u64,
    retried: u64,
    rate_limited: u64,
}

/// Writes outcomes as they come, in batches of up to 500 rows or every 100 ms.
async fn record_results(
    pool: PgPool,
    mut results: tokio::sync::mpsc::Receiver<GroupResult>,
    held: Held,
) -> Result<Recorded, SinkError> {
    let mut recorded = Recorded::default();
    let mut batch: Vec<RowOutcome> = Vec::new();
    let mut open = true;
    while open {
        let deadline = tokio::time::sleep(Duration::from_millis(100));
        tokio::pin!(deadline);
        while batch.len() < 500 {
            tokio::select! {
                result = results.recv() => match result {
                    Some(result) => {
                        recorded.retried += result.retried;
                        recorded.rate_limited += result.rate_limited;
                        batch.extend(result.outcomes);
                    }
                    None => {
                        open = false;
                        break;
                    }
                },
                _ = &mut deadline => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        retry_postgres(|| store::record_outcomes(&pool, &batch)).await?;
        {
            let mut held = lock(&held);
            for row in &batch {
                held.remove(&row.submission_id);
            }
        }
        for row in &batch {
            match row.outcome {
                Outcome::Sent => recorded.sent += 1,
                Outcome::Failed { .. } => recorded.failed += 1,
                Outcome::Retry { .. } | Outcome::NeedsReview { .. } | Outcome::Released => {}
            }
        }
        batch.clear();
    }
    Ok(recorded)
}

/// Retries a Postgres step that failed for a passing reason (connection lost, serialization)
/// a few times; the daemon's loop waits out a longer outage. The outage is reported once, as
/// the state of the `postgres` dependency.
async fn retry_postgres<T, F, Fut>(mut step: F) -> Result<T, SinkStoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SinkStoreError>>,
{
    let postgres = tally_runtime::dependency("postgres");
    let mut attempt = 0;
    loop {
        match step().await {
            Err(SinkStoreError::Postgres(error))
                if attempt < 5 && tally_db::is_retryable(&error) =>
            {
                attempt += 1;
                postgres.down(&error);
                tracing::debug!(%error, attempt, "Postgres step failed; retrying");
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            }
            Ok(value) => {
                postgres.up();
                return Ok(value);
            }
            other => return other,
        }
    }
}
