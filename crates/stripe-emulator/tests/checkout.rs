//! Checkout, refunds, invoices and the billing portal: every object decodes with async-stripe's
//! own types and every event the pages produce arrives signed, so tally is tested against the
//! shapes Stripe sends.

use std::time::Duration;

use serde_json::{json, Value};
use stripe_emulator::testing::{call, control};
use stripe_emulator::{Emulator, EmulatorConfig};

const KEY: &str = "sk_test_emulator";

async fn post(emulator: &Emulator, path: &str, form: &[(&str, String)]) -> Value {
    let answer = call(emulator.addr(), "POST", path, Some(KEY), form, None)
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{path}: {}", answer.body);
    answer.body
}

async fn refused(emulator: &Emulator, path: &str, form: &[(&str, String)]) -> Value {
    let answer = call(emulator.addr(), "POST", path, Some(KEY), form, None)
        .await
        .unwrap();
    assert!(
        (400..500).contains(&answer.status),
        "{path}: {}",
        answer.body
    );
    answer.body["error"].clone()
}

async fn get(emulator: &Emulator, path: &str) -> Value {
    let answer = call(emulator.addr(), "GET", path, Some(KEY), &[], None)
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{path}: {}", answer.body);
    answer.body
}

fn parse<T: miniserde::Deserialize>(value: &Value) -> T {
    miniserde::json::from_str(&value.to_string())
        .unwrap_or_else(|_| panic!("async-stripe cannot read {value:#}"))
}

/// The objects of the events of `event_type` so far.
fn objects(emulator: &Emulator, event_type: &str) -> Vec<Value> {
    emulator
        .events()
        .iter()
        .filter(|e| e.event_type == event_type)
        .map(|e| serde_json::from_str::<Value>(&e.body).unwrap()["data"]["object"].clone())
        .collect()
}

struct Catalog {
    customer: String,
    plan_price: String,
    metered_price: String,
    pack_price: String,
}

async fn catalog(emulator: &Emulator) -> Catalog {
    let customer = post(emulator, "/v1/customers", &[("name", "acme".into())]).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let meter = post(
        emulator,
        "/v1/billing/meters",
        &[
            ("display_name", "API calls".into()),
            ("event_name", "api_calls".into()),
            ("default_aggregation[formula]", "sum".into()),
        ],
    )
    .await;
    let product = post(emulator, "/v1/products", &[("name", "PRO".into())]).await;
    let product = product["id"].as_str().unwrap().to_owned();
    let id = |v: Value| v["id"].as_str().unwrap().to_owned();
    let plan_price = id(post(
        emulator,
        "/v1/prices",
        &[
            ("currency", "usd".into()),
            ("unit_amount", "4900".into()),
            ("recurring[interval]", "month".into()),
            ("product", product.clone()),
        ],
    )
    .await);
    let metered_price = id(post(
        emulator,
        "/v1/prices",
        &[
            ("currency", "usd".into()),
            ("unit_amount_decimal", "0.2".into()),
            ("recurring[interval]", "month".into()),
            ("recurring[usage_type]", "metered".into()),
            ("recurring[meter]", meter["id"].as_str().unwrap().to_owned()),
            ("product", product),
        ],
    )
    .await);
    let pack_price = id(post(
        emulator,
        "/v1/prices",
        &[
            ("currency", "usd".into()),
            ("unit_amount", "1000".into()),
            ("product_data[name]", "1,000 credits".into()),
            ("lookup_key", "tally_pack_small".into()),
        ],
    )
    .await);
    Catalog {
        customer,
        plan_price,
        metered_price,
        pack_price,
    }
}

#[tokio::test]
async fn prices_products_and_lookup_keys_read_as_stripe_writes_them() {
    let emulator = Emulator::start("127.0.0.1:0".parse().unwrap(), EmulatorConfig::default())
        .await
        .unwrap();
    let catalog = catalog(&emulator).await;
    let plan: stripe_shared::Price =
        parse(&get(&emulator, &format!("/v1/prices/{}", catalog.plan_price)).await);
    assert_eq!(plan.unit_amount, Some(4900));
    let metered = get(&emulator, &format!("/v1/prices/{}", catalog.metered_price)).await;
    let metered_price: stripe_shared::Price = parse(&metered);
    assert_eq!(
        metered_price.unit_amount, None,
        "a fractional amount has no integer"
    );
    assert_eq!(metered["unit_amount_decimal"], "0.2");
    assert_eq!(metered["recurring"]["usage_type"], "metered");
    let pack = get(&emulator, "/v1/prices?lookup_keys[]=tally_pack_small").await;
    assert_eq!(pack["data"][0]["id"], catalog.pack_price.as_str());
    assert_eq!(pack["data"][0]["type"], "one_time");
    // A lookup key is one price's.
    let error = refused(
        &emulator,
        "/v1/prices",
        &[
            ("currency", "usd".into()),
            ("lookup_key", "tally_pack_small".into()),
        ],
    )
    .await;
    assert!(error["message"].as_str().unwrap().contains("lookup key"));
}

