//! Customers as `tally customers sync` uses them: listed newest first in pages of up to 100
//! with `starting_after`, searched by metadata, created with metadata under an
//! `Idempotency-Key` that makes a retry return the first customer. async-stripe's own client
//! must decode every answer.

use std::collections::{HashMap, HashSet};

use stripe_core::customer::{CreateCustomer, ListCustomer, SearchCustomer};
use stripe_emulator::testing::{call, Answer};
use stripe_emulator::{Emulator, EmulatorConfig, Faults};

const KEY: &str = "sk_test_emulator";

async fn start() -> Emulator {
    let config = EmulatorConfig {
        test_rate_per_second: 10_000,
        ..EmulatorConfig::default()
    };
    Emulator::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .expect("emulator starts")
}

fn client(emulator: &Emulator) -> stripe::Client {
    stripe::ClientBuilder::new(KEY)
        .url(emulator.url())
        .build()
        .unwrap()
}

async fn create(emulator: &Emulator, tally_customer: &str) -> String {
    CreateCustomer::new()
        .name(tally_customer)
        .metadata(HashMap::from([(
            "tally_customer".to_owned(),
            tally_customer.to_owned(),
        )]))
        .send(&client(emulator))
        .await
        .unwrap()
        .id
        .to_string()
}

async fn post_customer(
    emulator: &Emulator,
    form: &[(&str, String)],
    idempotency_key: Option<&str>,
) -> Result<Answer, String> {
    call(
        emulator.addr(),
        "POST",
        "/v1/customers",
        Some(KEY),
        form,
        idempotency_key,
    )
    .await
}

#[tokio::test]
async fn lists_every_customer_newest_first_in_pages() {
    let emulator = start().await;
    let mut created = Vec::new();
    for i in 0..250 {
        created.push(create(&emulator, &format!("c{i:03}")).await);
    }
    let client = client(&emulator);
    let mut listed = Vec::new();
    let mut pages = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut request = ListCustomer::new().limit(100);
        if let Some(after) = &after {
            request = request.starting_after(after.as_str());
        }
        let page = request.send(&client).await.unwrap();
        pages.push((page.data.len(), page.has_more));
        for customer in &page.data {
            let claim = customer.metadata.as_ref().unwrap()["tally_customer"].clone();
            listed.push((customer.id.to_string(), claim));
        }
        match (page.has_more, page.data.last()) {
            (true, Some(last)) => after = Some(last.id.to_string()),
            _ => break,
        }
    }
    assert_eq!(pages, [(100, true), (100, true), (50, false)]);
    let newest_first: Vec<String> = created.iter().rev().cloned().collect();
    assert_eq!(
        listed.iter().map(|l| l.0.clone()).collect::<Vec<_>>(),
        newest_first
    );
    assert_eq!(listed[0].1, "c249");
    assert_eq!(listed[249].1, "c000");

    // Stripe's envelope, and its rules for limit and starting_after.
    let page = call(
        emulator.addr(),
        "GET",
        "/v1/customers?limit=2",
        Some(KEY),
        &[],
        None,
    )
    .await
    .unwrap();
    assert_eq!(page.body["object"], "list");
    assert_eq!(page.body["url"], "/v1/customers");
    let bad = call(
        emulator.addr(),
        "GET",
        "/v1/customers?limit=101",
        Some(KEY),
        &[],
        None,
    )
    .await
    .unwrap();
    assert_eq!(bad.status, 400);
    let bad = call(
        emulator.addr(),
        "GET",
        "/v1/customers?starting_after=cus_nobody",
        Some(KEY),
        &[],
        None,
    )
    .await
    .unwrap();
    assert_eq!(bad.status, 400);
}

