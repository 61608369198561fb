//! The Stripe meters tally's meters bill under. Stripe accepts a meter event for an event
//! name that has no meter and reports the error later, so the sink checks at start and says
//! which meters are missing.

use std::collections::HashMap;

use stripe_billing::billing_meter::{
    CreateBillingMeter, CreateBillingMeterDefaultAggregation,
    CreateBillingMeterDefaultAggregationFormula, ListBillingMeter,
};

use crate::limiter::RateLimiter;
use crate::plan::BillingKind;
use crate::reconcile::call;
use crate::sink::SinkError;
use crate::store;
use crate::stripe::StripeHttp;

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
        let page = call(limiter, || request.send(stripe)).await?;
        for meter in &page.data {
            ids.insert(meter.event_name.clone(), meter.id.to_string());
        }
        match (page.has_more, page.data.last()) {
            (true, Some(last)) => after = Some(last.id.to_string()),
            _ => return Ok(ids),
        }
    }
}

/// Event names of billed tally meters that Stripe has no meter for.
pub async fn missing_stripe_meters(
    pool: &sqlx::PgPool,
    stripe: &StripeHttp,
) -> Result<Vec<String>, SinkError> {
    let limiter = RateLimiter::new(5);
    let existing = stripe_meter_ids(stripe, &limiter).await?;
    let mut missing: Vec<String> = store::billed_meters(pool)
        .await?
        .into_values()
        .filter(|m| m.kind.is_some() && !existing.contains_key(&m.event_name))
        .map(|m| m.event_name)
        .collect();
    missing.sort();
    Ok(missing)
}

/// Creates the Stripe meters that are missing: `sum` for sum/count meters, `last` for
/// max/latest. Returns the event names created.
pub async fn create_stripe_meters(
    pool: &sqlx::PgPool,
    stripe: &StripeHttp,
) -> Result<Vec<String>, SinkError> {
    let limiter = RateLimiter::new(5);
    let existing = stripe_meter_ids(stripe, &limiter).await?;
    let mut created = Vec::new();
    let mut meters: Vec<(String, store::BilledMeter)> =
        store::billed_meters(pool).await?.into_iter().collect();
    meters.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, meter) in meters {
        let Some(kind) = meter.kind else { continue };
        if existing.contains_key(&meter.event_name) {
            continue;
        }
        let formula = match kind {
            BillingKind::Delta => CreateBillingMeterDefaultAggregationFormula::Sum,
            BillingKind::Last => CreateBillingMeterDefaultAggregationFormula::Last,
        };
        let request = CreateBillingMeter::new(
            CreateBillingMeterDefaultAggregation::new(formula),
            format!("tally {name}"),
            meter.event_name.as_str(),
        );
        call(&limiter, || request.send(stripe)).await?;
        created.push(meter.event_name);
    }
    Ok(created)
}
