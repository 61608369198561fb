//! What tally sells through Stripe: each plan's prices (its fee, `licensed`; its usage,
//! `metered`) and each credit pack's (`one_time`), checked against Stripe and recorded in
//! `stripe_prices`. Checkout sells only what is recorded here, so a price that does not match
//! tally.toml is never sold.
//!
//! A plan's prices are its `stripe_prices`, or, without any, the prices whose lookup keys are
//! `tally_plan_<plan>` (the fee) and `tally_plan_<plan>_<meter>` (a limited meter's usage); a
//! pack's is its `stripe_price`, or the price whose lookup key is `tally_pack_<pack>`.
//! `tally plans sync --create` creates the missing ones under those keys.

use std::collections::HashMap;

use rust_decimal::Decimal;
use sqlx::PgPool;
use stripe_client_core::{RequestStrategy, StripeRequest};
use stripe_product::price::{
    CreatePrice, CreatePriceProductData, CreatePriceRecurring, CreatePriceRecurringInterval,
    CreatePriceRecurringUsageType, ListPrice, RetrievePrice,
};
use stripe_shared::{Price, PriceBillingScheme, PriceType, RecurringUsageType};
use tally_core::MeterDefinition;
use tally_credits::CreditPack;
use tally_sink::{StripeCallError, StripeHttp};

use crate::plan::{PlanDefinition, PriceInterval};

/// What a price sells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum PriceKind {
    /// A plan's recurring fee (one per plan).
    Licensed,
    /// A plan's usage of one meter, billed from the Stripe meter of its event name.
    Metered,
    /// A credit pack.
    OneTime,
}

/// A Stripe price that sells a plan or a pack, as Stripe described it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CatalogPrice {
    pub price_id: String,
    pub plan: Option<String>,
    pub pack: Option<String>,
    pub kind: PriceKind,
    pub currency: String,
    /// In the currency's smallest unit (cents), as Stripe writes it; may have decimals.
    pub unit_amount_decimal: Decimal,
    pub recurring_interval: Option<String>,
    /// For a metered price: the tally meter it bills.
    pub meter: Option<String>,
    pub livemode: bool,
}

/// The columns of `stripe_prices` a [`CatalogPrice`] is read from.
const PRICE_COLUMNS: &str = "price_id, plan, pack, kind, currency, unit_amount_decimal,
    recurring_interval, meter, livemode";

/// The prices found for the plans and packs, what does not agree with tally.toml, and what is
/// not for sale yet.
#[derive(Debug, Default)]
pub struct CatalogCheck {
    pub prices: Vec<CatalogPrice>,
    /// Each a sentence naming the plan or pack, the price and the fix.
    pub problems: Vec<String>,
    /// Plans and packs without a price in Stripe (Checkout refuses them).
    pub not_for_sale: Vec<String>,
}

/// The lookup key of a plan's fee.
pub fn plan_fee_key(plan: &str) -> String {
    format!("tally_plan_{plan}")
}

/// The lookup key of a plan's metered price for `meter`.
pub fn plan_usage_key(plan: &str, meter: &str) -> String {
    format!("tally_plan_{plan}_{meter}")
}

/// Digits after the point of a currency's smallest unit as Stripe counts it: none for the
/// zero-decimal currencies, three for the three-decimal ones, two for the rest.
pub fn minor_digits(currency: &str) -> u32 {
    const ZERO: [&str; 16] = [
        "bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv",
        "xaf", "xof", "xpf",
    ];
    const THREE: [&str; 5] = ["bhd", "jod", "kwd", "omr", "tnd"];
    if ZERO.contains(&currency) {
        0
    } else if THREE.contains(&currency) {
        3
    } else {
        2
    }
}

/// An amount in the currency's main unit ("49.00") in its smallest unit (4900), as Stripe's
/// `unit_amount` takes it; `None` beyond a decimal's range.
pub fn minor_units(amount: Decimal, currency: &str) -> Option<Decimal> {
    amount
        .checked_mul(Decimal::from(10i64.pow(minor_digits(currency))))
        .map(|d| d.normalize())
}

