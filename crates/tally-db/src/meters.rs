//! The meter catalog, `meters`: the one owner of that table. Every command records the meters
//! of tally.toml as it starts ([`record`]); every stage reads them from here, typed.

use std::collections::HashMap;

use sqlx::{PgConnection, PgPool};
use tally_core::{Aggregation, MeterDefinition};

/// A meter as recorded in the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedMeter {
    pub name: String,
    pub aggregation: Aggregation,
    /// The Stripe meter's `event_name` its usage is billed under.
    pub stripe_event_name: String,
}

/// Why the catalog could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("{0}")]
    Postgres(#[from] sqlx::Error),
    /// A meter's rules changed under windows built with the old ones.
    #[error("meter {name:?} was recorded with {recorded}, but tally.toml now says {configured}; its existing windows were built with the old rules: recompute them under the new ones with `tally rebuild --meter {name} --from DAY --to DAY` (docs/rebuild.md), or define a new meter name instead")]
    MeterChanged {
        name: String,
        recorded: String,
        configured: String,
    },
}

/// Records the configured meters. A meter whose aggregation, group_by or unique dimension
/// differs from what its windows were built with is refused: mixing rules would corrupt them.
/// Rows are locked in name order (two commands starting at once cannot deadlock). Returns the
/// definition version of each meter (`meters.version`).
pub async fn record(
    pool: &PgPool,
    meters: &[MeterDefinition],
) -> Result<HashMap<String, i64>, CatalogError> {
    let mut sorted: Vec<&MeterDefinition> = meters.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut tx = pool.begin().await?;
    for meter in sorted {
        let aggregation = meter.aggregation.as_str();
        let stored: Option<(String, Vec<String>, Option<String>)> = sqlx::query_as(
            "SELECT aggregation, group_by, unique_dimension FROM meters WHERE name = $1 FOR UPDATE",
        )
        .bind(&meter.name)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((stored_aggregation, group_by, unique_dimension)) = stored {
            if stored_aggregation != aggregation
                || group_by != meter.group_by
                || unique_dimension != meter.unique_dimension
            {
                return Err(CatalogError::MeterChanged {
                    name: meter.name.clone(),
                    recorded: format!("aggregation={stored_aggregation}, group_by={group_by:?}, unique_dimension={unique_dimension:?}"),
                    configured: format!(
                        "aggregation={aggregation}, group_by={:?}, unique_dimension={:?}",
                        meter.group_by, meter.unique_dimension
                    ),
                });
            }
        }
        sqlx::query(
            "INSERT INTO meters (name, aggregation, group_by, unique_dimension, stripe_event_name)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (name) DO UPDATE
                SET stripe_event_name = excluded.stripe_event_name, updated_at = now()",
        )
        .bind(&meter.name)
        .bind(aggregation)
        .bind(&meter.group_by)
        .bind(&meter.unique_dimension)
        .bind(meter.stripe_event_name())
        .execute(&mut *tx)
        .await?;
    }
    let names: Vec<&str> = meters.iter().map(|m| m.name.as_str()).collect();
    let versions = versions_in(&mut tx, &names).await?;
    tx.commit().await?;
    Ok(versions)
}

/// The definition version of each named meter that is recorded: `tally rebuild` bumps it when
/// it swaps in windows recomputed under a new definition.
async fn versions_in(
    tx: &mut PgConnection,
    names: &[&str],
) -> Result<HashMap<String, i64>, sqlx::Error> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT name, version FROM meters WHERE name = ANY($1)")
            .bind(names)
            .fetch_all(&mut *tx)
            .await?;
    Ok(rows.into_iter().collect())
}

/// A recorded meter's whole definition and version, or `None` when no readable meter has that
/// name.
pub async fn definition(
    conn: &mut PgConnection,
    name: &str,
) -> Result<Option<(MeterDefinition, i64)>, sqlx::Error> {
    // aggregation, group_by, unique_dimension, stripe_event_name, version
    type Row = (String, Vec<String>, Option<String>, String, i64);
    let row: Option<Row> = sqlx::query_as(
        "SELECT aggregation, group_by, unique_dimension, stripe_event_name, version
         FROM meters WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.and_then(
        |(aggregation, group_by, unique_dimension, stripe_event_name, version)| {
            let aggregation = readable(name, &aggregation)?;
            let definition = MeterDefinition {
                name: name.to_owned(),
                aggregation,
                group_by,
                unique_dimension,
                stripe_event_name: (stripe_event_name != name).then_some(stripe_event_name),
            };
            Some((definition, version))
        },
    ))
}

/// Records a new definition of a meter and bumps its version, in the caller's transaction
/// (`tally rebuild`'s swap, which has the row locked).
pub async fn redefine(tx: &mut PgConnection, meter: &MeterDefinition) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE meters SET aggregation = $2, group_by = $3, unique_dimension = $4,
                           version = version + 1, updated_at = now()
         WHERE name = $1 RETURNING version",
    )
    .bind(&meter.name)
    .bind(meter.aggregation.as_str())
    .bind(&meter.group_by)
    .bind(&meter.unique_dimension)
    .fetch_one(&mut *tx)
    .await
}

