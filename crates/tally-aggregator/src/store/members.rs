//! `aggregator_members`: each running aggregator as its watchdog last saw it (its assignment,
//! and a stall if it is stalled), for `tally status`. A row is written every few seconds and
//! deleted when the process stops; one not seen for a while belongs to a process that died.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::AggregatorStoreError;

/// What the watchdog records of its member.
pub(crate) struct MemberRecord<'a> {
    pub(crate) owner: &'a str,
    pub(crate) group: &'a str,
    pub(crate) topic: &'a str,
    pub(crate) instance_id: Option<&'a str>,
    pub(crate) assigned: &'a [i32],
    /// The stall under way, and for how long.
    pub(crate) stall: Option<(&'a str, std::time::Duration)>,
}

/// Rows not seen for this long are deleted by the other members (their process died).
const FORGET_AFTER_SECONDS: f64 = 3600.0;

pub(crate) async fn record_member(
    pool: &PgPool,
    member: &MemberRecord<'_>,
) -> Result<(), AggregatorStoreError> {
    let (stall, stalled_seconds) = match member.stall {
        Some((detail, stalled_for)) => (Some(detail), Some(stalled_for.as_secs_f64())),
        None => (None, None),
    };
    sqlx::query(
        "INSERT INTO aggregator_members AS m (owner, consumer_group, topic, instance_id, assigned,
                stall, stalled_since)
         VALUES ($1, $2, $3, $4, $5, $6, now() - make_interval(secs => $7))
         ON CONFLICT (owner) DO UPDATE
            SET assigned = excluded.assigned, stall = excluded.stall,
                stalled_since = excluded.stalled_since, seen_at = now()",
    )
    .bind(member.owner)
    .bind(member.group)
    .bind(member.topic)
    .bind(member.instance_id)
    .bind(member.assigned)
    .bind(stall)
    .bind(stalled_seconds)
    .execute(pool)
    .await?;
    sqlx::query("DELETE FROM aggregator_members WHERE seen_at < now() - make_interval(secs => $1)")
        .bind(FORGET_AFTER_SECONDS)
        .execute(pool)
        .await?;
    Ok(())
}

/// A process that stops says so.
pub(crate) async fn forget_member(pool: &PgPool, owner: &str) -> Result<(), AggregatorStoreError> {
    sqlx::query("DELETE FROM aggregator_members WHERE owner = $1")
        .bind(owner)
        .execute(pool)
        .await?;
    Ok(())
}

/// A running aggregator, as `tally status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AggregatorMember {
    /// `<host>-<uuid>`: unique per process and run.
    pub owner: String,
    pub instance_id: Option<String>,
    pub assigned: Vec<i32>,
    /// What its watchdog says when it is stalled.
    pub stall: Option<String>,
    pub stalled_since: Option<DateTime<Utc>>,
    pub started_at: DateTime<Utc>,
    pub seen_at: DateTime<Utc>,
}

/// The members of `group` on `topic` seen in the last hour, most recently seen first.
pub async fn members(
    pool: &PgPool,
    group: &str,
    topic: &str,
) -> Result<Vec<AggregatorMember>, AggregatorStoreError> {
    Ok(sqlx::query_as(
        "SELECT owner, instance_id, assigned, stall, stalled_since, started_at, seen_at
         FROM aggregator_members WHERE consumer_group = $1 AND topic = $2
         ORDER BY seen_at DESC, owner",
    )
    .bind(group)
    .bind(topic)
    .fetch_all(pool)
    .await?)
}

/// The partitions other members of `group` on `topic` seen within `within` hold while making
/// progress (no stall recorded): a member with none of its own does not call those orphaned.
pub(crate) async fn covered_by_others(
    pool: &PgPool,
    owner: &str,
    group: &str,
    topic: &str,
    within: std::time::Duration,
) -> Result<Vec<i32>, AggregatorStoreError> {
    Ok(sqlx::query_scalar(
        "SELECT DISTINCT unnest(assigned) FROM aggregator_members
         WHERE consumer_group = $1 AND topic = $2 AND owner <> $3 AND stall IS NULL
           AND seen_at >= now() - make_interval(secs => $4)",
    )
    .bind(group)
    .bind(topic)
    .bind(owner)
    .bind(within.as_secs_f64())
    .fetch_all(pool)
    .await?)
}