/// Stripe's currency of an ISO 4217 code (any code parses; Stripe refuses what it lacks).
fn currency(code: &str) -> stripe_types::Currency {
    code.parse()
        .unwrap_or_else(|never: std::convert::Infallible| match never {})
}

/// Reads every plan's and pack's prices from Stripe and checks them against tally.toml.
pub async fn check(
    stripe: &StripeHttp,
    plans: &[PlanDefinition],
    packs: &[CreditPack],
    meters: &[MeterDefinition],
) -> Result<CatalogCheck, StripeCallError> {
    let stripe_meters = tally_sink::stripe_meters_by_id(stripe).await?;
    let mut out = CatalogCheck::default();
    for plan in plans {
        let prices = plan_prices(stripe, plan).await?;
        let prices = match prices {
            Ok(prices) => prices,
            Err(problem) => {
                out.problems.push(problem);
                continue;
            }
        };
        if prices.is_empty() {
            out.not_for_sale.push(format!("plan {:?}", plan.name));
            continue;
        }
        let mut fees = 0;
        for price in prices {
            match plan_price(plan, &price, &stripe_meters, meters) {
                Ok(checked) => {
                    fees += usize::from(checked.kind == PriceKind::Licensed);
                    out.prices.push(checked);
                }
                Err(problem) => out.problems.push(problem),
            }
        }
        if fees > 1 {
            out.problems.push(format!(
                "plan {:?} has {fees} licensed (fee) prices in Stripe; a plan sells one fee: keep one in stripe_prices",
                plan.name
            ));
        }
    }
    for pack in packs {
        let price = match &pack.stripe_price {
            Some(id) => match retrieve(stripe, id).await? {
                Some(price) => price,
                None => {
                    out.problems.push(format!(
                        "pack {:?}: Stripe has no price {id}; create it, or remove stripe_price and run `tally plans sync --create`",
                        pack.name
                    ));
                    continue;
                }
            },
            None => match by_lookup_keys(stripe, &[pack.lookup_key()]).await?.pop() {
                Some(price) => price,
                None => {
                    out.not_for_sale.push(format!("pack {:?}", pack.name));
                    continue;
                }
            },
        };
        match pack_price(pack, &price) {
            Ok(checked) => out.prices.push(checked),
            Err(problem) => out.problems.push(problem),
        }
    }
    Ok(out)
}

/// Replaces `stripe_prices` with what [`check`] found, in one transaction.
pub async fn record(pool: &PgPool, prices: &[CatalogPrice]) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("DELETE FROM stripe_prices")
        .execute(&mut *tx)
        .await?;
    for p in prices {
        sqlx::query(
            "INSERT INTO stripe_prices (price_id, plan, pack, kind, currency, unit_amount_decimal,
                    recurring_interval, meter, livemode)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&p.price_id)
        .bind(&p.plan)
        .bind(&p.pack)
        .bind(p.kind)
        .bind(&p.currency)
        .bind(p.unit_amount_decimal)
        .bind(&p.recurring_interval)
        .bind(&p.meter)
        .bind(p.livemode)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

