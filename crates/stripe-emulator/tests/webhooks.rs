//! Subscriptions and their webhook events: every event the emulator sends must carry Stripe's
//! signature and decode with async-stripe-webhook, or tally's endpoint would be tested against
//! a shape Stripe does not send.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use stripe_emulator::testing::call;
use stripe_emulator::{Emulator, EmulatorConfig};
use stripe_webhook::{EventObject, Webhook};

const KEY: &str = "sk_test_emulator";

/// A webhook receiver that answers `status` and keeps every (signature, body) it got.
async fn receiver(status: u16) -> (String, Arc<Mutex<Vec<(String, String)>>>) {
    receiver_answering(move |_| status).await
}

/// A webhook receiver that answers its `n`th request (from 0) with `answer(n)` and keeps every
/// (signature, body) it got, refused or not.
async fn receiver_answering(
    answer: impl Fn(usize) -> u16 + Send + Sync + 'static,
) -> (String, Arc<Mutex<Vec<(String, String)>>>) {
    let answer = Arc::new(answer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let received = Arc::new(Mutex::new(Vec::new()));
    let sink = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let sink = sink.clone();
            let answer = answer.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let sink = sink.clone();
                    let answer = answer.clone();
                    async move {
                        let signature = request.headers()["stripe-signature"]
                            .to_str()
                            .unwrap()
                            .to_owned();
                        let body = request.into_body().collect().await.unwrap().to_bytes();
                        let body = String::from_utf8(body.to_vec()).unwrap();
                        let status = {
                            let mut sink = sink.lock().unwrap();
                            sink.push((signature, body));
                            answer(sink.len() - 1)
                        };
                        let mut response = hyper::Response::new(Full::new(Bytes::new()));
                        *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (url, received)
}

async fn post(emulator: &Emulator, path: &str, form: &[(&str, String)]) -> serde_json::Value {
    let answer = call(emulator.addr(), "POST", path, Some(KEY), form, None)
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{path}: {}", answer.body);
    answer.body
}

/// A new customer on a monthly price of `unit_amount` cents: (customer id, subscription id).
async fn monthly_subscription(emulator: &Emulator, unit_amount: &str) -> (String, String) {
    let customer = post(emulator, "/v1/customers", &[]).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let price = post(
        emulator,
        "/v1/prices",
        &[
            ("currency", "usd".into()),
            ("unit_amount", unit_amount.into()),
            ("recurring[interval]", "month".into()),
        ],
    )
    .await;
    let subscription = post(
        emulator,
        "/v1/subscriptions",
        &[
            ("customer", customer.clone()),
            ("items[0][price]", price["id"].as_str().unwrap().to_owned()),
        ],
    )
    .await;
    (customer, subscription["id"].as_str().unwrap().to_owned())
}

async fn delivered(emulator: &Emulator, count: usize) {
    for _ in 0..200 {
        let events = emulator.events();
        if events.len() >= count && events.iter().all(|e| e.delivered) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("events not delivered: {:?}", emulator.events());
}

#[tokio::test]
async fn subscription_events_are_signed_and_decode_with_async_stripe() {
    let emulator = Emulator::start("127.0.0.1:0".parse().unwrap(), EmulatorConfig::default())
        .await
        .unwrap();
    let (url, received) = receiver(200).await;
    let endpoint = post(&emulator, "/v1/webhook_endpoints", &[("url", url)]).await;
    let secret = endpoint["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"));

    let customer = post(&emulator, "/v1/customers", &[("name", "acme".into())]).await;
    let customer = customer["id"].as_str().unwrap().to_owned();
    let price = |amount: &str, plan: &str| {
        vec![
            ("currency", "usd".to_owned()),
            ("unit_amount", amount.to_owned()),
            ("recurring[interval]", "month".to_owned()),
            ("metadata[tally_plan]", plan.to_owned()),
        ]
    };
    let free = post(&emulator, "/v1/prices", &price("0", "FREE")).await;
    let pro = post(&emulator, "/v1/prices", &price("4900", "PRO")).await;
    let subscription = post(
        &emulator,
        "/v1/subscriptions",
        &[
            ("customer", customer.clone()),
            ("items[0][price]", free["id"].as_str().unwrap().to_owned()),
        ],
    )
    .await;
    let id = subscription["id"].as_str().unwrap().to_owned();
    post(
        &emulator,
        &format!("/v1/subscriptions/{id}"),
        &[("items[0][price]", pro["id"].as_str().unwrap().to_owned())],
    )
    .await;
    let advanced = call(
        emulator.addr(),
        "POST",
        &format!("/_emulator/subscriptions/{id}/advance_period"),
        None,
        &[],
        None,
    )
    .await
    .unwrap();
    assert_eq!(advanced.status, 200);
    let deleted = call(
        emulator.addr(),
        "DELETE",
        &format!("/v1/subscriptions/{id}"),
        Some(KEY),
        &[],
        None,
    )
    .await
    .unwrap();
    assert_eq!(deleted.body["status"], "canceled");

    // created + 3 invoice events, updated, updated + 3 invoice events, deleted.
    delivered(&emulator, 10).await;
    let received = received.lock().unwrap().clone();
    assert_eq!(received.len(), 10);
    let mut types = Vec::new();
    for (signature, body) in &received {
        let event = Webhook::construct_event(body, signature, &secret)
            .unwrap_or_else(|e| panic!("{e}: {body}"));
        match &event.data.object {
            EventObject::CustomerSubscriptionCreated(s)
            | EventObject::CustomerSubscriptionUpdated(s)
            | EventObject::CustomerSubscriptionDeleted(s) => {
                assert_eq!(s.id.as_str(), id);
                assert_eq!(s.customer.id().as_str(), customer);
                assert_eq!(s.items.data.len(), 1);
            }
            EventObject::InvoiceCreated(i)
            | EventObject::InvoiceFinalized(i)
            | EventObject::InvoicePaid(i) => {
                assert_eq!(i.customer.as_ref().unwrap().id().as_str(), customer);
            }
            other => panic!("unexpected event object {other:?}"),
        }
        types.push(event.type_.as_str().to_owned());
        // A forged signature does not verify.
        assert!(Webhook::construct_event(body, signature, "whsec_wrong").is_err());
    }
    assert_eq!(
        types,
        [
            "customer.subscription.created",
            "invoice.created",
            "invoice.finalized",
            "invoice.paid",
            "customer.subscription.updated",
            "customer.subscription.updated",
            "invoice.created",
            "invoice.finalized",
            "invoice.paid",
            "customer.subscription.deleted",
        ]
    );
    emulator.shutdown().await;
}

#[tokio::test]
async fn failed_deliveries_are_retried_and_events_can_be_resent() {
    let emulator = Emulator::start("127.0.0.1:0".parse().unwrap(), EmulatorConfig::default())
        .await
        .unwrap();
    let (failing, failures) = receiver(500).await;
    post(&emulator, "/v1/webhook_endpoints", &[("url", failing)]).await;
    monthly_subscription(&emulator, "0").await;
    // The first event is retried with backoff while the endpoint keeps failing.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let first = &emulator.events()[0];
    assert!(first.attempts >= 2, "{first:?}");
    assert_eq!(first.last_status, 500);
    assert!(!first.delivered);
    assert!(failures.lock().unwrap().len() >= 2);

    let resent = call(
        emulator.addr(),
        "POST",
        "/_emulator/events/evt_nope/resend",
        None,
        &[],
        None,
    )
    .await
    .unwrap();
    assert_eq!(resent.status, 404);
    emulator.shutdown().await;
}

/// As from Stripe, each event goes out on its own: an endpoint that never answers holds back no
/// other endpoint, and an event an endpoint refuses is retried while later events reach it.
#[tokio::test]
async fn an_endpoint_that_hangs_or_refuses_holds_back_nothing() {
    let emulator = Emulator::start("127.0.0.1:0".parse().unwrap(), EmulatorConfig::default())
        .await
        .unwrap();
    // Takes connections and never answers.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_url = format!("http://{}/hook", hole.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = hole.accept().await {
            held.push(stream);
        }
    });
    post(&emulator, "/v1/webhook_endpoints", &[("url", hole_url)]).await;
    let (healthy_url, healthy) = receiver(200).await;
    post(&emulator, "/v1/webhook_endpoints", &[("url", healthy_url)]).await;
    // Refuses the first delivery it gets, takes every other.
    let (picky_url, picky) = receiver_answering(|n| if n == 0 { 500 } else { 200 }).await;
    post(&emulator, "/v1/webhook_endpoints", &[("url", picky_url)]).await;

    monthly_subscription(&emulator, "4900").await;
    let events: Vec<String> = emulator.events().into_iter().map(|e| e.id).collect();
    assert!(events.len() >= 3, "{events:?}");
    let ids = |received: &Arc<Mutex<Vec<(String, String)>>>| -> Vec<String> {
        received
            .lock()
            .unwrap()
            .iter()
            .map(|(_, body)| {
                serde_json::from_str::<serde_json::Value>(body).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    };
    // Well within the hanging endpoint's 10 s: everything reached the others.
    for _ in 0..120 {
        let picky_ids = ids(&picky);
        if ids(&healthy) == events && events.iter().all(|e| picky_ids[1..].contains(e)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(ids(&healthy), events, "in order to a healthy endpoint");
    let picky_ids = ids(&picky);
    assert_eq!(picky_ids[0], events[0], "refused first");
    let taken = &picky_ids[1..];
    assert!(
        events.iter().all(|e| taken.contains(e)),
        "{taken:?} {events:?}"
    );
    assert_ne!(
        taken[0], events[0],
        "a later event went out while the refused one waited for its retry: {taken:?}"
    );
    emulator.shutdown().await;
}

/// A declining card fails a renewal (`invoice.payment_failed`, the subscription past due, the
/// first invoice paid at purchase untouched); Stripe voids an open or uncollectible invoice and
/// marks only an open one uncollectible.
#[tokio::test]
async fn a_declining_card_fails_renewals_and_only_open_invoices_change() {
    use stripe_emulator::testing::control;
    let emulator = Emulator::start("127.0.0.1:0".parse().unwrap(), EmulatorConfig::default())
        .await
        .unwrap();
    let (customer, subscription) = monthly_subscription(&emulator, "4900").await;
    let ctl = |path: String, body: serde_json::Value| {
        let addr = emulator.addr();
        async move { control(addr, &path, &body).await.unwrap() }
    };
    let declines = ctl(
        format!("customers/{customer}/card"),
        serde_json::json!({ "declines": true }),
    )
    .await;
    assert_eq!(declines.status, 200, "{}", declines.body);
    let advanced = ctl(
        format!("subscriptions/{subscription}/advance_period"),
        serde_json::json!({}),
    )
    .await;
    assert_eq!(advanced.status, 200, "{}", advanced.body);
    assert_eq!(advanced.body["status"], "past_due");
    let types: Vec<String> = emulator
        .events()
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert!(
        types.iter().any(|t| t == "invoice.payment_failed"),
        "{types:?}"
    );
    let listed = call(
        emulator.addr(),
        "GET",
        &format!("/v1/invoices?subscription={subscription}"),
        Some(KEY),
        &[],
        None,
    )
    .await
    .unwrap();
    let invoices = listed.body["data"].as_array().unwrap().clone();
    assert_eq!(invoices.len(), 2, "{}", listed.body);
    let with = |status: &str| {
        invoices
            .iter()
            .find(|i| i["status"] == status)
            .unwrap_or_else(|| panic!("no {status} invoice: {invoices:?}"))["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (paid, open) = (with("paid"), with("open"));
    let change = |id: &str, to: &str| ctl(format!("invoices/{id}/{to}"), serde_json::json!({}));
    assert_eq!(
        change(&paid, "void").await.status,
        400,
        "a paid invoice stays paid"
    );
    assert_eq!(change(&open, "uncollectible").await.status, 200);
    assert_eq!(change(&open, "payment_failed").await.status, 400);
    assert_eq!(
        change(&open, "void").await.status,
        200,
        "uncollectible, then void"
    );
    assert_eq!(change(&open, "void").await.status, 400);
    emulator.shutdown().await;
}
