//! The aggregator loop: poll, build a batch, commit it in one transaction, repeat.
//!
//! A batch's life: messages are decoded and checked as they are polled ([`Batch::push`]); when
//! the batch is full or old enough, [`store::commit_batch`] claims its ids, adds the new ones to
//! the minute windows and daily rollup, records rejects and advances the stored offsets, in one
//! transaction. Only then is anything told: Kafka's committed offsets (for lag tools), the DLQ
//! publisher, metrics. A crash at any point leaves Postgres either before or after the whole
//! batch, and the consumer resumes from the offsets Postgres holds.
//!
//! What the world throws at it:
//! - an event Postgres refuses although the contract let it through fails the batch with a data
//!   error; the batch is split until that event is found, which becomes an `unprocessable`
//!   reject, and the rest is committed ([`store::isolate_unprocessable`]);
//! - Postgres away: commits are retried with capped backoff; a lane whose next batch is full
//!   pauses its partitions, and the loop keeps polling, so the consumer stays in its group;
//!   partitions assigned meanwhile wait, paused, until they can be taken in Postgres;
//! - Kafka away: librdkafka reconnects; the loop keeps polling;
//! - the DLQ copies and the expiry of old dedup claims run as supervised background tasks, so
//!   neither can hold up (or stop) the batches.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use tally_core::config::KafkaConfig;
use tally_core::{MeterDefinition, Meters};
use tally_runtime::{sleep_unless_stopped, Backoff, Dependency, RunMode};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::batch::{Batch, Message, Rules};
use crate::config::{hostname, AggregatorConfig};
use crate::kafka::{self, AggregatorContext, Group};
use crate::membership::{lane_of, Membership, Progress};
use crate::store::{self, AggregatorStoreError, Epochs, Ownership, TakenPartition};
use crate::telemetry::{self, BatchReport};
use crate::watchdog::{self, Member};

/// How long Kafka may take to answer a metadata or watermark request.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one attempt to take assigned partitions in Postgres may take.
const TAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a poll waits while a lane's commit is in flight: how soon its landing is noticed.
const COMMIT_POLL: Duration = Duration::from_millis(1);
/// After a fenced batch, how long before the partitions are taken again (a rebalance that
/// moved them elsewhere arrives in the meantime).
const RETAKE_DELAY: Duration = Duration::from_secs(5);
/// How often expired dedup claims are deleted.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(3600);
/// How often the DLQ publisher looks for rejects when no batch wakes it.
const DLQ_INTERVAL: Duration = Duration::from_secs(10);
/// `--once` gives up on Postgres (or Kafka) after this many failed attempts at one step.
const ONCE_ATTEMPTS: u32 = 5;
/// `--once`: once every partition is at the end offset read when it was taken, how long no
/// new message may arrive before the run counts as drained. (Brokers do not all report end
/// offsets right: tansu 0.6 reports fewer than it serves. Messages keep coming while there
/// are more, whatever the broker said the end was.)
const ONCE_QUIET: Duration = Duration::from_millis(300);
/// `--once`: the longest it goes on past those end offsets (a steady stream never goes
/// quiet; what arrives later is the next run's).
const ONCE_TAIL: Duration = Duration::from_secs(2);

/// Named points of a batch's life, for tests that crash the process there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A batch is about to be committed.
    BeforeCommit,
    /// The Postgres transaction committed; nothing else has happened yet.
    AfterCommit,
    /// Offsets were also committed to Kafka and the DLQ copies published.
    AfterNotify,
}

#[cfg(feature = "testing")]
type StepHook = Arc<dyn Fn(Step) + Send + Sync>;
#[cfg(feature = "testing")]
type CommitHook = Arc<dyn Fn(&BatchReport, &[i64]) + Send + Sync>;

/// Observation points for tests and benchmarks (feature `testing`; not in release builds).
#[cfg(feature = "testing")]
#[derive(Clone, Default)]
pub struct Hooks {
    /// Called at each [`Step`].
    pub on_step: Option<StepHook>,
    /// Called after each committed batch with its report and its messages' Kafka timestamps.
    pub on_commit: Option<CommitHook>,
}

/// Totals of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSummary {
    pub batches: u64,
    pub consumed: u64,
    pub counted: u64,
    pub duplicates: u64,
    pub rejected: u64,
    /// Batches rolled back because another aggregator took a partition.
    pub fenced: u64,
    /// Times the member left the group and joined again after its watchdog found it stalled.
    pub rejoins: u64,
}

/// Why the aggregator stopped with an error. The message names the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    #[error("cannot reach Kafka at {brokers}: {reason}; check kafka.brokers and that the brokers are up")]
    KafkaUnreachable { brokers: String, reason: String },
    #[error("Kafka topic {topic:?} does not exist on {brokers}; create it (docker-compose.yml does) or set kafka.topic")]
    TopicMissing { topic: String, brokers: String },
    #[error("consumed nothing for {} s while partitions still have events to read ({behind}); check that the brokers serve fetches for them (aggregator.stall_timeout bounds this wait)", waited.as_secs())]
    Stalled { waited: Duration, behind: String },
    #[error("another aggregator took partition {partition} while this --once run was draining it; that one goes on from what this run committed (nothing is lost), but this run did not drain the topic. Run --once only where no aggregator daemon consumes the topic, and never two at once (`flock` them under cron)")]
    TakenOver { partition: i32 },
    #[error("a batch has been committing for {} s (Postgres holds it up: a lock, a full disk, a lost connection); nothing of it is stored, the next run reads it again. Check Postgres (pg_stat_activity, pg_locks)", waited.as_secs())]
    CommitStuck { waited: Duration },
    #[error("{0}")]
    Config(String),
    #[error("Postgres unreachable: {0}; `--once` gave up after {ONCE_ATTEMPTS} attempts (the daemon would wait)")]
    PostgresUnreachable(AggregatorStoreError),
    #[error("a batch commit task failed: {0}; this is a bug, please report it")]
    CommitTask(String),
    #[error(transparent)]
    Store(#[from] AggregatorStoreError),
}

