//! What a plan grants, and what a customer ends up with once their overrides are merged in.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// The period a limit counts usage over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// The UTC day.
    Day,
    /// The UTC calendar month.
    Month,
    /// The subscription's current billing period.
    BillingPeriod,
}

/// What happens above a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enforcement {
    /// Deny above the limit.
    Hard,
    /// Allow, and warn, above the limit.
    Soft,
    /// Allow up to limit × (1 + grace_percent / 100) with a warning, then deny.
    Grace,
    /// Allow while the customer's prepaid credits cover the usage (priced by
    /// `[[credits.rates]]`), then deny with INSUFFICIENT_CREDITS. A `limit`, if given, is also
    /// a hard ceiling; without one the meter has no limit but the credits.
    Credits,
}

/// One meter's limit in a plan (`[plans.limits.<meter>]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "WrittenLimit")]
pub struct LimitDefinition {
    /// Usage allowed per period; -1 means unlimited.
    pub limit: Decimal,
    pub period: Period,
    #[serde(default = "hard")]
    pub enforcement: Enforcement,
    /// For `grace`: how far above the limit usage may go, in percent.
    #[serde(default, skip_serializing_if = "Decimal::is_zero")]
    pub grace_percent: Decimal,
    /// Price of one unit, for the invoice preview (in the currency's main unit, e.g. "0.002").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_price: Option<Decimal>,
}

fn hard() -> Enforcement {
    Enforcement::Hard
}

/// A limit as written: `limit` and `period` may be left out only with `credits` enforcement
/// (no ceiling but the credits; usage shown per month).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WrittenLimit {
    limit: Option<Decimal>,
    period: Option<Period>,
    #[serde(default = "hard")]
    enforcement: Enforcement,
    #[serde(default)]
    grace_percent: Decimal,
    #[serde(default)]
    unit_price: Option<Decimal>,
}

impl TryFrom<WrittenLimit> for LimitDefinition {
    type Error = String;

    fn try_from(written: WrittenLimit) -> Result<LimitDefinition, String> {
        let credits = written.enforcement == Enforcement::Credits;
        let (limit, period) = match (written.limit, written.period) {
            (Some(limit), Some(period)) => (limit, period),
            (limit, period) if credits => (
                limit.unwrap_or(Decimal::NEGATIVE_ONE),
                period.unwrap_or(Period::Month),
            ),
            (None, _) => return Err("missing field `limit`".into()),
            (_, None) => return Err("missing field `period`".into()),
        };
        Ok(LimitDefinition {
            limit,
            period,
            enforcement: written.enforcement,
            grace_percent: written.grace_percent,
            unit_price: written.unit_price,
        })
    }
}

impl LimitDefinition {
    pub fn is_unlimited(&self) -> bool {
        self.limit == Decimal::NEGATIVE_ONE
    }

    /// Usage above which a check is denied: the limit, or for `grace` the limit plus its grace;
    /// `None` when nothing is ever denied (unlimited, or `soft`, or a grace beyond a decimal's
    /// range, which nothing can reach).
    pub fn deny_above(&self) -> Option<Decimal> {
        if self.is_unlimited() {
            return None;
        }
        match self.enforcement {
            Enforcement::Hard | Enforcement::Credits => Some(self.limit),
            Enforcement::Soft => None,
            Enforcement::Grace => self
                .limit
                .checked_mul(self.grace_percent)
                .and_then(|grace| grace.checked_div(Decimal::ONE_HUNDRED))
                .and_then(|grace| self.limit.checked_add(grace)),
        }
    }

    fn validate(&self, plan: &str, meter: &str) -> Result<(), String> {
        if self.limit.is_sign_negative() && !self.is_unlimited() {
            return Err(format!(
                "plan {plan:?}, meter {meter:?}: limit {} must be 0 or more, or -1 for unlimited",
                self.limit
            ));
        }
        if self.grace_percent.is_sign_negative() {
            return Err(format!(
                "plan {plan:?}, meter {meter:?}: grace_percent must not be negative"
            ));
        }
        if self.enforcement != Enforcement::Grace && !self.grace_percent.is_zero() {
            return Err(format!(
                "plan {plan:?}, meter {meter:?}: grace_percent only applies to enforcement = \"grace\""
            ));
        }
        if self.unit_price.is_some_and(|p| p.is_sign_negative()) {
            return Err(format!(
                "plan {plan:?}, meter {meter:?}: unit_price must not be negative"
            ));
        }
        Ok(())
    }
}

