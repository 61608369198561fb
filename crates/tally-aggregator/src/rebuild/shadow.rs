//! A rebuild's shadow tables: copies of the four window tables, filled by the aggregator's own
//! fold and upsert (so the merge rules are the live ones), compared with the live windows,
//! and swapped in.

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgConnection;
use tally_core::Aggregation;

use super::{BackdatedSlot, DayDifference, RebuildError};
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
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// Per customer and day, the usage before and after, where anything differs. Usage is read as
/// text: exact, whatever its size (no customer's enormous sum can fail the rebuild).
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
                l.s::text, l.m::text, s.s::text, s.m::text
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
        .filter(|d| d.events_before != d.events_after || d.usage_before != d.usage_after)
        .collect())
}

/// A day's usage over its groups, as the report shows it: added up for `sum`, `count` and
/// `unique_count`, the largest group's for `max` and `latest`.
fn day_usage(aggregation: Aggregation, sum: Option<String>, max: Option<String>) -> String {
    let value = match aggregation {
        Aggregation::Max | Aggregation::Latest => max,
        _ => sum,
    };
    value.unwrap_or_else(|| "0".into())
}

/// The windows that differ between the live tables and the shadow, with their billing slot.
fn changed_windows(shadow: &WindowTables) -> String {
    format!(
        "SELECT customer_id, date_bin('5 minutes', window_start, timestamptz '1970-01-01 00:00:00+00') AS slot
         FROM (SELECT * FROM usage_minute WHERE {IN_MINUTES}) l
         FULL JOIN (SELECT * FROM {} WHERE {IN_MINUTES}) s
           USING (customer_id, meter, window_start, group_key)
         WHERE (l.value, l.event_count, l.latest_at, l.latest_id)
               IS DISTINCT FROM (s.value, s.event_count, s.latest_at, s.latest_id)",
        shadow.minute
    )
}

/// The billing slots holding a window that differs: recorded for the sink (in SQL, however
/// many), or only counted (a dry run). Returns how many.
pub(super) async fn changed_slots(
    conn: &mut PgConnection,
    id: i64,
    range: &Range<'_>,
    record: bool,
) -> Result<u64, sqlx::Error> {
    let changed = changed_windows(&WindowTables::shadow(id));
    let distinct = format!("SELECT DISTINCT customer_id, $1::text, slot FROM ({changed}) c");
    if record {
        let sql =
            format!("INSERT INTO usage_slot_changes (customer_id, meter, slot_start) {distinct}");
        Ok(query(&sql, range)
            .execute(&mut *conn)
            .await?
            .rows_affected())
    } else {
        let sql = format!("SELECT count(*) FROM ({distinct}) d");
        let (count,): (i64,) = query_as(&sql, range).fetch_one(&mut *conn).await?;
        Ok(count as u64)
    }
}

/// At most this many backdated slots are listed in a report (all are recorded).
pub(super) const LISTED: i64 = 1_000;

/// The changed slots older than Stripe takes meter events for.
pub(super) struct Backdated {
    pub(super) total: u64,
    pub(super) listed: Vec<BackdatedSlot>,
}

