//! A rebuild's shadow tables: copies of the four window tables, filled by the aggregator's own
//! fold and upsert (so the merge rules are the live ones), compared with the live windows,
//! and swapped in.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use sqlx::PgConnection;
use tally_core::window::oldest_stripe_timestamp;
use tally_core::{Aggregation, BillingKind};
use tally_db::ExactDecimal;

use super::{DayDifference, RebuildError, UnbilledSlot};
use crate::batch::{fold, Candidate, Granularity};
use crate::store::{upsert_windows, WindowTables};

pub(super) async fn create(conn: &mut PgConnection, id: i64) -> Result<(), sqlx::Error> {
    let shadow = WindowTables::shadow(id);
    for (table, live) in shadow.pairs(&WindowTables::live()) {
        // Unlogged: a crash loses the shadow, and a rebuild that died starts again anyway.
        sqlx::query(&format!(
            "CREATE UNLOGGED TABLE {table} (LIKE {live} INCLUDING ALL)"
        ))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

pub(super) async fn drop_tables(conn: &mut PgConnection, id: i64) -> Result<(), sqlx::Error> {
    let shadow = WindowTables::shadow(id);
    for (table, _) in shadow.pairs(&WindowTables::live()) {
        sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Folds the candidates into window deltas and upserts them into the shadow tables: the
/// aggregator's batch, without the claims (the ids were claimed when they were counted).
pub(super) async fn add(
    conn: &mut PgConnection,
    id: i64,
    candidates: &[Candidate],
) -> Result<(), RebuildError> {
    if candidates.is_empty() {
        return Ok(());
    }
    let shadow = WindowTables::shadow(id);
    let minutes = fold(candidates, Granularity::Minute);
    let days = fold(candidates, Granularity::Day);
    upsert_windows(conn, &shadow, Granularity::Minute, minutes).await?;
    upsert_windows(conn, &shadow, Granularity::Day, days).await?;
    Ok(())
}

/// The live windows a rebuild replaces, as SQL parameters: `$1` meter, `$2` customer (NULL:
/// all), `$3`/`$4` the first and the end instant, `$5`/`$6` the first and the end day.
#[derive(Debug, Clone)]
pub(super) struct Range<'a> {
    pub(super) meter: &'a str,
    pub(super) customer: Option<&'a str>,
    pub(super) from: DateTime<Utc>,
    pub(super) to: DateTime<Utc>,
    pub(super) from_day: NaiveDate,
    pub(super) to_day: NaiveDate,
}

/// The range's minute rows. Each filter names all six parameters (the other granularity's in
/// a condition that always holds), so that one set of bindings serves every statement.
const IN_MINUTES: &str = "meter = $1 AND ($2::text IS NULL OR customer_id = $2)
    AND window_start >= $3 AND window_start < $4 AND $5::date < $6::date";
/// The range's day rows.
const IN_DAYS: &str = "meter = $1 AND ($2::text IS NULL OR customer_id = $2)
    AND day >= $5 AND day < $6 AND $3::timestamptz < $4::timestamptz";

fn query<'q>(
    sql: &'q str,
    range: &'q Range<'_>,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(sql)
        .bind(range.meter)
        .bind(range.customer)
        .bind(range.from)
        .bind(range.to)
        .bind(range.from_day)
        .bind(range.to_day)
}

fn query_as<'q, T>(
    sql: &'q str,
    range: &'q Range<'_>,
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, T, sqlx::postgres::PgArguments>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
{
    sqlx::query_as(sql)
        .bind(range.meter)
        .bind(range.customer)
        .bind(range.from)
        .bind(range.to)
        .bind(range.from_day)
        .bind(range.to_day)
}

/// Per customer and hour, the events the live windows count and the shadow counts, where they
/// differ (at most `limit`): a rebuild recounts the very events the aggregator counted, so any
/// difference means the sources lack some (or hold some the windows do not).
pub(super) async fn count_differences(
    conn: &mut PgConnection,
    id: i64,
    range: &Range<'_>,
    limit: i64,
) -> Result<Vec<(String, DateTime<Utc>, i64, i64)>, sqlx::Error> {
    let shadow = WindowTables::shadow(id);
    let sql = format!(
        "WITH live AS (SELECT customer_id, date_trunc('hour', window_start, 'UTC') AS hour,
                              sum(event_count) AS n
                       FROM usage_minute WHERE {IN_MINUTES} GROUP BY 1, 2),
              shadow AS (SELECT customer_id, date_trunc('hour', window_start, 'UTC') AS hour,
                                sum(event_count) AS n
                         FROM {} WHERE {IN_MINUTES} GROUP BY 1, 2)
         SELECT customer_id, hour, coalesce(l.n, 0)::bigint, coalesce(s.n, 0)::bigint
         FROM live l FULL JOIN shadow s USING (customer_id, hour)
         WHERE coalesce(l.n, 0) <> coalesce(s.n, 0)
         ORDER BY hour, customer_id
         LIMIT {limit}",
        shadow.minute
    );
    query_as(&sql, range).fetch_all(&mut *conn).await
}

/// Window rows before (live) and after (shadow).
pub(super) async fn window_counts(
    conn: &mut PgConnection,
    id: i64,
    range: &Range<'_>,
) -> Result<(i64, i64), sqlx::Error> {
    let shadow = WindowTables::shadow(id);
    let sql = format!(
        "SELECT (SELECT count(*) FROM usage_minute WHERE {IN_MINUTES}),
                (SELECT count(*) FROM {} WHERE {IN_MINUTES})",
        shadow.minute
    );
    query_as(&sql, range).fetch_one(&mut *conn).await
}

type DayRow = (
    String,
    NaiveDate,
    i64,
    i64,
    Option<ExactDecimal>,
    Option<ExactDecimal>,
    Option<ExactDecimal>,
    Option<ExactDecimal>,
);

/// Per customer and day, the usage before and after, where anything differs.
pub(super) async fn day_differences(
    conn: &mut PgConnection,
    id: i64,
    range: &Range<'_>,
    before: Aggregation,
    after: Aggregation,
) -> Result<Vec<DayDifference>, sqlx::Error> {
    let shadow = WindowTables::shadow(id);
    let sql = format!(
        "WITH live AS (SELECT customer_id, day, sum(event_count) AS n, sum(value) AS s,
                              max(value) AS m
                       FROM usage_daily WHERE {IN_DAYS} GROUP BY 1, 2),
              shadow AS (SELECT customer_id, day, sum(event_count) AS n, sum(value) AS s,
                                max(value) AS m
                         FROM {} WHERE {IN_DAYS} GROUP BY 1, 2)
         SELECT customer_id, day, coalesce(l.n, 0)::bigint, coalesce(s.n, 0)::bigint,
                l.s, l.m, s.s, s.m
         FROM live l FULL JOIN shadow s USING (customer_id, day)
         WHERE l.n IS DISTINCT FROM s.n OR l.s IS DISTINCT FROM s.s OR l.m IS DISTINCT FROM s.m
         ORDER BY day, customer_id",
        shadow.daily
    );
    let rows: Vec<DayRow> = query_as(&sql, range).fetch_all(&mut *conn).await?;
    Ok(rows
        .into_iter()
        .map(
            |(customer, day, events_before, events_after, sb, mb, sa, ma)| DayDifference {
                customer,
                day,
                events_before,
                events_after,
                usage_before: day_usage(before, sb, mb),
                usage_after: day_usage(after, sa, ma),
            },
        )
        .filter(|d| {
            d.events_before != d.events_after || d.usage_before != d.usage_after
        })
        .collect())
}