/// One `[[plans]]` entry of `tally.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanDefinition {
    /// Plan name, e.g. `PRO`.
    pub name: String,
    /// Boolean features, e.g. `{ sso = true }`. A feature not listed is off.
    #[serde(default)]
    pub features: BTreeMap<String, bool>,
    /// Per-meter limits. A meter not listed has no quota (checks on it are allowed).
    #[serde(default)]
    pub limits: BTreeMap<String, LimitDefinition>,
    /// Stripe price ids that put a subscription on this plan (for Stripe webhooks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stripe_prices: Vec<String>,
    /// The plan's recurring price, for MRR and ARR (`finance_mrr_daily`); tally takes no
    /// payments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<PlanPrice>,
    /// `[plans.credits]`: credits granted to each subscription every period, expiring at the
    /// period's end (the credit burner grants them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credits: Option<PlanCredits>,
    /// `[[plans.alerts]]`: alerts every subscriber of the plan gets (webhooks to the alert
    /// endpoints).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<AlertRule>,
    /// A trial on this plan ends in cancellation, not in an active subscription, unless a
    /// payment method is on record for the subscription.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub requires_payment_method: bool,
    /// A customer's own token may open a Checkout Session for this plan
    /// (`POST /v1/customers/{id}/checkout`); otherwise only an admin token may.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub self_serve: bool,
}

/// `[plans.price]`: what a subscription to the plan costs each month or year.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanPrice {
    /// In the currency's main unit, e.g. "49.00".
    pub amount: Decimal,
    /// ISO 4217, lowercase as Stripe writes it, e.g. "usd".
    pub currency: String,
    pub interval: PriceInterval,
}

/// An alert rule: `meter` + `percent` (usage reaching that share of the meter's limit in its
/// period; fires once per period) or `credit_balance_below` (the projected credit balance
/// falling below the amount; fires again only after it was back at or above it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meter: Option<String>,
    /// Of the limit, more than 0 and at most 1000 (e.g. 80, 100, 120).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credit_balance_below: Option<Decimal>,
}

impl AlertRule {
    /// A stable name for the rule within its plan (part of its firings' key).
    pub fn key(&self) -> String {
        match (&self.meter, self.percent, self.credit_balance_below) {
            (Some(meter), Some(percent), _) => format!("usage:{meter}:{}", percent.normalize()),
            (_, _, Some(below)) => format!("credit_balance:{}", below.normalize()),
            _ => "invalid".into(),
        }
    }

    /// One kind, complete; the error says what to change.
    pub fn validate(&self, meters: &[String]) -> Result<(), String> {
        match (&self.meter, self.percent, self.credit_balance_below) {
            (Some(meter), Some(percent), None) => {
                if !meters.contains(meter) {
                    return Err(format!("alert on meter {meter:?}, which is not in [[meters]]"));
                }
                if percent <= Decimal::ZERO || percent > Decimal::from(1000) {
                    return Err(format!(
                        "alert on {meter:?}: percent {percent} must be more than 0 and at most 1000"
                    ));
                }
                Ok(())
            }
            (None, None, Some(below)) if below.abs() <= Decimal::from(1_000_000_000_000_000_000i64) => Ok(()),
            (None, None, Some(below)) => Err(format!("alert: credit_balance_below {below} is beyond 10^18")),
            _ => Err("an alert is either `meter` + `percent` (usage reaching a share of the meter's limit) or `credit_balance_below`; give one of the two".into()),
        }
    }
}

/// `[plans.credits]`: the credits a plan grants each billing period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanCredits {
    /// Credits per period: more than 0, at most 10^18, at most 9 decimal places.
    pub amount: Decimal,
    /// Draw order among the customer's grants (lower first); default 20, after purchased
    /// credits (10) and before promotional ones (30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
}

/// How often a plan's price is charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PriceInterval {
    Month,
    Year,
}

