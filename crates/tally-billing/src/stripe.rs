//! Stripe webhooks, once verified: subscriptions follow Stripe, invoices are recorded for
//! finance. Each event id is stored once (a replay changes nothing) and an event older than the
//! one that last changed an object never overwrites it (Stripe does not deliver in order).
//!
//! The HTTP side (signature, parsing Stripe's objects) is in `tally-api`; this module takes
//! the few fields tally needs, so it does not depend on Stripe's types.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sqlx::{PgConnection, PgPool};

use crate::events::{
    SameSecond, StripeEvent, StripeInvoice, StripeInvoiceLine, StripePrice, StripeSubscription,
    WebhookEffect, WebhookError, WebhookOutcome,
};
use crate::store::{Audit, BillingStoreError};

/// Applies one verified event in one transaction, with its `stripe_webhook_events` row
/// (except for [`WebhookOutcome::AskStripe`], which stores nothing).
pub async fn apply_webhook(
    pool: &PgPool,
    event: &StripeEvent,
    effect: &WebhookEffect,
    same_second: SameSecond,
) -> Result<WebhookOutcome, WebhookError> {
    let mut tx = pool.begin().await?;
    // Claim the id first: a concurrent delivery of the same event waits here, then finds it.
    let claimed = sqlx::query(
        "INSERT INTO stripe_webhook_events (event_id, type, created, livemode, outcome, payload)
         VALUES ($1, $2, $3, $4, 'ignored', $5::jsonb) ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(&event.id)
    .bind(&event.event_type)
    .bind(event.created)
    .bind(event.livemode)
    .bind(&event.payload)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if claimed == 0 {
        return Ok(WebhookOutcome::Replay);
    }
    let (object_id, outcome) = match effect {
        WebhookEffect::Subscription(subscription) => (
            Some(subscription.id.as_str()),
            match apply_subscription(&mut tx, event, subscription, same_second).await? {
                // Rolled back with the transaction: the claim too, so the event applies
                // once Stripe has been asked.
                ask @ WebhookOutcome::AskStripe { .. } => return Ok(ask),
                outcome => outcome,
            },
        ),
        WebhookEffect::Invoice(invoice) => (
            Some(invoice.id.as_str()),
            record_invoice(&mut tx, event, invoice).await?,
        ),
        WebhookEffect::Checkout(kind, session) => (
            Some(session.id.as_str()),
            crate::checkout::apply_session(&mut tx, event, *kind, session).await?,
        ),
        WebhookEffect::Refund(refund) => (
            Some(refund.charge.as_str()),
            crate::checkout::apply_refund(&mut tx, event, refund).await?,
        ),
        WebhookEffect::MeterErrorReport => {
            sqlx::query(
                "INSERT INTO stripe_meter_error_reports (event_id, type, created, livemode)
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            )
            .bind(&event.id)
            .bind(&event.event_type)
            .bind(event.created)
            .bind(event.livemode)
            .execute(&mut *tx)
            .await?;
            (None, WebhookOutcome::Applied { customer: None })
        }
        WebhookEffect::Ignored => (None, WebhookOutcome::Ignored),
    };
    sqlx::query(
        "UPDATE stripe_webhook_events SET outcome = $2, object_id = $3 WHERE event_id = $1",
    )
    .bind(&event.id)
    .bind(outcome.as_str())
    .bind(object_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(outcome)
}

/// Where a Stripe subscription status sits in its usual life, for ordering events of the same
/// second: a subscription starts `incomplete`, becomes `trialing` or `active`, may fall behind
/// on payment, and ends.
fn subscription_rank(status: &str) -> u8 {
    match status {
        "incomplete" => 0,
        "trialing" => 1,
        "active" => 2,
        "past_due" | "paused" => 3,
        "unpaid" => 4,
        "incomplete_expired" | "canceled" => 5,
        _ => 0,
    }
}

/// The same for invoices, in SQL: `draft` → `open` → `uncollectible` → `paid` or `void`. An
/// invoice event of the same second as the stored one applies only if it does not go back.
const INVOICE_RANK: &str = "CASE {} WHEN 'draft' THEN 0 WHEN 'open' THEN 1 \
    WHEN 'uncollectible' THEN 2 WHEN 'paid' THEN 3 WHEN 'void' THEN 3 ELSE 0 END";

/// tally's status for Stripe's: only `active` and `trialing` grant entitlements.
fn tally_status(stripe_status: &str, deleted: bool) -> &'static str {
    match stripe_status {
        _ if deleted => "canceled",
        "active" => "active",
        "trialing" => "trialing",
        "canceled" | "incomplete_expired" => "canceled",
        // past_due, unpaid, incomplete, paused and anything new: no entitlements, not ended.
        _ => "past_due",
    }
}

async fn tally_customer(
    tx: &mut PgConnection,
    stripe_customer: &str,
) -> Result<Option<String>, WebhookError> {
    let customers: Vec<String> = sqlx::query_scalar(
        "SELECT customer_id FROM stripe_customers WHERE stripe_customer_id = $1 ORDER BY 1",
    )
    .bind(stripe_customer)
    .fetch_all(&mut *tx)
    .await?;
    match customers.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one.clone())),
        many => Err(WebhookError::AmbiguousCustomer {
            stripe_customer: stripe_customer.to_owned(),
            customers: many.join(", "),
        }),
    }
}

