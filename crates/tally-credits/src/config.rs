//! `[credits]` in tally.toml: the rate card (`[[credits.rates]]`) and how often the burner runs.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tally_core::{Aggregation, MeterDefinition};

/// `[credits]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CreditsConfig {
    /// `[[credits.rates]]`: what a unit of a meter costs in credits.
    pub rates: Vec<RateDefinition>,
    /// How often the burner (in `tally aggregate`) looks for committed usage to burn, expired
    /// grants and plan grants due. Usage is burned within about this long of its commit.
    #[serde(with = "tally_core::duration")]
    pub burn_every: Duration,
}

impl Default for CreditsConfig {
    fn default() -> Self {
        CreditsConfig {
            rates: Vec::new(),
            burn_every: Duration::from_millis(250),
        }
    }
}

/// One `[[credits.rates]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateDefinition {
    /// A `sum` or `count` meter.
    pub meter: String,
    /// Credits one unit costs, e.g. "0.001"; 0 to 1,000,000, at most 9 decimal places.
    pub credits_per_unit: Decimal,
    /// Only for windows with these group-by values (e.g. `{ model = "large" }`); without, the
    /// meter's default rate. The rate naming the most dimensions a window has wins.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dimensions: BTreeMap<String, String>,
}

/// The largest rate: with quantities up to 10^15 per event, a window's cost stays far inside a
/// 28-digit decimal.
const MAX_RATE: Decimal = Decimal::from_parts(1_000_000, 0, 0, false, 0);

impl CreditsConfig {
    /// Checks the rate card against the meters; the error says what to change.
    pub fn validate(&self, meters: &[MeterDefinition]) -> Result<(), String> {
        if self.burn_every < Duration::from_millis(10) || self.burn_every > Duration::from_secs(60)
        {
            return Err("credits.burn_every must be between 10ms and 60s".into());
        }
        let mut seen = BTreeSet::new();
        for rate in &self.rates {
            let Some(meter) = meters.iter().find(|m| m.name == rate.meter) else {
                return Err(format!(
                    "[[credits.rates]] prices meter {:?}, which is not in [[meters]]; define the meter or remove the rate",
                    rate.meter
                ));
            };
            if !matches!(meter.aggregation, Aggregation::Sum | Aggregation::Count) {
                return Err(format!(
                    "[[credits.rates]] prices meter {:?}, which aggregates {}; only sum and count meters can burn credits (their usage adds up)",
                    rate.meter,
                    meter.aggregation.as_str()
                ));
            }
            if rate.credits_per_unit.is_sign_negative()
                || rate.credits_per_unit > MAX_RATE
                || rate.credits_per_unit.normalize().scale() > 9
            {
                return Err(format!(
                    "[[credits.rates]] meter {:?}: credits_per_unit {} must be 0 to 1000000 with at most 9 decimal places",
                    rate.meter, rate.credits_per_unit
                ));
            }
            if let Some(key) = rate.dimensions.keys().find(|k| !meter.group_by.contains(k)) {
                return Err(format!(
                    "[[credits.rates]] meter {:?}: dimension {key:?} is not in the meter's group_by ({:?}); a rate can only tell windows apart by what they are grouped by",
                    rate.meter, meter.group_by
                ));
            }
            if !seen.insert((&rate.meter, &rate.dimensions)) {
                return Err(format!(
                    "[[credits.rates]] meter {:?} has two rates for dimensions {:?}; keep one",
                    rate.meter, rate.dimensions
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meters() -> Vec<MeterDefinition> {
        tally_core::meter::meters_from_toml(
            r#"
            [[meters]]
            name = "tokens"
            aggregation = "sum"
            group_by = ["model"]
            [[meters]]
            name = "seats"
            aggregation = "max"
            "#,
        )
        .unwrap()
    }

    fn config(text: &str) -> CreditsConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn a_rate_card_is_checked_against_the_meters() {
        let ok = config(
            r#"
            [[rates]]
            meter = "tokens"
            credits_per_unit = "0.001"
            [[rates]]
            meter = "tokens"
            credits_per_unit = "0.01"
            dimensions = { model = "large" }
            "#,
        );
        ok.validate(&meters()).unwrap();
        for (text, says) in [
            (
                r#"[[rates]]
                meter = "nope"
                credits_per_unit = "1""#,
                "not in [[meters]]",
            ),
            (
                r#"[[rates]]
                meter = "seats"
                credits_per_unit = "1""#,
                "only sum and count",
            ),
            (
                r#"[[rates]]
                meter = "tokens"
                credits_per_unit = "-1""#,
                "0 to 1000000",
            ),
            (
                r#"[[rates]]
                meter = "tokens"
                credits_per_unit = "0.0000000001""#,
                "9 decimal places",
            ),
            (
                r#"[[rates]]
                meter = "tokens"
                credits_per_unit = "1"
                dimensions = { region = "eu" }"#,
                "not in the meter's group_by",
            ),
            (
                r#"[[rates]]
                meter = "tokens"
                credits_per_unit = "1"
                [[rates]]
                meter = "tokens"
                credits_per_unit = "2""#,
                "two rates",
            ),
        ] {
            let error = config(text).validate(&meters()).unwrap_err();
            assert!(error.contains(says), "{error}");
        }
    }
}
