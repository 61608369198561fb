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

/// A price: recurring (`licensed`, billed per quantity each period, or `metered`, billed in
/// arrears from a meter's usage) or one-time (a credit pack sold through Checkout).
pub(crate) struct Price {
    pub(crate) id: String,
    pub(crate) currency: String,
    /// In the currency's smallest unit; may have decimals (`unit_amount_decimal`), e.g. a
    /// metered price of 0.2 cents a call.
    pub(crate) unit_amount_decimal: String,
    pub(crate) recurring: Option<Recurring>,
    /// `transform_quantity[divide_by]`: sold in packages of this many units (rounded up).
    pub(crate) divide_by: Option<i64>,
    pub(crate) product: String,
    pub(crate) lookup_key: Option<String>,
    pub(crate) metadata: BTreeMap<String, String>,
    pub(crate) livemode: bool,
    pub(crate) created: i64,
}

pub(crate) struct Recurring {
    pub(crate) interval: String,
    /// `licensed` or `metered`.
    pub(crate) usage_type: String,
    /// The billing meter (`mtr_…`) a metered price bills.
    pub(crate) meter: Option<String>,
}

impl Price {
    fn unit_amount(&self) -> f64 {
        self.unit_amount_decimal.parse().unwrap_or(0.0)
    }

    fn is_metered(&self) -> bool {
        self.recurring
            .as_ref()
            .is_some_and(|r| r.usage_type == "metered")
    }
}

struct Product {
    id: String,
    name: String,
    metadata: BTreeMap<String, String>,
    livemode: bool,
    created: i64,
}

/// One item of a subscription: a licensed price with its quantity, or a metered price.
pub(crate) struct Item {
    id: String,
    price: String,
    quantity: Option<u64>,
}

struct Subscription {
    id: String,
    customer: String,
    items: Vec<Item>,
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

/// What Stripe bills a metered price from: the usage of its meter for one customer over a
/// period (`Store::metered_usage`).
pub(crate) type MeteredUsage<'a> = &'a dyn Fn(&str, &str, i64, i64) -> f64;

pub(crate) struct Billing {
    /// Where the emulator is reached (`http://127.0.0.1:port`): hosted pages and PDFs.
    pub(crate) base_url: String,
    pub(crate) prices: BTreeMap<String, Price>,
    products: BTreeMap<String, Product>,
    subscriptions: BTreeMap<String, Subscription>,
    pub(crate) invoices: BTreeMap<String, Value>,
    pub(crate) checkout: crate::sessions::Checkout,
    /// Customers whose card declines (emulator control): their invoices' payments fail.
    declining: std::collections::BTreeSet<String>,
    next_id: u64,
}

impl Billing {
    pub(crate) fn new(base_url: String) -> Billing {
        Billing {
            base_url,
            prices: BTreeMap::new(),
            products: BTreeMap::new(),
            subscriptions: BTreeMap::new(),
            invoices: BTreeMap::new(),
            checkout: Default::default(),
            declining: Default::default(),
            next_id: 0,
        }
    }