/// The plan the prices select: `metadata.tally_plan`, else the plan listing the price in its
/// `stripe_prices`. Prices that select no plan (a metered usage price, say) are fine as long
/// as one price selects exactly one plan.
async fn resolve_plan(
    tx: &mut PgConnection,
    prices: &[StripePrice],
) -> Result<String, WebhookError> {
    let mut plans = std::collections::BTreeSet::new();
    for price in prices {
        match &price.tally_plan {
            Some(plan) => {
                plans.insert(plan.clone());
            }
            // The plan listing it in its `stripe_prices`; listed by none, the plan Checkout
            // sold it for (table `stripe_prices`, found by lookup key).
            None => plans.extend(
                sqlx::query_scalar::<_, String>(
                    "SELECT name FROM plans WHERE definition -> 'stripe_prices' ? $1
                     UNION ALL
                     SELECT plan FROM stripe_prices
                     WHERE price_id = $1 AND plan IS NOT NULL
                       AND NOT EXISTS (SELECT 1 FROM plans WHERE definition -> 'stripe_prices' ? $1)",
                )
                .bind(&price.id)
                .fetch_all(&mut *tx)
                .await?,
            ),
        }
    }
    let mut plans = plans.into_iter();
    match (plans.next(), plans.next()) {
        (Some(plan), None) => Ok(plan),
        (None, _) => Err(WebhookError::UnknownPrice(
            prices
                .iter()
                .map(|p| p.id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        )),
        (Some(first), Some(second)) => Err(WebhookError::AmbiguousPlan(
            [first, second]
                .into_iter()
                .chain(plans)
                .collect::<Vec<_>>()
                .join(", "),
        )),
    }
}

#[derive(sqlx::FromRow)]
struct StoredSubscription {
    subscription_id: i64,
    customer_id: String,
    plan: String,
    status: String,
    stripe_status: Option<String>,
    current_period_start: DateTime<Utc>,
    current_period_end: DateTime<Utc>,
    cancel_at_period_end: bool,
    stripe_event_created: Option<DateTime<Utc>>,
}

impl StoredSubscription {
    fn audit_value(&self) -> Value {
        json!({
            "customer_id": self.customer_id, "plan": self.plan, "status": self.status,
            "stripe_status": self.stripe_status,
            "current_period_start": self.current_period_start,
            "current_period_end": self.current_period_end,
            "cancel_at_period_end": self.cancel_at_period_end,
        })
    }
}

async fn apply_subscription(
    tx: &mut PgConnection,
    event: &StripeEvent,
    subscription: &StripeSubscription,
    same_second: SameSecond,
) -> Result<WebhookOutcome, WebhookError> {
    // Locks in one order everywhere: the customer's lock first, then its subscriptions' rows
    // (creating and canceling by the API do the same; the other order deadlocks).
    let known: Option<String> = sqlx::query_scalar(
        "SELECT customer_id FROM subscriptions WHERE stripe_subscription_id = $1",
    )
    .bind(&subscription.id)
    .fetch_optional(&mut *tx)
    .await?;
    let known = match known {
        Some(customer) => Some(customer),
        None => tally_customer(tx, &subscription.stripe_customer).await?,
    };
    if let Some(customer) = &known {
        crate::subscriptions::lock_customer(tx, customer).await?;
    }
    let stored: Option<StoredSubscription> = sqlx::query_as(
        "SELECT subscription_id, customer_id, plan, status, stripe_status, current_period_start,
                current_period_end, cancel_at_period_end, stripe_event_created
         FROM subscriptions WHERE stripe_subscription_id = $1 FOR UPDATE",
    )
    .bind(&subscription.id)
    .fetch_optional(&mut *tx)
    .await?;
    // Stripe does not deliver in order. An older event never wins; an event of the same
    // second (Stripe's clock has whole seconds) that would move the status backwards
    // (`incomplete` after `active`, or `active` after `past_due` when a retried payment
    // succeeded) is decided by Stripe's current object, or by status without one.
    if let Some(stored) = &stored {
        let new_status = if subscription.deleted {
            "canceled"
        } else {
            subscription.status.as_str()
        };
        let stored_status = stored.stripe_status.as_deref().unwrap_or("incomplete");
        match stored.stripe_event_created {
            Some(last) if last > event.created => return Ok(WebhookOutcome::Stale),
            Some(last)
                if last == event.created
                    && subscription_rank(new_status) < subscription_rank(stored_status) =>
            {
                match same_second {
                    SameSecond::Current => {}
                    SameSecond::AskStripe => {
                        return Ok(WebhookOutcome::AskStripe {
                            subscription: subscription.id.clone(),
                        })
                    }
                    SameSecond::ByStatus => return Ok(WebhookOutcome::Stale),
                }
            }
            _ => {}
        }
    }
    let customer = match &stored {
        Some(stored) => stored.customer_id.clone(),
        None => tally_customer(tx, &subscription.stripe_customer)
            .await?
            .ok_or_else(|| WebhookError::UnmappedCustomer(subscription.stripe_customer.clone()))?,
    };
    let plan = match (&stored, resolve_plan(tx, &subscription.prices).await) {
        (_, Ok(plan)) => plan,
        // An ending subscription keeps its plan even if the price has since been unmapped.
        (Some(stored), Err(_)) if subscription.deleted => stored.plan.clone(),
        (_, Err(error)) => return Err(error),
    };
    let status = tally_status(&subscription.status, subscription.deleted);
    if matches!(status, "active" | "trialing") {
        replace_fallback(tx, &customer, event, subscription.checkout_id.as_deref()).await?;
    }
    let after = StoredSubscription {
        subscription_id: stored.as_ref().map_or(0, |s| s.subscription_id),
        customer_id: customer.clone(),
        plan,
        status: status.to_owned(),
        stripe_status: Some(subscription.status.clone()),
        current_period_start: subscription.current_period_start,
        current_period_end: subscription.current_period_end,
        cancel_at_period_end: subscription.cancel_at_period_end,
        stripe_event_created: Some(event.created),
    };
    let written = match &stored {
        Some(stored) => sqlx::query(
            "UPDATE subscriptions SET plan = $2, status = $3, stripe_status = $4,
                        current_period_start = $5, current_period_end = $6,
                        cancel_at_period_end = $7, stripe_event_created = $8, updated_at = now(),
                        status_since = CASE WHEN plan <> $2 OR status <> $3 THEN $8 ELSE status_since END,
                        ended_at = CASE WHEN $3 = 'canceled' THEN coalesce(ended_at, $8) END
                 WHERE subscription_id = $1 AND stripe_subscription_id = $9",
        )
        .bind(stored.subscription_id),
        None => sqlx::query(
            "INSERT INTO subscriptions (customer_id, plan, status, stripe_status,
                    current_period_start, current_period_end, cancel_at_period_end,
                    stripe_event_created, stripe_subscription_id, source, billing_anchor,
                    started_at, status_since, ended_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'stripe', $5, $5, $8,
                     CASE WHEN $3 = 'canceled' THEN $8::timestamptz END)",
        )
        .bind(&customer),
    }
    .bind(&after.plan)
    .bind(status)
    .bind(&subscription.status)
    .bind(subscription.current_period_start)
    .bind(subscription.current_period_end)
    .bind(subscription.cancel_at_period_end)
    .bind(event.created)
    .bind(&subscription.id)
    .execute(&mut *tx)
    .await;
    match written {
        Ok(_) => {}
        Err(sqlx::Error::Database(e))
            if e.constraint() == Some("subscriptions_one_live_per_customer") =>
        {
            return Err(BillingStoreError::SecondLiveSubscription { customer }.into())
        }
        Err(sqlx::Error::Database(e)) if e.constraint() == Some("subscriptions_plan_fkey") => {
            return Err(BillingStoreError::UnknownPlan(after.plan).into())
        }
        Err(e) => return Err(e.into()),
    }
    let before = stored.as_ref().map(StoredSubscription::audit_value);
    let actor = format!("stripe:{}", event.id);
    Audit {
        entity: "subscription",
        key: &customer,
        action: if stored.is_some() { "update" } else { "create" },
        before: before.as_ref(),
        after: Some(&after.audit_value()),
        actor: &actor,
        reason: Some(&event.event_type),
    }
    .write(tx)
    .await?;
    Ok(WebhookOutcome::Applied {
        customer: Some(customer),
    })
}

