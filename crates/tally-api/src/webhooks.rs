//! `POST /v1/webhooks/stripe`: Stripe's signed events.
//!
//! The signature (`Stripe-Signature: t=…,v1=…`, HMAC-SHA256 over `"{t}.{raw body}"`, 300 s
//! tolerance, constant-time comparison) and Stripe's object shapes are checked by
//! async-stripe-webhook; `tally_billing::stripe` stores each event id once and applies it.
//!
//! Answers: 200 when the event is handled (applied, stale, ignored or a replay); 400 for a
//! forged, stale or unparseable event (Stripe shows it as failing); 422 when tally cannot apply
//! it yet (an unmapped customer or price): nothing is stored, so Stripe's retries apply it once
//! the mapping is fixed; 503 when no secret is configured, Postgres is down, or a same-second
//! tie needs Stripe asked and Stripe does not answer (nothing is stored; Stripe redelivers).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use stripe_webhook::{EventObject, Webhook, WebhookError as SignatureError};
use tally_billing::checkout::CHECKOUT_ID_KEY;
use tally_billing::events::{
    CheckoutEvent, SameSecond, StripeCheckoutSession, StripeEvent, StripeInvoice,
    StripeInvoiceLine, StripePrice, StripeRefund, StripeSubscription, WebhookEffect, WebhookError,
    WebhookOutcome,
};
use tally_billing::stripe::apply_webhook;

use crate::error::ApiError;
use crate::telemetry;
use crate::{ApiState, StripeWebhook};

pub(crate) async fn stripe_webhook(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let Some(endpoint) = &state.stripe_webhook else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "WEBHOOKS_DISABLED",
            "no webhook signing secret: set STRIPE_WEBHOOK_SECRET (or serve.stripe_webhook_secret) to the endpoint's whsec_… secret",
        ));
    };
    let verified = verify(&headers, &body, endpoint.secret.expose()).and_then(|(event, effect)| {
        if event.livemode != endpoint.livemode {
            let mode = |live| if live { "live" } else { "test" };
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "WRONG_MODE",
                format!(
                    "a {}-mode event, but this deployment bills with a {}-mode key; point the {} webhook endpoint at the tally that uses that mode",
                    mode(event.livemode),
                    mode(endpoint.livemode),
                    mode(event.livemode)
                ),
            ));
        }
        Ok((event, effect))
    });
    let (event, effect) = verified.inspect_err(|error| {
        telemetry::webhook("unverified", "refused");
        tracing::warn!(code = error.code, message = %error.message, "Stripe webhook refused");
    })?;
    telemetry::webhook_delay(event.created);
    match apply(&state.pool, endpoint, &event, &effect).await? {
        Ok(outcome) => {
            if let WebhookOutcome::Applied {
                customer: Some(customer),
            } = &outcome
            {
                state.quota.invalidate(customer);
            }
            telemetry::webhook(&event.event_type, outcome.as_str());
            tracing::info!(event = %event.id, r#type = %event.event_type, outcome = outcome.as_str(), "Stripe webhook");
            Ok(Json(
                json!({ "received": true, "event": event.id, "outcome": outcome.as_str() }),
            ))
        }
        Err(error) => {
            telemetry::webhook(&event.event_type, "failed");
            let detail = format!(
                "Stripe webhook {} ({}) not applied; Stripe will retry it: {error}",
                event.id, event.event_type
            );
            Err(match &error {
                WebhookError::Store(tally_billing::BillingStoreError::Postgres(_)) => {
                    ApiError::unavailable(error.code(), detail)
                }
                _ if error.code() == "INTERNAL" => {
                    ApiError::internal("applying a Stripe webhook", detail)
                }
                _ => ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    error.code(),
                    error.to_string(),
                )
                .with_detail(detail),
            })
        }
    }
}

