//! The aggregator loop: poll, build a batch, commit it in one transaction, repeat.
//!
//! A batch's life: messages are decoded and checked as they are polled ([`Batch::push`]); when
//! the batch is full or old enough, [`store::commit_batch`] claims its ids, adds the new ones to
//! the minute windows and daily rollup, records rejects and advances the stored offsets, in one
//! transaction. Only then is anything told: Kafka's committed offsets (for lag tools), the DLQ
//! topic, metrics. A crash at any point leaves Postgres either before or after the whole batch,
//! and the consumer resumes from the offsets Postgres holds.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{NaiveDate, TimeDelta, Utc};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message as _;
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use tally_core::config::KafkaConfig;
use tally_core::{MeterDefinition, Meters};
use tokio_util::sync::CancellationToken;

use crate::batch::{Batch, Message, Rules};
use crate::config::AggregatorConfig;
use crate::kafka::{self, AggregatorContext};
use crate::store::{self, Epochs, Ownership, StoreError};
use crate::telemetry::{self, BatchReport};

/// How long Kafka may take to answer the start-up metadata request.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `--once` waits for the group to hand it partitions.
const ASSIGNMENT_TIMEOUT: Duration = Duration::from_secs(60);
/// How often expired dedup partitions are dropped.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(3600);
/// `--once` gives up on Postgres after this many failed attempts at one batch.
const ONCE_ATTEMPTS: u32 = 5;

/// Run until stopped, or drain what is there and exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Long-running: stop on cancellation, after finishing and committing the current batch.
    Daemon,
    /// For cron: consume up to the end offsets seen when each partition was assigned, commit,
    /// return.
    Once,
}

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

type StepHook = Arc<dyn Fn(Step) + Send + Sync>;
type CommitHook = Arc<dyn Fn(&BatchReport, &[i64]) + Send + Sync>;

/// Observation points; empty in production.
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
}