#[tokio::test]
async fn a_subscription_checkout_starts_the_subscription_and_invoices_it() {
    let emulator = Emulator::start("127.0.0.1:0".parse().unwrap(), EmulatorConfig::default())
        .await
        .unwrap();
    let catalog = catalog(&emulator).await;
    // Stripe's own refusals: a one-time price in subscription mode, a quantity on a metered
    // price, a recurring price in payment mode.
    for (mode, price, quantity) in [
        ("subscription", &catalog.pack_price, None),
        ("subscription", &catalog.metered_price, Some("3")),
        ("payment", &catalog.plan_price, None),
    ] {
        let mut form = vec![
            ("mode", mode.to_owned()),
            ("customer", catalog.customer.clone()),
            ("line_items[0][price]", price.clone()),
            ("success_url", "https://example.com/ok".into()),
        ];
        form.extend(quantity.map(|q| ("line_items[0][quantity]", q.to_owned())));
        refused(&emulator, "/v1/checkout/sessions", &form).await;
    }
    let session = post(
        &emulator,
        "/v1/checkout/sessions",
        &[
            ("mode", "subscription".into()),
            ("customer", catalog.customer.clone()),
            ("line_items[0][price]", catalog.plan_price.clone()),
            ("line_items[0][quantity]", "1".into()),
            ("line_items[1][price]", catalog.metered_price.clone()),
            ("success_url", "https://example.com/ok".into()),
            ("cancel_url", "https://example.com/back".into()),
            ("subscription_data[metadata][tally_customer]", "acme".into()),
            ("metadata[tally_session]", "1".into()),
        ],
    )
    .await;
    let typed: stripe_shared::CheckoutSession = parse(&session);
    assert_eq!(typed.amount_total, Some(4900));
    let id = session["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("cs_test_"));
    let url = session["url"].as_str().unwrap();
    assert!(url.ends_with(&format!("/_emulator/checkout/{id}")), "{url}");

    let completed = control(
        emulator.addr(),
        &format!("checkout/{id}/complete"),
        &json!({}),
    )
    .await
    .unwrap();
    assert_eq!(completed.status, 200, "{}", completed.body);
    assert_eq!(completed.body["payment_status"], "paid");
    let subscription_id = completed.body["subscription"].as_str().unwrap().to_owned();
    // Paid once only.
    let again = control(
        emulator.addr(),
        &format!("checkout/{id}/complete"),
        &json!({}),
    )
    .await
    .unwrap();
    assert_eq!(again.status, 400);

    let subscription: stripe_shared::Subscription =
        parse(&get(&emulator, &format!("/v1/subscriptions/{subscription_id}")).await);
    assert_eq!(subscription.items.data.len(), 2);
    assert_eq!(
        subscription
            .metadata
            .get("tally_customer")
            .map(String::as_str),
        Some("acme")
    );
    let sessions = objects(&emulator, "checkout.session.completed");
    let completed: stripe_shared::CheckoutSession = parse(&sessions[0]);
    assert_eq!(completed.metadata.unwrap()["tally_session"], "1");

    // Usage in the period, then the period ends: the usage is billed in arrears, the fee ahead.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    post(
        &emulator,
        "/v1/billing/meter_events",
        &[
            ("event_name", "api_calls".into()),
            ("payload[stripe_customer_id]", catalog.customer.clone()),
            ("payload[value]", "1500".into()),
            ("timestamp", now.to_string()),
        ],
    )
    .await;
    let advanced = control(
        emulator.addr(),
        &format!("subscriptions/{subscription_id}/advance_period"),
        &json!({}),
    )
    .await
    .unwrap();
    assert_eq!(advanced.status, 200, "{}", advanced.body);
    let paid = objects(&emulator, "invoice.paid");
    assert_eq!(paid.len(), 2, "the first period and the renewal");
    let renewal: stripe_shared::Invoice = parse(&paid[1]);
    assert_eq!(
        renewal.total,
        4900 + 300,
        "the fee ahead and 1,500 calls at 0.2 cents"
    );
    let metered_line = renewal
        .lines
        .data
        .iter()
        .find(|line| line.quantity == Some(1500))
        .expect("a metered line");
    assert_eq!(metered_line.amount, 300);

    // The hosted invoice and its PDF answer.
    let pdf_url = paid[1]["invoice_pdf"].as_str().unwrap();
    let pdf_path = pdf_url.split_once("/_emulator/").unwrap().1;
    let answer = call(
        emulator.addr(),
        "GET",
        &format!("/_emulator/{pdf_path}"),
        None,
        &[],
        None,
    )
    .await
    .unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.headers["content-type"], "application/pdf");
    let invoice_id = paid[1]["id"].as_str().unwrap();
    let fetched: stripe_shared::Invoice =
        parse(&get(&emulator, &format!("/v1/invoices/{invoice_id}")).await);
    assert_eq!(fetched.total, renewal.total);
    let hosted = paid[1]["hosted_invoice_url"].as_str().unwrap();
    let hosted_path = hosted.split_once("/_emulator/").unwrap().1;
    let answer = call(
        emulator.addr(),
        "GET",
        &format!("/_emulator/{hosted_path}"),
        None,
        &[],
        None,
    )
    .await
    .unwrap();
    assert_eq!(answer.status, 200);
    assert!(answer.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));

    // The customer cancels in the portal, at the period's end.
    let portal = post(
        &emulator,
        "/v1/billing_portal/sessions",
        &[
            ("customer", catalog.customer.clone()),
            ("return_url", "https://example.com/account".into()),
        ],
    )
    .await;
    assert!(portal["url"]
        .as_str()
        .unwrap()
        .contains("/_emulator/portal/bps_"));
    let portal_id = portal["id"].as_str().unwrap();
    let canceled = control(
        emulator.addr(),
        &format!("portal/{portal_id}/cancel"),
        &json!({}),
    )
    .await
    .unwrap();
    assert_eq!(canceled.status, 200, "{}", canceled.body);
    assert_eq!(canceled.body["cancel_at_period_end"], true);
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test]
async fn a_credit_pack_is_paid_at_once_or_later_and_refunded() {
    let emulator = Emulator::start("127.0.0.1:0".parse().unwrap(), EmulatorConfig::default())
        .await
        .unwrap();
    let catalog = catalog(&emulator).await;
    let session = |emulator: &Emulator| {
        let form = vec![
            ("mode", "payment".to_owned()),
            ("customer", catalog.customer.clone()),
            ("line_items[0][price]", catalog.pack_price.clone()),
            ("line_items[0][quantity]", "1".to_owned()),
            ("success_url", "https://example.com/ok".to_owned()),
        ];
        let addr = emulator.addr();
        async move {
            let answer = call(
                addr,
                "POST",
                "/v1/checkout/sessions",
                Some(KEY),
                &form,
                None,
            )
            .await
            .unwrap();
            answer.body["id"].as_str().unwrap().to_owned()
        }
    };
    // A card: paid at once.
    let card = session(&emulator).await;
    let paid = control(
        emulator.addr(),
        &format!("checkout/{card}/complete"),
        &json!({}),
    )
    .await
    .unwrap();
    assert_eq!(paid.body["payment_status"], "paid");
    let intent = paid.body["payment_intent"].as_str().unwrap().to_owned();

    // A bank debit: complete but unpaid, then it settles.
    let debit = session(&emulator).await;
    let pending = control(
        emulator.addr(),
        &format!("checkout/{debit}/complete"),
        &json!({ "payment": "async" }),
    )
    .await
    .unwrap();
    assert_eq!(pending.body["payment_status"], "unpaid");
    let settled = control(
        emulator.addr(),
        &format!("checkout/{debit}/async_payment"),
        &json!({ "succeeded": true }),
    )
    .await
    .unwrap();
    assert_eq!(settled.body["payment_status"], "paid");
    let succeeded = objects(&emulator, "checkout.session.async_payment_succeeded");
    let typed: stripe_shared::CheckoutSession = parse(&succeeded[0]);
    assert_eq!(typed.id.as_str(), debit);

    // An expired session cannot be paid.
    let expired = session(&emulator).await;
    post(
        &emulator,
        &format!("/v1/checkout/sessions/{expired}/expire"),
        &[],
    )
    .await;
    let late = control(
        emulator.addr(),
        &format!("checkout/{expired}/complete"),
        &json!({}),
    )
    .await
    .unwrap();
    assert_eq!(late.status, 400);

    // A refund, in part and then the rest; no more than was paid.
    post(
        &emulator,
        "/v1/refunds",
        &[("payment_intent", intent.clone()), ("amount", "400".into())],
    )
    .await;
    post(
        &emulator,
        "/v1/refunds",
        &[("payment_intent", intent.clone())],
    )
    .await;
    refused(
        &emulator,
        "/v1/refunds",
        &[("payment_intent", intent.clone())],
    )
    .await;
    let refunds = objects(&emulator, "charge.refunded");
    assert_eq!(refunds.len(), 2);
    let last: stripe_shared::Charge = parse(&refunds[1]);
    assert_eq!(last.amount_refunded, 1000);
    assert!(last.refunded);
    assert_eq!(
        last.payment_intent
            .as_ref()
            .map(|p| p.id().as_str().to_owned()),
        Some(intent)
    );
}
