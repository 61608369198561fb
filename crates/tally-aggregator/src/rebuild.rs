//! `tally rebuild`: one meter's windows recomputed from the event archive under its current
//! definition, into shadow tables, then swapped in, in one transaction, beside the live
//! aggregator (docs/rebuild.md).
//!
//! A rebuild's life:
//! 1. One rebuild at a time (an advisory lock); the shadow tables of one that died are dropped.
//! 2. The request is checked against the catalog (`meters`): a new definition must cover every
//!    window the aggregator may still write (every customer, from the lateness horizon's day
//!    through today), and must bill the way the meter's Stripe meter aggregates.
//! 3. `source`: the events the aggregator counted up to where it stands (`kafka_offsets`): the
//!    archive's files, and from Kafka what the archive does not have yet; the aggregator's
//!    refusals left out, each id once.
//! 4. `shadow`: those events folded and upserted into shadow tables by the aggregator's own
//!    code, under the new definition; caught up with Kafka until little is left.
//! 5. The swap, one transaction: take the meter's lock exclusively (aggregator batches counting
//!    the meter hold it shared, and wait), catch up with what the aggregator counted
//!    meanwhile, check that the shadow counts exactly the events the windows count, record the
//!    changed billing slots for the sink (listing those older than Stripe takes) and the customers for the
//!    quota caches, replace the windows, record the new definition. A dry run does all of it
//!    and rolls back.

mod shadow;
mod source;

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use sqlx::{Connection, PgConnection, PgPool};
use tally_archive::{ArchiveStore, ArchivedRecord};
use tally_core::config::KafkaConfig;
use tally_core::event::FUTURE_TOLERANCE;
use tally_core::{Aggregation, BillingKind, MeterDefinition};

use crate::batch::{counted_as, Candidate, ConsumedMessage};
use crate::store::AggregatorStoreError;
use shadow::Range;
use source::{Filter, Positions, Seen};

/// What to rebuild.
#[derive(Debug, Clone)]
pub struct RebuildRequest {
    /// The meter's definition now (tally.toml's).
    pub meter: MeterDefinition,
    /// Only this customer's windows (not with a new definition).
    pub customer: Option<String>,
    /// The first UTC day rebuilt.
    pub from: NaiveDate,
    /// The UTC day after the last one rebuilt.
    pub to: NaiveDate,
    /// Compute and compare, change nothing.
    pub dry_run: bool,
}

/// Where the rebuild reads and what it must agree with.
#[derive(Debug, Clone)]
pub struct RebuildSettings {
    pub kafka: KafkaConfig,
    /// The aggregator's consumer group (`kafka_offsets` says where it stands).
    pub aggregator_group: String,
    pub lateness_horizon: TimeDelta,
}

/// One customer's day whose usage the rebuild changes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DayDifference {
    pub customer: String,
    pub day: NaiveDate,
    pub events_before: i64,
    pub events_after: i64,
    /// The day's usage over its groups (exact, as Postgres adds it): added up for sum, count
    /// and unique_count; the largest group's for max and latest.
    pub usage_before: String,
    pub usage_after: String,
}

/// A changed billing slot older than Stripe takes meter events for (35 days): the sink bills
/// its difference as it bills any late change to such a slot, with the oldest timestamp Stripe
/// takes rather than in the slot's own period (or, for a decrease too old to cancel, in
/// `billing_corrections`). Listed for finance, and in `rebuild_backdated_slots`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BackdatedSlot {
    pub customer: String,
    pub slot_start: DateTime<Utc>,
    /// The slot's usage as the sink bills it (exact).
    pub usage_before: String,
    pub usage_after: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RebuildReport {
    pub rebuild_id: i64,
    pub meter: String,
    pub customer: Option<String>,
    pub from: NaiveDate,
    pub to: NaiveDate,
    pub dry_run: bool,
    /// The definition the windows were built with, when the rebuild changes it.
    pub redefined_from: Option<String>,
    pub definition: String,
    pub files: usize,
    /// Events counted into the rebuilt windows, and how many of them came from Kafka (the
    /// archive did not have them yet).
    pub events: u64,
    pub from_kafka: u64,
    pub windows_before: i64,
    pub windows_after: i64,
    pub days: Vec<DayDifference>,
    /// Billing slots handed to the sink, which bills what changed as new revisions.
    pub slots_to_bill: u64,
    /// Of those, the ones older than Stripe takes: how many, and the first thousand.
    pub backdated_total: u64,
    pub backdated: Vec<BackdatedSlot>,
    /// Whether the windows were replaced (false for a dry run).
    pub swapped: bool,
}