/// One aggregator process's worth of state.
pub struct Aggregator {
    config: AggregatorConfig,
    kafka: KafkaConfig,
    meters: Vec<MeterDefinition>,
    /// The rules batches are checked under: replaced when `tally rebuild` redefines a meter
    /// (see [`Aggregator::redefined`]).
    rules: RwLock<Arc<Rules>>,
    pool: PgPool,
    runtime: tokio::runtime::Handle,
    group: Group,
    #[cfg(feature = "testing")]
    hooks: Hooks,
    postgres: &'static Dependency,
    /// Meters with a credit rate: their newly counted usage is queued for the credit burner
    /// in the batch's transaction.
    priced_meters: Arc<BTreeSet<String>>,
}

impl Aggregator {
    /// `runtime` runs the Postgres queries; [`Aggregator::run`] blocks the calling thread, which
    /// must not be one of that runtime's workers (use a plain thread or `spawn_blocking`).
    pub fn new(
        config: AggregatorConfig,
        kafka: KafkaConfig,
        meters: Vec<MeterDefinition>,
        pool: PgPool,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, AggregatorError> {
        config.validate().map_err(AggregatorError::Config)?;
        let rules = Rules {
            meters: Meters::new(&meters).map_err(AggregatorError::Config)?,
            lateness_horizon: TimeDelta::from_std(config.lateness_horizon)
                .map_err(|e| AggregatorError::Config(e.to_string()))?,
            versions: Arc::default(),
        };
        let group = Group {
            id: config.group_id.clone(),
            owner: format!("{}-{}", hostname(), uuid::Uuid::now_v7().simple()),
            instance_id: config.instance_id(),
            session_timeout: config.session_timeout,
        };
        Ok(Aggregator {
            config,
            kafka,
            meters,
            rules: RwLock::new(Arc::new(rules)),
            pool,
            runtime,
            group,
            #[cfg(feature = "testing")]
            hooks: Hooks::default(),
            postgres: tally_runtime::dependency("postgres"),
            priced_meters: Arc::default(),
        })
    }

    /// Queues the newly counted usage of these meters for the credit burner (the meters of
    /// `[[credits.rates]]`), in each batch's transaction.
    pub fn with_priced_meters(mut self, meters: BTreeSet<String>) -> Self {
        self.priced_meters = Arc::new(meters);
        self
    }

    #[cfg(feature = "testing")]
    pub fn with_hooks(mut self, hooks: Hooks) -> Self {
        self.hooks = hooks;
        self
    }

    /// Consumes until `stop` is cancelled ([`RunMode::Daemon`]) or the topic is drained
    /// ([`RunMode::Once`]). Either way the batch in progress is committed before returning.
    pub fn run(
        &self,
        mode: RunMode,
        stop: &CancellationToken,
    ) -> Result<RunSummary, AggregatorError> {
        telemetry::describe();
        // The meters are recorded before anything is counted under them.
        let recorded = self.wait_for_postgres(mode, stop, || async {
            Ok(tally_db::meters::record(&self.pool, &self.meters).await?)
        })?;
        let Some(versions) = recorded else {
            return Ok(RunSummary::default());
        };
        self.replace_rules(|rules| rules.versions = Arc::new(versions));
        let background = stop.child_token();
        let _stop_background = background.clone().drop_guard();
        self.spawn_maintenance(background.clone());
        let dlq = kafka::dlq_producer(&self.kafka).map_err(|e| self.unreachable(e))?;
        let dlq_wake = Arc::new(Notify::new());
        self.spawn_dlq_publisher(dlq.clone(), dlq_wake.clone(), background.clone());

        let lanes = self.config.parallel_commits;
        let mut run = RunState {
            lanes: (0..lanes).map(|_| Lane::default()).collect(),
            epochs: Epochs::new(),
            positions: HashMap::new(),
            fetched: HashMap::new(),
            last_message: Instant::now(),
            ends_reached: None,
            targets: HashMap::new(),
            pending: Vec::new(),
            next_take: Instant::now(),
            take_backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(10)),
            take_failures: 0,
            taken_once: false,
            last_progress: Instant::now(),
            summary: RunSummary::default(),
        };
        let membership = Arc::new(Membership::default());
        let mut group = self.group.clone();
        if mode == RunMode::Daemon {
            self.spawn_watchdog(&group, membership.clone(), background.clone());
        }
        // A member that joins again after a stall does so with a fresh consumer.
        loop {
            let context = AggregatorContext::new(&self.kafka.topic, membership.clone());
            let consumer =
                kafka::consumer(&self.kafka, &group, context).map_err(|e| self.unreachable(e))?;
            let Some(partitions) = self.wait_for_topic(&consumer, mode, stop)? else {
                return Ok(run.summary);
            };
            match mode {
                // The daemon shares the partitions with the group's other members.
                RunMode::Daemon => consumer
                    .subscribe(&[&self.kafka.topic])
                    .map_err(|e| self.unreachable(e))?,
                // `--once` does not join the group: it takes every partition in Postgres
                // (fencing whoever held it) and reads them itself, so no broker's group
                // coordinator (a stopped static member still holding them, a slow rebalance)
                // can keep it from draining.
                RunMode::Once => {
                    run.pending = partitions;
                    run.next_take = Instant::now();
                }
            }
            tracing::info!(
                group = %group.id,
                instance = group.instance_id.as_deref().unwrap_or("(dynamic member)"),
                topic = %self.kafka.topic,
                owner = %self.group.owner,
                mode = mode.as_str(),
                "aggregator started"
            );
            let session = Session {
                consumer: &consumer,
                dlq_wake: &dlq_wake,
                mode,
                stop,
                membership: &membership,
            };
            let consumed = self.consume(&session, &mut run, &group);
            if let Err(AggregatorError::TakenOver { .. }) = &consumed {
                // What this run committed is final: its rejects go to the DLQ topic now.
                self.publish_dlq_now(&dlq);
            }
            if consumed? == Consumed::Rejoin {
                // Nothing is lost: what was not committed is read again from the offsets
                // Postgres holds, by whoever takes the partitions next.
                self.restart_assignment(&session, &mut run, Instant::now());
                run.pending.clear();
                run.summary.rejoins += 1;
                telemetry::record_rejoin();
                if group.instance_id.take().is_some() {
                    tracing::warn!("joining again as a dynamic member: the broker did not serve this static member (aggregator.static_membership stays off until the process restarts)");
                }
                self.leave(&session);
                continue;
            }
            self.finish(&session, &mut run)?;
            if mode == RunMode::Once {
                // The background publisher stops with the run: copy this run's rejects now.
                self.publish_dlq_now(&dlq);
            } else {
                self.leave(&session);
                let forget = store::forget_member(&self.pool, &self.group.owner);
                let _ = self
                    .runtime
                    .block_on(async { tokio::time::timeout(TAKE_TIMEOUT, forget).await });
            }
            let summary = &run.summary;
            tracing::info!(
                batches = summary.batches,
                consumed = summary.consumed,
                counted = summary.counted,
                duplicates = summary.duplicates,
                rejected = summary.rejected,
                fenced = summary.fenced,
                rejoins = summary.rejoins,
                "aggregator stopped"
            );
            return Ok(run.summary);
        }
    }