/// After plans were applied without asking Stripe (no key, or Stripe away): keeps the recorded
/// prices of the plans that did not change and of the packs whose price is as recorded, so
/// webhooks still recognise them and Checkout still sells them; forgets the rest until
/// `tally plans sync` checks them again.
pub async fn forget_changed(
    pool: &PgPool,
    unchanged_plans: &[String],
    packs: &[CreditPack],
) -> Result<(), sqlx::Error> {
    let recorded: Vec<CatalogPrice> =
        sqlx::query_as(&format!("SELECT {PRICE_COLUMNS} FROM stripe_prices"))
            .fetch_all(pool)
            .await?;
    let still_holds = |price: &CatalogPrice| match (&price.plan, &price.pack) {
        (Some(plan), _) => unchanged_plans.contains(plan),
        (None, Some(name)) => packs.iter().any(|pack| {
            &pack.name == name
                && pack.price.currency == price.currency
                && minor_units(pack.price.amount, &pack.price.currency)
                    == Some(price.unit_amount_decimal)
                && pack
                    .stripe_price
                    .as_ref()
                    .is_none_or(|id| *id == price.price_id)
        }),
        (None, None) => false,
    };
    let stale: Vec<String> = recorded
        .iter()
        .filter(|price| !still_holds(price))
        .map(|price| price.price_id.clone())
        .collect();
    sqlx::query("DELETE FROM stripe_prices WHERE price_id = ANY($1)")
        .bind(&stale)
        .execute(pool)
        .await?;
    Ok(())
}

/// The recorded prices of a plan, or of a pack.
pub async fn prices_of(
    pool: &PgPool,
    plan: Option<&str>,
    pack: Option<&str>,
) -> Result<Vec<CatalogPrice>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {PRICE_COLUMNS} FROM stripe_prices
         WHERE plan IS NOT DISTINCT FROM $1 AND pack IS NOT DISTINCT FROM $2
         ORDER BY kind, price_id"
    ))
    .bind(plan)
    .bind(pack)
    .fetch_all(pool)
    .await
}

/// What `sync --create` made.
#[derive(Debug, Default)]
pub struct Created {
    /// Lookup keys of the prices created.
    pub prices: Vec<String>,
    /// What could not be created, and why.
    pub skipped: Vec<String>,
}

/// Creates the prices Stripe lacks, under their lookup keys: each plan's fee (from
/// `[plans.price]`), each limited meter's usage (from its `unit_price`, when Stripe has a meter
/// for its event name), each pack's price. A plan listing `stripe_prices` is left as written.
/// Idempotent: a price found under its lookup key is not created again, and each create
/// carries an idempotency key of its lookup key.
pub async fn create_missing(
    stripe: &StripeHttp,
    plans: &[PlanDefinition],
    packs: &[CreditPack],
    meters: &[MeterDefinition],
) -> Result<Created, StripeCallError> {
    let by_event_name: HashMap<String, String> = tally_sink::stripe_meters_by_id(stripe)
        .await?
        .into_iter()
        .map(|(id, event_name)| (event_name, id))
        .collect();
    let mut created = Created::default();
    for plan in plans.iter().filter(|p| p.stripe_prices.is_empty()) {
        if let Some(price) = &plan.price {
            let key = plan_fee_key(&plan.name);
            let amount = minor_units(price.amount, &price.currency).unwrap_or_default();
            let interval = match price.interval {
                PriceInterval::Month => CreatePriceRecurringInterval::Month,
                PriceInterval::Year => CreatePriceRecurringInterval::Year,
            };
            let request = CreatePrice::new(currency(&price.currency))
                .unit_amount_decimal(amount.to_string())
                .recurring(CreatePriceRecurring::new(interval))
                .product_data(CreatePriceProductData::new(format!("{} plan", plan.name)))
                .metadata(HashMap::from([(
                    "tally_plan".to_owned(),
                    plan.name.clone(),
                )]))
                .lookup_key(key.as_str());
            create_once(stripe, &key, request, &mut created).await?;
        }
        for (meter, limit) in &plan.limits {
            let (Some(unit_price), Some(currency)) =
                (limit.unit_price, plan.price.as_ref().map(|p| &p.currency))
            else {
                continue;
            };
            let key = plan_usage_key(&plan.name, meter);
            let event_name = meters
                .iter()
                .find(|m| &m.name == meter)
                .map(|m| m.stripe_event_name().to_owned())
                .unwrap_or_else(|| meter.clone());
            let Some(stripe_meter) = by_event_name.get(&event_name) else {
                created.skipped.push(format!(
                    "{key}: Stripe has no meter for event name {event_name:?}; run `tally sink --create-meters` first"
                ));
                continue;
            };
            let interval = match plan.price.as_ref().map(|p| p.interval) {
                Some(PriceInterval::Year) => CreatePriceRecurringInterval::Year,
                _ => CreatePriceRecurringInterval::Month,
            };
            let mut recurring = CreatePriceRecurring::new(interval);
            recurring.usage_type = Some(CreatePriceRecurringUsageType::Metered);
            recurring.meter = Some(stripe_meter.clone());
            let amount = minor_units(unit_price, currency).unwrap_or_default();
            let request = CreatePrice::new(self::currency(currency))
                .unit_amount_decimal(amount.to_string())
                .recurring(recurring)
                .product_data(CreatePriceProductData::new(format!(
                    "{} plan: {meter}",
                    plan.name
                )))
                .metadata(HashMap::from([(
                    "tally_plan".to_owned(),
                    plan.name.clone(),
                )]))
                .lookup_key(key.as_str());
            create_once(stripe, &key, request, &mut created).await?;
        }
    }
    for pack in packs.iter().filter(|p| p.stripe_price.is_none()) {
        let key = pack.lookup_key();
        let amount = minor_units(pack.price.amount, &pack.price.currency).unwrap_or_default();
        let request = CreatePrice::new(currency(&pack.price.currency))
            .unit_amount_decimal(amount.to_string())
            .product_data(CreatePriceProductData::new(format!(
                "{} credits ({})",
                pack.credits, pack.name
            )))
            .metadata(HashMap::from([(
                "tally_pack".to_owned(),
                pack.name.clone(),
            )]))
            .lookup_key(key.as_str());
        create_once(stripe, &key, request, &mut created).await?;
    }
    Ok(created)
}