/// A customer who subscribes in Stripe leaves the fallback plan tally put them on; one who
/// subscribed through tally's Checkout leaves the tally-managed plan too, at the moment the
/// Stripe subscription starts (no gap, no overlap of limits).
async fn replace_fallback(
    tx: &mut PgConnection,
    customer: &str,
    event: &StripeEvent,
    checkout_id: Option<&str>,
) -> Result<(), WebhookError> {
    use crate::subscriptions::{end_fallback, live_for_update, lock_customer, Source};
    lock_customer(tx, customer).await?;
    if let Some(live) = live_for_update(tx, customer).await? {
        let replaced = match live.source {
            Source::Fallback => true,
            Source::Tally => crate::checkout::from_checkout(tx, customer, checkout_id).await?,
            Source::Stripe => false,
        };
        if replaced {
            let reason = format!(
                "the customer subscribed in Stripe; the {} subscription to {} ends",
                match live.source {
                    Source::Fallback => "fallback",
                    _ => "tally-managed",
                },
                live.plan
            );
            let actor = format!("stripe:{}", event.id);
            end_fallback(tx, &live, event.created, &actor, &reason).await?;
        }
    }
    Ok(())
}

async fn record_invoice(
    tx: &mut PgConnection,
    event: &StripeEvent,
    invoice: &StripeInvoice,
) -> Result<WebhookOutcome, WebhookError> {
    let customer = match &invoice.stripe_customer {
        Some(stripe_customer) => tally_customer(tx, stripe_customer).await?,
        None => None,
    };
    // The WHERE keeps a newer description: an older event updates nothing, and one of the
    // same second only when its status does not go back.
    let rank = |column: &str| INVOICE_RANK.replace("{}", column);
    let lines = invoice_lines(tx, &invoice.lines).await?;
    let sql = format!(
        "INSERT INTO stripe_invoices (invoice_id, stripe_customer_id, customer_id,
                stripe_subscription_id, number, status, currency, amount_due, amount_paid,
                amount_remaining, total, period_start, period_end, attempt_count,
                last_event_type, last_event_created, created, hosted_invoice_url, invoice_pdf,
                lines, lines_complete)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
                 $18, $19, $20, $21)
         ON CONFLICT (invoice_id) DO UPDATE SET
                created = EXCLUDED.created,
                lines_complete = EXCLUDED.lines_complete,
                hosted_invoice_url = coalesce(EXCLUDED.hosted_invoice_url, stripe_invoices.hosted_invoice_url),
                invoice_pdf = coalesce(EXCLUDED.invoice_pdf, stripe_invoices.invoice_pdf),
                lines = EXCLUDED.lines,
                stripe_customer_id = EXCLUDED.stripe_customer_id,
                customer_id = EXCLUDED.customer_id,
                stripe_subscription_id = EXCLUDED.stripe_subscription_id,
                number = EXCLUDED.number, status = EXCLUDED.status,
                currency = EXCLUDED.currency, amount_due = EXCLUDED.amount_due,
                amount_paid = EXCLUDED.amount_paid, amount_remaining = EXCLUDED.amount_remaining,
                total = EXCLUDED.total, period_start = EXCLUDED.period_start,
                period_end = EXCLUDED.period_end, attempt_count = EXCLUDED.attempt_count,
                last_event_type = EXCLUDED.last_event_type,
                last_event_created = EXCLUDED.last_event_created, updated_at = now()
         WHERE stripe_invoices.last_event_created < EXCLUDED.last_event_created
            OR (stripe_invoices.last_event_created = EXCLUDED.last_event_created
                AND {} >= {})",
        rank("EXCLUDED.status"),
        rank("stripe_invoices.status")
    );
    let written = sqlx::query(&sql)
        .bind(&invoice.id)
        .bind(&invoice.stripe_customer)
        .bind(&customer)
        .bind(&invoice.stripe_subscription)
        .bind(&invoice.number)
        .bind(&invoice.status)
        .bind(&invoice.currency)
        .bind(invoice.amount_due)
        .bind(invoice.amount_paid)
        .bind(invoice.amount_remaining)
        .bind(invoice.total)
        .bind(invoice.period_start)
        .bind(invoice.period_end)
        .bind(invoice.attempt_count)
        .bind(&event.event_type)
        .bind(event.created)
        .bind(invoice.created)
        .bind(&invoice.hosted_invoice_url)
        .bind(&invoice.invoice_pdf)
        .bind(lines)
        .bind(invoice.lines_complete)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    Ok(if written == 0 {
        WebhookOutcome::Stale
    } else {
        WebhookOutcome::Applied { customer }
    })
}

