//! Prices, subscriptions and their invoices: enough of Stripe Billing for tally's webhooks.
//! Every change returns the events Stripe would send (`customer.subscription.*`, `invoice.*`),
//! with objects in the shape of API version 2026-09-30 (the period is on the items).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::reply::Reply;
use crate::store::Form;

const DAY: i64 = 24 * 3600;

/// An event to record and deliver: its type, the object, and what changed (`*.updated`).
pub(crate) struct Change {
    pub(crate) event_type: &'static str,
    pub(crate) object: Value,
    pub(crate) previous_attributes: Option<Value>,
}

struct Price {
    id: String,
    currency: String,
    unit_amount: i64,
    interval: String,
    product: String,
    metadata: BTreeMap<String, String>,
    livemode: bool,
    created: i64,
}

struct Subscription {
    id: String,
    item_id: String,
    customer: String,
    price: String,
    quantity: u64,
    status: String,
    period_start: i64,
    period_end: i64,
    trial_end: Option<i64>,
    cancel_at_period_end: bool,
    canceled_at: Option<i64>,
    ended_at: Option<i64>,
    metadata: BTreeMap<String, String>,
    livemode: bool,
    created: i64,
    latest_invoice: Option<String>,
}

#[derive(Default)]
pub(crate) struct Billing {
    prices: BTreeMap<String, Price>,
    subscriptions: BTreeMap<String, Subscription>,
    invoices: BTreeMap<String, Value>,
    next_id: u64,
}