/// Why a rebuild did not happen. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("Postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("{0}")]
    Store(String),
    #[error("another tally rebuild is running; wait for it to finish")]
    Busy,
    #[error("{0}")]
    Refused(String),
    #[error("the archive: {0}")]
    Archive(String),
    #[error("Kafka: {0}")]
    Kafka(String),
    #[error("the rebuilt windows would not count the events the live windows count; nothing was changed:\n{0}")]
    Incomplete(String),
}

impl From<AggregatorStoreError> for RebuildError {
    fn from(error: AggregatorStoreError) -> Self {
        match error {
            AggregatorStoreError::Retryable(e)
            | AggregatorStoreError::Data(e)
            | AggregatorStoreError::Permanent(e) => RebuildError::Postgres(e),
            other => RebuildError::Store(other.to_string()),
        }
    }
}

/// The key of the advisory lock one rebuild at a time holds.
const LOCK_KEY: &str = "tally rebuild";
/// Candidates folded and upserted into the shadow at a time.
const CHUNK: usize = 200_000;
/// Records handed from the thread decoding a file at a time.
const READ_BATCH: usize = 8_192;
/// The swap reads at most about this many records from Kafka while it holds the meter's row
/// (aggregator batches counting the meter wait for it): the catch-up before it goes on until
/// the aggregator is at most this far ahead.
const SWAP_CATCH_UP: i64 = 20_000;
/// The most records read from Kafka before the swap (what the archive lacks): further behind,
/// the archive should catch up first.
const MOST_FROM_KAFKA: i64 = 20_000_000;
/// Rounds of catching up with the aggregator before the swap, at most.
const CATCH_UP_ROUNDS: usize = 10;