/// The lines as stored: each with the tally meter its price bills, when it is a plan's metered
/// price (`stripe_prices`).
async fn invoice_lines(
    tx: &mut PgConnection,
    lines: &[StripeInvoiceLine],
) -> Result<Value, WebhookError> {
    let prices: Vec<String> = lines.iter().filter_map(|l| l.price.clone()).collect();
    let meters: std::collections::HashMap<String, String> = sqlx::query_as(
        "SELECT price_id, meter FROM stripe_prices WHERE price_id = ANY($1) AND meter IS NOT NULL",
    )
    .bind(&prices)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    Ok(Value::Array(
        lines
            .iter()
            .map(|line| {
                let meter = line.price.as_ref().and_then(|p| meters.get(p));
                json!({
                    "id": line.id, "price": line.price, "meter": meter,
                    "description": line.description, "quantity": line.quantity,
                    "amount": line.amount, "period_start": line.period_start,
                    "period_end": line.period_end,
                })
            })
            .collect(),
    ))
}

/// Rows deleted per statement, so retention never holds a long lock or a long transaction.
const RETENTION_CHUNK: i64 = 10_000;

/// Deletes webhook events received before `cutoff`, meter error reports created before it, and
/// refunds kept since before it; returns how many rows went.
pub async fn delete_expired_webhook_events(
    pool: &PgPool,
    cutoff: DateTime<Utc>,
) -> Result<u64, sqlx::Error> {
    let mut deleted = 0;
    for statement in [
        "DELETE FROM stripe_webhook_events WHERE event_id IN (
             SELECT event_id FROM stripe_webhook_events WHERE received_at < $1 LIMIT $2)",
        "DELETE FROM stripe_meter_error_reports WHERE event_id IN (
             SELECT event_id FROM stripe_meter_error_reports WHERE created < $1 LIMIT $2)",
        // Refunds of payments tally never saw completed (most are not tally's at all).
        "DELETE FROM stripe_refunds WHERE payment_intent IN (
             SELECT payment_intent FROM stripe_refunds WHERE received_at < $1 LIMIT $2)",
    ] {
        loop {
            let rows = sqlx::query(statement)
                .bind(cutoff)
                .bind(RETENTION_CHUNK)
                .execute(pool)
                .await?
                .rows_affected();
            deleted += rows;
            if rows < RETENTION_CHUNK as u64 {
                break;
            }
        }
    }
    Ok(deleted)
}