impl Billing {
    fn new_id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}_emb{:010}", self.next_id)
    }

    /// `POST /v1/prices`: `currency`, `unit_amount`, `recurring[interval]`, `product` or
    /// `product_data[name]`, `metadata[…]`.
    pub(crate) fn create_price(&mut self, form: &Form, livemode: bool, now: i64) -> Reply {
        let Some(currency) = form.get("currency") else {
            return Reply::missing("currency");
        };
        let unit_amount = match form.get("unit_amount").map(str::parse::<i64>) {
            None => 0,
            Some(Ok(amount)) if amount >= 0 => amount,
            Some(_) => {
                return Reply::invalid(
                    "Invalid integer: unit_amount must be a non-negative integer",
                    Some("unit_amount"),
                )
            }
        };
        let interval = form
            .nested("recurring")
            .get("interval")
            .cloned()
            .unwrap_or_else(|| "month".into());
        if !matches!(interval.as_str(), "day" | "week" | "month" | "year") {
            return Reply::invalid(
                format!("Invalid recurring[interval]: must be one of day, week, month, or year (got {interval})"),
                Some("recurring[interval]"),
            );
        }
        let product = match form.get("product") {
            Some(product) => product.to_owned(),
            None => self.new_id("prod"),
        };
        let price = Price {
            id: self.new_id("price"),
            currency: currency.to_lowercase(),
            unit_amount,
            interval,
            product,
            metadata: form.nested("metadata"),
            livemode,
            created: now,
        };
        let reply = Reply::json(200, &price_json(&price));
        self.prices.insert(price.id.clone(), price);
        reply
    }

    /// `POST /v1/subscriptions`: `customer`, `items[0][price]`, `items[0][quantity]`,
    /// `trial_period_days`, `cancel_at_period_end`, `metadata[…]`. Pays the first invoice.
    pub(crate) fn create_subscription(
        &mut self,
        form: &Form,
        customer_exists: bool,
        livemode: bool,
        now: i64,
    ) -> Result<(Reply, Vec<Change>), Reply> {
        let Some(customer) = form.get("customer") else {
            return Err(Reply::missing("customer"));
        };
        if !customer_exists {
            return Err(Reply::not_found(
                format!("No such customer: '{customer}'"),
                Some("customer"),
            ));
        }
        let price = self.price_param(form)?;
        let quantity = quantity_param(form)?;
        let trial_days = match form.get("trial_period_days").map(str::parse::<i64>) {
            None => None,
            Some(Ok(days)) if days > 0 => Some(days),
            Some(_) => {
                return Err(Reply::invalid(
                    "trial_period_days must be a positive integer",
                    Some("trial_period_days"),
                ))
            }
        };
        let period_end = match trial_days {
            Some(days) => now + days * DAY,
            None => now + self.interval_seconds(&price),
        };
        let subscription = Subscription {
            id: self.new_id("sub"),
            item_id: self.new_id("si"),
            customer: customer.to_owned(),
            price,
            quantity,
            status: if trial_days.is_some() {
                "trialing"
            } else {
                "active"
            }
            .into(),
            period_start: now,
            period_end,
            trial_end: trial_days.map(|_| period_end),
            cancel_at_period_end: form.get("cancel_at_period_end") == Some("true"),
            canceled_at: None,
            ended_at: None,
            metadata: form.nested("metadata"),
            livemode,
            created: now,
            latest_invoice: None,
        };
        let id = subscription.id.clone();
        self.subscriptions.insert(id.clone(), subscription);
        let invoice = self.invoice_period(&id, now);
        let object = self.subscription_json(&id);
        let mut changes = vec![Change {
            event_type: "customer.subscription.created",
            object: object.clone(),
            previous_attributes: None,
        }];
        changes.extend(invoice);
        Ok((Reply::json(200, &object), changes))
    }

    /// `POST /v1/subscriptions/{id}`: a new `items[0][price]` / `items[0][quantity]`,
    /// `cancel_at_period_end`, `metadata[…]`.
    pub(crate) fn update_subscription(
        &mut self,
        id: &str,
        form: &Form,
    ) -> Result<(Reply, Vec<Change>), Reply> {
        let price = match form.get("items[0][price]") {
            Some(_) => Some(self.price_param(form)?),
            None => None,
        };
        let quantity = match form.get("items[0][quantity]") {
            Some(_) => Some(quantity_param(form)?),
            None => None,
        };
        let before = self.subscription_json(id);
        let Some(subscription) = self.subscriptions.get_mut(id) else {
            return Err(no_such_subscription(id));
        };
        if subscription.status == "canceled" {
            return Err(Reply::invalid(
                format!("A canceled subscription can only update its cancellation_details and metadata (subscription {id})."),
                None,
            ));
        }
        if let Some(price) = price {
            subscription.price = price;
        }
        if let Some(quantity) = quantity {
            subscription.quantity = quantity;
        }
        if let Some(flag) = form.get("cancel_at_period_end") {
            subscription.cancel_at_period_end = flag == "true";
        }
        subscription.metadata.extend(form.nested("metadata"));
        let after = self.subscription_json(id);
        Ok((Reply::json(200, &after), vec![updated(before, after)]))
    }

    /// `DELETE /v1/subscriptions/{id}`: ends it now.
    pub(crate) fn cancel_subscription(
        &mut self,
        id: &str,
        now: i64,
    ) -> Result<(Reply, Vec<Change>), Reply> {
        let Some(subscription) = self.subscriptions.get_mut(id) else {
            return Err(no_such_subscription(id));
        };
        if subscription.status == "canceled" {
            return Err(Reply::invalid(
                format!("No such subscription: '{id}' is already canceled"),
                None,
            ));
        }
        subscription.status = "canceled".into();
        subscription.canceled_at = Some(now);
        subscription.ended_at = Some(now);
        let object = self.subscription_json(id);
        Ok((
            Reply::json(200, &object),
            vec![Change {
                event_type: "customer.subscription.deleted",
                object,
                previous_attributes: None,
            }],
        ))
    }

    pub(crate) fn get_subscription(&self, id: &str) -> Reply {
        if self.subscriptions.contains_key(id) {
            Reply::json(200, &self.subscription_json(id))
        } else {
            no_such_subscription(id)
        }
    }

    /// The period ends (emulator control, like a test clock): the next period starts and is
    /// invoiced, or the subscription ends if it was set to cancel at the period's end.
    pub(crate) fn advance_period(&mut self, id: &str) -> Result<(Reply, Vec<Change>), Reply> {
        let before = self.subscription_json(id);
        let interval = match self.subscriptions.get(id) {
            Some(s) => self.interval_seconds(&s.price),
            None => return Err(no_such_subscription(id)),
        };
        let subscription = self.subscriptions.get_mut(id).expect("checked above");
        let end = subscription.period_end;
        if subscription.cancel_at_period_end {
            subscription.status = "canceled".into();
            subscription.canceled_at = Some(end);
            subscription.ended_at = Some(end);
            let object = self.subscription_json(id);
            let change = Change {
                event_type: "customer.subscription.deleted",
                object: object.clone(),
                previous_attributes: None,
            };
            return Ok((Reply::json(200, &object), vec![change]));
        }
        subscription.period_start = end;
        subscription.period_end = end + interval;
        subscription.trial_end = None;
        subscription.status = "active".into();
        let mut changes = self.invoice_period(id, end);
        let after = self.subscription_json(id);
        changes.insert(0, updated(before, after.clone()));
        Ok((Reply::json(200, &after), changes))
    }

    fn price_param(&self, form: &Form) -> Result<String, Reply> {
        let Some(price) = form.get("items[0][price]") else {
            return Err(Reply::missing("items[0][price]"));
        };
        if !self.prices.contains_key(price) {
            return Err(Reply::not_found(
                format!("No such price: '{price}'"),
                Some("items[0][price]"),
            ));
        }
        Ok(price.to_owned())
    }

    fn interval_seconds(&self, price: &str) -> i64 {
        match self.prices.get(price).map(|p| p.interval.as_str()) {
            Some("day") => DAY,
            Some("week") => 7 * DAY,
            Some("year") => 365 * DAY,
            _ => 30 * DAY,
        }
    }

    /// Invoices the subscription's current period and pays it at once (as a card on file
    /// would): `invoice.created`, `invoice.finalized`, `invoice.paid`.
    fn invoice_period(&mut self, subscription_id: &str, now: i64) -> Vec<Change> {
        let id = self.new_id("in");
        let subscription = &self.subscriptions[subscription_id];
        let price = &self.prices[&subscription.price];
        let amount = if subscription.status == "trialing" {
            0
        } else {
            price.unit_amount * subscription.quantity as i64
        };
        let number = format!("EMU-{:06}", self.invoices.len() + 1);
        let mut invoice = json!({
            "id": id, "object": "invoice", "number": number,
            "customer": subscription.customer, "currency": price.currency,
            "livemode": subscription.livemode, "created": now,
            "status": "draft", "collection_method": "charge_automatically",
            "amount_due": amount, "amount_paid": 0, "amount_remaining": amount,
            "amount_overpaid": 0, "amount_shipping": 0, "subtotal": amount, "total": amount,
            "attempt_count": 0, "attempted": false, "starting_balance": 0,
            "post_payment_credit_notes_amount": 0, "pre_payment_credit_notes_amount": 0,
            "period_start": subscription.period_start, "period_end": subscription.period_end,
            "automatic_tax": { "enabled": false }, "issuer": { "type": "self" },
            "default_tax_rates": [], "discounts": [], "payment_settings": {},
            "status_transitions": {}, "metadata": {},
            "parent": {
                "type": "subscription_details",
                "subscription_details": { "subscription": subscription_id, "metadata": {} },
            },
            "lines": { "object": "list", "data": [], "has_more": false,
                       "url": format!("/v1/invoices/{id}/lines") },
        });
        let created = invoice.clone();
        invoice["status"] = json!("open");
        invoice["status_transitions"] = json!({ "finalized_at": now });
        let finalized = invoice.clone();
        invoice["status"] = json!("paid");
        invoice["amount_paid"] = json!(amount);
        invoice["amount_remaining"] = json!(0);
        invoice["attempt_count"] = json!(1);
        invoice["attempted"] = json!(true);
        invoice["status_transitions"] = json!({ "finalized_at": now, "paid_at": now });
        self.invoices.insert(id.clone(), invoice.clone());
        if let Some(subscription) = self.subscriptions.get_mut(subscription_id) {
            subscription.latest_invoice = Some(id);
        }
        [
            ("invoice.created", created),
            ("invoice.finalized", finalized),
            ("invoice.paid", invoice),
        ]
        .into_iter()
        .map(|(event_type, object)| Change {
            event_type,
            object,
            previous_attributes: None,
        })
        .collect()
    }

    fn subscription_json(&self, id: &str) -> Value {
        let Some(s) = self.subscriptions.get(id) else {
            return Value::Null;
        };
        let price = &self.prices[&s.price];
        let item = json!({
            "id": s.item_id, "object": "subscription_item", "created": s.created,
            "subscription": s.id, "quantity": s.quantity, "metadata": {}, "discounts": [],
            "current_period_start": s.period_start, "current_period_end": s.period_end,
            "price": price_json(price),
            "plan": {
                "id": price.id, "object": "plan", "active": true, "billing_scheme": "per_unit",
                "created": price.created, "currency": price.currency,
                "interval": price.interval, "interval_count": 1, "livemode": price.livemode,
                "usage_type": "licensed", "amount": price.unit_amount,
                "product": price.product, "metadata": price.metadata,
            },
        });
        json!({
            "id": s.id, "object": "subscription", "customer": s.customer,
            "status": s.status, "livemode": s.livemode, "created": s.created,
            "start_date": s.created, "billing_cycle_anchor": s.created,
            "cancel_at_period_end": s.cancel_at_period_end,
            "cancel_at": if s.cancel_at_period_end { Some(s.period_end) } else { None },
            "canceled_at": s.canceled_at, "ended_at": s.ended_at,
            "trial_start": s.trial_end.map(|_| s.created), "trial_end": s.trial_end,
            "currency": price.currency, "collection_method": "charge_automatically",
            "automatic_tax": { "enabled": false }, "billing_mode": { "type": "classic" },
            "billing_schedules": [], "discounts": [], "metadata": s.metadata,
            "invoice_settings": { "issuer": { "type": "self" } },
            "latest_invoice": s.latest_invoice,
            "items": { "object": "list", "data": [item], "has_more": false,
                       "url": format!("/v1/subscription_items?subscription={}", s.id) },
        })
    }
}