/// Rebuilds the windows `request` names. `progress` hears what it is doing.
pub async fn rebuild(
    pool: &PgPool,
    store: &ArchiveStore,
    settings: &RebuildSettings,
    request: &RebuildRequest,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<RebuildReport, RebuildError> {
    // The whole rebuild runs on one connection of its own, which holds the lock: it is closed
    // (and the lock so released) at the end, or when the process dies. Not an idle connection
    // beside a working one, which a server's idle timeout could close midway and let a second
    // rebuild take this one's shadow tables for abandoned.
    let mut conn = pool.acquire().await?.detach();
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
        .bind(LOCK_KEY)
        .fetch_one(&mut conn)
        .await?;
    if !locked {
        return Err(RebuildError::Busy);
    }
    abandon_dead(&mut conn).await?;
    let (recorded, version) = tally_db::meters::definition(&mut conn, &request.meter.name)
        .await?
        .ok_or_else(|| {
            RebuildError::Refused(format!(
                "meter {:?} has never counted anything (it is not in the meters table): there is nothing to rebuild",
                request.meter.name
            ))
        })?;
    refuse_priced(&mut conn, &request.meter.name).await?;
    let now = Utc::now();
    let redefined = check_request(request, &recorded, settings.lateness_horizon, now)?;
    let definition = describe(&request.meter);
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO rebuilds (meter, customer_id, from_day, to_day, dry_run, definition)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING rebuild_id",
    )
    .bind(&request.meter.name)
    .bind(&request.customer)
    .bind(request.from)
    .bind(request.to)
    .bind(request.dry_run)
    .bind(serde_json::to_value(&request.meter).unwrap_or_default())
    .fetch_one(&mut conn)
    .await?;
    shadow::create(&mut conn, id).await?;
    let mut report = RebuildReport {
        rebuild_id: id,
        meter: request.meter.name.clone(),
        customer: request.customer.clone(),
        from: request.from,
        to: request.to,
        dry_run: request.dry_run,
        redefined_from: redefined.then(|| describe(&recorded)),
        definition,
        files: 0,
        events: 0,
        from_kafka: 0,
        windows_before: 0,
        windows_after: 0,
        days: Vec::new(),
        slots_to_bill: 0,
        backdated_total: 0,
        backdated: Vec::new(),
        swapped: false,
    };
    let result = Rebuild {
        store,
        settings,
        request,
        id,
        version,
        recorded_aggregation: recorded.aggregation,
        filter: Filter {
            meter: request.meter.name.clone(),
            customer: request.customer.clone(),
            from: day_start(request.from),
            to: day_start(request.to),
        },
        seen: Seen::default(),
        progress,
    }
    .run(&mut conn, redefined, &mut report)
    .await;
    let (state, detail) = match &result {
        Ok(()) if report.swapped => ("swapped", None),
        Ok(()) => ("dry_run", None),
        Err(error) => ("failed", Some(error.to_string())),
    };
    // Best effort: the windows are what they are either way.
    let _ = shadow::drop_tables(&mut conn, id).await;
    let _ = sqlx::query(
        "UPDATE rebuilds SET state = $2, detail = $3, events = $4, windows_before = $5,
                             windows_after = $6, finished_at = now()
         WHERE rebuild_id = $1",
    )
    .bind(id)
    .bind(state)
    .bind(detail)
    .bind(report.events as i64)
    .bind(report.windows_before)
    .bind(report.windows_after)
    .execute(&mut conn)
    .await;
    let _ = conn.close().await;
    result.map(|()| report)
}

/// A meter with a credit rate is refused (at the start and again in the swap): the burner drew
/// credits down for its usage as it was counted, and the sink bills the usage credits did not
/// pay; recounting it would leave those burns standing against usage that changed.
async fn refuse_priced(conn: &mut PgConnection, meter: &str) -> Result<(), RebuildError> {
    let priced: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM credit_rates WHERE meter = $1)")
            .bind(meter)
            .fetch_one(&mut *conn)
            .await?;
    if priced {
        return Err(RebuildError::Refused(format!(
            "meter {meter:?} has a credit rate ([[credits.rates]]): rebuilding its windows would leave the credits already burned for the old usage as they are; not supported yet"
        )));
    }
    Ok(())
}

