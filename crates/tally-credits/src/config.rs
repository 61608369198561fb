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
    /// `[[credits.packs]]`: packs of credits customers buy through Stripe Checkout.
    pub packs: Vec<CreditPack>,
}

impl Default for CreditsConfig {
    fn default() -> Self {
        CreditsConfig {
            rates: Vec::new(),
            burn_every: Duration::from_millis(250),
            packs: Vec::new(),
        }
    }
}

/// One `[[credits.packs]]` entry: `credits` sold for `price` through Stripe Checkout
/// (`POST /v1/customers/{id}/credits/checkout`), granted as purchased credits once paid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditPack {
    /// 1 to 64 of `a-z`, `0-9`, `_` and `-`: it names the pack in the API and in Stripe
    /// (`tally plans sync --create` gives its price the lookup key `tally_pack_<name>`).
    pub name: String,
    /// More than 0, at most 9 decimal places.
    pub credits: Decimal,
    pub price: PackPrice,
    /// The Stripe price (`price_…`, one-time, of `price`) Checkout sells; without one, the
    /// price whose lookup key is `tally_pack_<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stripe_price: Option<String>,
    /// The credits expire this long after they are granted; without, they never expire.
    #[serde(
        default,
        with = "tally_core::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires_after: Option<Duration>,
}

/// `[credits.packs.price]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackPrice {
    /// In the currency's main unit, e.g. "10.00".
    pub amount: Decimal,
    /// ISO 4217, lowercase as Stripe writes it, e.g. "usd".
    pub currency: String,
}

impl CreditPack {
    /// The lookup key of the pack's Stripe price when `stripe_price` is not given.
    pub fn lookup_key(&self) -> String {
        format!("tally_pack_{}", self.name)
    }

    fn validate(&self) -> Result<(), String> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !name_ok {
            return Err(format!(
                "[[credits.packs]] name {:?} must be 1 to 64 of a-z, 0-9, _ and -",
                self.name
            ));
        }
        if self.credits <= Decimal::ZERO
            || self.credits > crate::grants::MAX_GRANT
            || self.credits.normalize().scale() > 9
        {
            return Err(format!(
                "[[credits.packs]] {:?}: credits {} must be more than 0, at most 10^18, with at most 9 decimal places",
                self.name, self.credits
            ));
        }
        let currency = &self.price.currency;
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_lowercase()) {
            return Err(format!(
                "[[credits.packs]] {:?}: price.currency {currency:?} must be a lowercase ISO 4217 code, e.g. \"usd\"",
                self.name
            ));
        }
        if self.price.amount.is_sign_negative() || self.price.amount.normalize().scale() > 2 {
            return Err(format!(
                "[[credits.packs]] {:?}: price.amount {} must be 0 or more with at most 2 decimal places (the currency's main unit)",
                self.name, self.price.amount
            ));
        }
        if let Some(price) = &self.stripe_price {
            if !price.starts_with("price_") || price.len() > 255 {
                return Err(format!(
                    "[[credits.packs]] {:?}: stripe_price {price:?} is not a Stripe price id (price_…)",
                    self.name
                ));
            }
        }
        if self.expires_after.is_some_and(|d| {
            d < Duration::from_secs(3600) || d > Duration::from_secs(100 * 365 * 86_400)
        }) {
            return Err(format!(
                "[[credits.packs]] {:?}: expires_after must be between 1h and 100 years",
                self.name
            ));
        }
        Ok(())
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
        let mut names = BTreeSet::new();
        for pack in &self.packs {
            pack.validate()?;
            if !names.insert(&pack.name) {
                return Err(format!(
                    "[[credits.packs]] {:?} is defined twice; keep one",
                    pack.name
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

    #[test]
    fn credit_packs_are_checked() {
        let ok = config(
            r#"
            [[packs]]
            name = "small"
            credits = "1000"
            price = { amount = "10.00", currency = "usd" }
            expires_after = "365d"
            "#,
        );
        ok.validate(&meters()).unwrap();
        assert_eq!(ok.packs[0].lookup_key(), "tally_pack_small");
        for (pack, says) in [
            (
                r#"name = "Small Pack", credits = "1", price = { amount = "1", currency = "usd" }"#,
                "a-z",
            ),
            (
                r#"name = "s", credits = "0", price = { amount = "1", currency = "usd" }"#,
                "more than 0",
            ),
            (
                r#"name = "s", credits = "1", price = { amount = "1.001", currency = "usd" }"#,
                "2 decimal places",
            ),
            (
                r#"name = "s", credits = "1", price = { amount = "1", currency = "USD" }"#,
                "lowercase",
            ),
            (
                r#"name = "s", credits = "1", price = { amount = "1", currency = "usd" }, stripe_price = "prod_1""#,
                "price_",
            ),
            (
                r#"name = "s", credits = "1", price = { amount = "1", currency = "usd" }, expires_after = "1m""#,
                "between 1h",
            ),
        ] {
            let error = config(&format!("packs = [{{ {pack} }}]"))
                .validate(&meters())
                .unwrap_err();
            assert!(error.contains(says), "{error}");
        }
        let twice = r#"packs = [{ name = "s", credits = "1", price = { amount = "1", currency = "usd" } },
                               { name = "s", credits = "2", price = { amount = "2", currency = "usd" } }]"#;
        assert!(config(twice)
            .validate(&meters())
            .unwrap_err()
            .contains("twice"));
    }
}
