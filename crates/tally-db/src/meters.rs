//! The meter catalog, `meters`: the one owner of that table. Every command records the meters
//! of tally.toml as it starts ([`record`]); every stage reads them from here, typed.

use sqlx::PgPool;
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
    #[error("meter {name:?} was recorded with {recorded}, but tally.toml now says {configured}; its existing windows were built with the old rules, so define a new meter name instead of changing this one")]
    MeterChanged {
        name: String,
        recorded: String,
        configured: String,
    },
}

/// Records the configured meters. A meter whose aggregation, group_by or unique dimension
/// differs from what its windows were built with is refused: mixing rules would corrupt them.
pub async fn record(pool: &PgPool, meters: &[MeterDefinition]) -> Result<(), CatalogError> {
    let mut tx = pool.begin().await?;
    for meter in meters {
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
    tx.commit().await?;
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
