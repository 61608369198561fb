//! Checkout Sessions, the payments they take (payment intents, charges, refunds) and billing
//! portal sessions: what a customer does on Stripe's hosted pages, done by the test routes
//! (`/_emulator/checkout/{id}/complete`, `…/async_payment`, `/_emulator/portal/{id}/cancel`)
//! the way a paying customer would, with the events Stripe sends for each.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::billing::{indexed_items, Billing, Change};
use crate::reply::Reply;
use crate::sessions::{Payment, PortalSession, Session};
use crate::store::Form;

/// A session is open this long unless `expires_at` says otherwise (Stripe: 24 hours).
const SESSION_LIFETIME: i64 = 24 * 3600;

/// How the customer paid on the Checkout page (`/_emulator/checkout/{id}/complete`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Payer {
    /// A card: paid at once.
    Card,
    /// A delayed method (a bank debit): the session completes unpaid, and
    /// `…/async_payment` settles it later.
    Async,
}

impl Billing {
    /// `POST /v1/checkout/sessions`: `mode`, `customer`, `line_items[i][price]`,
    /// `line_items[i][quantity]`, `success_url`, `cancel_url`, `client_reference_id`,
    /// `metadata[…]`, `subscription_data[metadata][…]`, `expires_at`.
    pub(crate) fn create_session(
        &mut self,
        form: &Form,
        customer_exists: bool,
        livemode: bool,
        now: i64,
    ) -> Reply {
        let mode = match form.get("mode") {
            Some(mode @ ("payment" | "subscription")) => mode.to_owned(),
            Some(other) => {
                return Reply::invalid(
                    format!("Invalid mode: must be one of payment, setup, or subscription (got {other}); the emulator does not do setup"),
                    Some("mode"),
                )
            }
            None => return Reply::missing("mode"),
        };
        let Some(customer) = form.get("customer") else {
            return Reply::missing("customer");
        };
        if !customer_exists {
            return Reply::not_found(format!("No such customer: '{customer}'"), Some("customer"));
        }
        for (field, url) in [
            ("success_url", form.get("success_url")),
            ("cancel_url", form.get("cancel_url")),
        ] {
            if let Some(url) = url {
                if !(url.starts_with("https://") || url.starts_with("http://")) || url.len() > 5000
                {
                    return Reply::invalid(format!("Not a valid URL: {field}"), Some(field));
                }
            }
        }
        let line_items = match indexed_items(form, "line_items") {
            Ok(items) if items.is_empty() => return Reply::missing("line_items[0][price]"),
            Ok(items) => items,
            Err(reply) => return reply,
        };
        let mut amount_total = 0i64;
        let mut currency = None;
        for (i, (price_id, quantity)) in line_items.iter().enumerate() {
            let field = format!("line_items[{i}][price]");
            let Some(price) = self.prices.get(price_id) else {
                return Reply::not_found(format!("No such price: '{price_id}'"), Some(&field));
            };
            if currency.get_or_insert(price.currency.clone()) != &price.currency {
                return Reply::invalid("All line items must share one currency.", Some(&field));
            }
            match (&price.recurring, mode.as_str()) {
                (Some(_), "payment") => {
                    return Reply::invalid(
                        format!("You specified `payment` mode but passed a recurring price ({price_id}). Either switch to `subscription` mode or use only one-time prices."),
                        Some(&field),
                    )
                }
                (None, "subscription") => {
                    return Reply::invalid(
                        format!("The price {price_id} is one-time; `subscription` mode takes recurring prices only."),
                        Some(&field),
                    )
                }
                _ => {}
            }
            if price
                .recurring
                .as_ref()
                .is_some_and(|r| r.usage_type == "metered")
            {
                continue;
            }
            let unit: f64 = price.unit_amount_decimal.parse().unwrap_or(0.0);
            amount_total += (unit * quantity.unwrap_or(1) as f64).round() as i64;
        }
        if mode == "subscription" {
            // The same checks a subscription's items get (one interval, no metered quantity).
            if let Err(reply) = self.items_param(&line_items, "line_items") {
                return reply;
            }
        }
        let expires_at = match form.get("expires_at").map(str::parse::<i64>) {
            None => now + SESSION_LIFETIME,
            Some(Ok(at)) if at >= now + 1800 && at <= now + SESSION_LIFETIME => at,
            Some(_) => {
                return Reply::invalid(
                    "expires_at must be between 30 minutes and 24 hours from now.",
                    Some("expires_at"),
                )
            }
        };
        let session = Session {
            id: self.new_id("cs_test"),
            mode,
            customer: customer.to_owned(),
            line_items,
            success_url: form.get("success_url").map(str::to_owned),
            cancel_url: form.get("cancel_url").map(str::to_owned),
            client_reference_id: form.get("client_reference_id").map(str::to_owned),
            metadata: form.nested("metadata"),
            subscription_metadata: nested2(form, "subscription_data", "metadata"),
            status: "open".into(),
            payment_status: "unpaid".into(),
            amount_total,
            currency: currency.unwrap_or_default(),
            payment_intent: None,
            subscription: None,
            invoice: None,
            livemode,
            created: now,
            expires_at,
        };
        let reply = Reply::json(200, &self.session_json(&session));
        self.checkout.sessions.insert(session.id.clone(), session);
        reply
    }