fn price_json(price: &Price) -> Value {
    json!({
        "id": price.id, "object": "price", "active": true, "billing_scheme": "per_unit",
        "created": price.created, "currency": price.currency, "livemode": price.livemode,
        "metadata": price.metadata, "product": price.product, "type": "recurring",
        "unit_amount": price.unit_amount, "unit_amount_decimal": price.unit_amount.to_string(),
        "recurring": { "interval": price.interval, "interval_count": 1, "usage_type": "licensed" },
        "tax_behavior": "unspecified",
    })
}

fn quantity_param(form: &Form) -> Result<u64, Reply> {
    match form.get("items[0][quantity]").map(str::parse::<u64>) {
        None => Ok(1),
        Some(Ok(quantity)) => Ok(quantity),
        Some(Err(_)) => Err(Reply::invalid(
            "Invalid integer: items[0][quantity]",
            Some("items[0][quantity]"),
        )),
    }
}

fn no_such_subscription(id: &str) -> Reply {
    Reply::not_found(format!("No such subscription: '{id}'"), Some("id"))
}

/// `customer.subscription.updated`, with the top-level fields that changed before the update.
fn updated(before: Value, after: Value) -> Change {
    let mut previous = serde_json::Map::new();
    if let (Value::Object(before), Value::Object(after_fields)) = (&before, &after) {
        for (key, old) in before {
            if after_fields.get(key) != Some(old) {
                previous.insert(key.clone(), old.clone());
            }
        }
    }
    Change {
        event_type: "customer.subscription.updated",
        object: after,
        previous_attributes: Some(Value::Object(previous)),
    }
}
