//! Upserting a batch's window deltas into `usage_minute` and `usage_daily` (one merge rule per
//! aggregation), the values `unique_count` windows have seen, and the billing slots the batch
//! changed.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgConnection;
use tally_core::window::slot_start;
use tally_core::Aggregation;

use super::AggregatorStoreError;
use crate::batch::{Granularity, WindowDelta};

/// The tables windows are written to: the live ones, or the shadow copies a rebuild fills
/// before it swaps them in. Both are written by the same code, under the same merge rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WindowTables {
    pub(crate) minute: String,
    pub(crate) daily: String,
    pub(crate) minute_values: String,
    pub(crate) daily_values: String,
}

impl WindowTables {
    pub(crate) fn live() -> WindowTables {
        WindowTables {
            minute: "usage_minute".into(),
            daily: "usage_daily".into(),
            minute_values: "usage_minute_values".into(),
            daily_values: "usage_daily_values".into(),
        }
    }

    /// Rebuild `id`'s shadow tables (names made of a number only, never of input).
    pub(crate) fn shadow(id: i64) -> WindowTables {
        WindowTables {
            minute: format!("rebuild_{id}_minute"),
            daily: format!("rebuild_{id}_daily"),
            minute_values: format!("rebuild_{id}_minute_values"),
            daily_values: format!("rebuild_{id}_daily_values"),
        }
    }

    /// Each shadow table with the live table it stands in for.
    pub(crate) fn pairs<'a>(&'a self, live: &'a WindowTables) -> [(&'a str, &'a str); 4] {
        [
            (&self.minute, &live.minute),
            (&self.daily, &live.daily),
            (&self.minute_values, &live.minute_values),
            (&self.daily_values, &live.daily_values),
        ]
    }
}

/// The tables and the value merge rule for one granularity and aggregation.
fn upsert_sql(tables: &WindowTables, granularity: Granularity, aggregation: Aggregation) -> String {
    let (table, time_column, time_type) = match granularity {
        Granularity::Minute => (tables.minute.as_str(), "window_start", "timestamptz"),
        Granularity::Day => (tables.daily.as_str(), "day", "date"),
    };
    let (value, latest) = match aggregation {
        Aggregation::Sum | Aggregation::Count | Aggregation::UniqueCount => {
            ("w.value + excluded.value", "")
        }
        Aggregation::Max => ("GREATEST(w.value, excluded.value)", ""),
        Aggregation::Latest => (
            "CASE WHEN newer THEN excluded.value ELSE w.value END",
            ", latest_at = CASE WHEN newer THEN excluded.latest_at ELSE w.latest_at END,
               latest_id = CASE WHEN newer THEN excluded.latest_id ELSE w.latest_id END",
        ),
    };
    let newer = "(excluded.latest_at, excluded.latest_id) > (w.latest_at, w.latest_id)";
    format!(
        "INSERT INTO {table} AS w (customer_id, meter, {time_column}, group_key, value, event_count,
                                   latest_at, latest_id, first_updated, last_updated)
         SELECT c, m, t, g, v, n, la, li, now(), now()
         FROM unnest($1::text[], $2::text[], $3::{time_type}[], $4::text[], $5::numeric[],
                     $6::bigint[], $7::timestamptz[], $8::text[]) AS u(c, m, t, g, v, n, la, li)
         ON CONFLICT (customer_id, meter, {time_column}, group_key) DO UPDATE
            SET value = {value}, event_count = w.event_count + excluded.event_count,
                last_updated = excluded.last_updated{latest}"
    )
    .replace("newer", newer)
}

/// Tells the sink which 5-minute billing slots this batch changed. `unique_count` meters are
/// not billed (Stripe meters cannot count distinct values), so they are left out.
pub(super) async fn record_slot_changes(
    tx: &mut PgConnection,
    minutes: &[WindowDelta],
) -> Result<(), AggregatorStoreError> {
    let slots: BTreeSet<(&str, &str, DateTime<Utc>)> = minutes
        .iter()
        .filter(|d| d.aggregation != Aggregation::UniqueCount)
        .map(|d| {
            (
                d.key.customer.as_str(),
                d.key.meter.as_str(),
                slot_start(d.key.start),
            )
        })
        .collect();
    tally_db::slot_changes::record(tx, &slots).await?;
    Ok(())
}

/// Upserts the deltas of one granularity: one statement per aggregation present (and, in the
/// rare case a sum needed several partials, one more per extra partial).
pub(crate) async fn upsert_windows(
    tx: &mut PgConnection,
    tables: &WindowTables,
    granularity: Granularity,
    mut deltas: Vec<WindowDelta>,
) -> Result<(), AggregatorStoreError> {
    add_new_unique_values(tx, tables, granularity, &mut deltas).await?;
    for aggregation in [
        Aggregation::Sum,
        Aggregation::Count,
        Aggregation::Max,
        Aggregation::Latest,
        Aggregation::UniqueCount,
    ] {
        let mut rows: Vec<&WindowDelta> = deltas
            .iter()
            .filter(|d| d.aggregation == aggregation)
            .collect();
        let mut layer = 0;
        while !rows.is_empty() {
            upsert_rows(tx, tables, granularity, aggregation, &rows, layer).await?;
            layer += 1;
            rows.retain(|d| d.partials.len() > layer);
        }
    }
    Ok(())
}