/// Deletes what is older than `retention` now and then every hour until `stop`, supervised
/// (`serve.webhook_retention`). Several `tally serve` replicas may each do it: a row goes once.
pub fn start_webhook_retention(
    pool: PgPool,
    retention: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(3600);
    tally_runtime::supervise("webhook_retention", stop.clone(), move || {
        let (pool, stop) = (pool.clone(), stop.clone());
        async move {
            loop {
                let cutoff = chrono::TimeDelta::from_std(retention)
                    .ok()
                    .and_then(|retention| Utc::now().checked_sub_signed(retention))
                    .unwrap_or(DateTime::<Utc>::MIN_UTC);
                match delete_expired_webhook_events(&pool, cutoff).await {
                    Ok(0) => {}
                    Ok(deleted) => {
                        tracing::info!(deleted, %cutoff, "Stripe webhook events past serve.webhook_retention deleted")
                    }
                    Err(error) => {
                        tracing::warn!(%error, "webhook retention could not reach Postgres; trying again in an hour")
                    }
                }
                if tally_runtime::sleep_unless_stopped(EVERY, &stop).await {
                    return Ok(());
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::{subscription_rank, tally_status};

    #[test]
    fn a_subscription_moves_forward_through_its_statuses() {
        let life = [
            "incomplete",
            "trialing",
            "active",
            "past_due",
            "unpaid",
            "canceled",
        ];
        for pair in life.windows(2) {
            assert!(
                subscription_rank(pair[0]) < subscription_rank(pair[1]),
                "{pair:?}"
            );
        }
    }

    #[test]
    fn only_active_and_trialing_are_live() {
        assert_eq!(tally_status("active", false), "active");
        assert_eq!(tally_status("trialing", false), "trialing");
        assert_eq!(tally_status("active", true), "canceled");
        for status in [
            "past_due",
            "unpaid",
            "incomplete",
            "paused",
            "something_new",
        ] {
            assert_eq!(tally_status(status, false), "past_due", "{status}");
        }
        assert_eq!(tally_status("incomplete_expired", false), "canceled");
    }
}