    /// Polls and commits until stopped, drained (`--once`), or the watchdog asks the member
    /// to join the group again.
    fn consume(
        &self,
        session: &Session<'_>,
        run: &mut RunState,
        group: &Group,
    ) -> Result<Consumed, AggregatorError> {
        let consumer = session.consumer;
        let lanes = run.lanes.len();
        while !session.stop.is_cancelled() {
            let polled = consumer.poll(self.poll_wait(run));
            if consumer.context().take_rebalanced() {
                self.restart_assignment(session, run, Instant::now());
            }
            if !run.pending.is_empty() && Instant::now() >= run.next_take {
                self.take(session, run)?;
            }
            if let Some(message) = polled {
                match message {
                    Ok(m) => {
                        let partition = m.partition();
                        let fresh = run
                            .positions
                            .get(&partition)
                            .is_some_and(|&next| m.offset() >= next);
                        if fresh {
                            run.positions.insert(partition, m.offset() + 1);
                            *run.fetched.entry(partition).or_default() += 1;
                            if session.mode == RunMode::Once {
                                run.last_message = Instant::now();
                            }
                            let message = Message {
                                partition,
                                offset: m.offset(),
                                key: m.key(),
                                payload: m.payload(),
                                timestamp_ms: m.timestamp().to_millis(),
                            };
                            run.lanes[lane_of(partition, lanes)].building.push(
                                message,
                                &self.rules(),
                                Utc::now(),
                            );
                        }
                    }
                    Err(e)
                        if e.rdkafka_error_code()
                            == Some(rdkafka::types::RDKafkaErrorCode::FencedInstanceId) =>
                    {
                        return Err(AggregatorError::Config(format!(
                            "another aggregator joined group {} as instance {}: each aggregator needs its own aggregator.instance_id (TALLY_AGGREGATOR_INSTANCE_ID), e.g. the systemd instance name ({e})",
                            group.id,
                            group.instance_id.as_deref().unwrap_or("-")
                        )));
                    }
                    Err(e) => tracing::debug!(error = %e, "Kafka consumer error"),
                }
            }
            for lane in 0..lanes {
                self.advance(lane, false, session, run)?;
            }
            session.membership.report(|| Progress {
                consumed: run.fetched.clone(),
                committing_since: run
                    .lanes
                    .iter()
                    .map(|lane| lane.in_flight.as_ref().map(|f| f.started))
                    .collect(),
            });
            if session.membership.take_rejoin() {
                return Ok(Consumed::Rejoin);
            }
            if session.mode == RunMode::Once && self.once_done(run)? {
                break;
            }
        }
        Ok(Consumed::Stopped)
    }

    /// `--once`, each turn: whether the run has drained; `Stalled` when it has consumed and
    /// committed nothing for `stall_timeout` without draining.
    fn once_done(&self, run: &mut RunState) -> Result<bool, AggregatorError> {
        let at_ends = |run: &RunState| {
            run.positions
                .iter()
                .all(|(p, next)| run.targets.get(p).is_none_or(|end| next >= end))
        };
        if run.taken_once && run.pending.is_empty() && at_ends(run) {
            let reached = *run.ends_reached.get_or_insert_with(Instant::now);
            return Ok(run.last_message.elapsed() >= ONCE_QUIET || reached.elapsed() >= ONCE_TAIL);
        }
        let waited = run.last_progress.max(run.last_message).elapsed();
        if waited < self.config.stall_timeout {
            return Ok(false);
        }
        // Waiting for Postgres to commit is not consuming nothing, for as long as a commit
        // may take (`finish` gives up on one stuck longer).
        let stall_timeout = self.config.stall_timeout;
        let committing = run.lanes.iter().any(|lane| {
            lane.in_flight
                .as_ref()
                .is_some_and(|f| f.started.elapsed() < stall_timeout)
        });
        if committing {
            return Ok(false);
        }
        let mut behind: Vec<String> = run
            .positions
            .iter()
            .filter_map(|(&p, &next)| {
                let end = *run.targets.get(&p)?;
                (next < end).then(|| format!("{p} at {next} of {end}"))
            })
            .collect();
        behind.sort();
        Err(AggregatorError::Stalled {
            waited,
            behind: behind.join(", "),
        })
    }