async fn create_once(
    stripe: &StripeHttp,
    key: &str,
    request: CreatePrice,
    created: &mut Created,
) -> Result<(), StripeCallError> {
    if !by_lookup_keys(stripe, &[key.to_owned()]).await?.is_empty() {
        return Ok(());
    }
    let idempotency = stripe_client_core::IdempotencyKey::new(format!("tally-price-create:{key}"))
        .map_err(|e| StripeCallError::transport(e.to_string()))?;
    request
        .customize()
        .request_strategy(RequestStrategy::Idempotent(idempotency))
        .send(stripe)
        .await?;
    created.prices.push(key.to_owned());
    Ok(())
}

/// A plan's prices in Stripe: its `stripe_prices`, else those under its lookup keys. `Err` is a
/// problem to report (a listed price Stripe does not have).
async fn plan_prices(
    stripe: &StripeHttp,
    plan: &PlanDefinition,
) -> Result<Result<Vec<Price>, String>, StripeCallError> {
    if plan.stripe_prices.is_empty() {
        let mut keys = vec![plan_fee_key(&plan.name)];
        keys.extend(plan.limits.keys().map(|m| plan_usage_key(&plan.name, m)));
        return Ok(Ok(by_lookup_keys(stripe, &keys).await?));
    }
    let mut prices = Vec::new();
    for id in &plan.stripe_prices {
        match retrieve(stripe, id).await? {
            Some(price) => prices.push(price),
            None => {
                return Ok(Err(format!(
                    "plan {:?}: Stripe has no price {id}; create it in Stripe or remove it from the plan's stripe_prices",
                    plan.name
                )))
            }
        }
    }
    Ok(Ok(prices))
}

