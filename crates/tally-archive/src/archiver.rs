//! `tally archive`: the loop that reads the usage topic in its own consumer group and flushes
//! what it read as files, exactly once.
//!
//! A batch's life: each record is decoded ([`ArchivedRecord::decode`]) and pushed into the
//! [`Buffer`] (one file being written per hour of events). When the files hold
//! `archive.file_bytes`, or the first record has waited `archive.flush_every`, or
//! `archive.max_open_files` hours are open, or the run ends, the buffer is flushed
//! ([`flush::flush`]): staged, recorded with the offsets it advances, published.
//!
//! Nothing is lost and nothing archived twice, because the archive's offsets live in Postgres
//! with the files: after a rebalance, a failed flush or a crash, the buffer is dropped and each
//! partition is read again from where `archive_offsets` says its archive ends.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use tally_core::config::KafkaConfig;
use tally_runtime::{sleep_unless_stopped, Backoff, RunMode};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::config::ArchiveConfig;
use crate::flush::{self, Buffer, FlushError, ONCE_OWNER};
use crate::kafka::{self, ArchiverContext};
use crate::{retention, telemetry, ArchiveError, ArchiveStore, ArchivedRecord};

/// How long Postgres may take to hand over partitions before the take is tried again.
const TAKE_TIMEOUT: Duration = Duration::from_secs(30);
const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);
/// After a flush was fenced, how long to wait for the rebalance that explains it before
/// taking the partitions back (the group still says they are this member's).
const FENCED_WAIT: Duration = Duration::from_secs(30);
/// `--once`: how many times a step that keeps failing is tried before the run gives up.
const ONCE_ATTEMPTS: u32 = 5;
/// `--once`: consuming nothing for this long without reaching the end offsets is a stall.
const ONCE_STALL: Duration = Duration::from_secs(60);
/// How often a daemon marks the partitions it holds as held (`archive_offsets.updated_at`), and
/// how recent a mark must be for `--once` to leave the partition to it.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
const LIVE_WITHIN: Duration = Duration::from_secs(20);
/// Records read between looks at the size trigger and, in `--once`, the end offsets (both
/// cost more than a record): a file overshoots `archive.file_bytes` by at most this many.
/// (The age and open-files triggers are looked at after every record.)
const CHECK_EVERY: u64 = 1024;
/// How often the daemon publishes what a crash left staged, removes orphans and applies
/// `archive.retention`.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(600);

/// Why the archiver stopped.
#[derive(Debug, thiserror::Error)]
pub enum ArchiverError {
    #[error("archive.url: {0}")]
    Store(#[from] ArchiveError),
    #[error("Kafka: {0}")]
    Kafka(String),
    #[error("Postgres: {0}")]
    Postgres(String),
    #[error("flush: {0}")]
    Flush(FlushError),
    #[error("{0}")]
    Identity(String),
    #[error("a running `tally archive` daemon holds {partitions} partition(s) ({example}), marked within the last 20 s: --once is for hosts without the daemon; stop the daemon first, or let it archive")]
    Busy { partitions: usize, example: String },
    #[error("consumed nothing for {waited:?} before reaching the end offsets seen at start ({behind}); is the broker serving the topic?")]
    Stalled { waited: Duration, behind: String },
}

/// What a run archived.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSummary {
    pub consumed: u64,
    pub archived: u64,
    pub files: u64,
    pub flushes: u64,
}

pub struct Archiver {
    config: ArchiveConfig,
    kafka: KafkaConfig,
    /// The aggregator's: an event older than this on arrival is filed under the hour it came.
    lateness_horizon: chrono::TimeDelta,
    pool: PgPool,
    store: ArchiveStore,
    runtime: Handle,
    /// Unique per process: the owner `archive_offsets` records (a `--once` run's starts with
    /// [`flush::ONCE_OWNER`]).
    owner: String,
}

/// The loop's state between polls.
struct RunState {
    /// Who this run is in `archive_offsets`.
    owner: String,
    buffer: Buffer,
    /// When the buffer's first record arrived.
    opened: Option<Instant>,
    /// Per taken partition: the next offset expected. A record before it is stale (fetched
    /// before a seek) and ignored.
    positions: HashMap<i32, i64>,
    /// Partitions assigned but not yet taken in Postgres (paused until they are).
    pending: Vec<i32>,
    next_take: Instant,
    backoff: Backoff,
    failures: u32,
    /// `--once`: each partition's end offset when it was taken.
    targets: HashMap<i32, i64>,
    last_message: Instant,
    summary: RunSummary,
}