    pub(crate) fn get_session(&self, id: &str) -> Reply {
        match self.checkout.sessions.get(id) {
            Some(session) => Reply::json(200, &self.session_json(session)),
            None => no_such_session(id),
        }
    }

    /// `POST /v1/checkout/sessions/{id}/expire`, or the session's time running out.
    pub(crate) fn expire_session(&mut self, id: &str) -> Result<(Reply, Vec<Change>), Reply> {
        let Some(session) = self.checkout.sessions.get_mut(id) else {
            return Err(no_such_session(id));
        };
        if session.status != "open" {
            return Err(Reply::invalid(
                format!("Only Checkout Sessions with a status in [\"open\"] can be expired (session {id} is {}).", session.status),
                None,
            ));
        }
        session.status = "expired".into();
        let object = self.session_json(&self.checkout.sessions[id]);
        Ok((
            Reply::json(200, &object),
            vec![change("checkout.session.expired", object)],
        ))
    }

    /// The customer pays on the Checkout page. A subscription session starts the
    /// subscription and pays its first invoice (`customer.subscription.created`,
    /// `invoice.*`, then `checkout.session.completed`); a payment session takes the payment
    /// (`payment_intent.succeeded`, `charge.succeeded`, `checkout.session.completed` paid),
    /// or with a delayed method completes unpaid (`checkout.session.completed` unpaid).
    pub(crate) fn complete_session(
        &mut self,
        id: &str,
        payer: Payer,
        now: i64,
    ) -> Result<(Reply, Vec<Change>), Reply> {
        let Some(session) = self.checkout.sessions.get(id) else {
            return Err(no_such_session(id));
        };
        if session.status != "open" || now >= session.expires_at {
            return Err(Reply::invalid(
                format!(
                    "Checkout Session {id} is {} and cannot be paid.",
                    if session.status == "open" {
                        "past its expires_at"
                    } else {
                        &session.status
                    }
                ),
                None,
            ));
        }
        let (mode, customer, line_items, livemode) = (
            session.mode.clone(),
            session.customer.clone(),
            session.line_items.clone(),
            session.livemode,
        );
        let mut changes = Vec::new();
        if mode == "subscription" {
            let items = self.items_param(&line_items, "line_items")?;
            let metadata = self.checkout.sessions[id].subscription_metadata.clone();
            let subscription =
                self.subscribe(&customer, items, None, false, metadata, livemode, now);
            changes.extend(self.start_subscription(&subscription, now));
            let invoice = self.latest_invoice(&subscription);
            let session = self.checkout.sessions.get_mut(id).expect("found above");
            session.subscription = Some(subscription);
            session.invoice = invoice;
            session.status = "complete".into();
            session.payment_status = "paid".into();
        } else {
            let intent = self.new_id("pi");
            let charge = self.new_id("ch");
            let session = self.checkout.sessions.get_mut(id).expect("found above");
            let settled = payer == Payer::Card;
            let payment = Payment {
                intent: intent.clone(),
                charge,
                customer: customer.clone(),
                amount: session.amount_total,
                amount_refunded: 0,
                currency: session.currency.clone(),
                status: if settled { "succeeded" } else { "processing" }.into(),
                livemode,
                created: now,
            };
            session.payment_intent = Some(intent.clone());
            session.status = "complete".into();
            session.payment_status = if settled { "paid" } else { "unpaid" }.into();
            if settled {
                changes.push(change("charge.succeeded", charge_json(&payment)));
            }
            self.checkout.payments.insert(intent, payment);
        }
        let object = self.session_json(&self.checkout.sessions[id]);
        changes.push(change("checkout.session.completed", object.clone()));
        Ok((Reply::json(200, &object), changes))
    }