    /// Leaves the group now (serving the revoke), so the others take over at once rather
    /// than after the session timeout. (A static member does not leave: its partitions wait
    /// for it to come back, for up to the session timeout.)
    fn leave(&self, session: &Session<'_>) {
        let consumer = session.consumer;
        consumer.unsubscribe();
        let leaving = Instant::now();
        while leaving.elapsed() < Duration::from_secs(2) && !consumer.context().take_rebalanced() {
            let _ = consumer.poll(Duration::from_millis(50));
        }
    }

    /// Runs a Postgres step until it succeeds: waits out an outage (daemon: until `stop`;
    /// `--once`: [`ONCE_ATTEMPTS`] attempts). `Ok(None)`: stopped while waiting. A permanent
    /// error (a changed meter, a bad schema) ends the run.
    fn wait_for_postgres<T, F, Fut>(
        &self,
        mode: RunMode,
        stop: &CancellationToken,
        mut step: F,
    ) -> Result<Option<T>, AggregatorError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, AggregatorStoreError>>,
    {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let mut attempts = 0;
        loop {
            match self.runtime.block_on(step()) {
                Ok(value) => {
                    self.postgres.up();
                    return Ok(Some(value));
                }
                Err(AggregatorStoreError::Retryable(error)) => {
                    attempts += 1;
                    self.postgres.down(&error);
                    if mode == RunMode::Once && attempts >= ONCE_ATTEMPTS {
                        return Err(AggregatorError::PostgresUnreachable(
                            AggregatorStoreError::Retryable(error),
                        ));
                    }
                    let wait = backoff.next_wait();
                    if self.runtime.block_on(sleep_unless_stopped(wait, stop)) {
                        return Ok(None);
                    }
                }
                Err(other) => return Err(other.into()),
            }
        }
    }

    /// Waits until Kafka answers and has the topic; returns its partitions. `--once` gives up
    /// after [`ONCE_ATTEMPTS`]; the daemon waits until `stop` (`Ok(None)`).
    fn wait_for_topic(
        &self,
        consumer: &BaseConsumer<AggregatorContext>,
        mode: RunMode,
        stop: &CancellationToken,
    ) -> Result<Option<Vec<i32>>, AggregatorError> {
        let kafka = tally_runtime::dependency("kafka");
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut attempts = 0;
        loop {
            let error = match self.check_topic(consumer) {
                Ok(partitions) => {
                    kafka.up();
                    return Ok(Some(partitions));
                }
                Err(error) => error,
            };
            attempts += 1;
            if mode == RunMode::Once && attempts >= ONCE_ATTEMPTS.min(2) {
                return Err(error);
            }
            kafka.down(&error);
            let wait = backoff.next_wait();
            if self.runtime.block_on(sleep_unless_stopped(wait, stop)) {
                return Ok(None);
            }
        }
    }

    /// How long `poll` may wait: until the oldest batch being built is due, at most 100 ms.
    fn poll_wait(&self, run: &RunState) -> Duration {
        let mut wait = Duration::from_millis(100);
        for lane in &run.lanes {
            if lane.in_flight.is_some() {
                // Nothing launches on this lane before its commit lands, and only a poll
                // notices that: poll again soon, but never with no wait at all, or a loop
                // whose lanes are all paused for their commits spins and takes the core
                // Postgres needs to finish them (36% of the aggregator's time at 50k events/s).
                wait = wait.min(COMMIT_POLL);
            } else if let Some(opened) = lane.building.opened {
                wait = wait.min(self.config.batch_max_wait.saturating_sub(opened.elapsed()));
            }
        }
        wait
    }

    /// After a rebalance (or a fenced batch): settles the commits in flight, drops what was
    /// being built, and queues the assigned partitions to be taken in Postgres at `take_at`.
    ///
    /// Commits in flight are abandoned, never waited for (a wait could outlast the group's
    /// poll interval). Nothing is lost: an uncommitted batch's events are still in Kafka, and
    /// the partitions' owner resumes from the offsets Postgres holds. (A commit that lands
    /// after all either finished before the take, which waits for its row locks and resumes
    /// after it, or carries an epoch the take made stale, and rolls back.)
    fn restart_assignment(&self, session: &Session<'_>, run: &mut RunState, take_at: Instant) {
        for lane in 0..run.lanes.len() {
            if let Some(in_flight) = run.lanes[lane].in_flight.take() {
                in_flight.task.abort();
            }
            run.lanes[lane] = Lane::default();
        }
        run.epochs.clear();
        run.positions.clear();
        run.pending = session.consumer.context().assigned();
        run.next_take = take_at;
        run.take_backoff.reset();
        // Nothing is consumed until they are taken again (a rebalance paused them already).
        let mut paused = TopicPartitionList::new();
        for &partition in &run.pending {
            paused.add_partition(&self.kafka.topic, partition);
        }
        if let Err(e) = session.consumer.pause(&paused) {
            tracing::debug!(error = %e, "pausing partitions to take again failed");
        }
    }