/// The namespace of the per-meter advisory locks (the first key of the two-key form; the
/// second is the meter name's `hashtext`). Two names with the same hash only share a lock.
const METER_LOCKS: i32 = 0x7461_6c79; // "taly"

/// Takes the shared lock of each named meter for the transaction, in name order, and returns
/// their versions: the first thing an aggregator batch does. `tally rebuild` takes a meter's
/// lock exclusively ([`lock_exclusive`]) to swap in recomputed windows, so batches counting
/// that meter and the swap take turns. An advisory lock (not a row lock) because its queue is
/// fair: a batch arriving while a swap waits queues behind it, so batches that overlap cannot
/// starve the swap.
pub async fn share_versions(
    tx: &mut PgConnection,
    names: &[&str],
) -> Result<HashMap<String, i64>, sqlx::Error> {
    let mut sorted: Vec<&str> = names.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    for name in &sorted {
        sqlx::query("SELECT pg_advisory_xact_lock_shared($1, hashtext($2))")
            .bind(METER_LOCKS)
            .bind(name)
            .execute(&mut *tx)
            .await?;
    }
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT name, version FROM meters WHERE name = ANY($1)")
            .bind(&sorted)
            .fetch_all(&mut *tx)
            .await?;
    Ok(rows.into_iter().collect())
}

/// Takes a meter's lock exclusively for the transaction (`tally rebuild`'s swap): waits for
/// the batches counting it that hold it shared, and holds back the next ones.
pub async fn lock_exclusive(tx: &mut PgConnection, name: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind(METER_LOCKS)
        .bind(name)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Every recorded meter: those of tally.toml and earlier ones whose usage may still be billed.
/// A row with an aggregation this tally does not know is left out and logged at ERROR (the
/// stages then treat its usage as they treat an unknown meter's); the others are returned.
pub async fn all(pool: &PgPool) -> Result<Vec<RecordedMeter>, sqlx::Error> {
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT name, aggregation, stripe_event_name FROM meters ORDER BY name")
            .fetch_all(pool)
            .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(name, aggregation, stripe_event_name)| {
            let aggregation = readable(&name, &aggregation)?;
            Some(RecordedMeter {
                name,
                aggregation,
                stripe_event_name,
            })
        })
        .collect())
}

/// The aggregation of one recorded meter, or `None` when no readable meter has that name.
pub async fn aggregation_of(pool: &PgPool, name: &str) -> Result<Option<Aggregation>, sqlx::Error> {
    let stored: Option<String> =
        sqlx::query_scalar("SELECT aggregation FROM meters WHERE name = $1")
            .bind(name)
            .fetch_optional(pool)
            .await?;
    Ok(stored.and_then(|text| readable(name, &text)))
}

/// A stored aggregation, or `None` (logged at ERROR) when this tally cannot read it.
fn readable(meter: &str, stored: &str) -> Option<Aggregation> {
    match stored.parse() {
        Ok(aggregation) => Some(aggregation),
        Err(error) => {
            tracing::error!(meter, %error, "the meters table holds a meter this tally cannot read");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;

    /// A rebuild's swap waiting for a meter is not starved by batches that keep arriving: a
    /// batch asking for the meter after the swap queues behind it.
    #[test]
    fn a_waiting_swap_goes_before_batches_that_arrive_after_it() {
        let runtime = crate::testing::runtime();
        runtime.block_on(async {
            let db = crate::testing::fresh_database().await;
            let order = Arc::new(Mutex::new(Vec::new()));
            let mut first = db.pool.begin().await.unwrap();
            share_versions(&mut first, &["tokens"]).await.unwrap();
            let swap = {
                let (pool, order) = (db.pool.clone(), order.clone());
                tokio::spawn(async move {
                    let mut tx = pool.begin().await.unwrap();
                    lock_exclusive(&mut tx, "tokens").await.unwrap();
                    order.lock().unwrap().push("swap");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    tx.commit().await.unwrap();
                })
            };
            tokio::time::sleep(Duration::from_millis(200)).await;
            let later = {
                let (pool, order) = (db.pool.clone(), order.clone());
                tokio::spawn(async move {
                    let mut tx = pool.begin().await.unwrap();
                    share_versions(&mut tx, &["tokens", "api_calls"])
                        .await
                        .unwrap();
                    order.lock().unwrap().push("later batch");
                    tx.commit().await.unwrap();
                })
            };
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert!(
                order.lock().unwrap().is_empty(),
                "{:?}",
                order.lock().unwrap()
            );
            first.commit().await.unwrap();
            swap.await.unwrap();
            later.await.unwrap();
            assert_eq!(*order.lock().unwrap(), ["swap", "later batch"]);
        });
    }
}