/// A day's usage over its groups, as the report shows it: added up for `sum`, `count` and
/// `unique_count`, the largest group's for `max` and `latest`.
fn day_usage(
    aggregation: Aggregation,
    sum: Option<ExactDecimal>,
    max: Option<ExactDecimal>,
) -> Decimal {
    let value = match aggregation {
        Aggregation::Max | Aggregation::Latest => max,
        _ => sum,
    };
    value.map(|v| v.0).unwrap_or_default()
}

/// The billing slots holding a window that differs between the live windows and the shadow.
pub(super) async fn changed_slots(
    conn: &mut PgConnection,
    id: i64,
    range: &Range<'_>,
) -> Result<BTreeSet<(String, DateTime<Utc>)>, sqlx::Error> {
    let shadow = WindowTables::shadow(id);
    let sql = format!(
        "SELECT DISTINCT customer_id,
                date_bin('5 minutes', window_start, timestamptz '1970-01-01 00:00:00+00')
         FROM (SELECT * FROM usage_minute WHERE {IN_MINUTES}) l
         FULL JOIN (SELECT * FROM {} WHERE {IN_MINUTES}) s
           USING (customer_id, meter, window_start, group_key)
         WHERE (l.value, l.event_count, l.latest_at, l.latest_id)
               IS DISTINCT FROM (s.value, s.event_count, s.latest_at, s.latest_id)",
        shadow.minute
    );
    let rows: Vec<(String, DateTime<Utc>)> = query_as(&sql, range).fetch_all(&mut *conn).await?;
    Ok(rows.into_iter().collect())
}

