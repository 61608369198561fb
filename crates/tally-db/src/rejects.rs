//! Refused events, `rejected_events`: the one owner of that table. The aggregator stores what
//! it refuses from Kafka inside its batch transaction, HTTP ingest stores what it refuses
//! before emitting anything, and the aggregator's DLQ publisher copies every row to the DLQ
//! topic once. Nothing refused is ever lost.

use sqlx::{PgConnection, PgPool};

/// One refused event.
#[derive(Debug, Clone, Copy)]
pub struct Rejected<'a> {
    /// The stable code (`RejectReason::code`).
    pub reason: &'a str,
    pub detail: &'a str,
    pub event_id: Option<&'a str>,
    pub customer: Option<&'a str>,
    pub meter: Option<&'a str>,
    /// The bytes as received.
    pub raw: &'a [u8],
    pub received: Received<'a>,
}

/// Where a refused event came from.
#[derive(Debug, Clone, Copy)]
pub enum Received<'a> {
    /// Consumed from Kafka, at this position.
    Kafka {
        topic: &'a str,
        partition: i32,
        offset: i64,
        key: Option<&'a [u8]>,
    },
    /// Posted to `POST /v1/events`.
    Http,
}

/// Stores refused events: in the caller's transaction (aggregator) or on a pool (HTTP ingest).
pub async fn insert<'c>(
    executor: impl sqlx::PgExecutor<'c>,
    rows: &[Rejected<'_>],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut columns = Columns::default();
    for row in rows {
        columns.push(row);
    }
    sqlx::query(
        "INSERT INTO rejected_events
            (reason, detail, event_id, customer_id, meter, raw, received_via, topic, partition,
             \"offset\", kafka_key)
         SELECT r, d, i, c, m, b, v, t, p, o, k
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bytea[],
                     $7::text[], $8::text[], $9::int[], $10::bigint[], $11::bytea[])
              AS u(r, d, i, c, m, b, v, t, p, o, k)",
    )
    .bind(&columns.reasons)
    .bind(&columns.details)
    .bind(&columns.ids)
    .bind(&columns.customers)
    .bind(&columns.meters)
    .bind(&columns.raws)
    .bind(&columns.received_via)
    .bind(&columns.topics)
    .bind(&columns.partitions)
    .bind(&columns.offsets)
    .bind(&columns.keys)
    .execute(executor)
    .await?;
    Ok(())
}

/// `rows` as one array per column, for a single `unnest` insert.
#[derive(Default)]
struct Columns<'a> {
    reasons: Vec<&'a str>,
    details: Vec<&'a str>,
    ids: Vec<Option<&'a str>>,
    customers: Vec<Option<&'a str>>,
    meters: Vec<Option<&'a str>>,
    raws: Vec<&'a [u8]>,
    received_via: Vec<&'static str>,
    topics: Vec<Option<&'a str>>,
    partitions: Vec<Option<i32>>,
    offsets: Vec<Option<i64>>,
    keys: Vec<Option<&'a [u8]>>,
}

impl<'a> Columns<'a> {
    fn push(&mut self, row: &Rejected<'a>) {
        self.reasons.push(row.reason);
        self.details.push(row.detail);
        self.ids.push(row.event_id);
        self.customers.push(row.customer);
        self.meters.push(row.meter);
        self.raws.push(row.raw);
        match row.received {
            Received::Kafka {
                topic,
                partition,
                offset,
                key,
            } => {
                self.received_via.push("kafka");
                self.topics.push(Some(topic));
                self.partitions.push(Some(partition));
                self.offsets.push(Some(offset));
                self.keys.push(key);
            }
            Received::Http => {
                self.received_via.push("http");
                self.topics.push(None);
                self.partitions.push(None);
                self.offsets.push(None);
                self.keys.push(None);
            }
        }
    }
}

/// A refused event whose DLQ copy is not yet acknowledged.
#[derive(Debug, sqlx::FromRow)]
pub struct PendingDlq {
    pub rejection_id: i64,
    pub reason: String,
    pub detail: String,
    /// `topic/partition/offset` for events consumed from Kafka, `http` for events refused by
    /// `POST /v1/events`.
    pub source: String,
    pub raw: Vec<u8>,
    pub kafka_key: Option<Vec<u8>>,
}

/// Locks up to `limit` refused events not yet on the DLQ topic (skipping rows another
/// aggregator is publishing). Publish them, then [`mark_dlq_published`] in the same transaction.
pub async fn lock_pending_dlq(
    tx: &mut PgConnection,
    limit: i64,
) -> Result<Vec<PendingDlq>, sqlx::Error> {
    sqlx::query_as(
        "SELECT rejection_id, reason, detail,
                COALESCE(topic || '/' || partition || '/' || \"offset\", received_via) AS source,
                raw, kafka_key
         FROM rejected_events WHERE dlq_published_at IS NULL
         ORDER BY rejection_id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(&mut *tx)
    .await
}

/// The latest refused event of each reason since `since`: what the console shows as a sample.
#[derive(Debug, Clone)]
pub struct RejectSample {
    pub reason: String,
    pub detail: String,
    /// The first 300 bytes as received, lossily decoded, control characters escaped.
    pub raw: String,
}

/// The latest refused event of each reason since `since` (for the console).
pub async fn latest_samples(
    pool: &PgPool,
    since: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<RejectSample>, sqlx::Error> {
    let reasons: Vec<String> = tally_core::reject::RejectReason::ALL
        .iter()
        .map(|reason| reason.code().to_owned())
        .collect();
    // One index probe per reason, newest first ((reason, rejected_at) index): a flood of
    // rejects costs no more than a few.
    let rows: Vec<(String, String, Vec<u8>)> = sqlx::query_as(
        "SELECT r.reason, left(latest.detail, 500), substring(latest.raw FROM 1 FOR 300)
         FROM unnest($2::text[]) AS r(reason)
         CROSS JOIN LATERAL (
             SELECT detail, raw FROM rejected_events e
             WHERE e.reason = r.reason AND e.rejected_at >= $1
             ORDER BY e.rejected_at DESC LIMIT 1
         ) AS latest",
    )
    .bind(since)
    .bind(&reasons)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(reason, detail, raw)| RejectSample {
            reason,
            detail,
            raw: tally_core::reject::printable(String::from_utf8_lossy(&raw).into_owned()),
        })
        .collect())
}

/// Refused events per reason since `since`, most first (for `tally status`).
pub async fn counts_since(
    pool: &PgPool,
    since: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT reason, count(*) FROM rejected_events WHERE rejected_at >= $1
         GROUP BY reason ORDER BY 2 DESC, 1",
    )
    .bind(since)
    .fetch_all(pool)
    .await
}

/// Refused events not yet copied to the DLQ topic: how many, and the age in seconds of the
/// oldest (0 when none).
pub async fn dlq_backlog(pool: &PgPool) -> Result<(i64, f64), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*), COALESCE(extract(epoch FROM now() - min(rejected_at))::float8, 0)
         FROM rejected_events WHERE dlq_published_at IS NULL",
    )
    .fetch_one(pool)
    .await
}

/// Marks refused events as copied to the DLQ topic.
pub async fn mark_dlq_published(
    tx: &mut PgConnection,
    rejection_ids: &[i64],
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE rejected_events SET dlq_published_at = now() WHERE rejection_id = ANY($1)")
        .bind(rejection_ids)
        .execute(&mut *tx)
        .await?;
    Ok(())
}