    /// A delayed payment settles: `checkout.session.async_payment_succeeded` (the session is
    /// now paid) or `…_failed`.
    pub(crate) fn settle_async_payment(
        &mut self,
        id: &str,
        succeeded: bool,
    ) -> Result<(Reply, Vec<Change>), Reply> {
        let Some(session) = self.checkout.sessions.get_mut(id) else {
            return Err(no_such_session(id));
        };
        let intent = session.payment_intent.clone();
        let payment = intent
            .as_ref()
            .and_then(|intent| self.checkout.payments.get_mut(intent))
            .filter(|payment| payment.status == "processing");
        let Some(payment) = payment else {
            return Err(Reply::invalid(
                format!("Checkout Session {id} has no payment waiting to settle."),
                None,
            ));
        };
        payment.status = if succeeded { "succeeded" } else { "failed" }.into();
        let charge = charge_json(payment);
        if succeeded {
            session.payment_status = "paid".into();
        }
        let object = self.session_json(&self.checkout.sessions[id]);
        let mut changes = Vec::new();
        if succeeded {
            changes.push(change("charge.succeeded", charge));
        }
        changes.push(change(
            if succeeded {
                "checkout.session.async_payment_succeeded"
            } else {
                "checkout.session.async_payment_failed"
            },
            object.clone(),
        ));
        Ok((Reply::json(200, &object), changes))
    }

    /// `POST /v1/refunds`: `payment_intent` or `charge`, `amount` (default: what is left),
    /// `reason`. Sends `charge.refunded` with the charge as it is after the refund.
    pub(crate) fn create_refund(
        &mut self,
        form: &Form,
        now: i64,
    ) -> Result<(Reply, Vec<Change>), Reply> {
        let payment = match (form.get("payment_intent"), form.get("charge")) {
            (Some(intent), _) => self.checkout.payments.get_mut(intent),
            (None, Some(charge)) => self
                .checkout
                .payments
                .values_mut()
                .find(|p| p.charge == charge),
            (None, None) => return Err(Reply::missing("payment_intent")),
        };
        let Some(payment) = payment else {
            return Err(Reply::not_found(
                "No such payment_intent or charge",
                Some("payment_intent"),
            ));
        };
        if payment.status != "succeeded" {
            return Err(Reply::invalid(
                format!(
                    "This PaymentIntent ({}) does not have a successful charge to refund.",
                    payment.intent
                ),
                Some("payment_intent"),
            ));
        }
        let left = payment.amount - payment.amount_refunded;
        let amount = match form.get("amount").map(str::parse::<i64>) {
            None => left,
            Some(Ok(amount)) if amount > 0 && amount <= left => amount,
            Some(_) => {
                return Err(Reply::invalid(
                    format!(
                        "Refund amount must be positive and at most the {left} left to refund."
                    ),
                    Some("amount"),
                ))
            }
        };
        if left == 0 {
            return Err(Reply::invalid(
                format!("Charge {} has already been refunded.", payment.charge),
                Some("charge"),
            ));
        }
        payment.amount_refunded += amount;
        let refund = json!({
            "id": format!("re_emu{:016x}", rand::random::<u64>()), "object": "refund", "amount": amount,
            "charge": payment.charge, "payment_intent": payment.intent, "created": now,
            "currency": payment.currency, "metadata": {}, "reason": form.get("reason"),
            "status": "succeeded",
        });
        let charge = charge_json(payment);
        Ok((
            Reply::json(200, &refund),
            vec![change("charge.refunded", charge)],
        ))
    }