impl Archiver {
    /// Opens the store `config.url` names (so a bad URL fails before anything is consumed).
    pub fn new(
        config: ArchiveConfig,
        kafka: KafkaConfig,
        lateness_horizon: Duration,
        pool: PgPool,
        runtime: Handle,
    ) -> Result<Archiver, ArchiverError> {
        let store = ArchiveStore::open(&config.url)?;
        Ok(Archiver {
            config,
            kafka,
            lateness_horizon: chrono::TimeDelta::from_std(lateness_horizon)
                .unwrap_or(chrono::TimeDelta::MAX),
            pool,
            store,
            runtime,
            owner: format!("{}-{}", hostname(), uuid::Uuid::now_v7()),
        })
    }

    /// Archives until `stop` (daemon), or up to the end offsets seen at start (`--once`).
    pub fn run(
        &self,
        mode: RunMode,
        stop: &CancellationToken,
    ) -> Result<RunSummary, ArchiverError> {
        telemetry::describe();
        self.runtime
            .block_on(flush::same_store(&self.pool, &self.store, &self.config.url))
            .map_err(|e| ArchiverError::Identity(e.to_string()))?;
        self.maintain();
        let background = stop.child_token();
        let _stop_background = background.clone().drop_guard();
        if mode == RunMode::Daemon {
            self.spawn_maintenance(background.clone());
            self.spawn_heartbeat(self.owner.clone(), background);
        }
        let consumer = kafka::consumer(&self.kafka, &self.config.group_id, &self.owner)
            .map_err(|e| ArchiverError::Kafka(self.kafka.options.redact(&e.to_string())))?;
        let Some(partitions) = self.wait_for_topic(&consumer, mode, stop)? else {
            return Ok(RunSummary::default());
        };
        let mut run = RunState {
            owner: match mode {
                RunMode::Daemon => self.owner.clone(),
                RunMode::Once => format!("{ONCE_OWNER}{}", self.owner),
            },
            buffer: Buffer::new(self.lateness_horizon),
            opened: None,
            positions: HashMap::new(),
            pending: Vec::new(),
            next_take: Instant::now(),
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(30)),
            failures: 0,
            targets: HashMap::new(),
            last_message: Instant::now(),
            summary: RunSummary::default(),
        };
        match mode {
            // The daemon shares the partitions with the group's other archivers.
            RunMode::Daemon => consumer
                .subscribe(&[&self.kafka.topic])
                .map_err(|e| ArchiverError::Kafka(e.to_string()))?,
            // `--once` takes every partition in Postgres and reads them itself, without
            // joining the group; not while a daemon archives them (two archivers would fence
            // each other in turn), but from one that stopped or hangs.
            RunMode::Once => {
                let held = self
                    .runtime
                    .block_on(flush::held_by_others(
                        &self.pool,
                        &self.kafka.topic,
                        &run.owner,
                        LIVE_WITHIN,
                    ))
                    .map_err(|e| ArchiverError::Postgres(e.to_string()))?;
                if let Some((partition, owner)) = held.first() {
                    return Err(ArchiverError::Busy {
                        partitions: held.len(),
                        example: format!("partition {partition} by {owner}"),
                    });
                }
                run.pending = partitions;
            }
        }
        tracing::info!(group = %self.config.group_id, topic = %self.kafka.topic, owner = %run.owner, url = %self.config.url, mode = mode.as_str(), "archiver started");
        let result = self.consume(&consumer, mode, stop, &mut run);
        if mode == RunMode::Daemon {
            consumer.unsubscribe();
            let leaving = Instant::now();
            while leaving.elapsed() < Duration::from_secs(2)
                && !consumer.context().take_rebalanced()
            {
                let _ = consumer.poll(Duration::from_millis(50));
            }
        }
        {
            // Leaves the partitions to whoever comes next, daemon or cron.
            let released =
                self.runtime
                    .block_on(flush::release(&self.pool, &self.kafka.topic, &run.owner));
            if let Err(error) = released {
                tracing::warn!(%error, "could not release the partitions in Postgres");
            }
        }
        result?;
        let summary = run.summary;
        tracing::info!(
            consumed = summary.consumed,
            archived = summary.archived,
            files = summary.files,
            flushes = summary.flushes,
            "archiver stopped"
        );
        Ok(summary)
    }

    fn consume(
        &self,
        consumer: &BaseConsumer<ArchiverContext>,
        mode: RunMode,
        stop: &CancellationToken,
        run: &mut RunState,
    ) -> Result<(), ArchiverError> {
        let topic = self.kafka.topic.as_str();
        while !stop.is_cancelled() {
            let polled = consumer.poll(Duration::from_millis(100));
            let quiet = !matches!(polled, Some(Ok(_)));
            if consumer.context().take_rebalanced() {
                // What was read is archived before the partitions move on, so that frequent
                // rebalances cannot keep the archive from advancing. The flush records only
                // partitions this archiver still holds in Postgres: one a member took already
                // fences it, and its records are read again by that member.
                if !run.buffer.is_empty() {
                    self.flush(consumer, mode, run)?;
                }
                let assigned = assigned(consumer, topic);
                tracing::info!(partitions = ?assigned, "partitions assigned; taking them in Postgres before reading");
                self.rewind(run, assigned, Instant::now());
            }
            if !run.pending.is_empty() && Instant::now() >= run.next_take {
                self.take(consumer, mode, run)?;
            }
            if let Some(Ok(message)) = polled {
                let partition = message.partition();
                let offset = message.offset();
                if let Some(&next) = run.positions.get(&partition) {
                    if offset >= next {
                        if offset > next {
                            tracing::warn!(partition, from = next, to = offset, "offsets skipped: records Kafka no longer has (or a compacted or transactional topic's gaps) were not archived");
                            telemetry::record_skipped(offset - next);
                        }
                        run.positions.insert(partition, offset + 1);
                        let received_at = message
                            .timestamp()
                            .to_millis()
                            .and_then(DateTime::<Utc>::from_timestamp_millis)
                            .unwrap_or_else(Utc::now);
                        let record = ArchivedRecord::decode(
                            message.payload().unwrap_or_default(),
                            partition,
                            offset,
                            received_at,
                        );
                        run.buffer.push(record).map_err(ArchiverError::Store)?;
                        run.opened.get_or_insert_with(Instant::now);
                        run.summary.consumed += 1;
                        run.last_message = Instant::now();
                    }
                }
            } else if let Some(Err(e)) = polled {
                tracing::debug!(error = %e, "Kafka consumer error");
            }
            // What costs more than a record's own work (the files' sizes, the end offsets)
            // is looked at when the topic is quiet, or every CHECK_EVERY records.
            let look = quiet
                || run.summary.consumed.is_multiple_of(CHECK_EVERY)
                || run.buffer.open_files() > self.config.max_open_files
                || run
                    .opened
                    .is_some_and(|at| at.elapsed() >= self.config.flush_every);
            if !look {
                continue;
            }
            let drained = mode == RunMode::Once && self.drained(consumer, run)?;
            if !run.buffer.is_empty() && (drained || self.flush_due(run)) {
                self.flush(consumer, mode, run)?;
            }
            if drained && run.pending.is_empty() && run.buffer.is_empty() {
                return Ok(());
            }
            telemetry::record_buffered(run.buffer.records());
        }
        // Stopped: what was read is archived, if it can be now (else it is read again).
        if !run.buffer.is_empty() {
            let _ = self.flush(consumer, RunMode::Daemon, run);
        }
        Ok(())
    }

    fn flush_due(&self, run: &RunState) -> bool {
        run.buffer.memory_bytes() >= self.config.file_bytes
            || run.buffer.open_files() > self.config.max_open_files
            || run
                .opened
                .is_some_and(|at| at.elapsed() >= self.config.flush_every)
    }

    /// Flushes the buffer. A flush that recorded nothing has its records read again: the
    /// partitions are taken anew and each resumes where Postgres says its archive ends.
    fn flush(
        &self,
        consumer: &BaseConsumer<ArchiverContext>,
        mode: RunMode,
        run: &mut RunState,
    ) -> Result<(), ArchiverError> {
        let buffer = std::mem::replace(&mut run.buffer, Buffer::new(self.lateness_horizon));
        run.opened = None;
        telemetry::record_buffered(0);
        let (records, accepted) = (buffer.records(), buffer.accepted());
        let started = Instant::now();
        let flushed = self.runtime.block_on(flush::flush(
            &self.pool,
            &self.store,
            &self.kafka.topic,
            &run.owner,
            buffer,
        ));
        let error = match flushed {
            Ok(flushed) => {
                let bytes = flushed.files.iter().map(|f| f.bytes).sum();
                telemetry::record_flush(
                    accepted,
                    records - accepted,
                    flushed.files.len(),
                    bytes,
                    started.elapsed(),
                );
                run.summary.flushes += 1;
                run.summary.files += flushed.files.len() as u64;
                run.summary.archived += records as u64;
                run.failures = 0;
                tracing::info!(
                    records,
                    files = flushed.files.len(),
                    bytes,
                    took_ms = started.elapsed().as_millis() as u64,
                    "flushed"
                );
                return Ok(());
            }
            Err(FlushError::Unpublished(error)) => {
                // Recorded: the records must not be read again; maintenance publishes it.
                telemetry::record_flush(accepted, records - accepted, 0, 0, started.elapsed());
                run.summary.flushes += 1;
                run.summary.archived += records as u64;
                tracing::warn!(%error, "flush recorded but not yet published; it is published by the next maintenance pass");
                return Ok(());
            }
            Err(error) => error,
        };
        let (reason, wait) = match &error {
            FlushError::Archive(_) => ("store", None),
            FlushError::Store(_) => ("postgres", None),
            FlushError::Fenced { .. } => ("fenced", Some(FENCED_WAIT)),
            FlushError::Overlap { .. } => ("overlap", None),
            FlushError::TooSlow(_) => ("slow", None),
            FlushError::Unpublished(_) => unreachable!("answered above"),
        };
        telemetry::record_failure(reason);
        run.failures += 1;
        tracing::warn!(%error, records, "flush recorded nothing; its records are read again");
        if mode == RunMode::Once
            && (matches!(error, FlushError::Fenced { .. }) || run.failures >= ONCE_ATTEMPTS)
        {
            return Err(ArchiverError::Flush(error));
        }
        let take_at = Instant::now() + wait.unwrap_or_else(|| run.backoff.next_wait());
        let partitions = match mode {
            RunMode::Daemon => assigned(consumer, &self.kafka.topic),
            RunMode::Once => run.positions.keys().copied().collect(),
        };
        self.rewind(run, partitions, take_at);
        let mut paused = TopicPartitionList::new();
        for &partition in &run.pending {
            paused.add_partition(&self.kafka.topic, partition);
        }
        if let Err(e) = consumer.pause(&paused) {
            tracing::warn!(error = %e, "pausing the partitions to read again failed");
        }
        Ok(())
    }

    /// Marks the partitions this daemon holds as held every [`HEARTBEAT_EVERY`], so that
    /// `--once` leaves them alone: from a task of its own, so a long flush does not stop it.
    fn spawn_heartbeat(&self, owner: String, stop: CancellationToken) {
        let (pool, topic) = (self.pool.clone(), self.kafka.topic.clone());
        self.runtime.spawn(async move {
            while !sleep_unless_stopped(HEARTBEAT_EVERY, &stop).await {
                let marked = tokio::time::timeout(
                    Duration::from_secs(5),
                    flush::mark_held(&pool, &topic, &owner),
                )
                .await;
                if !matches!(marked, Ok(Ok(_))) {
                    tracing::debug!("could not mark the held partitions in Postgres; trying again");
                }
            }
        });
    }

    /// Drops what was read, and queues `partitions` to be taken in Postgres at `take_at`.
    fn rewind(&self, run: &mut RunState, partitions: Vec<i32>, take_at: Instant) {
        run.buffer = Buffer::new(self.lateness_horizon);
        run.opened = None;
        run.positions.clear();
        run.pending = partitions;
        run.next_take = take_at;
        telemetry::record_buffered(0);
    }

    /// Takes the pending partitions in Postgres and starts each where its archive ends. On a
    /// Postgres error they stay paused and this is tried again after a backoff.
    fn take(
        &self,
        consumer: &BaseConsumer<ArchiverContext>,
        mode: RunMode,
        run: &mut RunState,
    ) -> Result<(), ArchiverError> {
        let topic = self.kafka.topic.as_str();
        let taken = self.runtime.block_on(async {
            tokio::time::timeout(
                TAKE_TIMEOUT,
                flush::take_partitions(&self.pool, topic, &run.pending, &run.owner),
            )
            .await
        });
        let resume = match taken {
            Ok(Ok(resume)) => resume,
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer in {TAKE_TIMEOUT:?}"),
                };
                run.failures += 1;
                if mode == RunMode::Once && run.failures >= ONCE_ATTEMPTS {
                    return Err(ArchiverError::Postgres(error));
                }
                tracing::warn!(%error, "taking partitions failed; trying again");
                run.next_take = Instant::now() + run.backoff.next_wait();
                return Ok(());
            }
        };
        let mut assignment = TopicPartitionList::new();
        let mut ahead = Vec::new();
        for (&partition, &next) in &resume {
            let end = match consumer.fetch_watermarks(topic, partition, KAFKA_TIMEOUT) {
                Ok((_, high)) => Some(high),
                Err(e) if mode == RunMode::Once => {
                    run.positions.clear();
                    run.next_take = Instant::now() + run.backoff.next_wait();
                    run.failures += 1;
                    if run.failures >= ONCE_ATTEMPTS {
                        return Err(ArchiverError::Kafka(format!(
                            "cannot read the end offset of partition {partition}: {e}"
                        )));
                    }
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(partition, error = %e, "cannot read the end offset; reading on");
                    None
                }
            };
            if let Some(end) = end.filter(|&end| next > end) {
                // The topic was recreated or its log cut short under the archive: every record
                // below `next` would be taken for one archived already. Left paused, for a
                // person; the other partitions go on.
                tracing::error!(partition, archived_to = next, kafka_ends_at = end, "the archive of this partition ends past Kafka's log (the topic was recreated, or its log cut short): not reading it; see docs/operations.md#tallyarchivepartitionahead");
                ahead.push(partition);
                continue;
            }
            if let Err(e) = assignment.add_partition_offset(topic, partition, Offset::Offset(next))
            {
                tracing::error!(partition, error = %e, "cannot set a start offset");
                continue;
            }
            run.positions.insert(partition, next);
            if let (RunMode::Once, Some(end)) = (mode, end) {
                run.targets.entry(partition).or_insert(end);
            }
        }
        telemetry::record_ahead(ahead.len());
        // Replaces the paused assignment with one that starts where the archive ends.
        if let Err(e) = consumer.assign(&assignment) {
            tracing::warn!(error = %e, "assigning the taken partitions failed; retrying");
            run.positions.clear();
            run.next_take = Instant::now() + run.backoff.next_wait();
            return Ok(());
        }
        if let Err(e) = consumer.resume(&assignment) {
            tracing::warn!(error = %e, "resuming the taken partitions failed");
        }
        tracing::info!(partitions = ?resume.keys().collect::<Vec<_>>(), "partitions taken; reading from where their archive ends");
        run.pending.clear();
        run.backoff.reset();
        run.last_message = Instant::now();
        Ok(())
    }

    /// `--once`: whether every partition is read up to its end offset seen at start. A
    /// partition quiet below its end (its last offsets are transaction markers, or the
    /// records were deleted) is read to where the consumer says it is.
    fn drained(
        &self,
        consumer: &BaseConsumer<ArchiverContext>,
        run: &mut RunState,
    ) -> Result<bool, ArchiverError> {
        if !run.pending.is_empty() || run.positions.is_empty() {
            return Ok(false);
        }
        let behind = |run: &RunState| -> Vec<(i32, i64, i64)> {
            run.positions
                .iter()
                .filter_map(|(&p, &next)| {
                    let end = *run.targets.get(&p)?;
                    (next < end).then_some((p, next, end))
                })
                .collect()
        };
        if behind(run).is_empty() {
            return Ok(true);
        }
        let quiet = run.last_message.elapsed();
        if quiet < Duration::from_secs(2) {
            return Ok(false);
        }
        // Only what the consumer has fetched past counts: positions move no further than
        // the records archived, so a partition whose tail holds no records is done when
        // the consumer's position reached its end.
        if let Ok(at) = consumer.position() {
            let done = behind(run).iter().all(|&(p, _, end)| {
                at.find_partition(&self.kafka.topic, p)
                    .is_some_and(|e| matches!(e.offset(), Offset::Offset(o) if o >= end))
            });
            if done {
                return Ok(true);
            }
        }
        if quiet >= ONCE_STALL {
            let behind: Vec<String> = behind(run)
                .iter()
                .map(|(p, next, end)| format!("partition {p} at {next} of {end}"))
                .collect();
            return Err(ArchiverError::Stalled {
                waited: quiet,
                behind: behind.join(", "),
            });
        }
        Ok(false)
    }

    /// Waits until Kafka answers and has the topic; returns its partitions.
    fn wait_for_topic(
        &self,
        consumer: &BaseConsumer<ArchiverContext>,
        mode: RunMode,
        stop: &CancellationToken,
    ) -> Result<Option<Vec<i32>>, ArchiverError> {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut attempts = 0;
        loop {
            match kafka::partitions(consumer, &self.kafka.topic, KAFKA_TIMEOUT) {
                Ok(partitions) => return Ok(Some(partitions)),
                Err(error) => {
                    let error = self.kafka.options.redact(&error);
                    attempts += 1;
                    if mode == RunMode::Once && attempts >= 2 {
                        return Err(ArchiverError::Kafka(error));
                    }
                    tracing::warn!(%error, "waiting for Kafka");
                }
            }
            if self
                .runtime
                .block_on(sleep_unless_stopped(backoff.next_wait(), stop))
            {
                return Ok(None);
            }
        }
    }

    /// Publishes what a crash left staged, removes orphans older than a day, and deletes
    /// files past `archive.retention`: each step on its own, and none fatal (a file that cannot
    /// be published or deleted now is tried again by the next pass, and archiving goes on).
    fn maintain(&self) {
        self.runtime
            .block_on(maintenance(&self.pool, &self.store, self.config.retention));
    }

    fn spawn_maintenance(&self, stop: CancellationToken) {
        let (pool, store, retention) =
            (self.pool.clone(), self.store.clone(), self.config.retention);
        self.runtime.spawn(async move {
            while !sleep_unless_stopped(MAINTENANCE_EVERY, &stop).await {
                maintenance(&pool, &store, retention).await;
            }
        });
    }
}

