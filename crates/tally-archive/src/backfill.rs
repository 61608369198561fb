//! `tally backfill`: events from files sent through Kafka, so that the same contract, dedup
//! and late-event rules apply to them as to live events, and the archive keeps them.
//!
//! A file's life: its SHA-256 names it in `backfill_progress` (so a renamed copy is the same
//! file); its records are read from where that row says the last run stopped
//! ([`crate::input::read`]), each decided by the contract here only to be counted (the
//! aggregator decides it again, and records refusals in `rejected_events`), and sent with the
//! header [`BACKFILL_HEADER`]. Every [`CHECKPOINT_RECORDS`] records the producer is flushed
//! and the row advanced: a kill re-sends at most that many, which the aggregator's dedup by
//! event id counts once.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::BuildHasher;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tally_core::config::KafkaConfig;
use tally_core::wire;
use tokio::runtime::Handle;

use crate::input::{self, InputError};

/// The Kafka header a backfilled record carries (its value: the file's SHA-256), for whoever
/// reads the topic to tell history from live usage. The archiver files a backfilled record as
/// it files a live one.
pub const BACKFILL_HEADER: &str = "tally-backfill";
/// Records sent between two checkpoints (a flush of the producer and a row update).
pub const CHECKPOINT_RECORDS: u64 = 20_000;

#[derive(Debug, Clone)]
pub struct Options {
    /// Decide and count every record; send nothing, write nothing.
    pub dry_run: bool,
    /// At most this many records a second (0: as fast as Kafka takes them).
    pub rate: u64,
    /// The aggregator's: an event older than this is archived but not counted.
    pub lateness_horizon: Duration,
    /// The meters tally.toml defines: an event of another is refused by the aggregator.
    pub meters: BTreeSet<String>,
}

/// What a file's records came to (from where this run started).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// Records read by this run.
    pub records: u64,
    /// Sent to Kafka (all records read, unless a dry run).
    pub sent: u64,
    /// Events the aggregator will count (unless sent before under the same id).
    pub countable: u64,
    /// Events older than the lateness horizon: archived, not counted (`too_late`).
    pub too_old: u64,
    /// Events whose id came before in this file (the aggregator counts one of them; ids are
    /// looked at for the first [`IDS_CHECKED`] records of a file).
    pub repeated_ids: u64,
    /// Records the contract or the aggregator refuses, by reason: each ends up in
    /// `rejected_events` (and the archive) with it.
    pub refused: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct FileReport {
    pub path: String,
    pub sha256: String,
    /// The record this run started at (0, or where an earlier run stopped).
    pub started_at: u64,
    /// This file was backfilled whole by an earlier run: nothing was sent again.
    pub already_done: bool,
    pub counts: Counts,
}

/// How many ids of a file are remembered to count repeats (about 16 bytes each).
pub const IDS_CHECKED: usize = 5_000_000;