    pub(crate) fn new_id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}_emb{:010}", self.next_id)
    }

    /// `POST /v1/products`: `name`, `id`, `metadata[…]`.
    pub(crate) fn create_product(&mut self, form: &Form, livemode: bool, now: i64) -> Reply {
        let Some(name) = form.get("name") else {
            return Reply::missing("name");
        };
        let id = match form.get("id") {
            Some(id) if self.products.contains_key(id) => {
                return Reply::invalid(format!("Product already exists: '{id}'"), Some("id"))
            }
            Some(id) => id.to_owned(),
            None => self.new_id("prod"),
        };
        let product = Product {
            id: id.clone(),
            name: name.to_owned(),
            metadata: form.nested("metadata"),
            livemode,
            created: now,
        };
        let reply = Reply::json(200, &product_json(&product));
        self.products.insert(id, product);
        reply
    }

    pub(crate) fn get_product(&self, id: &str) -> Reply {
        match self.products.get(id) {
            Some(product) => Reply::json(200, &product_json(product)),
            None => Reply::not_found(format!("No such product: '{id}'"), Some("id")),
        }
    }

    /// `POST /v1/prices`: `currency`, `unit_amount` or `unit_amount_decimal`,
    /// `recurring[interval]`, `recurring[usage_type]`, `recurring[meter]` (a price without
    /// `recurring` is one-time), `product` or `product_data[name]`, `lookup_key`,
    /// `metadata[…]`.
    pub(crate) fn create_price(&mut self, form: &Form, livemode: bool, now: i64) -> Reply {
        let Some(currency) = form.get("currency") else {
            return Reply::missing("currency");
        };
        let amount = match (form.get("unit_amount"), form.get("unit_amount_decimal")) {
            (Some(_), Some(_)) => return Reply::invalid(
                "You may only specify one of these parameters: unit_amount, unit_amount_decimal.",
                Some("unit_amount"),
            ),
            (Some(amount), None) => match amount.parse::<i64>() {
                Ok(amount) if amount >= 0 => amount.to_string(),
                _ => {
                    return Reply::invalid(
                        "Invalid integer: unit_amount must be a non-negative integer",
                        Some("unit_amount"),
                    )
                }
            },
            (None, Some(decimal)) => match decimal.parse::<f64>() {
                Ok(value) if value >= 0.0 && value.is_finite() => decimal.to_owned(),
                _ => {
                    return Reply::invalid(
                        "Invalid decimal: unit_amount_decimal",
                        Some("unit_amount_decimal"),
                    )
                }
            },
            (None, None) => "0".to_owned(),
        };
        let written = form.nested("recurring");
        let recurring = if written.is_empty() {
            None
        } else {
            let interval = written.get("interval").cloned().unwrap_or_default();
            if !matches!(interval.as_str(), "day" | "week" | "month" | "year") {
                return Reply::invalid(
                    format!("Invalid recurring[interval]: must be one of day, week, month, or year (got {interval})"),
                    Some("recurring[interval]"),
                );
            }
            let usage_type = written
                .get("usage_type")
                .cloned()
                .unwrap_or_else(|| "licensed".into());
            if !matches!(usage_type.as_str(), "licensed" | "metered") {
                return Reply::invalid(
                    format!("Invalid recurring[usage_type]: must be one of licensed or metered (got {usage_type})"),
                    Some("recurring[usage_type]"),
                );
            }
            let meter = written.get("meter").cloned();
            if usage_type == "metered" && meter.is_none() {
                return Reply::invalid(
                    "A metered price must be backed by a billing meter: set recurring[meter].",
                    Some("recurring[meter]"),
                );
            }
            Some(Recurring {
                interval,
                usage_type,
                meter,
            })
        };
        let product = match (form.get("product"), form.get("product_data[name]")) {
            (Some(product), _) if self.products.contains_key(product) => product.to_owned(),
            (Some(product), _) => {
                return Reply::not_found(format!("No such product: '{product}'"), Some("product"))
            }
            (None, Some(name)) => {
                let id = self.new_id("prod");
                let product = Product {
                    id: id.clone(),
                    name: name.to_owned(),
                    metadata: BTreeMap::new(),
                    livemode,
                    created: now,
                };
                self.products.insert(id.clone(), product);
                id
            }
            (None, None) => self.new_id("prod"),
        };
        let divide_by =
            match form.get("transform_quantity[divide_by]") {
                None => None,
                Some(n) => match n.parse::<i64>() {
                    Ok(n) if n > 0 => Some(n),
                    _ => return Reply::invalid(
                        "Invalid integer: transform_quantity[divide_by] must be a positive integer",
                        Some("transform_quantity[divide_by]"),
                    ),
                },
            };
        let lookup_key = form.get("lookup_key").map(str::to_owned);
        if let Some(key) = &lookup_key {
            if self
                .prices
                .values()
                .any(|p| p.lookup_key.as_ref() == Some(key))
            {
                return Reply::invalid(
                    format!("A price (`{key}`) already uses that lookup key."),
                    Some("lookup_key"),
                );
            }
        }
        let price = Price {
            id: self.new_id("price"),
            currency: currency.to_lowercase(),
            unit_amount_decimal: amount,
            recurring,
            divide_by,
            product,
            lookup_key,
            metadata: form.nested("metadata"),
            livemode,
            created: now,
        };
        let reply = Reply::json(200, &price_json(&price));
        self.prices.insert(price.id.clone(), price);
        reply
    }

    pub(crate) fn get_price(&self, id: &str) -> Reply {
        match self.prices.get(id) {
            Some(price) => Reply::json(200, &price_json(price)),
            None => Reply::not_found(format!("No such price: '{id}'"), Some("price")),
        }
    }

    /// `GET /v1/prices`: `lookup_keys[]`, `product`.
    pub(crate) fn list_prices(&self, query: &Form) -> Reply {
        let keys = query.array("lookup_keys");
        let product = query.get("product");
        let data: Vec<Value> = self
            .prices
            .values()
            .filter(|p| keys.is_empty() || p.lookup_key.as_ref().is_some_and(|k| keys.contains(k)))
            .filter(|p| product.is_none_or(|product| p.product == product))
            .map(price_json)
            .collect();
        Reply::json(
            200,
            &json!({ "object": "list", "data": data, "has_more": false, "url": "/v1/prices" }),
        )
    }

    /// The subscription items of a form (`items[i][price]`, `items[i][quantity]`), or of a
    /// Checkout Session's line items: recurring prices of one interval; a metered price
    /// takes no quantity.
    pub(crate) fn items_param(
        &mut self,
        prices: &[(String, Option<u64>)],
        param: &str,
    ) -> Result<Vec<Item>, Reply> {
        if prices.is_empty() {
            return Err(Reply::missing(&format!("{param}[0][price]")));
        }
        let mut interval = None;
        let mut items = Vec::new();
        for (i, (id, quantity)) in prices.iter().enumerate() {
            let field = format!("{param}[{i}][price]");
            let Some(price) = self.prices.get(id) else {
                return Err(Reply::not_found(
                    format!("No such price: '{id}'"),
                    Some(&field),
                ));
            };
            let Some(recurring) = &price.recurring else {
                return Err(Reply::invalid(
                    format!("The price specified ({id}) is set to `type=one_time` but this field only accepts prices with `type=recurring`."),
                    Some(&field),
                ));
            };
            if interval.get_or_insert(recurring.interval.clone()) != &recurring.interval {
                return Err(Reply::invalid(
                    "All prices on a subscription must have the same `recurring.interval` and `recurring.interval_count`.",
                    Some(&field),
                ));
            }
            if price.is_metered() && quantity.is_some() {
                return Err(Reply::invalid(
                    format!("Quantity should not be specified where usage_type is `metered`. Remove quantity from `{param}[{i}]`."),
                    Some(&format!("{param}[{i}][quantity]")),
                ));
            }
            let quantity = if price.is_metered() {
                None
            } else {
                Some(quantity.unwrap_or(1))
            };
            items.push(Item {
                id: self.new_id("si"),
                price: id.clone(),
                quantity,
            });
        }
        Ok(items)
    }

    /// `POST /v1/subscriptions`: `customer`, `items[i][price]`, `items[i][quantity]`,
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
        let prices = indexed_items(form, "items")?;
        let items = self.items_param(&prices, "items")?;
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
        let id = self.subscribe(
            customer,
            items,
            trial_days,
            form.get("cancel_at_period_end") == Some("true"),
            form.nested("metadata"),
            livemode,
            now,
        );
        let invoice = self.invoice_first_period(&id, now);
        let object = self.subscription_json(&id);
        let mut changes = vec![Change {
            event_type: "customer.subscription.created",
            object: object.clone(),
            previous_attributes: None,
        }];
        changes.extend(invoice);
        Ok((Reply::json(200, &object), changes))
    }

    /// Records a new subscription and returns its id (no invoice, no event yet).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn subscribe(
        &mut self,
        customer: &str,
        items: Vec<Item>,
        trial_days: Option<i64>,
        cancel_at_period_end: bool,
        metadata: BTreeMap<String, String>,
        livemode: bool,
        now: i64,
    ) -> String {
        let period_end = match trial_days {
            Some(days) => now + days * DAY,
            None => now + self.interval_seconds(&items[0].price),
        };
        let subscription = Subscription {
            id: self.new_id("sub"),
            customer: customer.to_owned(),
            items,
            status: if trial_days.is_some() {
                "trialing"
            } else {
                "active"
            }
            .into(),
            period_start: now,
            period_end,
            trial_end: trial_days.map(|_| period_end),
            cancel_at_period_end,
            canceled_at: None,
            ended_at: None,
            metadata,
            livemode,
            created: now,
            latest_invoice: None,
        };
        let id = subscription.id.clone();
        self.subscriptions.insert(id.clone(), subscription);
        id
    }

    /// `POST /v1/subscriptions/{id}`: a new `items[0][price]` / `items[0][quantity]` for the
    /// first item, `cancel_at_period_end`, `metadata[…]`.
    pub(crate) fn update_subscription(
        &mut self,
        id: &str,
        form: &Form,
    ) -> Result<(Reply, Vec<Change>), Reply> {
        let price = match form.get("items[0][price]") {
            Some(price)
                if self
                    .prices
                    .get(price)
                    .is_some_and(|p| p.recurring.is_some()) =>
            {
                Some(price.to_owned())
            }
            Some(price) => {
                return Err(Reply::not_found(
                    format!("No such recurring price: '{price}'"),
                    Some("items[0][price]"),
                ))
            }
            None => None,
        };
        let quantity = match form.get("items[0][quantity]").map(str::parse::<u64>) {
            None => None,
            Some(Ok(quantity)) => Some(quantity),
            Some(Err(_)) => {
                return Err(Reply::invalid(
                    "Invalid integer: items[0][quantity]",
                    Some("items[0][quantity]"),
                ))
            }
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
            subscription.items[0].price = price;
        }
        if let Some(quantity) = quantity {
            subscription.items[0].quantity = Some(quantity);
        }
        if let Some(flag) = form.get("cancel_at_period_end") {
            subscription.cancel_at_period_end = flag == "true";
        }
        subscription.metadata.extend(form.nested("metadata"));
        let after = self.subscription_json(id);
        Ok((Reply::json(200, &after), vec![updated(before, after)]))
    }

    /// Sets or clears `cancel_at_period_end` (the customer portal's cancel and renew).
    pub(crate) fn set_cancel_at_period_end(
        &mut self,
        id: &str,
        cancel: bool,
    ) -> Result<(Reply, Vec<Change>), Reply> {
        let before = self.subscription_json(id);
        let Some(subscription) = self.subscriptions.get_mut(id) else {
            return Err(no_such_subscription(id));
        };
        subscription.cancel_at_period_end = cancel;
        let after = self.subscription_json(id);
        Ok((Reply::json(200, &after), vec![updated(before, after)]))
    }

    /// The live subscription of a customer, if any (the customer portal acts on it).
    pub(crate) fn live_subscription_of(&self, customer: &str) -> Option<String> {
        self.subscriptions
            .values()
            .filter(|s| s.customer == customer && s.status != "canceled")
            .map(|s| s.id.clone())
            .next_back()
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

    /// The period ends (emulator control, like a test clock): the metered usage of the period
    /// that ended and the next period's licensed fee are invoiced, or the subscription ends
    /// (its last usage invoiced) if it was set to cancel at the period's end.
    pub(crate) fn advance_period(
        &mut self,
        id: &str,
        usage: MeteredUsage<'_>,
    ) -> Result<(Reply, Vec<Change>), Reply> {
        let before = self.subscription_json(id);
        let (interval, ended) = match self.subscriptions.get(id) {
            Some(s) if s.status == "canceled" => {
                return Err(Reply::invalid(
                    format!("subscription {id} is canceled"),
                    None,
                ))
            }
            Some(s) => (
                self.interval_seconds(&s.items[0].price),
                (s.period_start, s.period_end),
            ),
            None => return Err(no_such_subscription(id)),
        };
        let subscription = self.subscriptions.get_mut(id).expect("checked above");
        let end = subscription.period_end;
        if subscription.cancel_at_period_end {
            subscription.status = "canceled".into();
            subscription.canceled_at = Some(end);
            subscription.ended_at = Some(end);
            let object = self.subscription_json(id);
            let mut changes = vec![Change {
                event_type: "customer.subscription.deleted",
                object: object.clone(),
                previous_attributes: None,
            }];
            changes.extend(self.invoice_period(id, end, Some(ended), usage));
            return Ok((Reply::json(200, &object), changes));
        }
        subscription.period_start = end;
        subscription.period_end = end + interval;
        subscription.trial_end = None;
        subscription.status = "active".into();
        let mut changes = self.invoice_period(id, end, Some(ended), usage);
        let after = self.subscription_json(id);
        changes.insert(0, updated(before, after.clone()));
        Ok((Reply::json(200, &after), changes))
    }

    /// A new subscription's first invoice (its licensed fees; no usage yet).
    pub(crate) fn invoice_first_period(&mut self, id: &str, now: i64) -> Vec<Change> {
        self.invoice_period(id, now, None, &|_, _, _, _| 0.0)
    }

    pub(crate) fn latest_invoice(&self, id: &str) -> Option<String> {
        self.subscriptions.get(id)?.latest_invoice.clone()
    }

    pub(crate) fn subscription_object(&self, id: &str) -> Value {
        self.subscription_json(id)
    }

    fn interval_seconds(&self, price: &str) -> i64 {
        let interval = self
            .prices
            .get(price)
            .and_then(|p| p.recurring.as_ref())
            .map(|r| r.interval.as_str());
        match interval {
            Some("day") => DAY,
            Some("week") => 7 * DAY,
            Some("year") => 365 * DAY,
            _ => 30 * DAY,
        }
    }

    /// Invoices a subscription and pays it at once (as a card on file would):
    /// `invoice.created`, `invoice.finalized`, `invoice.paid`. The lines: each licensed
    /// item's fee for the current period (nothing while trialing, nothing once canceled),
    /// and each metered item's usage over `ended` (the period that just ended; in arrears).
    fn invoice_period(
        &mut self,
        subscription_id: &str,
        now: i64,
        ended: Option<(i64, i64)>,
        usage: MeteredUsage<'_>,
    ) -> Vec<Change> {
        let id = self.new_id("in");
        let subscription = &self.subscriptions[subscription_id];
        let mut lines = Vec::new();
        let mut total = 0i64;
        for item in &subscription.items {
            let price = &self.prices[&item.price];
            let (quantity, period) = match (price.recurring.as_ref(), ended) {
                (Some(recurring), Some(ended)) if recurring.usage_type == "metered" => {
                    let meter = recurring.meter.as_deref().unwrap_or_default();
                    let used = usage(meter, &subscription.customer, ended.0, ended.1);
                    (used.max(0.0).round() as u64, ended)
                }
                (Some(recurring), None) if recurring.usage_type == "metered" => continue,
                _ if subscription.status != "active" => continue,
                _ => (
                    item.quantity.unwrap_or(1),
                    (subscription.period_start, subscription.period_end),
                ),
            };
            // Packages are charged whole (Stripe's `round: up`).
            let charged = match price.divide_by {
                Some(size) => (quantity as i64 + size - 1) / size,
                None => quantity as i64,
            };
            let amount = (price.unit_amount() * charged as f64).round() as i64;
            total += amount;
            lines.push(json!({
                "id": format!("il_{}_{}", &id[3..], lines.len()), "object": "line_item",
                "amount": amount, "currency": price.currency,
                "description": format!("{quantity} × {} (at {} / unit)", price.product, price.unit_amount_decimal),
                "discountable": true, "discounts": [], "invoice": id, "livemode": price.livemode,
                "metadata": {}, "period": { "start": period.0, "end": period.1 },
                "quantity": quantity, "subtotal": amount, "taxes": [],
                "pricing": {
                    "type": "price_details",
                    "price_details": { "price": price.id, "product": price.product },
                    "unit_amount_decimal": price.unit_amount_decimal,
                },
                "parent": {
                    "type": "subscription_item_details",
                    "subscription_item_details": {
                        "subscription_item": item.id, "subscription": subscription_id,
                        "proration": false, "invoice_item": null,
                    },
                },
            }));
        }
        let currency = self.prices[&subscription.items[0].price].currency.clone();
        let (customer, livemode) = (subscription.customer.clone(), subscription.livemode);
        let period = ended.unwrap_or((subscription.period_start, subscription.period_end));
        let parent = json!({
            "type": "subscription_details",
            "subscription_details": { "subscription": subscription_id, "metadata": {} },
        });
        let changes = self.issue_invoice(
            &id,
            &customer,
            &currency,
            livemode,
            now,
            period,
            lines,
            total,
            Some(parent),
            // The first invoice is paid where the subscription is bought (Checkout's page).
            ended.is_some(),
        );
        if let Some(subscription) = self.subscriptions.get_mut(subscription_id) {
            // A renewal whose payment failed leaves the subscription past due (Stripe's
            // default retry settings), until it is paid or canceled; a canceled one stays so.
            if subscription.status != "canceled"
                && changes
                    .iter()
                    .any(|c| c.event_type == "invoice.payment_failed")
            {
                subscription.status = "past_due".into();
            }
            subscription.latest_invoice = Some(id);
        }
        changes
    }

    /// A customer's card declines from now on, or pays again (emulator control).
    pub(crate) fn set_card_declines(&mut self, customer: &str, declines: bool) {
        if declines {
            self.declining.insert(customer.to_owned());
        } else {
            self.declining.remove(customer);
        }
    }

    /// Records an invoice of `lines` and pays it: its `created`, `finalized` and `paid`
    /// events (an invoice of nothing is paid as well, as Stripe does). When the customer's
    /// card declines, a renewal's payment fails instead: `invoice.payment_failed`, the invoice
    /// left open.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn issue_invoice(
        &mut self,
        id: &str,
        customer: &str,
        currency: &str,
        livemode: bool,
        now: i64,
        period: (i64, i64),
        lines: Vec<Value>,
        total: i64,
        parent: Option<Value>,
        renewal: bool,
    ) -> Vec<Change> {
        let number = format!("EMU-{:06}", self.invoices.len() + 1);
        let line_count = lines.len();
        let mut invoice = json!({
            "id": id, "object": "invoice", "number": number,
            "customer": customer, "currency": currency,
            "livemode": livemode, "created": now,
            "status": "draft", "collection_method": "charge_automatically",
            "amount_due": total, "amount_paid": 0, "amount_remaining": total,
            "amount_overpaid": 0, "amount_shipping": 0, "subtotal": total, "total": total,
            "attempt_count": 0, "attempted": false, "starting_balance": 0,
            "post_payment_credit_notes_amount": 0, "pre_payment_credit_notes_amount": 0,
            "period_start": period.0, "period_end": period.1,
            "automatic_tax": { "enabled": false }, "issuer": { "type": "self" },
            "default_tax_rates": [], "discounts": [], "payment_settings": {},
            "status_transitions": {}, "metadata": {},
            "parent": parent,
            "hosted_invoice_url": null, "invoice_pdf": null,
            "lines": { "object": "list", "data": lines, "has_more": false,
                       "total_count": line_count,
                       "url": format!("/v1/invoices/{id}/lines") },
        });
        let created = invoice.clone();
        invoice["status"] = json!("open");
        invoice["status_transitions"] = json!({ "finalized_at": now });
        // Stripe gives the hosted page and the PDF once an invoice is finalized.
        invoice["hosted_invoice_url"] = json!(format!("{}/_emulator/invoices/{id}", self.base_url));
        invoice["invoice_pdf"] = json!(format!("{}/_emulator/invoices/{id}/pdf", self.base_url));
        let finalized = invoice.clone();
        invoice["attempt_count"] = json!(1);
        invoice["attempted"] = json!(true);
        let paid = if renewal && total > 0 && self.declining.contains(customer) {
            "invoice.payment_failed"
        } else {
            invoice["status"] = json!("paid");
            invoice["amount_paid"] = json!(total);
            invoice["amount_remaining"] = json!(0);
            invoice["status_transitions"] = json!({ "finalized_at": now, "paid_at": now });
            "invoice.paid"
        };
        self.invoices.insert(id.to_owned(), invoice.clone());
        [
            ("invoice.created", created),
            ("invoice.finalized", finalized),
            (paid, invoice),
        ]
        .into_iter()
        .map(|(event_type, object)| Change {
            event_type,
            object,
            previous_attributes: None,
        })
        .collect()
    }

    pub(crate) fn get_invoice(&self, id: &str) -> Reply {
        match self.invoices.get(id) {
            Some(invoice) => Reply::json(200, invoice),
            None => Reply::not_found(format!("No such invoice: '{id}'"), Some("invoice")),
        }
    }

    /// `GET /v1/invoices`: `customer`, newest first.
    pub(crate) fn list_invoices(&self, query: &Form) -> Reply {
        let customer = query.get("customer");
        let subscription = query.get("subscription");
        let mut data: Vec<Value> = self
            .invoices
            .values()
            .filter(|i| customer.is_none_or(|c| i["customer"] == c))
            .filter(|i| {
                subscription
                    .is_none_or(|s| i["parent"]["subscription_details"]["subscription"] == s)
            })
            .cloned()
            .collect();
        data.sort_by_key(|i| std::cmp::Reverse(i["created"].as_i64()));
        Reply::json(
            200,
            &json!({ "object": "list", "data": data, "has_more": false, "url": "/v1/invoices" }),
        )
    }

    /// The invoice's status changes after the fact (emulator control): `void` or
    /// `uncollectible` (`invoice.voided`, `invoice.marked_uncollectible`), or `payment_failed`
    /// (an open invoice whose payment attempt failed).
    pub(crate) fn change_invoice(
        &mut self,
        id: &str,
        to: &str,
        now: i64,
    ) -> Result<(Reply, Vec<Change>), Reply> {
        let Some(invoice) = self.invoices.get_mut(id) else {
            return Err(Reply::not_found(
                format!("No such invoice: '{id}'"),
                Some("invoice"),
            ));
        };
        // Stripe voids an open or uncollectible invoice; only an open one is marked
        // uncollectible or attempted again.
        let status = invoice["status"].as_str().unwrap_or("unknown").to_owned();
        let allowed = status == "open" || (to == "void" && status == "uncollectible");
        if !allowed {
            return Err(Reply::invalid(
                format!("You cannot {to} invoice {id}: it is {status}."),
                None,
            ));
        }
        let event_type = match to {
            "void" => {
                invoice["status"] = json!("void");
                invoice["amount_remaining"] = json!(0);
                invoice["status_transitions"]["voided_at"] = json!(now);
                "invoice.voided"
            }
            "uncollectible" => {
                invoice["status"] = json!("uncollectible");
                invoice["status_transitions"]["marked_uncollectible_at"] = json!(now);
                "invoice.marked_uncollectible"
            }
            "payment_failed" => {
                invoice["status"] = json!("open");
                invoice["amount_paid"] = json!(0);
                invoice["amount_remaining"] = invoice["amount_due"].clone();
                invoice["attempt_count"] =
                    json!(invoice["attempt_count"].as_i64().unwrap_or(0) + 1);
                "invoice.payment_failed"
            }
            other => {
                return Err(Reply::invalid(
                    format!("no invoice change {other:?}: void, uncollectible or payment_failed"),
                    None,
                ))
            }
        };
        let object = invoice.clone();
        Ok((
            Reply::json(200, &object),
            vec![Change {
                event_type,
                object,
                previous_attributes: None,
            }],
        ))
    }

    fn subscription_json(&self, id: &str) -> Value {
        let Some(s) = self.subscriptions.get(id) else {
            return Value::Null;
        };
        let items: Vec<Value> = s
            .items
            .iter()
            .map(|item| {
                let price = &self.prices[&item.price];
                let recurring = price.recurring.as_ref();
                json!({
                    "id": item.id, "object": "subscription_item", "created": s.created,
                    "subscription": s.id, "quantity": item.quantity, "metadata": {},
                    "discounts": [],
                    "current_period_start": s.period_start, "current_period_end": s.period_end,
                    "price": price_json(price),
                    "plan": {
                        "id": price.id, "object": "plan", "active": true,
                        "billing_scheme": "per_unit", "created": price.created,
                        "currency": price.currency,
                        "interval": recurring.map(|r| r.interval.as_str()),
                        "interval_count": 1, "livemode": price.livemode,
                        "usage_type": recurring.map(|r| r.usage_type.as_str()),
                        "meter": recurring.and_then(|r| r.meter.as_deref()),
                        "amount_decimal": price.unit_amount_decimal,
                        "product": price.product, "metadata": price.metadata,
                    },
                })
            })
            .collect();
        let currency = &self.prices[&s.items[0].price].currency;
        json!({
            "id": s.id, "object": "subscription", "customer": s.customer,
            "status": s.status, "livemode": s.livemode, "created": s.created,
            "start_date": s.created, "billing_cycle_anchor": s.created,
            "cancel_at_period_end": s.cancel_at_period_end,
            "cancel_at": if s.cancel_at_period_end { Some(s.period_end) } else { None },
            "canceled_at": s.canceled_at, "ended_at": s.ended_at,
            "trial_start": s.trial_end.map(|_| s.created), "trial_end": s.trial_end,
            "currency": currency, "collection_method": "charge_automatically",
            "automatic_tax": { "enabled": false }, "billing_mode": { "type": "classic" },
            "billing_schedules": [], "discounts": [], "metadata": s.metadata,
            "invoice_settings": { "issuer": { "type": "self" } },
            "latest_invoice": s.latest_invoice,
            "items": { "object": "list", "data": items, "has_more": false,
                       "url": format!("/v1/subscription_items?subscription={}", s.id) },
        })
    }
}