    /// The cardholder disputes the payment (emulator control, as their bank would):
    /// `charge.dispute.created`, then `charge.dispute.funds_withdrawn` as Stripe takes the
    /// money back.
    pub(crate) fn dispute(
        &mut self,
        intent: &str,
        now: i64,
    ) -> Result<(Reply, Vec<Change>), Reply> {
        let Some(payment) = self.checkout.payments.get(intent) else {
            return Err(Reply::not_found(
                format!("No such payment_intent: '{intent}'"),
                None,
            ));
        };
        if payment.status != "succeeded" {
            return Err(Reply::invalid(
                "Only a successful payment can be disputed.",
                None,
            ));
        }
        let dispute = json!({
            "id": format!("dp_{}", &payment.charge[3..]), "object": "dispute",
            "amount": payment.amount - payment.amount_refunded, "balance_transactions": [],
            "charge": payment.charge, "payment_intent": payment.intent, "created": now,
            "currency": payment.currency, "enhanced_eligibility_types": [],
            "evidence": { "enhanced_evidence": {} },
            "evidence_details": { "enhanced_eligibility": {}, "has_evidence": false,
                                  "past_due": false, "submission_count": 0 },
            "is_charge_refundable": false, "livemode": payment.livemode, "metadata": {},
            "reason": "fraudulent", "status": "needs_response",
        });
        Ok((
            Reply::json(200, &dispute),
            vec![
                change("charge.dispute.created", dispute.clone()),
                change("charge.dispute.funds_withdrawn", dispute),
            ],
        ))
    }

    /// `POST /v1/billing_portal/sessions`: `customer`, `return_url`.
    pub(crate) fn create_portal_session(
        &mut self,
        form: &Form,
        customer_exists: bool,
        livemode: bool,
        now: i64,
    ) -> Reply {
        let Some(customer) = form.get("customer") else {
            return Reply::missing("customer");
        };
        if !customer_exists {
            return Reply::not_found(format!("No such customer: '{customer}'"), Some("customer"));
        }
        let session = PortalSession {
            id: self.new_id("bps"),
            customer: customer.to_owned(),
            return_url: form.get("return_url").map(str::to_owned),
            livemode,
            created: now,
        };
        let reply = Reply::json(200, &self.portal_json(&session));
        self.checkout
            .portal_sessions
            .insert(session.id.clone(), session);
        reply
    }

    /// The customer cancels in the portal: at the period's end (Stripe's default) or now.
    pub(crate) fn portal_cancel(
        &mut self,
        id: &str,
        at_period_end: bool,
        now: i64,
    ) -> Result<(Reply, Vec<Change>), Reply> {
        let Some(session) = self.checkout.portal_sessions.get(id) else {
            return Err(Reply::not_found(
                format!("No such portal session: '{id}'"),
                None,
            ));
        };
        let Some(subscription) = self.live_subscription_of(&session.customer.clone()) else {
            return Err(Reply::invalid(
                "The customer has no subscription to cancel.",
                None,
            ));
        };
        if at_period_end {
            self.set_cancel_at_period_end(&subscription, true)
        } else {
            self.cancel_subscription(&subscription, now)
        }
    }

    /// The hosted pages: a Checkout Session, an invoice, a portal session.
    pub(crate) fn page(&self, kind: &str, id: &str) -> Reply {
        let (title, body) = match kind {
            "checkout" => match self.checkout.sessions.get(id) {
                Some(s) => (
                    format!("Checkout {}", s.id),
                    format!(
                        "<p>Mode: {}. Status: {}, payment {}.</p><p>Total: {} {}.</p>",
                        s.mode, s.status, s.payment_status, s.amount_total, s.currency
                    ),
                ),
                None => return no_such_session(id),
            },
            "invoices" => match self.invoices.get(id) {
                Some(i) => (
                    format!("Invoice {}", i["number"].as_str().unwrap_or(id)),
                    format!(
                        "<p>Status: {}. Total: {} {}.</p>",
                        i["status"].as_str().unwrap_or(""),
                        i["total"],
                        i["currency"].as_str().unwrap_or("")
                    ),
                ),
                None => return Reply::not_found(format!("No such invoice: '{id}'"), None),
            },
            "portal" => match self.checkout.portal_sessions.get(id) {
                Some(p) => (
                    "Billing portal".to_owned(),
                    format!("<p>Customer {}.</p>", p.customer),
                ),
                None => return Reply::not_found(format!("No such portal session: '{id}'"), None),
            },
            _ => return Reply::not_found("no such page", None),
        };
        Reply::document(
            "text/html; charset=utf-8",
            format!("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title></head><body><h1>{title}</h1>{body}<p>stripe-emulator</p></body></html>"),
        )
    }