/// A file's size and modification time, to notice it changing while it is sent (its SHA-256
/// names what was read; a file replaced midway would resume another file's records).
struct Snapshot {
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl Snapshot {
    fn of(path: &Path) -> Result<Snapshot, InputError> {
        let meta = std::fs::metadata(path).map_err(|e| InputError {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        Ok(Snapshot {
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }

    fn check(&self, path: &Path) -> Result<(), BackfillError> {
        let now = Snapshot::of(path)?;
        if now.len != self.len || now.modified != self.modified {
            return Err(BackfillError::Input(InputError {
                path: path.display().to_string(),
                why: "the file changed while it was sent; what was sent is recorded up to the last checkpoint: run again once the file is complete".into(),
            }));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error(
        "{0}: another `tally backfill` of this file (by its SHA-256) is running; let it finish"
    )]
    Busy(String),
    #[error(transparent)]
    Input(#[from] InputError),
    #[error("Postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("Kafka: {0}")]
    Kafka(String),
}

/// Counts what librdkafka could not deliver (after its own retries).
#[derive(Default)]
struct Deliveries {
    failed: AtomicU64,
    first: Mutex<Option<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, _)) = result {
            self.failed.fetch_add(1, Ordering::AcqRel);
            if let Ok(mut first) = self.first.lock() {
                first.get_or_insert_with(|| error.to_string());
            }
        }
    }
}

pub struct Backfill {
    kafka: KafkaConfig,
    /// `None` in a dry run: nothing is read from or written to Postgres.
    pool: Option<PgPool>,
    runtime: Handle,
    options: Options,
    producer: Option<ThreadedProducer<Deliveries>>,
}

impl Backfill {
    pub fn new(
        kafka: KafkaConfig,
        pool: Option<PgPool>,
        runtime: Handle,
        options: Options,
    ) -> Result<Backfill, BackfillError> {
        let producer = if options.dry_run {
            None
        } else {
            let mut config = ClientConfig::new();
            for (key, value) in &kafka.options {
                config.set(key, value);
            }
            let producer = config
                .set("bootstrap.servers", &kafka.brokers)
                .set("enable.idempotence", "true")
                // As the emitter partitions: a customer's backfilled events go where its live
                // ones go.
                .set("partitioner", "murmur2_random")
                .set("acks", "all")
                .set("linger.ms", "20")
                .set("compression.type", "lz4")
                .set("queue.buffering.max.messages", "500000")
                .set("message.timeout.ms", "120000")
                .create_with_context(Deliveries::default())
                .map_err(|e| BackfillError::Kafka(kafka.options.redact(&e.to_string())))?;
            Some(producer)
        };
        Ok(Backfill {
            kafka,
            pool,
            runtime,
            options,
            producer,
        })
    }

    /// Backfills one file; `progress` hears how far it got, every thousand records.
    pub fn file(
        &self,
        path: &Path,
        progress: &mut dyn FnMut(&Counts),
    ) -> Result<FileReport, BackfillError> {
        let unchanged = Snapshot::of(path)?;
        let sha256 = sha256_of(path)?;
        let topic = self.kafka.topic.as_str();
        // One backfill of a file at a time: a session lock, held by a connection of its own
        // that closes (and lets go) when this returns, however it returns.
        let _lock = match &self.pool {
            Some(pool) => Some(self.runtime.block_on(async {
                let mut connection = pool.acquire().await?.detach();
                let locked: bool =
                    sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 27))")
                        .bind(format!("backfill:{topic}:{sha256}"))
                        .fetch_one(&mut connection)
                        .await?;
                Ok::<_, sqlx::Error>((connection, locked))
            })?),
            None => None,
        };
        if let Some((_, false)) = &_lock {
            return Err(BackfillError::Busy(path.display().to_string()));
        }
        let (started_at, done) = match &self.pool {
            Some(pool) => self.runtime.block_on(async {
                sqlx::query(
                    "INSERT INTO backfill_progress (topic, sha256, path) VALUES ($1, $2, $3)
                     ON CONFLICT (topic, sha256) DO NOTHING",
                )
                .bind(topic)
                .bind(&sha256)
                .bind(path.display().to_string())
                .execute(pool)
                .await?;
                sqlx::query_as::<_, (i64, bool)>(
                    "SELECT next_record, done_at IS NOT NULL FROM backfill_progress
                     WHERE topic = $1 AND sha256 = $2",
                )
                .bind(topic)
                .bind(&sha256)
                .fetch_one(pool)
                .await
            })?,
            None => (0, false),
        };
        let mut report = FileReport {
            path: path.display().to_string(),
            sha256: sha256.clone(),
            started_at: started_at as u64,
            already_done: done,
            counts: Counts::default(),
        };
        if done {
            return Ok(report);
        }
        let now = Utc::now();
        let oldest =
            now - TimeDelta::from_std(self.options.lateness_horizon).unwrap_or(TimeDelta::MAX / 2);
        let mut pace = Pace::new(self.options.rate);
        let ids_key = std::collections::hash_map::RandomState::new();
        let mut ids = std::collections::HashSet::new();
        let mut checkpoint_error = None;
        let counts = &mut report.counts;
        let mut each = |number: u64, json: &[u8]| -> Result<(), String> {
            counts.records += 1;
            let mut key = None;
            match wire::decode(json, now) {
                Ok(event) => {
                    if ids.len() < IDS_CHECKED && !ids.insert(ids_key.hash_one(&event.id)) {
                        counts.repeated_ids += 1;
                    }
                    if !self.options.meters.contains(&event.meter) {
                        *counts.refused.entry("unknown_meter".into()).or_default() += 1;
                    } else if event.timestamp < oldest {
                        counts.too_old += 1;
                    } else {
                        counts.countable += 1;
                    }
                    key = Some(event.customer);
                }
                Err(rejection) => {
                    *counts
                        .refused
                        .entry(rejection.reason.code().into())
                        .or_default() += 1;
                }
            }
            if counts.records.is_multiple_of(1_000) {
                progress(counts);
            }
            let Some(producer) = &self.producer else {
                return Ok(());
            };
            pace.take();
            send(producer, topic, key.as_deref(), json, &sha256)?;
            counts.sent += 1;
            if (number + 1).is_multiple_of(CHECKPOINT_RECORDS) {
                let checked = unchanged
                    .check(path)
                    .and_then(|()| self.checkpoint(producer, &sha256, number + 1, false));
                if let Err(e) = checked {
                    checkpoint_error = Some(e);
                    return Err("stopped".into());
                }
            }
            Ok(())
        };
        let read = input::read(path, started_at as u64, &mut each);
        if let Some(error) = checkpoint_error {
            return Err(error);
        }
        read?;
        if let Some(producer) = &self.producer {
            unchanged.check(path)?;
            let end = started_at as u64 + report.counts.records;
            self.checkpoint(producer, &sha256, end, true)?;
        }
        progress(&report.counts);
        Ok(report)
    }

    /// Waits until Kafka has every record sent so far, then records that the file is sent up
    /// to record `next` (and, with `done`, whole).
    fn checkpoint(
        &self,
        producer: &ThreadedProducer<Deliveries>,
        sha256: &str,
        next: u64,
        done: bool,
    ) -> Result<(), BackfillError> {
        producer
            .flush(Duration::from_secs(180))
            .map_err(|e| BackfillError::Kafka(format!("records not acknowledged: {e}")))?;
        let deliveries = producer.context();
        let failed = deliveries.failed.load(Ordering::Acquire);
        if failed > 0 {
            let first = deliveries
                .first
                .lock()
                .ok()
                .and_then(|f| f.clone())
                .unwrap_or_default();
            return Err(BackfillError::Kafka(format!(
                "{failed} record(s) were not delivered ({first}); run the same command again to go on from the last checkpoint"
            )));
        }
        let Some(pool) = &self.pool else {
            return Ok(());
        };
        self.runtime.block_on(
            sqlx::query(
                "UPDATE backfill_progress
                 SET next_record = $3, updated_at = now(),
                     done_at = CASE WHEN $4 THEN now() ELSE done_at END
                 WHERE topic = $1 AND sha256 = $2",
            )
            .bind(&self.kafka.topic)
            .bind(sha256)
            .bind(next as i64)
            .bind(done)
            .execute(pool),
        )?;
        Ok(())
    }
}

/// `--rate` as a bucket of at most a second's worth of records: a pause (a slow checkpoint)
/// is not made up for by a burst afterwards.
struct Pace {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Pace {
    fn new(rate: u64) -> Pace {
        Pace {
            rate: rate as f64,
            tokens: 0.0,
            last: Instant::now(),
        }
    }

    /// Waits until one more record may go.
    fn take(&mut self) {
        if self.rate <= 0.0 {
            return;
        }
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.rate);
        self.last = now;
        if self.tokens < 1.0 {
            let wait = (1.0 - self.tokens) / self.rate;
            // Sleeping below a millisecond costs more than it paces.
            if wait >= 0.001 {
                std::thread::sleep(Duration::from_secs_f64(wait));
                self.tokens += wait * self.rate;
                self.last = Instant::now();
            } else {
                self.tokens = 1.0;
            }
        }
        self.tokens -= 1.0;
    }
}

/// Sends one record, waiting while librdkafka's queue is full.
fn send(
    producer: &ThreadedProducer<Deliveries>,
    topic: &str,
    key: Option<&str>,
    json: &[u8],
    sha256: &str,
) -> Result<(), String> {
    let headers = OwnedHeaders::new().insert(Header {
        key: BACKFILL_HEADER,
        value: Some(sha256),
    });
    let mut record = BaseRecord::<str, [u8]>::to(topic)
        .payload(json)
        .headers(headers);
    if let Some(key) = key {
        record = record.key(key);
    }
    let started = Instant::now();
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::QueueFull,
                ),
                back,
            )) if started.elapsed() < Duration::from_secs(180) => {
                record = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((error, _)) => return Err(format!("Kafka did not take a record: {error}")),
        }
    }
}

/// The file's SHA-256, read in 1 MiB pieces.
fn sha256_of(path: &Path) -> Result<String, InputError> {
    let error = |e: std::io::Error| InputError {
        path: path.display().to_string(),
        why: e.to_string(),
    };
    let mut file = std::fs::File::open(path).map_err(error)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(error)?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buffer[..n]);
    }
}