/// Why the aggregator stopped with an error. The message names the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    #[error("cannot reach Kafka at {brokers}: {reason}; check kafka.brokers and that the brokers are up")]
    KafkaUnreachable { brokers: String, reason: String },
    #[error("Kafka topic {topic:?} does not exist on {brokers}; create it (docker-compose.yml does) or set kafka.topic")]
    TopicMissing { topic: String, brokers: String },
    #[error("Kafka gave this aggregator no partitions within {0:?}; check that the group's other members are healthy")]
    NoAssignment(Duration),
    #[error("{0}")]
    Config(String),
    #[error("a batch commit task failed: {0}; this is a bug, please report it")]
    CommitTask(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One aggregator process's worth of state.
pub struct Aggregator {
    config: AggregatorConfig,
    kafka: KafkaConfig,
    meters: Vec<MeterDefinition>,
    rules: Rules,
    pool: PgPool,
    runtime: tokio::runtime::Handle,
    owner: String,
    hooks: Hooks,
    known_days: Mutex<BTreeSet<NaiveDate>>,
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
        };
        Ok(Aggregator {
            config,
            kafka,
            meters,
            rules,
            pool,
            runtime,
            owner: format!("{}-{}", hostname(), uuid::Uuid::now_v7().simple()),
            hooks: Hooks::default(),
            known_days: Mutex::new(BTreeSet::new()),
        })
    }

    pub fn with_hooks(mut self, hooks: Hooks) -> Self {
        self.hooks = hooks;
        self
    }

    /// Consumes until `stop` is cancelled ([`Mode::Daemon`]) or the topic is drained
    /// ([`Mode::Once`]). Either way the batch in progress is committed before returning.
    pub fn run(&self, mode: Mode, stop: &CancellationToken) -> Result<RunSummary, AggregatorError> {
        telemetry::describe();
        self.runtime
            .block_on(store::sync_meters(&self.pool, &self.meters))?;
        self.maintain()?;
        let context = AggregatorContext {
            pool: self.pool.clone(),
            runtime: self.runtime.clone(),
            group: self.config.group_id.clone(),
            topic: self.kafka.topic.clone(),
            owner: self.owner.clone(),
            epochs: Mutex::default(),
            starts: Mutex::default(),
            rebalanced: AtomicBool::new(false),
            failure: Mutex::default(),
        };
        let consumer = kafka::consumer(&self.kafka, context).map_err(|e| self.unreachable(e))?;
        self.check_topic(&consumer)?;
        let dlq = kafka::dlq_producer(&self.kafka).map_err(|e| self.unreachable(e))?;
        self.publish_dlq(&dlq);
        consumer
            .subscribe(&[&self.kafka.topic])
            .map_err(|e| self.unreachable(e))?;
        tracing::info!(group = %self.config.group_id, topic = %self.kafka.topic, owner = %self.owner, ?mode, "aggregator started");

        let session = Session {
            consumer: &consumer,
            dlq: &dlq,
            mode,
            stop,
        };
        let started = Instant::now();
        let lanes = self.config.parallel_commits;
        let mut run = RunState {
            lanes: (0..lanes).map(|_| Lane::default()).collect(),
            positions: HashMap::new(),
            targets: HashMap::new(),
            summary: RunSummary::default(),
        };
        let mut assigned_once = false;
        let mut last_maintenance = Instant::now();

        while !stop.is_cancelled() {
            let polled = consumer.poll(self.poll_wait(&run));
            let context = consumer.context();
            if context.take_rebalanced() {
                // Commits in flight finish (or are fenced: the new assignment bumped every
                // epoch). Eager protocol: everything being built belonged to the revoked
                // assignment, so it is dropped and consumed again from the stored offsets.
                self.settle(&session, &mut run)?;
                for lane in &mut run.lanes {
                    lane.building = Batch::default();
                }
                assigned_once = true;
                run.positions = self.start_positions(&consumer, mode, &mut run.targets);
                if let Some(failure) = context.take_failure() {
                    return Err(failure.into());
                }
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
                            let message = Message {
                                partition,
                                offset: m.offset(),
                                key: m.key(),
                                payload: m.payload(),
                                timestamp_ms: m.timestamp().to_millis(),
                            };
                            run.lanes[lane_of(partition, lanes)].building.push(
                                message,
                                &self.rules,
                                Utc::now(),
                            );
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "Kafka consumer error"),
                }
            }
            for lane in 0..lanes {
                self.advance(lane, false, &session, &mut run)?;
            }
            if last_maintenance.elapsed() >= MAINTENANCE_INTERVAL {
                self.maintain()?;
                last_maintenance = Instant::now();
            }
            if mode == Mode::Once {
                if !assigned_once && started.elapsed() > ASSIGNMENT_TIMEOUT {
                    return Err(AggregatorError::NoAssignment(ASSIGNMENT_TIMEOUT));
                }
                let drained = assigned_once
                    && run
                        .positions
                        .iter()
                        .all(|(p, next)| run.targets.get(p).is_none_or(|end| next >= end));
                if drained {
                    break;
                }
            }
        }
        // Finish: commit what is being built, and wait for every commit.
        for lane in 0..lanes {
            self.advance(lane, true, &session, &mut run)?;
        }
        self.settle(&session, &mut run)?;
        // Leave the group now (serving the revoke), so the others take over at once rather
        // than after the session timeout.
        consumer.unsubscribe();
        let leaving = Instant::now();
        while leaving.elapsed() < Duration::from_secs(2) && !consumer.context().take_rebalanced() {
            let _ = consumer.poll(Duration::from_millis(50));
        }
        tracing::info!(summary = ?run.summary, "aggregator stopped");
        Ok(run.summary)
    }

    /// How long `poll` may wait: until the oldest batch being built is due, at most 100 ms.
    fn poll_wait(&self, run: &RunState) -> Duration {
        let oldest = run.lanes.iter().filter_map(|l| l.building.opened).min();
        let wait = oldest.map_or(self.config.batch_max_wait, |opened| {
            self.config.batch_max_wait.saturating_sub(opened.elapsed())
        });
        wait.min(Duration::from_millis(100))
    }

    /// Moves one lane along: takes in a finished commit, and launches the batch being built
    /// once it is full or due (`finish`: now), waiting for the lane's previous commit first.
    fn advance(
        &self,
        lane: usize,
        finish: bool,
        session: &Session<'_>,
        run: &mut RunState,
    ) -> Result<(), AggregatorError> {
        self.reap(lane, false, session, run)?;
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
            if !(full || finish) {
                // Keep filling while the previous batch commits: bigger batches catch up.
                return Ok(());
            }
            // Backpressure: a full batch waits for its lane.
            self.reap(lane, true, session, run)?;
            if run.lanes[lane].building.is_empty() {
                return Ok(()); // dropped by a fenced commit
            }
        }
        let batch = std::mem::take(&mut run.lanes[lane].building);
        self.ensure_partitions(&batch.days())?;
        self.step(Step::BeforeCommit);
        // The batch is bound to the epochs its messages were consumed under: if a rebalance
        // bumps them before it commits, it is fenced rather than applied late.
        let epochs = session.consumer.context().epochs();
        run.lanes[lane].in_flight = Some(self.launch(batch, epochs, 0));
        Ok(())
    }

    /// Starts a batch's transaction on the runtime, after a backoff when it is a retry.
    fn launch(&self, batch: Batch, epochs: Epochs, attempt: u32) -> InFlight {
        let pool = self.pool.clone();
        let group = self.config.group_id.clone();
        let topic = self.kafka.topic.clone();
        let task_epochs = epochs.clone();
        let backoff = if attempt == 0 {
            Duration::ZERO
        } else {
            (Duration::from_millis(100) * 2u32.pow(attempt.min(7))).min(Duration::from_secs(10))
        };
        let task = self.runtime.spawn(async move {
            tokio::time::sleep(backoff).await;
            let ownership = Ownership {
                group: &group,
                topic: &topic,
                epochs: &task_epochs,
            };
            let result = store::commit_batch(&pool, &batch, ownership).await;
            (batch, result)
        });
        InFlight {
            task,
            epochs,
            attempt,
        }
    }

    /// Waits for every lane's commit.
    fn settle(&self, session: &Session<'_>, run: &mut RunState) -> Result<(), AggregatorError> {
        for lane in 0..run.lanes.len() {
            self.reap(lane, true, session, run)?;
        }
        Ok(())
    }

    /// Takes in a lane's commit if it finished (or, with `block`, once it finishes): notifies
    /// on success, retries what can be retried, and on fencing drops the lane's work and
    /// rewinds its partitions to the stored offsets.
    fn reap(
        &self,
        lane: usize,
        block: bool,
        session: &Session<'_>,
        run: &mut RunState,
    ) -> Result<(), AggregatorError> {
        let consumer = session.consumer;
        loop {
            let Some(in_flight) = run.lanes[lane].in_flight.take() else {
                return Ok(());
            };
            if !block && !in_flight.task.is_finished() {
                run.lanes[lane].in_flight = Some(in_flight);
                return Ok(());
            }
            let (batch, result) = self
                .runtime
                .block_on(in_flight.task)
                .map_err(|e| AggregatorError::CommitTask(e.to_string()))?;
            match result {
                Ok(report) => {
                    self.notify(session, &batch, &report, &mut run.summary);
                    return Ok(());
                }
                Err(StoreError::Fenced { topic, partition }) => {
                    tracing::warn!(%topic, partition, "batch fenced: another aggregator took the partition; rolled back");
                    telemetry::record_fenced();
                    run.summary.fenced += 1;
                    consumer.context().disown(partition);
                    run.positions.remove(&partition);
                    run.lanes[lane].building = Batch::default();
                    let lanes = run.lanes.len();
                    self.rewind(consumer, &mut run.positions, |p| lane_of(p, lanes) == lane)?;
                    return Ok(());
                }
                Err(StoreError::Retryable(e)) => {
                    let attempt = in_flight.attempt + 1;
                    if session.stop.is_cancelled() {
                        // Not lost: nothing was stored, and Kafka still has the events.
                        tracing::warn!(error = %e, "stopping with an uncommitted batch; it will be consumed again");
                        return Ok(());
                    }
                    if session.mode == Mode::Once && attempt >= ONCE_ATTEMPTS {
                        return Err(StoreError::Retryable(e).into());
                    }
                    tracing::warn!(error = %e, attempt, "batch commit failed; retrying");
                    telemetry::record_retry();
                    run.lanes[lane].in_flight = Some(self.launch(batch, in_flight.epochs, attempt));
                    if !block {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// After a commit: tell Kafka (for lag tools), copy rejects to the DLQ, record metrics.
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
            self.publish_dlq(session.dlq);
        }
        self.step(Step::AfterNotify);
        telemetry::record_batch(report, &batch.timestamps_ms, Utc::now().timestamp_millis());
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

    /// After a rebalance: where each owned partition resumes, and (for `--once`) where it ends.
    fn start_positions(
        &self,
        consumer: &BaseConsumer<AggregatorContext>,
        mode: Mode,
        targets: &mut HashMap<i32, i64>,
    ) -> HashMap<i32, i64> {
        let starts = consumer
            .context()
            .starts
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        let mut positions = HashMap::new();
        for (partition, stored) in starts {
            let watermarks = if stored.is_none() || mode == Mode::Once {
                consumer
                    .fetch_watermarks(&self.kafka.topic, partition, KAFKA_TIMEOUT)
                    .ok()
            } else {
                None
            };
            let start = stored.or(watermarks.map(|(low, _)| low)).unwrap_or(0);
            positions.insert(partition, start);
            if mode == Mode::Once {
                if let Some((_, high)) = watermarks {
                    targets.entry(partition).or_insert(high);
                }
            }
        }
        positions
    }

    /// Seeks the owned partitions `which` selects back to their stored offsets (after a
    /// rolled-back batch).
    fn rewind(
        &self,
        consumer: &BaseConsumer<AggregatorContext>,
        positions: &mut HashMap<i32, i64>,
        which: impl Fn(i32) -> bool,
    ) -> Result<(), AggregatorError> {
        let owned: Vec<i32> = consumer
            .context()
            .epochs()
            .into_keys()
            .filter(|&p| which(p))
            .collect();
        let stored = self.runtime.block_on(store::stored_offsets(
            &self.pool,
            &self.config.group_id,
            &self.kafka.topic,
            &owned,
        ))?;
        for partition in owned {
            let offset = stored.get(&partition).copied().flatten();
            let target = offset.map_or(Offset::Beginning, Offset::Offset);
            if let Err(e) = consumer.seek(&self.kafka.topic, partition, target, KAFKA_TIMEOUT) {
                tracing::warn!(partition, error = %e, "seek after a rolled-back batch failed");
            }
            positions.insert(partition, offset.unwrap_or(0));
        }
        Ok(())
    }

    fn ensure_partitions(&self, days: &BTreeSet<NaiveDate>) -> Result<(), AggregatorError> {
        let mut known = self.known_days.lock().unwrap_or_else(|p| p.into_inner());
        let missing: BTreeSet<NaiveDate> = days.difference(&known).copied().collect();
        if !missing.is_empty() {
            self.runtime
                .block_on(store::ensure_day_partitions(&self.pool, &missing))?;
            known.extend(missing);
        }
        Ok(())
    }

    /// Creates today's and tomorrow's dedup partitions and drops expired ones.
    fn maintain(&self) -> Result<(), AggregatorError> {
        let today = Utc::now().date_naive();
        let days: BTreeSet<NaiveDate> = [today, today + TimeDelta::days(1)].into();
        self.ensure_partitions(&days)?;
        let retention = TimeDelta::from_std(self.config.dedup_retention).unwrap_or(TimeDelta::MAX);
        let horizon = TimeDelta::from_std(self.config.lateness_horizon).unwrap_or(TimeDelta::MAX);
        // One spare day: an event exactly at the horizon still finds its partition.
        let keep_from = today - retention - TimeDelta::days(1);
        let values_before = Utc::now() - horizon - TimeDelta::days(1);
        let dropped =
            self.runtime
                .block_on(store::drop_expired(&self.pool, keep_from, values_before))?;
        if !dropped.is_empty() {
            self.known_days
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|day| *day >= keep_from);
            tracing::info!(?dropped, "dropped expired dedup partitions");
        }
        Ok(())
    }

    fn publish_dlq(&self, dlq: &FutureProducer) {
        match self
            .runtime
            .block_on(kafka::publish_dlq(&self.pool, dlq, &self.kafka.dlq_topic))
        {
            Ok(0) => {}
            Ok(n) => tracing::debug!(published = n, "rejected events copied to the DLQ topic"),
            // The events are safe in rejected_events; the copy is retried after the next batch.
            Err(e) => {
                tracing::warn!(error = %e, topic = %self.kafka.dlq_topic, "cannot publish rejected events to the DLQ topic yet")
            }
        }
    }

    fn check_topic(
        &self,
        consumer: &BaseConsumer<AggregatorContext>,
    ) -> Result<(), AggregatorError> {
        let metadata = consumer
            .fetch_metadata(Some(&self.kafka.topic), KAFKA_TIMEOUT)
            .map_err(|e| self.unreachable(e))?;
        let present = metadata.topics().iter().any(|t| {
            t.name() == self.kafka.topic && t.error().is_none() && !t.partitions().is_empty()
        });
        if !present {
            return Err(AggregatorError::TopicMissing {
                topic: self.kafka.topic.clone(),
                brokers: self.kafka.brokers.clone(),
            });
        }
        Ok(())
    }

    fn unreachable(&self, error: rdkafka::error::KafkaError) -> AggregatorError {
        AggregatorError::KafkaUnreachable {
            brokers: self.kafka.brokers.clone(),
            reason: error.to_string(),
        }
    }

    fn step(&self, step: Step) {
        if let Some(on_step) = &self.hooks.on_step {
            on_step(step);
        }
    }
}

/// What every step of one `run` works with.
struct Session<'a> {
    consumer: &'a BaseConsumer<AggregatorContext>,
    dlq: &'a FutureProducer,
    mode: Mode,
    stop: &'a CancellationToken,
}

/// The state of one `run`.
struct RunState {
    lanes: Vec<Lane>,
    /// Per owned partition: the next offset to accept (older messages are stale).
    positions: HashMap<i32, i64>,
    /// `--once`: per partition, the end offset seen when it was assigned.
    targets: HashMap<i32, i64>,
    summary: RunSummary,
}

/// The partitions with `partition % lanes == lane`. A lane commits its batches one at a time,
/// in order (so each partition's stored offset only moves forward), while the other lanes
/// commit theirs at the same time on other connections: Postgres gets more than one core.
#[derive(Default)]
struct Lane {
    building: Batch,
    in_flight: Option<InFlight>,
}

struct InFlight {
    task: tokio::task::JoinHandle<(Batch, Result<BatchReport, StoreError>)>,
    epochs: Epochs,
    attempt: u32,
}

fn lane_of(partition: i32, lanes: usize) -> usize {
    partition.unsigned_abs() as usize % lanes
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into())
}