/// Applies the event; a same-second tie that would move a subscription backwards is decided
/// by the subscription as Stripe has it now. `Err` when Stripe cannot be asked just now
/// (Stripe redelivers the event later).
async fn apply(
    pool: &sqlx::PgPool,
    endpoint: &StripeWebhook,
    event: &StripeEvent,
    effect: &WebhookEffect,
) -> Result<Result<WebhookOutcome, WebhookError>, ApiError> {
    let Some(stripe) = &endpoint.stripe else {
        return Ok(apply_webhook(pool, event, effect, SameSecond::ByStatus).await);
    };
    let outcome = apply_webhook(pool, event, effect, SameSecond::AskStripe).await;
    let Ok(WebhookOutcome::AskStripe { subscription }) = outcome else {
        return Ok(outcome);
    };
    match current_subscription(stripe, &subscription).await {
        Ok(Some(current)) => {
            tracing::info!(event = %event.id, %subscription, status = %current.status, "a same-second event would move the subscription back: applied Stripe's current subscription");
            let current = WebhookEffect::Subscription(current);
            Ok(apply_webhook(pool, event, &current, SameSecond::Current).await)
        }
        Ok(None) => Ok(apply_webhook(pool, event, effect, SameSecond::ByStatus).await),
        Err(error) => {
            telemetry::webhook(&event.event_type, "failed");
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "STRIPE_UNAVAILABLE",
                format!(
                    "Stripe webhook {} ties with an earlier event of the same second and Stripe could not be asked for subscription {subscription} ({error}); Stripe will retry it",
                    event.id
                ),
            ))
        }
    }
}

/// `GET /v1/subscriptions/{id}`: the subscription now; `None` when Stripe will not give it
/// (the tie is then decided by status), `Err` when asking again later may work.
async fn current_subscription(
    stripe: &tally_sink::StripeHttp,
    id: &str,
) -> Result<Option<StripeSubscription>, tally_sink::StripeCallError> {
    // The id comes from a signed event; still, only an id's characters go into a path.
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Ok(None);
    }
    let json = match stripe.get_json(&format!("v1/subscriptions/{id}")).await {
        Ok(json) => json,
        Err(error) if error.is_retryable() => return Err(error),
        // Unknown to Stripe, or a key that may not read it: decided by status, and said.
        Err(error) => {
            tracing::warn!(%id, %error, "Stripe did not give the subscription; the tie is decided by status");
            return Ok(None);
        }
    };
    let text = json.to_string();
    match miniserde::json::from_str::<stripe_shared::Subscription>(&text) {
        Ok(current) => Ok(Some(subscription(&current, false))),
        Err(_) => {
            tracing::warn!(%id, "Stripe's subscription does not parse; the tie is decided by status");
            Ok(None)
        }
    }
}