impl PlanDefinition {
    /// Checks the plan against the known meters; the error says what to change.
    pub fn validate(&self, meters: &[String]) -> Result<(), String> {
        if self.name.is_empty() || self.name.len() > 64 {
            return Err("a plan's name must be 1 to 64 characters".into());
        }
        for (meter, limit) in &self.limits {
            if !meters.contains(meter) {
                return Err(format!(
                    "plan {:?} limits meter {meter:?}, which is not in [[meters]]; define the meter or remove the limit",
                    self.name
                ));
            }
            limit.validate(&self.name, meter)?;
        }
        for alert in &self.alerts {
            alert
                .validate(meters)
                .map_err(|problem| format!("plan {:?}: {problem}", self.name))?;
            if let (Some(meter), Some(_)) = (&alert.meter, alert.percent) {
                if self.limits.get(meter).is_none_or(|l| l.is_unlimited()) {
                    return Err(format!(
                        "plan {:?}: an alert on {meter:?} needs a limit on it to take a percentage of; add [plans.limits.{meter}] or remove the alert",
                        self.name
                    ));
                }
            }
        }
        if let Some(credits) = &self.credits {
            let max = Decimal::from(1_000_000_000_000_000_000i64);
            if credits.amount <= Decimal::ZERO
                || credits.amount > max
                || credits.amount.normalize().scale() > 9
            {
                return Err(format!(
                    "plan {:?}: credits.amount {} must be more than 0, at most 10^18, with at most 9 decimal places",
                    self.name, credits.amount
                ));
            }
            if credits.priority.is_some_and(|p| !(0..=1000).contains(&p)) {
                return Err(format!(
                    "plan {:?}: credits.priority must be 0 to 1000 (lower draws first)",
                    self.name
                ));
            }
        }
        if let Some(price) = &self.price {
            if price.amount.is_sign_negative() {
                return Err(format!(
                    "plan {:?}: price.amount must not be negative",
                    self.name
                ));
            }
            let currency_ok =
                price.currency.len() == 3 && price.currency.bytes().all(|b| b.is_ascii_lowercase());
            if !currency_ok {
                return Err(format!(
                    "plan {:?}: price.currency {:?} must be a lowercase ISO 4217 code, e.g. \"usd\"",
                    self.name, price.currency
                ));
            }
        }
        Ok(())
    }
}

/// Checks a set of plans: each valid, names unique, each Stripe price on one plan only.
pub fn validate_plans(plans: &[PlanDefinition], meters: &[String]) -> Result<(), String> {
    let mut names = std::collections::BTreeSet::new();
    let mut prices = BTreeMap::new();
    for plan in plans {
        plan.validate(meters)?;
        if !names.insert(&plan.name) {
            return Err(format!("plan {:?} is defined twice", plan.name));
        }
        for price in &plan.stripe_prices {
            if let Some(other) = prices.insert(price, &plan.name) {
                return Err(format!(
                    "Stripe price {price:?} is on plans {other:?} and {:?}; a price must select one plan",
                    plan.name
                ));
            }
        }
    }
    Ok(())
}

/// A customer's override of their plan: any subset of features and limit fields. Merged over
/// the plan field by field; the override wins.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    #[serde(default)]
    pub features: BTreeMap<String, bool>,
    #[serde(default)]
    pub limits: BTreeMap<String, LimitOverride>,
}

/// The fields of one limit that an override changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitOverride {
    pub limit: Option<Decimal>,
    pub period: Option<Period>,
    pub enforcement: Option<Enforcement>,
    pub grace_percent: Option<Decimal>,
    pub unit_price: Option<Decimal>,
}

/// What a customer may do: their plan with their override merged in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entitlements {
    pub plan: String,
    pub features: BTreeMap<String, bool>,
    pub limits: BTreeMap<String, LimitDefinition>,
}