    /// An invoice's PDF: a one-page document naming it.
    pub(crate) fn invoice_pdf(&self, id: &str) -> Reply {
        let Some(invoice) = self.invoices.get(id) else {
            return Reply::not_found(format!("No such invoice: '{id}'"), None);
        };
        let text = format!(
            "Invoice {} total {} {}",
            invoice["number"].as_str().unwrap_or(id),
            invoice["total"],
            invoice["currency"].as_str().unwrap_or("")
        )
        .replace(['(', ')', '\\'], "");
        Reply::document("application/pdf", pdf(&text))
    }

    fn start_subscription(&mut self, subscription: &str, now: i64) -> Vec<Change> {
        let object = self.subscription_object(subscription);
        let mut changes = vec![change("customer.subscription.created", object)];
        changes.extend(self.invoice_first_period(subscription, now));
        changes
    }

    fn session_json(&self, s: &Session) -> Value {
        let mut metadata = json!({});
        for (key, value) in &s.metadata {
            metadata[key] = json!(value);
        }
        json!({
            "id": s.id, "object": "checkout.session", "mode": s.mode,
            "customer": s.customer, "client_reference_id": s.client_reference_id,
            "success_url": s.success_url, "cancel_url": s.cancel_url,
            "status": s.status, "payment_status": s.payment_status,
            "amount_subtotal": s.amount_total, "amount_total": s.amount_total,
            "currency": s.currency, "livemode": s.livemode, "created": s.created,
            "expires_at": s.expires_at, "metadata": metadata,
            "payment_intent": s.payment_intent, "subscription": s.subscription,
            "invoice": s.invoice,
            "url": if s.status == "open" { Some(format!("{}/_emulator/checkout/{}", self.base_url, s.id)) } else { None },
            "automatic_tax": { "enabled": false, "liability": null, "provider": null, "status": null },
            "custom_fields": [], "custom_text": {}, "payment_method_types": ["card"],
            "shipping_options": [], "ui_mode": "hosted",
        })
    }

    fn portal_json(&self, p: &PortalSession) -> Value {
        json!({
            "id": p.id, "object": "billing_portal.session", "configuration": "bpc_emulator",
            "created": p.created, "customer": p.customer, "livemode": p.livemode,
            "locale": null, "on_behalf_of": null, "return_url": p.return_url, "flow": null,
            "url": format!("{}/_emulator/portal/{}", self.base_url, p.id),
        })
    }
}

fn charge_json(p: &Payment) -> Value {
    json!({
        "id": p.charge, "object": "charge", "amount": p.amount,
        "amount_captured": if p.status == "succeeded" { p.amount } else { 0 },
        "amount_refunded": p.amount_refunded, "billing_details": {},
        "captured": p.status == "succeeded", "created": p.created, "currency": p.currency,
        "customer": p.customer, "disputed": false, "livemode": p.livemode, "metadata": {},
        "paid": p.status == "succeeded", "payment_intent": p.intent,
        "refunded": p.amount_refunded > 0 && p.amount_refunded == p.amount,
        "status": if p.status == "failed" { "failed" } else if p.status == "succeeded" { "succeeded" } else { "pending" },
    })
}

fn change(event_type: &'static str, object: Value) -> Change {
    Change {
        event_type,
        object,
        previous_attributes: None,
    }
}

fn no_such_session(id: &str) -> Reply {
    Reply::not_found(format!("No such checkout.session: '{id}'"), Some("session"))
}

/// `prefix[inner][key]=value` as `key → value`.
fn nested2(form: &Form, prefix: &str, inner: &str) -> BTreeMap<String, String> {
    form.nested(&format!("{prefix}[{inner}]"))
}

/// A minimal valid one-page PDF showing `text`.
fn pdf(text: &str) -> Vec<u8> {
    let stream = format!("BT /F1 14 Tf 72 720 Td ({text}) Tj ET");
    let objects = [
        "<< /Type /Catalog /Pages 2 0 R >>".to_owned(),
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_owned(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>".to_owned(),
        format!("<< /Length {} >>\nstream\n{stream}\nendstream", stream.len()),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_owned(),
    ];
    let mut out = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, object) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend(format!("{} 0 obj\n{object}\nendobj\n", i + 1).as_bytes());
    }
    let xref = out.len();
    out.extend(format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes());
    for offset in offsets {
        out.extend(format!("{offset:010} 00000 n \n").as_bytes());
    }
    out.extend(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            objects.len() + 1
        )
        .as_bytes(),
    );
    out
}
