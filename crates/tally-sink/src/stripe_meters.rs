//! The Stripe meters tally's meters bill under. Stripe accepts a meter event for an event
//! name that has no meter and reports the error later, so the sink checks at start and says
//! which meters are missing.

use std::collections::HashMap;

use stripe_billing::billing_meter::{
    CreateBillingMeter, CreateBillingMeterDefaultAggregation,
    CreateBillingMeterDefaultAggregationFormula, ListBillingMeter,
};

use crate::limiter::RateLimiter;
use crate::owed::BillingKind;
use crate::sink::SinkError;
use crate::store;
use crate::stripe::{with_retries, StripeHttp};

/// Stripe meter id per event name (all pages).
pub(crate) async fn stripe_meter_ids(
    stripe: &StripeHttp,
    limiter: &RateLimiter,
) -> Result<HashMap<String, String>, SinkError> {
    let mut ids = HashMap::new();
    let mut after: Option<String> = None;
    loop {
        let mut request = ListBillingMeter::new().limit(100);
        if let Some(after) = &after {
            request = request.starting_after(after.as_str());
        }
        let page = with_retries(limiter, || request.send(stripe)).await?;
        for meter in &page.data {
            ids.insert(meter.event_name.clone(), meter.id.to_string());
        }
        match (page.has_more, page.data.last()) {
            (true, Some(last)) => after = Some(last.id.to_string()),
            _ => return Ok(ids),
        }
    }
}

/// Every Stripe meter's event name, by meter id (`mtr_…`): which tally meter a metered price
/// bills (`tally plans apply`). One attempt a page.
pub async fn stripe_meters_by_id(
    stripe: &StripeHttp,
) -> Result<HashMap<String, String>, crate::StripeCallError> {
    let mut by_id = HashMap::new();
    let mut after: Option<String> = None;
    loop {
        let mut request = ListBillingMeter::new().limit(100);
        if let Some(after) = &after {
            request = request.starting_after(after.as_str());
        }
        let page = request.send(stripe).await?;
        for meter in &page.data {
            by_id.insert(meter.id.to_string(), meter.event_name.clone());
        }
        match (page.has_more, page.data.last()) {
            (true, Some(last)) => after = Some(last.id.to_string()),
            _ => return Ok(by_id),
        }
    }
}

/// The billed tally meters (by name, in name order) whose event name Stripe has no meter for.
async fn meters_missing_at_stripe(
    pool: &sqlx::PgPool,
    stripe: &StripeHttp,
    limiter: &RateLimiter,
) -> Result<Vec<(String, store::BilledMeter)>, SinkError> {
    let existing = stripe_meter_ids(stripe, limiter).await?;
    let mut missing: Vec<(String, store::BilledMeter)> = store::billed_meters(pool)
        .await?
        .into_iter()
        .filter(|(_, m)| m.kind.is_some() && !existing.contains_key(&m.event_name))
        .collect();
    missing.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(missing)
}

/// Event names of billed tally meters that Stripe has no meter for.
pub async fn missing_stripe_meters(
    pool: &sqlx::PgPool,
    stripe: &StripeHttp,
) -> Result<Vec<String>, SinkError> {
    let missing = meters_missing_at_stripe(pool, stripe, &RateLimiter::new(5)).await?;
    Ok(missing.into_iter().map(|(_, m)| m.event_name).collect())
}

/// Creates the Stripe meters that are missing: `sum` for sum/count meters, `last` for
/// max/latest. Returns the event names created.
pub async fn create_stripe_meters(
    pool: &sqlx::PgPool,
    stripe: &StripeHttp,
) -> Result<Vec<String>, SinkError> {
    let limiter = RateLimiter::new(5);
    let mut created = Vec::new();
    for (name, meter) in meters_missing_at_stripe(pool, stripe, &limiter).await? {
        let formula = match meter.kind {
            Some(BillingKind::Delta) => CreateBillingMeterDefaultAggregationFormula::Sum,
            Some(BillingKind::Last) => CreateBillingMeterDefaultAggregationFormula::Last,
            None => continue,
        };
        let request = CreateBillingMeter::new(
            CreateBillingMeterDefaultAggregation::new(formula),
            format!("tally {name}"),
            meter.event_name.as_str(),
        );
        with_retries(&limiter, || request.send(stripe)).await?;
        created.push(meter.event_name);
    }
    Ok(created)
}