async fn upsert_rows(
    tx: &mut PgConnection,
    tables: &WindowTables,
    granularity: Granularity,
    aggregation: Aggregation,
    rows: &[&WindowDelta],
    layer: usize,
) -> Result<(), AggregatorStoreError> {
    let customers: Vec<&str> = rows.iter().map(|d| d.key.customer.as_str()).collect();
    let meters: Vec<&str> = rows.iter().map(|d| d.key.meter.as_str()).collect();
    let groups: Vec<&str> = rows.iter().map(|d| d.key.group_key.as_str()).collect();
    let values: Vec<Decimal> = rows
        .iter()
        .map(|d| d.partials.get(layer).copied().unwrap_or(Decimal::ZERO))
        .collect();
    // Later layers carry only a value; the event count was added with the first.
    let counts: Vec<i64> = rows
        .iter()
        .map(|d| if layer == 0 { d.events } else { 0 })
        .collect();
    let latest_at: Vec<Option<DateTime<Utc>>> = rows
        .iter()
        .map(|d| d.latest.as_ref().map(|l| l.at))
        .collect();
    let latest_id: Vec<Option<&str>> = rows
        .iter()
        .map(|d| d.latest.as_ref().map(|l| l.id.as_str()))
        .collect();
    let sql = upsert_sql(tables, granularity, aggregation);
    let query = sqlx::query(&sql).bind(&customers).bind(&meters);
    let query = match granularity {
        Granularity::Minute => query.bind(rows.iter().map(|d| d.key.start).collect::<Vec<_>>()),
        Granularity::Day => query.bind(
            rows.iter()
                .map(|d| d.key.start.date_naive())
                .collect::<Vec<_>>(),
        ),
    };
    query
        .bind(&groups)
        .bind(&values)
        .bind(&counts)
        .bind(&latest_at)
        .bind(&latest_id)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// For `unique_count` deltas: records the batch's values and sets each delta's value to the
/// number that were new to its window, so counts stay exact across batches.
async fn add_new_unique_values(
    tx: &mut PgConnection,
    tables: &WindowTables,
    granularity: Granularity,
    deltas: &mut [WindowDelta],
) -> Result<(), AggregatorStoreError> {
    let mut customers = Vec::new();
    let mut meters = Vec::new();
    let mut starts = Vec::new();
    let mut groups = Vec::new();
    let mut values = Vec::new();
    for delta in deltas
        .iter()
        .filter(|d| d.aggregation == Aggregation::UniqueCount)
    {
        for value in &delta.unique_values {
            customers.push(delta.key.customer.as_str());
            meters.push(delta.key.meter.as_str());
            starts.push(delta.key.start);
            groups.push(delta.key.group_key.as_str());
            values.push(value.as_str());
        }
    }
    if values.is_empty() {
        return Ok(());
    }
    let sql = match granularity {
        Granularity::Minute => format!(
            "INSERT INTO {} (customer_id, meter, window_start, group_key, value)
             SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::text[])
             ON CONFLICT DO NOTHING
             RETURNING customer_id, meter, window_start, group_key",
            tables.minute_values
        ),
        Granularity::Day => format!(
            "INSERT INTO {} (customer_id, meter, day, group_key, value)
             SELECT c, m, (t AT TIME ZONE 'UTC')::date, g, v
             FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::text[])
                  AS u(c, m, t, g, v)
             ON CONFLICT DO NOTHING
             RETURNING customer_id, meter, day::timestamp AT TIME ZONE 'UTC', group_key",
            tables.daily_values
        ),
    };
    let new: Vec<(String, String, DateTime<Utc>, String)> = sqlx::query_as(&sql)
        .bind(&customers)
        .bind(&meters)
        .bind(&starts)
        .bind(&groups)
        .bind(&values)
        .fetch_all(&mut *tx)
        .await?;
    let mut new_per_window: HashMap<(String, String, DateTime<Utc>, String), i64> = HashMap::new();
    for key in new {
        *new_per_window.entry(key).or_default() += 1;
    }
    for delta in deltas
        .iter_mut()
        .filter(|d| d.aggregation == Aggregation::UniqueCount)
    {
        let key = (
            delta.key.customer.clone(),
            delta.key.meter.clone(),
            delta.key.start,
            delta.key.group_key.clone(),
        );
        let new = new_per_window.get(&key).copied().unwrap_or(0);
        delta.partials = vec![Decimal::from(new)];
    }
    Ok(())
}