impl Backdated {
    /// The slots, with their usage before and after as the sink bills a slot of the meter's
    /// aggregation (the rule of `tally_sink`'s accounting: the sum of its windows, the
    /// largest, or the latest window's), by slot: a slot is backdated when its start is.
    fn sql(shadow: &WindowTables, aggregation: Aggregation) -> String {
        let usage = match aggregation {
            Aggregation::Max => "max(value)",
            Aggregation::Latest => {
                "(array_agg(value ORDER BY latest_at DESC NULLS LAST, latest_id DESC))[1]"
            }
            _ => "sum(value)",
        };
        let per_slot = |table: &str| {
            format!(
                "SELECT customer_id,
                        date_bin('5 minutes', window_start, timestamptz '1970-01-01 00:00:00+00') AS slot,
                        {usage} AS usage
                 FROM {table} WHERE {IN_MINUTES} GROUP BY 1, 2"
            )
        };
        format!(
            "WITH changed AS (SELECT DISTINCT customer_id, slot FROM ({}) c WHERE slot < $7),
                  live AS ({}), shadow AS ({})
             SELECT c.customer_id, c.slot, coalesce(l.usage, 0) AS before,
                    coalesce(s.usage, 0) AS after
             FROM changed c
             LEFT JOIN live l ON l.customer_id = c.customer_id AND l.slot = c.slot
             LEFT JOIN shadow s ON s.customer_id = c.customer_id AND s.slot = c.slot",
            changed_windows(shadow),
            per_slot("usage_minute"),
            per_slot(&shadow.minute)
        )
    }

    pub(super) async fn of(
        conn: &mut PgConnection,
        id: i64,
        range: &Range<'_>,
        aggregation: Aggregation,
        oldest: DateTime<Utc>,
    ) -> Result<Backdated, sqlx::Error> {
        let slots = Backdated::sql(&WindowTables::shadow(id), aggregation);
        let (total,): (i64,) = query_as(&format!("SELECT count(*) FROM ({slots}) b"), range)
            .bind(oldest)
            .fetch_one(&mut *conn)
            .await?;
        let rows: Vec<(String, DateTime<Utc>, String, String)> = query_as(
            &format!(
                "SELECT customer_id, slot, before::text, after::text FROM ({slots}) b
                 ORDER BY slot, customer_id LIMIT {LISTED}"
            ),
            range,
        )
        .bind(oldest)
        .fetch_all(&mut *conn)
        .await?;
        Ok(Backdated {
            total: total as u64,
            listed: rows
                .into_iter()
                .map(
                    |(customer, slot_start, usage_before, usage_after)| BackdatedSlot {
                        customer,
                        slot_start,
                        usage_before,
                        usage_after,
                    },
                )
                .collect(),
        })
    }

    /// Records them all in `rebuild_backdated_slots`, in the swap's transaction.
    pub(super) async fn record(
        conn: &mut PgConnection,
        id: i64,
        range: &Range<'_>,
        aggregation: Aggregation,
        oldest: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        let slots = Backdated::sql(&WindowTables::shadow(id), aggregation);
        query(
            &format!(
                "INSERT INTO rebuild_backdated_slots (rebuild_id, customer_id, meter, slot_start,
                                                      usage_before, usage_after)
                 SELECT {id}, customer_id, $1, slot, before, after FROM ({slots}) b"
            ),
            range,
        )
        .bind(oldest)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
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
/// Minute unique values only from `values_from` on (older ones are never read again, and
/// retention deletes them: the two never touch the same rows).
pub(super) async fn swap(
    conn: &mut PgConnection,
    id: i64,
    range: &Range<'_>,
    values_from: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let shadow = WindowTables::shadow(id);
    let live = WindowTables::live();
    let recent_values = format!("{IN_MINUTES} AND window_start >= $7");
    for (table, live, filter) in [
        (&shadow.minute, &live.minute, IN_MINUTES),
        (&shadow.daily, &live.daily, IN_DAYS),
        (
            &shadow.minute_values,
            &live.minute_values,
            recent_values.as_str(),
        ),
        (&shadow.daily_values, &live.daily_values, IN_DAYS),
    ] {
        // $7 is bound for every statement; the one filter that does not name it names it here.
        let unused = if filter.contains("$7") {
            ""
        } else {
            " AND $7::timestamptz IS NOT NULL"
        };
        query(&format!("DELETE FROM {live} WHERE {filter}{unused}"), range)
            .bind(values_from)
            .execute(&mut *conn)
            .await?;
        query(
            &format!("INSERT INTO {live} SELECT * FROM {table} WHERE {filter}{unused}"),
            range,
        )
        .bind(values_from)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}
