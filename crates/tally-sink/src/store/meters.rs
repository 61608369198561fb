//! The meters as the sink bills them, read from the `meters` table (through `tally_db::meters`).

use std::collections::HashMap;

use sqlx::PgPool;
use tally_core::Aggregation;

use super::SinkStoreError;
use crate::owed::BillingKind;

/// How a meter is billed, from the `meters` table.
#[derive(Debug, Clone)]
pub struct BilledMeter {
    pub aggregation: Aggregation,
    pub kind: Option<BillingKind>,
    pub event_name: String,
}

/// The meters as recorded in the `meters` table: every meter of tally.toml (each command
/// records them as it starts), and earlier meters whose usage may still be billed.
pub async fn billed_meters(pool: &PgPool) -> Result<HashMap<String, BilledMeter>, SinkStoreError> {
    Ok(tally_db::meters::all(pool)
        .await?
        .into_iter()
        .map(|meter| {
            let billed = BilledMeter {
                aggregation: meter.aggregation,
                kind: BillingKind::of(meter.aggregation),
                event_name: meter.stripe_event_name,
            };
            (meter.name, billed)
        })
        .collect())
}