async fn maintenance(pool: &PgPool, store: &ArchiveStore, retention: Option<Duration>) {
    match flush::publish_staged(pool, store).await {
        Ok(0) => {}
        Ok(files) => tracing::info!(files, "published files a crash left staged"),
        Err(error) => tracing::warn!(%error, "publishing staged files failed; trying again later"),
    }
    match flush::remove_orphans(pool, store).await {
        Ok(0) => {}
        Ok(files) => tracing::info!(
            files,
            "removed staged files of flushes that never committed"
        ),
        Err(error) => {
            tracing::warn!(%error, "removing orphaned staged files failed; trying again later")
        }
    }
    if let Some(keep) = retention {
        let keep = chrono::TimeDelta::from_std(keep).unwrap_or(chrono::TimeDelta::MAX);
        let Some(before) = Utc::now().checked_sub_signed(keep) else {
            return;
        };
        match retention::expire(pool, store, before).await {
            Ok(0) => {}
            Ok(files) => {
                telemetry::record_expired(files);
                tracing::info!(files, %before, "deleted files past archive.retention");
            }
            Err(error) => {
                tracing::warn!(%error, "deleting expired files failed; trying again later")
            }
        }
    }
}

/// The partitions of `topic` the consumer is assigned now.
fn assigned(consumer: &BaseConsumer<ArchiverContext>, topic: &str) -> Vec<i32> {
    consumer
        .assignment()
        .map(|list| {
            list.elements_for_topic(topic)
                .iter()
                .map(|e| e.partition())
                .collect()
        })
        .unwrap_or_default()
}

/// The machine's name, for the owner recorded in `archive_offsets`.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into())
}
