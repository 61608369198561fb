//! The rate card: what a unit of a meter costs in credits. tally.toml's `[[credits.rates]]`
//! are recorded in `credit_rates` (the one owner of that table) as each daemon starts, so the
//! aggregator, the burner and every quota check price usage the same way.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use sqlx::PgPool;
use tally_db::ExactDecimal;

use crate::config::RateDefinition;

/// A `credit_rates` row: meter, dimensions, credits per unit.
type RecordedRate = (
    String,
    sqlx::types::Json<BTreeMap<String, String>>,
    ExactDecimal,
);

/// The rates of every priced meter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateCard {
    /// Per meter, its rates, the most specific (most dimensions) first.
    by_meter: HashMap<String, Vec<RateDefinition>>,
}

impl RateCard {
    pub fn new(rates: &[RateDefinition]) -> RateCard {
        let mut by_meter: HashMap<String, Vec<RateDefinition>> = HashMap::new();
        for rate in rates {
            by_meter
                .entry(rate.meter.clone())
                .or_default()
                .push(rate.clone());
        }
        for rates in by_meter.values_mut() {
            rates.sort_by_key(|rate| std::cmp::Reverse(rate.dimensions.len()));
        }
        RateCard { by_meter }
    }

    /// Meters with at least one rate: the aggregator queues their committed usage.
    pub fn priced_meters(&self) -> BTreeSet<String> {
        self.by_meter.keys().cloned().collect()
    }

    pub fn is_priced(&self, meter: &str) -> bool {
        self.by_meter.contains_key(meter)
    }

    pub fn is_empty(&self) -> bool {
        self.by_meter.is_empty()
    }

    /// The rate of a window of `meter` with this group key (the aggregator's: `''` or a JSON
    /// object of group-by values): the most specific rate whose dimensions the window has.
    /// `None`: the window is not priced.
    pub fn rate_for_window(&self, meter: &str, group_key: &str) -> Option<Decimal> {
        let rates = self.by_meter.get(meter)?;
        if rates.iter().all(|r| r.dimensions.is_empty()) {
            return rates.first().map(|r| r.credits_per_unit);
        }
        let values: BTreeMap<String, String> = serde_json::from_str(group_key).unwrap_or_default();
        self.rate_for_dimensions(meter, Some(&values))
    }

    /// The rate for usage with these dimensions. Without dimensions (a check that does not
    /// say which model), the meter's default rate, or, when it has only narrower rates, the
    /// highest of them: a check must not allow what the burn could not cover.
    pub fn rate_for_dimensions(
        &self,
        meter: &str,
        dimensions: Option<&BTreeMap<String, String>>,
    ) -> Option<Decimal> {
        let rates = self.by_meter.get(meter)?;
        match dimensions {
            Some(values) => rates
                .iter()
                .find(|rate| {
                    rate.dimensions
                        .iter()
                        .all(|(key, value)| values.get(key) == Some(value))
                })
                .map(|rate| rate.credits_per_unit),
            None => rates
                .iter()
                .find(|rate| rate.dimensions.is_empty())
                .or_else(|| rates.iter().max_by_key(|rate| rate.credits_per_unit))
                .map(|rate| rate.credits_per_unit),
        }
    }

    /// The rates as recorded in Postgres.
    pub async fn load(pool: &PgPool) -> Result<RateCard, sqlx::Error> {
        let rows: Vec<RecordedRate> =
            sqlx::query_as("SELECT meter, dimensions, credits_per_unit FROM credit_rates")
                .fetch_all(pool)
                .await?;
        let rates: Vec<RateDefinition> = rows
            .into_iter()
            .map(|(meter, dimensions, rate)| RateDefinition {
                meter,
                credits_per_unit: rate.0,
                dimensions: dimensions.0,
            })
            .collect();
        Ok(RateCard::new(&rates))
    }
}

/// The rate card as a long-running task keeps it: reloaded once it is older than
/// [`FreshRates::MAX_AGE`], since another process may have recorded new rates.
#[derive(Debug, Default)]
pub struct FreshRates {
    card: RateCard,
    loaded: Option<Instant>,
}

impl FreshRates {
    pub const MAX_AGE: Duration = Duration::from_secs(10);

    /// The card, reloaded first when it is stale (or was never loaded).
    pub async fn get(&mut self, pool: &PgPool) -> Result<&RateCard, sqlx::Error> {
        if self.loaded.is_none_or(|at| at.elapsed() > Self::MAX_AGE) {
            self.card = RateCard::load(pool).await?;
            self.loaded = Some(Instant::now());
        }
        Ok(&self.card)
    }
}

/// Records the configured rates: each configured meter's rates replace what was recorded for
/// it; meters the configuration does not price keep theirs (a command started with a partial
/// tally.toml must not wipe the rate card; set `credits_per_unit = "0"` to stop pricing one).
pub async fn record(pool: &PgPool, rates: &[RateDefinition]) -> Result<(), sqlx::Error> {
    if rates.is_empty() {
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    let meters: Vec<&str> = rates
        .iter()
        .map(|r| r.meter.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    sqlx::query("DELETE FROM credit_rates WHERE meter = ANY($1)")
        .bind(&meters)
        .execute(&mut *tx)
        .await?;
    for rate in rates {
        sqlx::query(
            "INSERT INTO credit_rates (meter, dimensions, credits_per_unit) VALUES ($1, $2, $3)",
        )
        .bind(&rate.meter)
        .bind(sqlx::types::Json(&rate.dimensions))
        .bind(rate.credits_per_unit)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(meter: &str, per_unit: &str, dims: &[(&str, &str)]) -> RateDefinition {
        RateDefinition {
            meter: meter.into(),
            credits_per_unit: per_unit.parse().unwrap(),
            dimensions: dims
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn the_most_specific_rate_a_window_matches_wins() {
        let card = RateCard::new(&[
            rate("tokens", "0.001", &[]),
            rate("tokens", "0.01", &[("model", "large")]),
            rate("tokens", "0.05", &[("model", "large"), ("region", "eu")]),
            rate("calls", "1", &[]),
        ]);
        let d = |s: &str| Some(s.parse::<Decimal>().unwrap());
        assert_eq!(card.rate_for_window("calls", ""), d("1"));
        assert_eq!(
            card.rate_for_window("tokens", r#"{"model":"small"}"#),
            d("0.001")
        );
        assert_eq!(
            card.rate_for_window("tokens", r#"{"model":"large"}"#),
            d("0.01")
        );
        assert_eq!(
            card.rate_for_window("tokens", r#"{"model":"large","region":"eu"}"#),
            d("0.05")
        );
        assert_eq!(card.rate_for_window("tokens", "{}"), d("0.001"));
        assert_eq!(card.rate_for_window("other", ""), None);
        assert_eq!(card.rate_for_dimensions("tokens", None), d("0.001"));
    }

    #[test]
    fn without_a_default_rate_unmatched_windows_are_not_priced_and_checks_assume_the_highest() {
        let card = RateCard::new(&[
            rate("tokens", "0.01", &[("model", "large")]),
            rate("tokens", "0.002", &[("model", "small")]),
        ]);
        assert_eq!(card.rate_for_window("tokens", r#"{"model":"tiny"}"#), None);
        assert_eq!(card.rate_for_window("tokens", "not json"), None);
        assert_eq!(
            card.rate_for_dimensions("tokens", None),
            Some("0.01".parse().unwrap())
        );
    }
}