fn plan_price(
    plan: &PlanDefinition,
    price: &Price,
    stripe_meters: &HashMap<String, String>,
    meters: &[MeterDefinition],
) -> Result<CatalogPrice, String> {
    let id = price.id.as_str();
    let name = &plan.name;
    if let Some(named) = price.metadata.get("tally_plan").filter(|p| *p != name) {
        return Err(format!(
            "plan {name:?}: price {id} has metadata.tally_plan = {named:?}, so its subscriptions would go to that plan; fix the metadata or sell the price from plan {named:?}"
        ));
    }
    let Some(recurring) = &price.recurring else {
        return Err(format!(
            "plan {name:?}: price {id} is one-time; a plan's prices recur (a one-time price sells a credit pack: [[credits.packs]])"
        ));
    };
    let amount = unit_amount(price);
    let mut checked = CatalogPrice {
        price_id: id.to_owned(),
        plan: Some(name.clone()),
        pack: None,
        kind: PriceKind::Licensed,
        currency: price.currency.to_string(),
        unit_amount_decimal: amount,
        recurring_interval: Some(recurring.interval.as_str().to_owned()),
        meter: None,
        livemode: price.livemode,
    };
    if recurring.usage_type == RecurringUsageType::Metered {
        let event_name = recurring
            .meter
            .as_ref()
            .and_then(|meter| stripe_meters.get(meter));
        let meter = event_name.and_then(|event| {
            meters
                .iter()
                .find(|m| m.stripe_event_name() == event.as_str())
        });
        let Some(meter) = meter else {
            return Err(format!(
                "plan {name:?}: metered price {id} bills Stripe meter {:?} (event name {:?}), which no tally meter sends; point the price at the meter of a [[meters]] entry's stripe_event_name",
                recurring.meter.as_deref().unwrap_or("none"),
                event_name.map(String::as_str).unwrap_or("unknown")
            ));
        };
        checked.kind = PriceKind::Metered;
        checked.meter = Some(meter.name.clone());
        // Billed on the plan's subscription: the fee's currency and interval, and the unit
        // price the invoice preview shows.
        if let Some(written) = &plan.price {
            if written.currency != price.currency.to_string()
                || interval_name(written.interval) != recurring.interval.as_str()
                || recurring.interval_count != 1
            {
                return Err(format!(
                    "plan {name:?}: metered price {id} is in {} every {} {}, but the plan's fee is in {} a {}; a subscription bills one currency and one interval: make them agree",
                    price.currency,
                    recurring.interval_count,
                    recurring.interval.as_str(),
                    written.currency,
                    interval_name(written.interval)
                ));
            }
        }
        // A unit's price: the amount, or a package's amount over its size; tiers have none
        // to compare (the preview's unit_price is then the team's own estimate).
        let per_unit = match (&price.billing_scheme, &price.transform_quantity) {
            (PriceBillingScheme::PerUnit, None) => Some(amount),
            (PriceBillingScheme::PerUnit, Some(package)) if package.divide_by > 0 => {
                Some((amount / Decimal::from(package.divide_by)).normalize())
            }
            _ => None,
        };
        let unit_price = plan.limits.get(&meter.name).and_then(|l| l.unit_price);
        if let (Some(unit_price), Some(per_unit)) = (unit_price, per_unit) {
            if minor_units(unit_price, &price.currency.to_string()) != Some(per_unit) {
                return Err(format!(
                    "plan {name:?}: metered price {id} charges {per_unit} (smallest unit) {} a unit of {}, but the plan's unit_price is {unit_price}; make them agree (a new Stripe price, or the plan's unit_price) so the invoice preview shows what Stripe bills",
                    price.currency, meter.name
                ));
            }
        }
        return Ok(checked);
    }
    let Some(written) = &plan.price else {
        return Err(format!(
            "plan {name:?}: price {id} is a fee of {amount} {} a {}, but the plan has no [plans.price]; write it there so MRR and Checkout agree",
            price.currency, recurring.interval.as_str()
        ));
    };
    let want = minor_units(written.amount, &written.currency);
    if want.is_some_and(|w| !w.fract().is_zero()) {
        return Err(format!(
            "plan {name:?}: [plans.price] amount {} has more decimals than {} has; Stripe charges whole {} smallest units",
            written.amount, written.currency, written.currency
        ));
    }
    let interval = interval_name(written.interval);
    if want != Some(amount)
        || written.currency != price.currency.to_string()
        || interval != recurring.interval.as_str()
        || recurring.interval_count != 1
    {
        return Err(format!(
            "plan {name:?}: Stripe price {id} is {amount} (smallest unit) {} every {} {}, but [plans.price] says {} {} a {interval}; make them agree (a new Stripe price, or the plan's price)",
            price.currency,
            recurring.interval_count,
            recurring.interval.as_str(),
            written.amount,
            written.currency
        ));
    }
    Ok(checked)
}