#[tokio::test]
async fn searches_customers_by_metadata() {
    let emulator = start().await;
    let acme = create(&emulator, "acme").await;
    let beta = create(&emulator, "beta").await;
    let beta_again = create(&emulator, "beta").await;
    let client = client(&emulator);

    let found = SearchCustomer::new("metadata['tally_customer']:'acme'")
        .send(&client)
        .await
        .unwrap();
    assert_eq!(found.data.len(), 1);
    assert_eq!(found.data[0].id.as_str(), acme);
    assert!(!found.has_more);

    // Two claim beta: both found, newest first, a page at a time.
    let first = SearchCustomer::new("metadata[\"tally_customer\"]:\"beta\"")
        .limit(1)
        .send(&client)
        .await
        .unwrap();
    assert_eq!(first.data[0].id.as_str(), beta_again);
    assert!(first.has_more);
    let second = SearchCustomer::new("metadata[\"tally_customer\"]:\"beta\"")
        .limit(1)
        .page(first.next_page.clone().unwrap())
        .send(&client)
        .await
        .unwrap();
    assert_eq!(second.data[0].id.as_str(), beta);
    assert!(!second.has_more && second.next_page.is_none());

    let either = SearchCustomer::new("name:'acme' OR name:'nobody'")
        .send(&client)
        .await
        .unwrap();
    assert_eq!(either.data.len(), 1);
    let none = SearchCustomer::new("metadata['tally_customer']:'acme' AND name:'beta'")
        .send(&client)
        .await
        .unwrap();
    assert!(none.data.is_empty());

    for bad in [
        "metadata['tally_customer']~'ac'",
        "name:'a' AND name:'b' OR name:'c'",
        "phone:'1'",
        "name:acme",
    ] {
        let path = format!(
            "/v1/customers/search?{}",
            form_urlencoded::Serializer::new(String::new())
                .append_pair("query", bad)
                .finish()
        );
        let answer = call(emulator.addr(), "GET", &path, Some(KEY), &[], None)
            .await
            .unwrap();
        assert_eq!(answer.status, 400, "{bad}: {:?}", answer.body);
        assert_eq!(answer.body["error"]["param"], "query");
    }
}

#[tokio::test]
async fn an_idempotency_key_creates_one_customer() {
    let emulator = start().await;
    let form = [
        ("name", "acme".to_owned()),
        ("metadata[tally_customer]", "acme".to_owned()),
    ];
    let key = Some("tally-customer-create:acme");
    let first = post_customer(&emulator, &form, key).await.unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(first.body["metadata"]["tally_customer"], "acme");
    let again = post_customer(&emulator, &form, key).await.unwrap();
    assert_eq!(again.status, 200);
    assert_eq!(again.body["id"], first.body["id"]);
    assert_eq!(again.headers["idempotent-replayed"], "true");

    // The same key with other parameters is refused, and creates nothing.
    let other = [
        ("name", "acme".to_owned()),
        ("metadata[tally_customer]", "beta".to_owned()),
    ];
    let refused = post_customer(&emulator, &other, key).await.unwrap();
    assert_eq!(refused.status, 400);
    assert_eq!(refused.body["error"]["type"], "idempotency_error");
    assert_eq!(emulator.customers().len(), 1);
    assert_eq!(emulator.stats().customers_created, 1);
}

#[tokio::test]
async fn a_create_whose_answer_was_lost_is_replayed_to_the_retry() {
    let emulator = start().await;
    emulator
        .set_faults(Faults {
            drop_after_commit: 1.0,
            ..Faults::default()
        })
        .unwrap();
    let form = [("metadata[tally_customer]", "acme".to_owned())];
    let key = Some("tally-customer-create:acme");
    assert!(
        post_customer(&emulator, &form, key).await.is_err(),
        "the connection closes without an answer"
    );
    assert_eq!(emulator.customers().len(), 1, "the customer was committed");
    let retry = post_customer(&emulator, &form, key).await.unwrap();
    assert_eq!(retry.status, 200);
    assert_eq!(retry.headers["idempotent-replayed"], "true");
    assert_eq!(retry.body["id"], emulator.customers()[0]["id"]);
    assert_eq!(emulator.customers().len(), 1);
}

#[tokio::test]
async fn metadata_follows_stripes_limits() {
    let emulator = start().await;
    for (key, value) in [
        ("k".repeat(41), "v".to_owned()),
        ("a[b]".to_owned(), "v".to_owned()),
        ("k".to_owned(), "v".repeat(501)),
    ] {
        let param = format!("metadata[{key}]");
        let answer = post_customer(&emulator, &[(param.as_str(), value)], None)
            .await
            .unwrap();
        assert_eq!(answer.status, 400, "{key}: {:?}", answer.body);
    }
    let many: Vec<(String, String)> = (0..51)
        .map(|i| (format!("metadata[k{i}]"), "v".to_owned()))
        .collect();
    let form: Vec<(&str, String)> = many.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    assert_eq!(
        post_customer(&emulator, &form, None).await.unwrap().status,
        400
    );
    let ok = post_customer(&emulator, &[("metadata[k]", "v".repeat(500))], None)
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
    let ids: HashSet<String> = emulator
        .customers()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 1, "only the valid customer was created");
}