    /// Takes the pending partitions in Postgres (bumping their epochs, which fences whoever
    /// held them) and starts each at its stored offset. While Postgres is away they stay
    /// paused, and this is tried again after a backoff.
    fn take(&self, session: &Session<'_>, run: &mut RunState) -> Result<(), AggregatorError> {
        let partitions = run.pending.clone();
        let attempt = self.runtime.block_on(async {
            tokio::time::timeout(
                TAKE_TIMEOUT,
                store::take_partitions(
                    &self.pool,
                    &self.group.id,
                    &self.kafka.topic,
                    &partitions,
                    &self.group.owner,
                ),
            )
            .await
        });
        let taken = match attempt {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(AggregatorStoreError::Retryable(error))) => {
                Err(AggregatorStoreError::Retryable(error))
            }
            Ok(Err(other)) => return Err(other.into()),
            Err(_) => Err(AggregatorStoreError::Retryable(sqlx::Error::PoolTimedOut)),
        };
        let rows = match taken {
            Ok(rows) => rows,
            Err(error) => {
                self.postgres.down(&error);
                run.take_failures += 1;
                if session.mode == RunMode::Once && run.take_failures >= ONCE_ATTEMPTS {
                    return Err(AggregatorError::PostgresUnreachable(error));
                }
                run.next_take = Instant::now() + run.take_backoff.next_wait();
                return Ok(());
            }
        };
        run.take_failures = 0;
        self.postgres.up();
        let consumer = session.consumer;
        let mut assignment = TopicPartitionList::new();
        for TakenPartition {
            partition,
            next_offset: next,
            epoch,
        } in rows
        {
            let start = next.map_or(Offset::Beginning, Offset::Offset);
            if let Err(e) = assignment.add_partition_offset(&self.kafka.topic, partition, start) {
                tracing::error!(partition, error = %e, "cannot set a start offset");
                continue;
            }
            run.epochs.insert(partition, epoch);
            run.positions.insert(partition, next.unwrap_or(0));
            if session.mode == RunMode::Once {
                match consumer.fetch_watermarks(&self.kafka.topic, partition, KAFKA_TIMEOUT) {
                    Ok((_, high)) => {
                        run.targets.entry(partition).or_insert(high);
                    }
                    Err(e) => tracing::warn!(partition, error = %e, "cannot read the end offset"),
                }
            }
        }
        // Replaces the paused assignment the rebalance made with one that starts at the
        // offsets Postgres holds (not Kafka's informational ones).
        if let Err(e) = consumer.assign(&assignment) {
            tracing::warn!(error = %e, "assigning the taken partitions failed; retrying");
            run.epochs.clear();
            run.positions.clear();
            run.next_take = Instant::now() + run.take_backoff.next_wait();
            return Ok(());
        }
        if let Err(e) = consumer.resume(&assignment) {
            tracing::warn!(error = %e, "resuming the taken partitions failed");
        }
        tracing::info!(partitions = %kafka::list(&partitions), "partitions taken; resuming at the offsets stored in Postgres");
        run.pending.clear();
        run.take_backoff.reset();
        run.taken_once = true;
        run.last_progress = Instant::now();
        Ok(())
    }

    /// Moves one lane along: takes in a finished commit, and launches the batch being built
    /// once it is full or due (`finish`: now, if the lane's previous commit is in).
    /// A full batch whose lane is still committing pauses the lane's partitions instead of
    /// blocking the loop, which goes on polling (and so stays in its group).
    fn advance(
        &self,
        lane: usize,
        finish: bool,
        session: &Session<'_>,
        run: &mut RunState,
    ) -> Result<(), AggregatorError> {
        self.reap(lane, session, run)?;
        if run.lanes[lane].abandoned {
            run.lanes[lane].building = Batch::default();
            return Ok(());
        }
        let batch = &run.lanes[lane].building;
        if batch.is_empty() {
            return Ok(());
        }
        let full = batch.consumed as usize >= self.config.batch_max_events
            || batch.bytes >= self.config.batch_max_bytes;
        let due = batch
            .opened
            .is_some_and(|opened| opened.elapsed() >= self.config.batch_max_wait);
        if !(full || due || finish) {
            return Ok(());
        }
        if run.lanes[lane].in_flight.is_some() {
            if full && !run.lanes[lane].paused {
                // Backpressure: the lane waits for its commit, without blocking the loop.
                self.pause_lane(session, run, lane, true);
            }
            // Otherwise keep filling while the previous batch commits: bigger batches catch
            // up. (`finish` launches it once the lane's commit is in.)
            return Ok(());
        }
        if run.lanes[lane].building.is_empty() {
            return Ok(()); // dropped by a fenced commit
        }
        if run.lanes[lane].paused {
            self.pause_lane(session, run, lane, false);
        }
        let batch = std::mem::take(&mut run.lanes[lane].building);
        self.step(Step::BeforeCommit);
        // The batch is bound to the epochs its messages were consumed under: if a rebalance
        // bumps them before it commits, it is fenced rather than applied late.
        run.lanes[lane].in_flight = Some(self.launch(batch, run.epochs.clone(), 0));
        Ok(())
    }

    /// Pauses (or resumes) the partitions of one lane.
    fn pause_lane(&self, session: &Session<'_>, run: &mut RunState, lane: usize, pause: bool) {
        let lanes = run.lanes.len();
        let mut partitions = TopicPartitionList::new();
        for &partition in run.epochs.keys().filter(|&&p| lane_of(p, lanes) == lane) {
            partitions.add_partition(&self.kafka.topic, partition);
        }
        let result = if pause {
            session.consumer.pause(&partitions)
        } else {
            session.consumer.resume(&partitions)
        };
        if let Err(e) = result {
            tracing::warn!(lane, pause, error = %e, "pausing or resuming a lane failed");
        }
        run.lanes[lane].paused = pause;
    }

    /// Starts a batch's transaction on the runtime, after a backoff when it is a retry. A
    /// batch that fails with a data error is searched for the events Postgres refuses, which
    /// become rejects, and committed without them.
    fn launch(&self, batch: Batch, epochs: Epochs, attempt: u32) -> InFlight {
        let pool = self.pool.clone();
        let group = self.config.group_id.clone();
        let topic = self.kafka.topic.clone();
        let task_epochs = epochs.clone();
        let priced = self.priced_meters.clone();
        let backoff = if attempt == 0 {
            Duration::ZERO
        } else {
            (Duration::from_millis(100) * 2u32.pow(attempt.min(7))).min(Duration::from_secs(10))
        };
        let task = self.runtime.spawn(async move {
            tokio::time::sleep(backoff).await;
            let mut batch = batch;
            let ownership = Ownership {
                group: &group,
                topic: &topic,
                epochs: &task_epochs,
            };
            let mut result = store::commit_batch(&pool, &batch, ownership, &priced).await;
            if let Err(AggregatorStoreError::Data(error)) = &result {
                tracing::error!(%error, "a batch failed with a data error; looking for the events Postgres refuses");
                result = match store::isolate_unprocessable(&pool, &topic, &mut batch, &priced)
                    .await
                {
                    Ok(0) => result,
                    Ok(found) => {
                        tracing::error!(events = found, "events Postgres refuses were set aside as `unprocessable` rejects; committing the rest");
                        store::commit_batch(&pool, &batch, ownership, &priced).await
                    }
                    Err(search) => Err(search),
                };
            }
            (batch, result)
        });
        InFlight {
            task,
            epochs,
            attempt,
            started: Instant::now(),
        }
    }

    /// Commits what is being built and waits for every commit. `--once` gives up on a commit
    /// still under way after `stall_timeout` (the daemon, stopping, waits: its service
    /// manager's stop timeout bounds that, and nothing uncommitted is lost).
    fn finish(&self, session: &Session<'_>, run: &mut RunState) -> Result<(), AggregatorError> {
        loop {
            let mut committing = false;
            for lane in 0..run.lanes.len() {
                self.reap(lane, session, run)?;
                if run.lanes[lane].in_flight.is_none() {
                    self.advance(lane, true, session, run)?;
                }
                if let Some(in_flight) = &run.lanes[lane].in_flight {
                    committing = true;
                    let waited = in_flight.started.elapsed();
                    if session.mode == RunMode::Once && waited >= self.config.stall_timeout {
                        return Err(AggregatorError::CommitStuck { waited });
                    }
                }
            }
            if !committing {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Takes in a lane's commit if it finished: notifies on success, retries what can be
    /// retried, and on fencing drops the work in progress and takes the partitions again after
    /// a delay (`--once`: ends, `TakenOver`).
    fn reap(
        &self,
        lane: usize,
        session: &Session<'_>,
        run: &mut RunState,
    ) -> Result<(), AggregatorError> {
        let Some(in_flight) = run.lanes[lane].in_flight.take() else {
            return Ok(());
        };
        if !in_flight.task.is_finished() {
            run.lanes[lane].in_flight = Some(in_flight);
            return Ok(());
        }
        let (batch, result) = self
            .runtime
            .block_on(in_flight.task)
            .map_err(|e| AggregatorError::CommitTask(e.to_string()))?;
        match result {
            Ok(report) => {
                self.postgres.up();
                run.last_progress = Instant::now();
                self.notify(session, &batch, &report, &mut run.summary);
                Ok(())
            }
            Err(AggregatorStoreError::Fenced { topic, partition }) => {
                tracing::warn!(%topic, partition, "batch fenced: another aggregator took the partition; rolled back");
                telemetry::record_fenced();
                run.summary.fenced += 1;
                if session.mode == RunMode::Once {
                    // The partitions belong to another aggregator now: this run ends with
                    // what it committed and says so (taking them back would fence that
                    // one in turn, for ever), rather than report them drained.
                    return Err(AggregatorError::TakenOver { partition });
                }
                self.restart_assignment(session, run, Instant::now() + RETAKE_DELAY);
                Ok(())
            }
            Err(AggregatorStoreError::Redefined { meter }) => {
                let mut batch = batch;
                self.redefined(&meter, &mut batch)?;
                // With the retries' backoff: a catalog that keeps failing the check (or cannot
                // be read) is not asked in a tight loop.
                let retry = self.launch(batch, in_flight.epochs, in_flight.attempt + 1);
                run.lanes[lane].in_flight = Some(InFlight {
                    started: in_flight.started,
                    ..retry
                });
                Ok(())
            }
            Err(error @ (AggregatorStoreError::Retryable(_) | AggregatorStoreError::Data(_))) => {
                let attempt = in_flight.attempt + 1;
                if let AggregatorStoreError::Retryable(e) = &error {
                    self.postgres.down(e);
                } else {
                    tracing::error!(%error, attempt, "batch refused by Postgres and no single event is to blame; retrying");
                }
                if session.stop.is_cancelled() {
                    // Not lost: nothing was stored, and Kafka still has the events. No later
                    // batch of this lane may commit now: its offsets would pass this one's.
                    tracing::warn!(%error, "stopping with an uncommitted batch; it will be consumed again");
                    run.lanes[lane].abandoned = true;
                    run.lanes[lane].building = Batch::default();
                    return Ok(());
                }
                if session.mode == RunMode::Once && attempt >= ONCE_ATTEMPTS {
                    return Err(AggregatorError::PostgresUnreachable(error));
                }
                telemetry::record_retry();
                let retry = self.launch(batch, in_flight.epochs, attempt);
                run.lanes[lane].in_flight = Some(InFlight {
                    started: in_flight.started,
                    ..retry
                });
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The rules batches are checked under now.
    fn rules(&self) -> Arc<Rules> {
        self.rules
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn replace_rules(&self, change: impl FnOnce(&mut Rules)) {
        let mut rules = self.rules.write().unwrap_or_else(PoisonError::into_inner);
        let mut next = Rules::clone(&rules);
        change(&mut next);
        *rules = Arc::new(next);
    }

    /// `tally rebuild` swapped in windows recomputed under a new definition of `meter` (a batch
    /// found its version bumped): takes every configured meter's definition from the catalog
    /// (the rebuild recorded the new one there), and checks `batch` again under them. Batches
    /// other lanes are building fail the same check when they commit, and are checked again
    /// then.
    fn redefined(&self, meter: &str, batch: &mut Batch) -> Result<(), AggregatorError> {
        tracing::warn!(
            meter,
            "meter redefined by tally rebuild; counting under its new definition from now on"
        );
        let names: Vec<String> = self.meters.iter().map(|m| m.name.clone()).collect();
        let catalog = self.runtime.block_on(async {
            let mut conn = self.pool.acquire().await?;
            let mut found = Vec::new();
            for name in &names {
                if let Some(recorded) = tally_db::meters::definition(&mut conn, name).await? {
                    found.push(recorded);
                }
            }
            Ok::<_, sqlx::Error>(found)
        });
        let catalog = match catalog {
            Ok(catalog) => catalog,
            Err(error) => {
                // Retried as any batch whose commit failed: it fails the check again.
                self.postgres.down(&error);
                return Ok(());
            }
        };
        let mut definitions = self.meters.clone();
        let mut versions = HashMap::new();
        for (recorded, version) in catalog {
            versions.insert(recorded.name.clone(), version);
            if let Some(configured) = definitions.iter_mut().find(|m| m.name == recorded.name) {
                configured.aggregation = recorded.aggregation;
                configured.group_by = recorded.group_by;
                configured.unique_dimension = recorded.unique_dimension;
            }
        }
        let meters = Meters::new(&definitions).map_err(AggregatorError::Config)?;
        self.replace_rules(|rules| {
            rules.meters = meters;
            rules.versions = Arc::new(versions);
        });
        batch.recheck(&self.rules(), Utc::now());
        Ok(())
    }

    /// After a commit: tell Kafka (for lag tools), wake the DLQ publisher, record metrics.
    fn notify(
        &self,
        session: &Session<'_>,
        batch: &Batch,
        report: &BatchReport,
        summary: &mut RunSummary,
    ) {
        self.step(Step::AfterCommit);
        let mut committed = TopicPartitionList::new();
        for (&partition, &next) in &batch.next_offsets {
            let _ =
                committed.add_partition_offset(&self.kafka.topic, partition, Offset::Offset(next));
        }
        if let Err(e) = session.consumer.commit(&committed, CommitMode::Async) {
            tracing::debug!(error = %e, "offset commit to Kafka failed (informational only)");
        }
        if report.rejected_total() > 0 {
            session.dlq_wake.notify_one();
        }
        self.step(Step::AfterNotify);
        telemetry::record_batch(report, &batch.timestamps_ms, Utc::now().timestamp_millis());
        #[cfg(feature = "testing")]
        if let Some(on_commit) = &self.hooks.on_commit {
            on_commit(report, &batch.timestamps_ms);
        }
        summary.batches += 1;
        summary.consumed += report.consumed;
        summary.counted += report.counted;
        summary.duplicates += report.duplicates;
        summary.rejected += report.rejected_total();
        tracing::debug!(
            consumed = report.consumed,
            counted = report.counted,
            duplicates = report.duplicates,
            rejected = report.rejected_total(),
            windows = report.windows,
            transaction_ms = report.transaction.as_millis() as u64,
            "batch committed"
        );
    }

    /// Deletes expired dedup claims every [`MAINTENANCE_INTERVAL`], in the background (a
    /// failure is retried a minute later; batches never wait for it).
    fn spawn_maintenance(&self, stop: CancellationToken) {
        let pool = self.pool.clone();
        let retention = TimeDelta::from_std(self.config.dedup_retention).unwrap_or(TimeDelta::MAX);
        let horizon = TimeDelta::from_std(self.config.lateness_horizon).unwrap_or(TimeDelta::MAX);
        let task_stop = stop.clone();
        let _runtime = self.runtime.enter();
        tally_runtime::supervise("dedup_expiry", stop, move || {
            let (pool, stop) = (pool.clone(), task_stop.clone());
            async move {
                loop {
                    let today = Utc::now().date_naive();
                    // One spare day: a same-payload copy of an expiring id is `too_late` by then.
                    let claimed_before = today - retention - TimeDelta::days(1);
                    let values_before = Utc::now() - horizon - TimeDelta::days(1);
                    let wait = match store::delete_expired(&pool, claimed_before, values_before)
                        .await
                    {
                        Ok(deleted) => {
                            if deleted > 0 {
                                tracing::info!(deleted, "deleted expired dedup claims");
                            }
                            MAINTENANCE_INTERVAL
                        }
                        Err(error) => {
                            tracing::warn!(%error, "deleting expired dedup claims failed; trying again in a minute");
                            Duration::from_secs(60)
                        }
                    };
                    if sleep_unless_stopped(wait, &stop).await {
                        return Ok(());
                    }
                }
            }
        });
    }

    /// Copies rejected events to the DLQ topic in the background: woken after each batch with
    /// rejects, and every [`DLQ_INTERVAL`] anyway. The table is the record; a copy that cannot
    /// be made yet (Kafka or Postgres away) is made later.
    fn spawn_dlq_publisher(
        &self,
        producer: rdkafka::producer::FutureProducer,
        wake: Arc<Notify>,
        stop: CancellationToken,
    ) {
        let pool = self.pool.clone();
        let topic = self.kafka.dlq_topic.clone();
        let task_stop = stop.clone();
        let _runtime = self.runtime.enter();
        tally_runtime::supervise("dlq_publisher", stop, move || {
            let (pool, producer, topic, wake, stop) = (
                pool.clone(),
                producer.clone(),
                topic.clone(),
                wake.clone(),
                task_stop.clone(),
            );
            async move {
                let mut failing = false;
                loop {
                    match kafka::publish_dlq(&pool, &producer, &topic).await {
                        Ok(published) => {
                            if failing {
                                tracing::info!(%topic, "rejected events are copied to the DLQ topic again");
                            }
                            failing = false;
                            if published > 0 {
                                tracing::debug!(
                                    published,
                                    "rejected events copied to the DLQ topic"
                                );
                            }
                        }
                        Err(error) => {
                            if !failing {
                                tracing::warn!(%error, %topic, "cannot copy rejected events to the DLQ topic yet; they are safe in rejected_events and will be copied later");
                            }
                            failing = true;
                        }
                    }
                    if let Ok((pending, oldest)) = tally_db::rejects::dlq_backlog(&pool).await {
                        telemetry::record_dlq_backlog(pending, oldest);
                    }
                    tokio::select! {
                        _ = wake.notified() => {}
                        _ = tokio::time::sleep(DLQ_INTERVAL) => {}
                        _ = stop.cancelled() => return Ok(()),
                    }
                }
            }
        });
    }

    /// Watches this member's progress in the background (`watchdog.rs`).
    fn spawn_watchdog(&self, group: &Group, membership: Arc<Membership>, stop: CancellationToken) {
        let pool = self.pool.clone();
        let kafka = self.kafka.clone();
        let member = Member {
            owner: group.owner.clone(),
            group: group.id.clone(),
            instance_id: group.instance_id.clone(),
        };
        let stall_timeout = self.config.stall_timeout;
        let task_stop = stop.clone();
        let _runtime = self.runtime.enter();
        tally_runtime::supervise("aggregator_watchdog", stop, move || {
            watchdog::run(
                pool.clone(),
                kafka.clone(),
                member.clone(),
                membership.clone(),
                stall_timeout,
                task_stop.clone(),
            )
        });
    }

    /// One DLQ pass now, for `--once` (whose background publisher ends with the run).
    fn publish_dlq_now(&self, producer: &rdkafka::producer::FutureProducer) {
        let publish = kafka::publish_dlq(&self.pool, producer, &self.kafka.dlq_topic);
        match self
            .runtime
            .block_on(async { tokio::time::timeout(KAFKA_TIMEOUT * 3, publish).await })
        {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot copy rejected events to the DLQ topic yet; the next run will")
            }
            Err(_) => tracing::warn!(
                "copying rejected events to the DLQ topic timed out; the next run will"
            ),
        }
    }

    /// The topic's partitions, or why there are none.
    fn check_topic(
        &self,
        consumer: &BaseConsumer<AggregatorContext>,
    ) -> Result<Vec<i32>, AggregatorError> {
        let metadata = consumer
            .fetch_metadata(Some(&self.kafka.topic), KAFKA_TIMEOUT)
            .map_err(|e| self.unreachable(e))?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == self.kafka.topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            return Err(AggregatorError::TopicMissing {
                topic: self.kafka.topic.clone(),
                brokers: self.kafka.brokers.clone(),
            });
        }
        Ok(partitions)
    }

    fn unreachable(&self, error: rdkafka::error::KafkaError) -> AggregatorError {
        // librdkafka's refusal of an option quotes its value, which may be a password.
        let reason = self.kafka.options.redact(&error.to_string());
        if matches!(error, rdkafka::error::KafkaError::ClientConfig(..)) {
            return AggregatorError::Config(format!(
                "kafka.options: {reason}; fix or remove that option (see librdkafka's CONFIGURATION.md)"
            ));
        }
        AggregatorError::KafkaUnreachable {
            brokers: self.kafka.brokers.clone(),
            reason,
        }
    }

    /// A named point of a batch's life: tests crash or observe the process here.
    fn step(&self, step: Step) {
        #[cfg(feature = "testing")]
        if let Some(on_step) = &self.hooks.on_step {
            on_step(step);
        }
        let _ = step;
    }
}

/// What every step of one `run` works with.
struct Session<'a> {
    consumer: &'a BaseConsumer<AggregatorContext>,
    dlq_wake: &'a Notify,
    mode: RunMode,
    stop: &'a CancellationToken,
    membership: &'a Membership,
}

/// How a consumer's time in the group ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Consumed {
    /// Stopped, or (`--once`) drained.
    Stopped,
    /// The watchdog found the member stalled: join again with a fresh consumer.
    Rejoin,
}

/// The state of one `run`.
struct RunState {
    lanes: Vec<Lane>,
    /// The partitions taken in Postgres, with the epoch each was taken at.
    epochs: Epochs,
    /// Per taken partition: the next offset to accept (older messages are stale).
    positions: HashMap<i32, i64>,
    /// Per partition: messages consumed since the run started (never reset, unlike
    /// `positions`: what the watchdog takes as this member's own progress).
    fetched: HashMap<i32, u64>,
    /// When a message was last consumed.
    last_message: Instant,
    /// `--once`: when every partition first reached its end offset.
    ends_reached: Option<Instant>,
    /// `--once`: per partition, the end offset seen when it was taken.
    targets: HashMap<i32, i64>,
    /// Partitions Kafka assigned that are not taken in Postgres yet (paused until they are).
    pending: Vec<i32>,
    next_take: Instant,
    take_backoff: Backoff,
    /// Takes that failed in a row (`--once` gives up after [`ONCE_ATTEMPTS`]).
    take_failures: u32,
    taken_once: bool,
    /// When a message was last consumed or partitions last taken (`--once` gives up after
    /// `stall_timeout` without).
    last_progress: Instant,
    summary: RunSummary,
}

/// The partitions with `partition % lanes == lane`. A lane commits its batches one at a time,
/// in order (so each partition's stored offset only moves forward), while the other lanes
/// commit theirs at the same time on other connections: Postgres gets more than one core.
#[derive(Default)]
struct Lane {
    building: Batch,
    in_flight: Option<InFlight>,
    /// The lane's partitions are paused: its next batch is full and waits for the commit.
    paused: bool,
    /// A batch of this lane could not be committed before stopping: nothing after it may be.
    abandoned: bool,
}

struct InFlight {
    task: tokio::task::JoinHandle<(Batch, Result<BatchReport, AggregatorStoreError>)>,
    epochs: Epochs,
    attempt: u32,
    /// When the batch's first try was launched.
    started: Instant,
}