impl Entitlements {
    /// The plan deep-merged with the override. A limit the plan lacks can be added by an
    /// override only with both `limit` and `period` (there is nothing to inherit them from).
    pub fn resolve(
        plan: &PlanDefinition,
        overrides: Option<&Override>,
    ) -> Result<Entitlements, String> {
        let mut entitlements = Entitlements {
            plan: plan.name.clone(),
            features: plan.features.clone(),
            limits: plan.limits.clone(),
        };
        let Some(overrides) = overrides else {
            return Ok(entitlements);
        };
        entitlements
            .features
            .extend(overrides.features.iter().map(|(k, v)| (k.clone(), *v)));
        for (meter, change) in &overrides.limits {
            let merged = match entitlements.limits.get(meter) {
                Some(base) => LimitDefinition {
                    limit: change.limit.unwrap_or(base.limit),
                    period: change.period.unwrap_or(base.period),
                    enforcement: change.enforcement.unwrap_or(base.enforcement),
                    grace_percent: change.grace_percent.unwrap_or(base.grace_percent),
                    unit_price: change.unit_price.or(base.unit_price),
                },
                None if change.enforcement == Some(Enforcement::Credits) => LimitDefinition {
                    limit: change.limit.unwrap_or(Decimal::NEGATIVE_ONE),
                    period: change.period.unwrap_or(Period::Month),
                    enforcement: Enforcement::Credits,
                    grace_percent: change.grace_percent.unwrap_or_default(),
                    unit_price: change.unit_price,
                },
                None => match (change.limit, change.period) {
                    (Some(limit), Some(period)) => LimitDefinition {
                        limit,
                        period,
                        enforcement: change.enforcement.unwrap_or(Enforcement::Hard),
                        grace_percent: change.grace_percent.unwrap_or_default(),
                        unit_price: change.unit_price,
                    },
                    _ => {
                        return Err(format!(
                            "the override adds a limit on {meter:?}, which plan {:?} does not limit; give both limit and period",
                            plan.name
                        ))
                    }
                },
            };
            merged.validate(&plan.name, meter)?;
            entitlements.limits.insert(meter.clone(), merged);
        }
        Ok(entitlements)
    }

    pub fn feature(&self, feature: &str) -> bool {
        self.features.get(feature).copied().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"
        [[plans]]
        name = "FREE"
        features = { api = true, sso = false }
        [plans.limits.api_calls]
        limit = 100
        period = "day"
        [plans.limits.tokens]
        limit = 10000
        period = "month"
        enforcement = "grace"
        grace_percent = 10

        [[plans]]
        name = "ENTERPRISE"
        features = { api = true, sso = true }
        [plans.limits.api_calls]
        limit = -1
        period = "month"
    "#;

    fn seed() -> Vec<PlanDefinition> {
        #[derive(Deserialize)]
        struct File {
            plans: Vec<PlanDefinition>,
        }
        toml::from_str::<File>(SEED).unwrap().plans
    }

    fn d(text: &str) -> Decimal {
        text.parse().unwrap()
    }

    fn meters() -> Vec<String> {
        vec!["api_calls".into(), "tokens".into()]
    }

    #[test]
    fn plans_parse_and_validate() {
        let plans = seed();
        validate_plans(&plans, &meters()).unwrap();
        let free = &plans[0].limits["tokens"];
        assert_eq!(free.deny_above(), Some(d("11000")));
        assert_eq!(plans[0].limits["api_calls"].enforcement, Enforcement::Hard);
        assert_eq!(plans[1].limits["api_calls"].deny_above(), None, "unlimited");
        let err = validate_plans(&plans, &["api_calls".into()]).unwrap_err();
        assert!(err.contains("not in [[meters]]"), "{err}");
        let mut twice = plans.clone();
        twice.push(plans[0].clone());
        assert!(validate_plans(&twice, &meters())
            .unwrap_err()
            .contains("defined twice"));
        let mut negative = plans[0].clone();
        negative.limits.get_mut("api_calls").unwrap().limit = d("-2");
        assert!(negative
            .validate(&meters())
            .unwrap_err()
            .contains("-1 for unlimited"));
    }

    #[test]
    fn overrides_merge_field_by_field_and_win() {
        let free = &seed()[0];
        let overrides: Override = serde_json::from_value(serde_json::json!({
            "features": { "sso": true },
            "limits": { "api_calls": { "limit": "500" } }
        }))
        .unwrap();
        let resolved = Entitlements::resolve(free, Some(&overrides)).unwrap();
        assert!(resolved.feature("sso") && resolved.feature("api") && !resolved.feature("beta"));
        let calls = &resolved.limits["api_calls"];
        assert_eq!(
            (calls.limit, calls.period, calls.enforcement),
            (d("500"), Period::Day, Enforcement::Hard)
        );
        assert_eq!(
            resolved.limits["tokens"], free.limits["tokens"],
            "untouched limits stay"
        );

        let adds: Override = serde_json::from_value(serde_json::json!({
            "limits": { "storage_gb": { "limit": "5" } }
        }))
        .unwrap();
        assert!(Entitlements::resolve(free, Some(&adds))
            .unwrap_err()
            .contains("give both limit and period"));
    }
}