/// Checks the signature and reads what tally needs from the event.
fn verify(
    headers: &HeaderMap,
    body: &[u8],
    secret: &str,
) -> Result<(StripeEvent, WebhookEffect), ApiError> {
    let refuse = |code, message: String| ApiError::new(StatusCode::BAD_REQUEST, code, message);
    let signature = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            refuse(
                "MISSING_SIGNATURE",
                "no Stripe-Signature header; only Stripe may call this endpoint".into(),
            )
        })?;
    let text = std::str::from_utf8(body)
        .map_err(|_| refuse("MALFORMED_EVENT", "the body is not UTF-8".into()))?;
    let event = match Webhook::construct_event(text, signature, secret) {
        // The signature held, but this is no snapshot event: Stripe's thin (v2) events, such
        // as the asynchronous meter event error reports, carry no object.
        Err(SignatureError::BadParse(detail)) => {
            return thin_event(text).ok_or_else(|| {
                refuse(
                    "MALFORMED_EVENT",
                    format!("the signature is valid but the event does not parse: {detail}"),
                )
            })
        }
        other => other,
    };
    let event = event.map_err(|error| match error {
        SignatureError::BadTimestamp(t) => refuse(
            "STALE_SIGNATURE",
            format!("the signature's time {t} is more than 300 s from this server's clock; check the clock, or this is a replayed request"),
        ),
        SignatureError::BadParse(detail) => refuse(
            "MALFORMED_EVENT",
            format!("the signature is valid but the event does not parse: {detail}"),
        ),
        SignatureError::BadKey | SignatureError::BadHeader(_) | SignatureError::BadSignature => {
            refuse(
                "BAD_SIGNATURE",
                "the Stripe-Signature does not match; check STRIPE_WEBHOOK_SECRET is this endpoint's signing secret".into(),
            )
        }
    })?;
    let stored = StripeEvent {
        id: event.id.as_str().to_owned(),
        event_type: event.type_.as_str().to_owned(),
        created: timestamp(event.created),
        livemode: event.livemode,
        payload: text.to_owned(),
    };
    let effect = match event.data.object {
        EventObject::CustomerSubscriptionCreated(s)
        | EventObject::CustomerSubscriptionUpdated(s) => {
            WebhookEffect::Subscription(subscription(&s, false))
        }
        EventObject::CustomerSubscriptionDeleted(s) => {
            WebhookEffect::Subscription(subscription(&s, true))
        }
        EventObject::InvoiceCreated(i)
        | EventObject::InvoiceFinalized(i)
        | EventObject::InvoicePaid(i)
        | EventObject::InvoicePaymentFailed(i)
        | EventObject::InvoiceVoided(i)
        | EventObject::InvoiceMarkedUncollectible(i) => match invoice(&i) {
            Some(invoice) => WebhookEffect::Invoice(invoice),
            None => WebhookEffect::Ignored,
        },
        EventObject::CheckoutSessionCompleted(c) => {
            WebhookEffect::Checkout(CheckoutEvent::Completed, checkout_session(&c))
        }
        EventObject::CheckoutSessionAsyncPaymentSucceeded(c) => {
            WebhookEffect::Checkout(CheckoutEvent::AsyncPaymentSucceeded, checkout_session(&c))
        }
        EventObject::CheckoutSessionAsyncPaymentFailed(c) => {
            WebhookEffect::Checkout(CheckoutEvent::AsyncPaymentFailed, checkout_session(&c))
        }
        EventObject::CheckoutSessionExpired(c) => {
            WebhookEffect::Checkout(CheckoutEvent::Expired, checkout_session(&c))
        }
        EventObject::ChargeRefunded(charge) => WebhookEffect::Refund(StripeRefund {
            charge: charge.id.as_str().to_owned(),
            payment_intent: charge
                .payment_intent
                .as_ref()
                .map(|p| p.id().as_str().to_owned()),
            amount: charge.amount,
            amount_refunded: charge.amount_refunded,
            disputed: false,
        }),
        // The money is gone when Stripe withdraws it (an inquiry or a warning takes nothing).
        EventObject::ChargeDisputeFundsWithdrawn(dispute) => WebhookEffect::Refund(StripeRefund {
            charge: dispute.charge.id().as_str().to_owned(),
            payment_intent: dispute
                .payment_intent
                .as_ref()
                .map(|p| p.id().as_str().to_owned()),
            amount: dispute.amount,
            amount_refunded: dispute.amount,
            disputed: true,
        }),
        _ => WebhookEffect::Ignored,
    };
    Ok((stored, effect))
}

/// A thin event (`"object": "v2.core.event"`): id, type, RFC 3339 `created`, `livemode`.
/// `v1.billing.meter.*` reports are recorded; other thin events are ignored.
fn thin_event(text: &str) -> Option<(StripeEvent, WebhookEffect)> {
    #[derive(serde::Deserialize)]
    struct Thin {
        id: String,
        object: String,
        #[serde(rename = "type")]
        event_type: String,
        created: DateTime<Utc>,
        #[serde(default)]
        livemode: bool,
    }
    let thin: Thin = serde_json::from_str(text).ok()?;
    if thin.object != "v2.core.event" {
        return None;
    }
    let effect = if thin.event_type.starts_with("v1.billing.meter.") {
        WebhookEffect::MeterErrorReport
    } else {
        WebhookEffect::Ignored
    };
    let event = StripeEvent {
        id: thin.id,
        event_type: thin.event_type,
        created: thin.created,
        livemode: thin.livemode,
        payload: text.to_owned(),
    };
    Some((event, effect))
}