/// Rebuilds left `running` while this one holds the lock died: their shadow tables go.
async fn abandon_dead(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    let dead: Vec<i64> =
        sqlx::query_scalar("SELECT rebuild_id FROM rebuilds WHERE state = 'running'")
            .fetch_all(&mut *conn)
            .await?;
    for id in dead {
        shadow::drop_tables(conn, id).await?;
        sqlx::query(
            "UPDATE rebuilds SET state = 'abandoned', finished_at = now(),
                                 detail = 'the process stopped before it finished; nothing was changed'
             WHERE rebuild_id = $1",
        )
        .bind(id)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Whether the request changes the meter's definition; refused when it cannot be done
/// exactly.
fn check_request(
    request: &RebuildRequest,
    recorded: &MeterDefinition,
    lateness_horizon: TimeDelta,
    now: DateTime<Utc>,
) -> Result<bool, RebuildError> {
    let meter = &request.meter;
    if request.to <= request.from {
        return Err(RebuildError::Refused(format!(
            "--to ({}) must be after --from ({}): the range is the days from --from up to --to, not including it",
            request.to, request.from
        )));
    }
    let redefined = meter.aggregation != recorded.aggregation
        || meter.group_by != recorded.group_by
        || meter.unique_dimension != recorded.unique_dimension;
    if !redefined {
        return Ok(false);
    }
    // The sink bills a slot by one rule per aggregation (the sum of its windows for sum and
    // count, the largest for max, the latest for latest) and Stripe's meter adds up or keeps
    // the last value: a change of either would leave billed slots under the other rule.
    let adds_up = |a: Aggregation| matches!(a, Aggregation::Sum | Aggregation::Count);
    if meter.aggregation != recorded.aggregation
        && !(adds_up(meter.aggregation) && adds_up(recorded.aggregation))
    {
        return Err(RebuildError::Refused(format!(
            "meter {:?} aggregates {} and tally.toml now says {}: only sum and count can take each other's place (both bill the sum of their windows to a Stripe meter that adds up); define a new meter name for the new aggregation",
            meter.name,
            recorded.aggregation.as_str(),
            meter.aggregation.as_str(),
        )));
    }
    check_covers_live(request, lateness_horizon, now)?;
    Ok(true)
}

/// A new definition must rebuild every window the aggregator may still add to: every
/// customer, from the day the lateness horizon reaches back to, to a day after any event the
/// aggregator takes now (its clock plus the future tolerance, and a minute's margin).
fn check_covers_live(
    request: &RebuildRequest,
    lateness_horizon: TimeDelta,
    now: DateTime<Utc>,
) -> Result<(), RebuildError> {
    let horizon_day = (now - lateness_horizon).date_naive();
    let newest = now + FUTURE_TOLERANCE + TimeDelta::minutes(1);
    if request.customer.is_some() || request.from > horizon_day || day_start(request.to) <= newest {
        let to = newest
            .date_naive()
            .succ_opt()
            .unwrap_or(newest.date_naive());
        return Err(RebuildError::Refused(format!(
            "tally.toml changes meter {:?} (now {}): a new definition must rebuild every window the aggregator may still add to, so rebuild every customer (no --customer) with --from {horizon_day} or earlier and --to {to} or later",
            request.meter.name,
            describe(&request.meter),
        )));
    }
    Ok(())
}

fn describe(meter: &MeterDefinition) -> String {
    let mut text = format!("aggregation={}", meter.aggregation.as_str());
    if !meter.group_by.is_empty() {
        text.push_str(&format!(", group_by={:?}", meter.group_by));
    }
    if let Some(dimension) = &meter.unique_dimension {
        text.push_str(&format!(", unique_dimension={dimension:?}"));
    }
    text
}

fn day_start(day: NaiveDate) -> DateTime<Utc> {
    day.and_hms_opt(0, 0, 0)
        .map_or(DateTime::<Utc>::MIN_UTC, |t| t.and_utc())
}

/// One rebuild under way.
struct Rebuild<'a> {
    store: &'a ArchiveStore,
    settings: &'a RebuildSettings,
    request: &'a RebuildRequest,
    id: i64,
    /// The catalog version of the meter when the rebuild began.
    version: i64,
    recorded_aggregation: Aggregation,
    filter: Filter,
    seen: Seen,
    progress: &'a (dyn Fn(&str) + Sync),
}

impl Rebuild<'_> {
    async fn run(
        mut self,
        conn: &mut PgConnection,
        redefined: bool,
        report: &mut RebuildReport,
    ) -> Result<(), RebuildError> {
        let topic = self.settings.kafka.topic.clone();
        let aggregated = source::aggregated(conn, &self.settings.aggregator_group, &topic).await?;
        let archived = source::archived(conn, &topic).await?;
        // What the aggregator counted that the archive does not have yet, from Kafka.
        let behind = source::between(&archived, &aggregated);
        let lacking = records_in(&behind);
        if lacking > MOST_FROM_KAFKA {
            return Err(RebuildError::Archive(format!(
                "the archive is {lacking} records behind the aggregator; run `tally archive --once` (or let the daemon catch up) before rebuilding"
            )));
        }
        (self.progress)(&format!(
            "reading the archive from {} to {} (and {lacking} records from Kafka)",
            self.request.from, self.request.to
        ));
        let mut chunk = Chunk::default();
        self.read_from_kafka(conn, &behind, &mut chunk).await?;
        report.from_kafka = chunk.events();
        report.files = self.read_archive(conn, &aggregated, &mut chunk).await?;
        // Catch up with the aggregator until it is close; the rest is read in the swap.
        let mut reached = aggregated;
        for round in 0.. {
            let now = source::aggregated(conn, &self.settings.aggregator_group, &topic).await?;
            let gap = source::between(&reached, &now);
            if records_in(&gap) <= SWAP_CATCH_UP {
                break;
            }
            if round == CATCH_UP_ROUNDS {
                return Err(RebuildError::Kafka(format!(
                    "the aggregator stayed {} records ahead after {CATCH_UP_ROUNDS} rounds of catching up; rebuild when the topic is quieter",
                    records_in(&gap)
                )));
            }
            let before = chunk.events();
            self.read_from_kafka(conn, &gap, &mut chunk).await?;
            report.from_kafka += chunk.events() - before;
            reached = now;
        }
        self.finish(conn, &mut chunk).await?;
        report.events = chunk.events();
        for _ in 0..CATCH_UP_ROUNDS {
            match self
                .swap(conn, redefined, &reached, &mut chunk, report)
                .await?
            {
                Swap::Done => return Ok(()),
                // Batches of other meters moved the aggregator on while the swap waited for
                // the lock: read that outside the lock, then try again.
                Swap::Behind(now) => {
                    let gap = source::between(&reached, &now);
                    let before = chunk.events();
                    self.read_from_kafka(conn, &gap, &mut chunk).await?;
                    self.finish(conn, &mut chunk).await?;
                    report.from_kafka += chunk.events() - before;
                    report.events = chunk.events();
                    reached = now;
                }
            }
        }
        Err(RebuildError::Kafka(format!(
            "the aggregator kept running ahead while the swap waited for meter {:?}; rebuild when the topic is quieter",
            self.request.meter.name
        )))
    }

    /// Reads the records of `ranges` from Kafka (on a blocking thread, batches through a
    /// channel) and adds the events of the filter the aggregator counted to `chunk`.
    async fn read_from_kafka(
        &mut self,
        conn: &mut PgConnection,
        ranges: &BTreeMap<i32, (i64, i64)>,
        chunk: &mut Chunk,
    ) -> Result<(), RebuildError> {
        if ranges.is_empty() {
            return Ok(());
        }
        let refused = source::refused_in(conn, &self.settings.kafka.topic, ranges).await?;
        let (kafka, filter, ranges) = (
            self.settings.kafka.clone(),
            self.filter.clone(),
            ranges.clone(),
        );
        let (batches, received) = tokio::sync::mpsc::channel(2);
        let reader = tokio::task::spawn_blocking(move || {
            let mut batch = Batcher::new(batches);
            let read = source::read_kafka(&kafka, &ranges, |record| {
                let wanted = record.event().is_some_and(|e| filter.wants(e))
                    && !refused.contains(&(record.partition, record.offset));
                if wanted {
                    batch.push(record);
                }
                batch.open()
            });
            batch.finish();
            read.map(drop)
        });
        // The reader is awaited whatever happened here: it stops at its next record once the
        // receiver is gone.
        let taken = self.take(conn, received, chunk).await;
        let read = reader.await;
        taken?;
        read.map_err(|e| RebuildError::Kafka(e.to_string()))?
            .map_err(RebuildError::Kafka)
    }

    /// Reads the files of the range's hours into `chunk`. Returns the files read.
    async fn read_archive(
        &mut self,
        conn: &mut PgConnection,
        aggregated: &Positions,
        chunk: &mut Chunk,
    ) -> Result<usize, RebuildError> {
        let topic = &self.settings.kafka.topic;
        let (first_hour, end) = (self.filter.from, self.filter.to);
        let files: Vec<(String, String, String, DateTime<Utc>, i64, String)> = sqlx::query_as(
            "SELECT path, staging_path, state, hour, bytes, sha256 FROM archive_files
             WHERE hour >= $1 AND hour < $2 ORDER BY hour, file_id",
        )
        .bind(first_hour)
        .bind(end)
        .fetch_all(&mut *conn)
        .await?;
        if let Some((path, _, state, hour, ..)) =
            files.iter().find(|f| f.2 == "deleted" || f.2 == "lost")
        {
            let why = match state.as_str() {
                "deleted" => "was deleted by archive.retention".to_owned(),
                _ => format!("is lost ({path}): the store no longer has it"),
            };
            return Err(RebuildError::Archive(format!(
                "the archive's file for hour {hour} {why}, so the events of that hour cannot be recounted; rebuild a range after it"
            )));
        }
        let refused = Arc::new(
            tally_archive::verify::refused_positions(
                &mut *conn,
                topic,
                first_hour,
                end,
                Some(&self.filter.meter),
            )
            .await?,
        );
        for (read, (path, staging_path, state, _, bytes, sha256)) in files.iter().enumerate() {
            let (location, contents) = tally_archive::verify::read_whole(
                self.store,
                path,
                staging_path,
                state,
                *bytes,
                sha256,
            )
            .await
            .map_err(|why| RebuildError::Archive(format!("file {path} cannot be read: {why}")))?;
            // Decoded on a blocking thread, a batch at a time through a channel of two: memory
            // holds a few batches and one chunk, whatever the file's size, and the decoding
            // overlaps the upserts.
            let (batches, received) = tokio::sync::mpsc::channel(2);
            let (filter, aggregated, refused) =
                (self.filter.clone(), aggregated.clone(), refused.clone());
            let reader = tokio::task::spawn_blocking(move || {
                let mut batch = Batcher::new(batches);
                let read = tally_archive::file::read_each(&location, contents, |record| {
                    // Once the receiver is gone, the rest of the file is only decoded.
                    let wanted = batch.open()
                        && record.event().is_some_and(|e| filter.wants(e))
                        && aggregated
                            .get(&record.partition)
                            .is_some_and(|&next| record.offset < next)
                        && !refused.contains(&(record.partition, record.offset));
                    if wanted {
                        batch.push(record);
                    }
                });
                batch.finish();
                read
            });
            let taken = self.take(conn, received, chunk).await;
            let decoded = reader.await;
            taken?;
            decoded
                .map_err(|e| RebuildError::Archive(e.to_string()))?
                .map_err(|e| RebuildError::Archive(e.to_string()))?;
            (self.progress)(&format!(
                "{}/{} files, {} events",
                read + 1,
                files.len(),
                chunk.events()
            ));
        }
        Ok(files.len())
    }

    /// Takes the batches a reader sends into `chunk`, each event once, under the new
    /// definition; upserts the chunk into the shadow whenever it is full.
    async fn take(
        &mut self,
        conn: &mut PgConnection,
        mut received: tokio::sync::mpsc::Receiver<Vec<ArchivedRecord>>,
        chunk: &mut Chunk,
    ) -> Result<(), RebuildError> {
        while let Some(records) = received.recv().await {
            for record in records {
                self.keep(record, chunk);
            }
            if chunk.candidates.len() >= CHUNK {
                self.finish(conn, chunk).await?;
            }
        }
        Ok(())
    }

    /// Upserts what `chunk` holds into the shadow.
    async fn finish(&self, conn: &mut PgConnection, chunk: &mut Chunk) -> Result<(), RebuildError> {
        self.refuse_lacking(chunk.lacking)?;
        shadow::add(conn, self.id, &chunk.candidates).await?;
        chunk.upserted += chunk.candidates.len() as u64;
        chunk.candidates.clear();
        Ok(())
    }

    /// Adds a counted record's event to the chunk under the new definition, once; counts it
    /// as lacking when the new definition cannot count it (it lacks the unique dimension).
    fn keep(&mut self, record: ArchivedRecord, chunk: &mut Chunk) {
        let (partition, offset) = (record.partition, record.offset);
        let tally_archive::Verdict::Accepted(event) = record.verdict else {
            return;
        };
        if !self.seen.first(&event) {
            return;
        }
        let message = ConsumedMessage {
            partition,
            offset,
            key: None,
            raw: Vec::new(),
        };
        match counted_as(&self.request.meter, event, message) {
            Ok(candidate) => chunk.candidates.push(candidate),
            Err(_) => chunk.lacking += 1,
        }
    }

    fn refuse_lacking(&self, lacking: u64) -> Result<(), RebuildError> {
        if lacking == 0 {
            return Ok(());
        }
        Err(RebuildError::Refused(format!(
            "{lacking} events the windows count lack dimension {:?}, whose distinct values meter {:?} would now count: they could not be counted under the new definition; define a new meter instead",
            self.request.meter.unique_dimension.as_deref().unwrap_or_default(),
            self.request.meter.name
        )))
    }

    /// The last transaction. A rebuild takes the meter's lock exclusively: batches counting
    /// the meter hold it shared (`tally_db::meters::share_versions`), so from here on none
    /// commits and each under way has committed; it reads the last stretch from Kafka,
    /// compares, and swaps. A dry run takes no lock: it compares in one snapshot (repeatable
    /// read) of the windows and of the offsets they are at, and rolls back.
    async fn swap(
        &mut self,
        conn: &mut PgConnection,
        redefined: bool,
        reached: &Positions,
        chunk: &mut Chunk,
        report: &mut RebuildReport,
    ) -> Result<Swap, RebuildError> {
        let request = self.request;
        let range = Range {
            meter: &request.meter.name,
            customer: request.customer.as_deref(),
            from: self.filter.from,
            to: self.filter.to,
            from_day: request.from,
            to_day: request.to,
        };
        let mut tx = conn.begin().await?;
        if request.dry_run {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                .execute(&mut *tx)
                .await?;
        } else {
            // Bounded: a swap that cannot have the meter within this fails, and is run again.
            sqlx::query("SET LOCAL lock_timeout = '60s'")
                .execute(&mut *tx)
                .await?;
            tally_db::meters::lock_exclusive(&mut tx, &request.meter.name).await?;
        }
        let version: Option<i64> = sqlx::query_scalar("SELECT version FROM meters WHERE name = $1")
            .bind(&request.meter.name)
            .fetch_optional(&mut *tx)
            .await?;
        if version != Some(self.version) {
            return Err(RebuildError::Refused(format!(
                "meter {:?} was redefined while this rebuild ran; run it again",
                request.meter.name
            )));
        }
        if redefined {
            // Checked again now: the range must still cover every window the aggregator may
            // add to from here on.
            check_covers_live(request, self.settings.lateness_horizon, Utc::now())?;
        }
        refuse_priced(&mut tx, &request.meter.name).await?;
        let now = source::aggregated(
            &mut tx,
            &self.settings.aggregator_group,
            &self.settings.kafka.topic,
        )
        .await?;
        let gap = source::between(reached, &now);
        if records_in(&gap) > 2 * SWAP_CATCH_UP {
            tx.rollback().await?;
            return Ok(Swap::Behind(now));
        }
        let before = chunk.events();
        self.read_from_kafka(&mut tx, &gap, chunk).await?;
        self.finish(&mut tx, chunk).await?;
        report.from_kafka += chunk.events() - before;
        report.events = chunk.events();
        let differences = shadow::count_differences(&mut tx, self.id, &range, 20).await?;
        if !differences.is_empty() {
            let lines: Vec<String> = differences
                .iter()
                .map(|(customer, hour, live, rebuilt)| {
                    format!("  {hour} {customer}: the windows count {live} events, the archive and Kafka {rebuilt}")
                })
                .collect();
            return Err(RebuildError::Incomplete(format!(
                "{}\n(run `tally archive verify --from {} --to {}` to see what the archive lacks)",
                lines.join("\n"),
                request.from,
                request.to
            )));
        }
        (report.windows_before, report.windows_after) =
            shadow::window_counts(&mut tx, self.id, &range).await?;
        report.days = shadow::day_differences(
            &mut tx,
            self.id,
            &range,
            self.recorded_aggregation,
            request.meter.aggregation,
        )
        .await?;
        let billed = BillingKind::of(request.meter.aggregation).is_some();
        let oldest = tally_core::window::oldest_stripe_timestamp(Utc::now());
        if billed {
            let backdated =
                shadow::Backdated::of(&mut tx, self.id, &range, request.meter.aggregation, oldest)
                    .await?;
            report.backdated_total = backdated.total;
            report.backdated = backdated.listed;
        }
        if request.dry_run {
            if billed {
                report.slots_to_bill =
                    shadow::changed_slots(&mut tx, self.id, &range, false).await?;
            }
            tx.rollback().await?;
            return Ok(Swap::Done);
        }
        let customers = shadow::customers(&mut tx, self.id, &range).await?;
        if billed {
            report.slots_to_bill = shadow::changed_slots(&mut tx, self.id, &range, true).await?;
            shadow::Backdated::record(&mut tx, self.id, &range, request.meter.aggregation, oldest)
                .await?;
        }
        // Unique values older than the lateness horizon are never read again (retention deletes
        // them): left alone, so the swap and retention never touch the same rows.
        let values_from = Utc::now() - self.settings.lateness_horizon;
        shadow::swap(&mut tx, self.id, &range, values_from).await?;
        let customers: Vec<&str> = customers.iter().map(String::as_str).collect();
        tally_db::changes::record(&mut tx, &customers).await?;
        if redefined {
            tally_db::meters::redefine(&mut tx, &request.meter).await?;
        }
        // In the transaction: a rebuild killed right after it is not taken for one that
        // changed nothing.
        sqlx::query("UPDATE rebuilds SET state = 'swapped' WHERE rebuild_id = $1")
            .bind(self.id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        report.swapped = true;
        Ok(Swap::Done)
    }
}

/// How the last transaction went.
enum Swap {
    Done,
    /// The aggregator stood too far ahead once the lock was had: not read under it.
    Behind(Positions),
}

/// Events read into the shadow, a chunk at a time.
#[derive(Default)]
struct Chunk {
    candidates: Vec<Candidate>,
    /// Upserted into the shadow so far.
    upserted: u64,
    /// Counted events the new definition cannot count.
    lacking: u64,
}

impl Chunk {
    fn events(&self) -> u64 {
        self.upserted + self.candidates.len() as u64
    }
}

/// A reader's side of the channel: records handed over [`READ_BATCH`] at a time (blocking
/// while two batches wait: the rebuild's memory stays bounded whatever the source's size).
struct Batcher {
    sender: tokio::sync::mpsc::Sender<Vec<ArchivedRecord>>,
    batch: Vec<ArchivedRecord>,
}

impl Batcher {
    fn new(sender: tokio::sync::mpsc::Sender<Vec<ArchivedRecord>>) -> Batcher {
        Batcher {
            sender,
            batch: Vec::with_capacity(READ_BATCH),
        }
    }

    fn push(&mut self, record: ArchivedRecord) {
        self.batch.push(record);
        if self.batch.len() >= READ_BATCH {
            // Refused only when the receiver is gone: the rebuild failed.
            let _ = self.sender.blocking_send(std::mem::take(&mut self.batch));
        }
    }

    /// Whether the receiver still takes batches (else the reader may stop).
    fn open(&self) -> bool {
        !self.sender.is_closed()
    }

    fn finish(self) {
        if !self.batch.is_empty() {
            let _ = self.sender.blocking_send(self.batch);
        }
    }
}

fn records_in(ranges: &BTreeMap<i32, (i64, i64)>) -> i64 {
    ranges.values().map(|(start, end)| end - start).sum()
}
