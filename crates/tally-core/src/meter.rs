//! Meter definitions: which meters exist, how each aggregates, and what Stripe calls it.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::event::validate_meter_name;

/// How the events of one minute window combine into its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Sum of quantities.
    Sum,
    /// Number of events; quantities are ignored.
    Count,
    /// Largest quantity.
    Max,
    /// Quantity of the event with the latest timestamp.
    Latest,
    /// Number of distinct values of one dimension (`unique_dimension`), exact.
    UniqueCount,
}

impl Aggregation {
    /// The name used in `tally.toml` and in the `meters` table.
    pub const fn as_str(self) -> &'static str {
        match self {
            Aggregation::Sum => "sum",
            Aggregation::Count => "count",
            Aggregation::Max => "max",
            Aggregation::Latest => "latest",
            Aggregation::UniqueCount => "unique_count",
        }
    }
}

impl std::str::FromStr for Aggregation {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        [
            Aggregation::Sum,
            Aggregation::Count,
            Aggregation::Max,
            Aggregation::Latest,
            Aggregation::UniqueCount,
        ]
        .into_iter()
        .find(|a| a.as_str() == text)
        .ok_or_else(|| {
            format!(
                "unknown aggregation {text:?}; expected sum, count, max, latest or unique_count"
            )
        })
    }
}

/// How a meter is billed in Stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BillingKind {
    /// Whole units to add (Stripe `sum`).
    Delta,
    /// The slot's value (Stripe `last`).
    Last,
}

impl BillingKind {
    /// `None` for `unique_count`: Stripe meters cannot count distinct values.
    pub fn of(aggregation: Aggregation) -> Option<BillingKind> {
        match aggregation {
            Aggregation::Sum | Aggregation::Count => Some(BillingKind::Delta),
            Aggregation::Max | Aggregation::Latest => Some(BillingKind::Last),
            Aggregation::UniqueCount => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BillingKind::Delta => "delta",
            BillingKind::Last => "last",
        }
    }
}

/// One `[[meters]]` entry of `tally.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeterDefinition {
    /// Meter name as events carry it: `[a-z0-9_.-]{1,64}`.
    pub name: String,
    pub aggregation: Aggregation,
    /// Dimension keys whose values split the meter's windows (e.g. `["model"]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub group_by: Vec<String>,
    /// For `unique_count`: the dimension whose distinct values are counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique_dimension: Option<String>,
    /// Stripe meter `event_name`; defaults to `name`. At most 100 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stripe_event_name: Option<String>,
}

impl MeterDefinition {
    /// The Stripe meter event name this meter bills under.
    pub fn stripe_event_name(&self) -> &str {
        self.stripe_event_name.as_deref().unwrap_or(&self.name)
    }

    /// Checks the definition; the error says what to change.
    pub fn validate(&self) -> Result<(), String> {
        validate_meter_name(&self.name)?;
        match (self.aggregation, &self.unique_dimension) {
            (Aggregation::UniqueCount, None) => {
                return Err(format!(
                    "meter {:?} aggregates unique_count: set unique_dimension to the dimension whose distinct values it counts",
                    self.name
                ))
            }
            (Aggregation::UniqueCount, Some(_)) | (_, None) => {}
            (_, Some(_)) => {
                return Err(format!(
                    "meter {:?}: unique_dimension only applies to aggregation = \"unique_count\"; remove it",
                    self.name
                ))
            }
        }
        if self.group_by.iter().any(String::is_empty) {
            return Err(format!(
                "meter {:?}: group_by keys must not be empty",
                self.name
            ));
        }
        let event_name = self.stripe_event_name();
        if event_name.is_empty() || event_name.len() > 100 {
            return Err(format!(
                "meter {:?}: stripe_event_name must be 1 to 100 characters (Stripe's limit)",
                self.name
            ));
        }
        Ok(())
    }
}

/// Reads the `[[meters]]` entries of a TOML text (for built-in meter sets: the demo's, tests',
/// benchmarks'). The configuration file itself is read by `config::load`.
pub fn meters_from_toml(text: &str) -> Result<Vec<MeterDefinition>, String> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        meters: Vec<MeterDefinition>,
    }
    toml::from_str::<File>(text)
        .map(|file| file.meters)
        .map_err(|e| e.to_string())
}

/// The configured meters, looked up by name.
#[derive(Debug, Clone, Default)]
pub struct Meters {
    by_name: HashMap<String, MeterDefinition>,
}

impl Meters {
    /// Validates every definition and refuses duplicate names.
    pub fn new(definitions: &[MeterDefinition]) -> Result<Self, String> {
        let mut by_name = HashMap::with_capacity(definitions.len());
        for definition in definitions {
            definition.validate()?;
            if by_name
                .insert(definition.name.clone(), definition.clone())
                .is_some()
            {
                return Err(format!(
                    "meter {:?} is defined twice; keep one [[meters]] entry per name",
                    definition.name
                ));
            }
        }
        Ok(Meters { by_name })
    }

    pub fn get(&self, name: &str) -> Option<&MeterDefinition> {
        self.by_name.get(name)
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meter(aggregation: Aggregation) -> MeterDefinition {
        MeterDefinition {
            name: "tokens".into(),
            aggregation,
            group_by: vec!["model".into()],
            unique_dimension: None,
            stripe_event_name: None,
        }
    }

    #[test]
    fn unique_count_needs_its_dimension() {
        assert!(meter(Aggregation::UniqueCount).validate().is_err());
        let mut m = meter(Aggregation::UniqueCount);
        m.unique_dimension = Some("user".into());
        assert!(m.validate().is_ok());
        let mut m = meter(Aggregation::Sum);
        m.unique_dimension = Some("user".into());
        assert!(m.validate().is_err());
    }

    #[test]
    fn stripe_name_defaults_to_meter_name_and_is_bounded() {
        let mut m = meter(Aggregation::Sum);
        assert_eq!(m.stripe_event_name(), "tokens");
        m.stripe_event_name = Some("x".repeat(101));
        assert!(m.validate().is_err());
    }

    #[test]
    fn duplicate_names_are_refused() {
        let m = meter(Aggregation::Sum);
        assert!(Meters::new(&[m.clone(), m]).is_err());
    }
}