pub(crate) fn price_json(price: &Price) -> Value {
    let integral = price.unit_amount_decimal.parse::<i64>().ok();
    let recurring = price.recurring.as_ref().map(|r| {
        json!({ "interval": r.interval, "interval_count": 1, "usage_type": r.usage_type,
                "meter": r.meter })
    });
    json!({
        "id": price.id, "object": "price", "active": true, "billing_scheme": "per_unit",
        "created": price.created, "currency": price.currency, "livemode": price.livemode,
        "lookup_key": price.lookup_key, "metadata": price.metadata, "product": price.product,
        "type": if recurring.is_some() { "recurring" } else { "one_time" },
        "unit_amount": integral, "unit_amount_decimal": price.unit_amount_decimal,
        "recurring": recurring, "tax_behavior": "unspecified",
        "transform_quantity": price.divide_by.map(|n| json!({ "divide_by": n, "round": "up" })),
    })
}

fn product_json(product: &Product) -> Value {
    json!({
        "id": product.id, "object": "product", "active": true, "name": product.name,
        "created": product.created, "updated": product.created, "livemode": product.livemode,
        "metadata": product.metadata, "images": [], "marketing_features": [],
        "package_dimensions": null, "shippable": null, "type": "service",
    })
}

/// `items[i][price]` and `items[i][quantity]` of a form, in order of `i`.
pub(crate) fn indexed_items(form: &Form, param: &str) -> Result<Vec<(String, Option<u64>)>, Reply> {
    let mut items = Vec::new();
    for i in 0.. {
        let Some(price) = form.get(&format!("{param}[{i}][price]")) else {
            break;
        };
        let field = format!("{param}[{i}][quantity]");
        let quantity = match form.get(&field).map(str::parse::<u64>) {
            None => None,
            Some(Ok(quantity)) if quantity > 0 => Some(quantity),
            Some(_) => {
                return Err(Reply::invalid(
                    format!("Invalid integer: {field}"),
                    Some(&field),
                ))
            }
        };
        items.push((price.to_owned(), quantity));
        if i >= 20 {
            return Err(Reply::invalid("At most 20 items.", Some(param)));
        }
    }
    Ok(items)
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