/// Stripe's name of a plan's billing interval.
fn interval_name(interval: PriceInterval) -> &'static str {
    match interval {
        PriceInterval::Month => "month",
        PriceInterval::Year => "year",
    }
}

fn pack_price(pack: &CreditPack, price: &Price) -> Result<CatalogPrice, String> {
    let id = price.id.as_str();
    let amount = unit_amount(price);
    if minor_units(pack.price.amount, &pack.price.currency).is_some_and(|w| !w.fract().is_zero()) {
        return Err(format!(
            "pack {:?}: price amount {} has more decimals than {} has",
            pack.name, pack.price.amount, pack.price.currency
        ));
    }
    if price.type_ != PriceType::OneTime {
        return Err(format!(
            "pack {:?}: price {id} recurs; a credit pack sells a one-time price",
            pack.name
        ));
    }
    if minor_units(pack.price.amount, &pack.price.currency) != Some(amount)
        || pack.price.currency != price.currency.to_string()
    {
        return Err(format!(
            "pack {:?}: Stripe price {id} is {amount} (smallest unit) {}, but the pack's price is {} {}; make them agree",
            pack.name, price.currency, pack.price.amount, pack.price.currency
        ));
    }
    Ok(CatalogPrice {
        price_id: id.to_owned(),
        plan: None,
        pack: Some(pack.name.clone()),
        kind: PriceKind::OneTime,
        currency: price.currency.to_string(),
        unit_amount_decimal: amount,
        recurring_interval: None,
        meter: None,
        livemode: price.livemode,
    })
}

/// `unit_amount_decimal`, else `unit_amount`, in the smallest unit.
fn unit_amount(price: &Price) -> Decimal {
    price
        .unit_amount_decimal
        .as_deref()
        .and_then(|d| d.parse::<Decimal>().ok())
        .or(price.unit_amount.map(Decimal::from))
        .unwrap_or_default()
        .normalize()
}

/// The price, or `None` when Stripe has no such price.
async fn retrieve(stripe: &StripeHttp, id: &str) -> Result<Option<Price>, StripeCallError> {
    if !id.starts_with("price_") || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Ok(None);
    }
    match RetrievePrice::new(id).send(stripe).await {
        Ok(price) => Ok(Some(price)),
        Err(error) if error.is_not_found() => Ok(None),
        Err(error) => Err(error),
    }
}

/// The active prices under `keys` (Stripe takes ten lookup keys a call).
async fn by_lookup_keys(
    stripe: &StripeHttp,
    keys: &[String],
) -> Result<Vec<Price>, StripeCallError> {
    let mut prices = Vec::new();
    for chunk in keys.chunks(10) {
        let page = ListPrice::new()
            .lookup_keys(chunk.to_vec())
            .active(true)
            .limit(100)
            .send(stripe)
            .await?;
        prices.extend(page.data);
    }
    Ok(prices)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_in_the_smallest_unit_stripe_counts() {
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        assert_eq!(minor_units(d("49.00"), "usd"), Some(d("4900")));
        assert_eq!(minor_units(d("0.002"), "usd"), Some(d("0.2")));
        assert_eq!(minor_units(d("500"), "jpy"), Some(d("500")));
        assert_eq!(minor_units(d("1.5"), "kwd"), Some(d("1500")));
    }
}