fn timestamp(seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(seconds, 0).unwrap_or_default()
}

fn subscription(s: &stripe_shared::Subscription, deleted: bool) -> StripeSubscription {
    // Since API 2025-03-31 the period is on each item; a subscription's items share it.
    let items = &s.items.data;
    let start = items.iter().map(|i| i.current_period_start).min();
    let end = items.iter().map(|i| i.current_period_end).max();
    StripeSubscription {
        id: s.id.as_str().to_owned(),
        stripe_customer: s.customer.id().as_str().to_owned(),
        status: s.status.as_str().to_owned(),
        current_period_start: timestamp(start.unwrap_or(s.start_date)),
        current_period_end: timestamp(end.unwrap_or(s.start_date + 1)),
        cancel_at_period_end: s.cancel_at_period_end,
        prices: items
            .iter()
            .map(|item| StripePrice {
                id: item.price.id.as_str().to_owned(),
                tally_plan: item.price.metadata.get("tally_plan").cloned(),
            })
            .collect(),
        deleted,
        checkout_id: s.metadata.get(CHECKOUT_ID_KEY).cloned(),
    }
}

fn checkout_session(c: &stripe_shared::CheckoutSession) -> StripeCheckoutSession {
    StripeCheckoutSession {
        id: c.id.as_str().to_owned(),
        mode: c.mode.as_str().to_owned(),
        payment_status: c.payment_status.as_str().to_owned(),
        stripe_customer: c.customer.as_ref().map(|c| c.id().as_str().to_owned()),
        payment_intent: c
            .payment_intent
            .as_ref()
            .map(|p| p.id().as_str().to_owned()),
        subscription: c.subscription.as_ref().map(|s| s.id().as_str().to_owned()),
        amount_total: c.amount_total,
        currency: c.currency.as_ref().map(|c| c.to_string()),
        checkout_id: c
            .metadata
            .as_ref()
            .and_then(|m| m.get(CHECKOUT_ID_KEY).cloned()),
    }
}

/// `None` for an invoice without an id (the upcoming invoice preview).
fn invoice(i: &stripe_shared::Invoice) -> Option<StripeInvoice> {
    let subscription = i
        .parent
        .as_ref()
        .and_then(|p| p.subscription_details.as_ref())
        .map(|d| d.subscription.id().as_str().to_owned());
    Some(StripeInvoice {
        id: i.id.as_ref()?.as_str().to_owned(),
        stripe_customer: i.customer.as_ref().map(|c| c.id().as_str().to_owned()),
        stripe_subscription: subscription,
        number: i.number.clone(),
        status: i.status.as_ref().map(|s| s.as_str().to_owned()),
        currency: i.currency.to_string(),
        amount_due: i.amount_due,
        amount_paid: i.amount_paid,
        amount_remaining: i.amount_remaining,
        total: i.total,
        period_start: timestamp(i.period_start),
        period_end: timestamp(i.period_end),
        attempt_count: i64::try_from(i.attempt_count).unwrap_or(i64::MAX),
        created: timestamp(i.created),
        hosted_invoice_url: i.hosted_invoice_url.clone(),
        invoice_pdf: i.invoice_pdf.clone(),
        lines_complete: !i.lines.has_more,
        lines: i
            .lines
            .data
            .iter()
            .map(|line| StripeInvoiceLine {
                id: line.id.as_str().to_owned(),
                price: line
                    .pricing
                    .as_ref()
                    .and_then(|p| p.price_details.as_ref())
                    .map(|d| d.price.id().as_str().to_owned()),
                description: line.description.clone(),
                quantity: line
                    .quantity_decimal
                    .clone()
                    .or(line.quantity.map(|q| q.to_string())),
                amount: line.amount,
                period_start: line.period.start,
                period_end: line.period.end,
            })
            .collect(),
    })
}