/// Of the changed slots, those Stripe no longer takes a meter event for, with their usage
/// before and after (by the billing rule of the meter's definition on each side).
pub(super) async fn unbillable(
    conn: &mut PgConnection,
    id: i64,
    range: &Range<'_>,
    changed: &BTreeSet<(String, DateTime<Utc>)>,
    (before, after): (Aggregation, Aggregation),
    now: DateTime<Utc>,
) -> Result<Vec<UnbilledSlot>, sqlx::Error> {
    let oldest = oldest_stripe_timestamp(now);
    if !changed.iter().any(|(_, slot)| *slot < oldest) {
        return Ok(Vec::new());
    }
    let shadow = WindowTables::shadow(id);
    let per_slot = |table: &str, filter: &str| {
        format!(
            "SELECT customer_id,
                    date_bin('5 minutes', window_start, timestamptz '1970-01-01 00:00:00+00'),
                    sum(value), max(value),
                    (array_agg(value ORDER BY latest_at DESC NULLS LAST, latest_id DESC))[1]
             FROM {table} WHERE {filter} GROUP BY 1, 2"
        )
    };
    type SlotRow = (String, DateTime<Utc>, ExactDecimal, ExactDecimal, Option<ExactDecimal>);
    let mut usage: BTreeMap<(String, DateTime<Utc>), [Decimal; 2]> = BTreeMap::new();
    let live_sql = per_slot("usage_minute", &format!("{IN_MINUTES} AND window_start < $7"));
    let shadow_sql = per_slot(&shadow.minute, &format!("{IN_MINUTES} AND window_start < $7"));
    for (side, sql, aggregation) in [(0, live_sql, before), (1, shadow_sql, after)] {
        let rows: Vec<SlotRow> = query_as(&sql, range)
            .bind(oldest)
            .fetch_all(&mut *conn)
            .await?;
        for (customer, slot, sum, max, latest) in rows {
            let value = match BillingKind::of(aggregation) {
                Some(BillingKind::Delta) | None => sum.0,
                Some(BillingKind::Last) if aggregation == Aggregation::Max => max.0,
                Some(BillingKind::Last) => latest.unwrap_or_default().0,
            };
            usage.entry((customer, slot)).or_default()[side] = value;
        }
    }
    Ok(changed
        .iter()
        .filter(|(_, slot)| *slot < oldest)
        .map(|key| {
            let [usage_before, usage_after] = usage.get(key).copied().unwrap_or_default();
            UnbilledSlot {
                customer: key.0.clone(),
                slot_start: key.1,
                usage_before,
                usage_after,
            }
        })
        .collect())
}

/// The customers with windows in the range, before or after.
pub(super) async fn customers(
    conn: &mut PgConnection,
    id: i64,
    range: &Range<'_>,
) -> Result<Vec<String>, sqlx::Error> {
    let shadow = WindowTables::shadow(id);
    let sql = format!(
        "SELECT customer_id FROM usage_daily WHERE {IN_DAYS}
         UNION SELECT customer_id FROM {} WHERE {IN_DAYS}",
        shadow.daily
    );
    query_as::<(String,)>(&sql, range)
        .fetch_all(&mut *conn)
        .await
        .map(|rows| rows.into_iter().map(|(c,)| c).collect())
}

/// Replaces the live windows of the range with the shadow's, in the caller's transaction.
pub(super) async fn swap(
    conn: &mut PgConnection,
    id: i64,
    range: &Range<'_>,
) -> Result<(), sqlx::Error> {
    let shadow = WindowTables::shadow(id);
    let live = WindowTables::live();
    for (table, live, filter) in [
        (&shadow.minute, &live.minute, IN_MINUTES),
        (&shadow.daily, &live.daily, IN_DAYS),
        (&shadow.minute_values, &live.minute_values, IN_MINUTES),
        (&shadow.daily_values, &live.daily_values, IN_DAYS),
    ] {
        query(
            &format!("DELETE FROM {live} WHERE {filter}"),
            range,
        )
        .execute(&mut *conn)
        .await?;
        sqlx::query(&format!("INSERT INTO {live} SELECT * FROM {table}"))
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}
