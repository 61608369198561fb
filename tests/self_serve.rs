//! Self-serve billing with the built binary, as a team sets it up: `tally plans apply` (nothing
//! for sale yet), `tally plans sync --create` (the prices made in Stripe, checked and
//! recorded), `tally serve` as a process taking Stripe's signed webhooks. A customer buys a
//! credit pack and moves from the fallback plan to PRO through Checkout (paying on the
//! emulator's pages as a customer would), reads its invoices (API and `tally invoices`), is
//! refunded, and leaves through Stripe's billing portal.

use std::time::Duration;

use serde_json::json;
use stripe_emulator::testing::{call, control};
use tally_tests::*;

const ADMIN: &str = "self-serve-admin-token-0123456789";
const ACME: &str = "self-serve-acme-token-01234567890";

#[test]
fn a_customer_buys_credits_and_a_plan_through_checkout_and_leaves_through_the_portal() {
    let runtime = runtime();
    let (db, emulator) =
        runtime.block_on(async { (tally_db::testing::fresh_database().await, emulator().await) });
    let api_port = free_port();
    let address = format!("127.0.0.1:{api_port}");
    let endpoint = runtime
        .block_on(call(
            emulator.addr(),
            "POST",
            "/v1/webhook_endpoints",
            Some(STRIPE_KEY),
            &[("url", format!("http://{address}/v1/webhooks/stripe"))],
            None,
        ))
        .unwrap();
    let secret = endpoint.body["secret"].as_str().unwrap().to_owned();
    let kafka = tally_core::config::KafkaConfig {
        brokers: "127.0.0.1:9".into(),
        ..Default::default()
    };
    let work = Workdir::new(
        &kafka,
        &emulator.url(),
        &format!(
            "[serve]\nlisten = \"{address}\"\nstripe_webhook_secret = \"{secret}\"\n\
             checkout_return_origins = [\"https://app.example.com\"]\n\n\
             [[serve.tokens]]\nname = \"ops\"\nscope = \"admin\"\nsha256 = \"{}\"\n\n\
             [[serve.tokens]]\nname = \"acme\"\nscope = \"customer\"\ncustomer = \"acme\"\nsha256 = \"{}\"\n\n\
             [subscriptions]\nfallback_plan = \"FREE\"\n\n\
             [[credits.packs]]\nname = \"small\"\ncredits = \"1000\"\nprice = {{ amount = \"10.00\", currency = \"usd\" }}\n\n\
             [[plans]]\nname = \"FREE\"\n[plans.limits.api_calls]\nlimit = \"100\"\nperiod = \"day\"\n\n\
             [[plans]]\nname = \"PRO\"\nself_serve = true\nprice = {{ amount = \"49.00\", currency = \"usd\", interval = \"month\" }}\n\
             [plans.limits.api_calls]\nlimit = \"100000\"\nperiod = \"billing_period\"\nunit_price = \"0.002\"\n",
            tally_api::token_hash(ADMIN),
            tally_api::token_hash(ACME),
        ),
    );
    let tally = |args: &[&str]| {
        let (ok, out) = work.run(&db.url, args);
        assert!(ok, "tally {args:?}:\n{out}");
        out
    };
    tally(&["migrate"]);
    let applied = tally(&["plans", "apply"]);
    assert!(applied.contains("not for sale  plan \"PRO\""), "{applied}");
    // The Stripe meters first (a metered price bills one), then the prices.
    tally(&["sink", "--once", "--create-stripe-meters"]);
    let synced = tally(&["plans", "sync", "--create"]);
    for key in [
        "tally_plan_PRO",
        "tally_plan_PRO_api_calls",
        "tally_pack_small",
    ] {
        assert!(synced.contains(&format!("created price {key}")), "{synced}");
    }
    assert!(synced.contains("for sale  plan PRO: fee"), "{synced}");
    assert!(synced.contains("for sale  pack small"), "{synced}");
    let again = tally(&["plans", "sync", "--create"]);
    assert!(!again.contains("created price"), "idempotent:\n{again}");

    let stripe_customer = runtime
        .block_on(call(
            emulator.addr(),
            "POST",
            "/v1/customers",
            Some(STRIPE_KEY),
            &[("name", "acme".into())],
            None,
        ))
        .unwrap()
        .body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    tally(&["customers", "map", "acme", &stripe_customer]);
    tally(&[
        "subscriptions",
        "create",
        "acme",
        "FREE",
        "--reason",
        "signed up",
    ]);

    let _serve = work.spawn("serve", &db.url, &["serve"]);
    wait_until("tally serve listens", Duration::from_secs(30), || {
        std::net::TcpStream::connect(&address).is_ok()
    });
    let api = JsonApi { address };
    let urls = json!({ "success_url": "https://app.example.com/ok", "cancel_url": "https://app.example.com/back" });
    let with = |key: &str, value: &str| {
        let mut body = urls.clone();
        body[key] = json!(value);
        Some(body)
    };
    // Only the configured origins.
    let (status, answer) = api.call(
        "POST",
        "/v1/customers/acme/credits/checkout",
        ACME,
        Some(json!({ "pack": "small", "success_url": "https://evil.example.net/", "cancel_url": "https://app.example.com/" })),
    );
    assert_eq!(
        (status, answer["code"].as_str()),
        (400, Some("INVALID_RETURN_URL")),
        "{answer}"
    );

    // A credit pack, bought and paid by card.
    let (status, pack) = api.call(
        "POST",
        "/v1/customers/acme/credits/checkout",
        ACME,
        with("pack", "small"),
    );
    assert_eq!(status, 200, "{pack}");
    let pack_session = pack["id"].as_str().unwrap().to_owned();
    let paid = runtime
        .block_on(control(
            emulator.addr(),
            &format!("checkout/{pack_session}/complete"),
            &json!({}),
        ))
        .unwrap();
    assert_eq!(paid.status, 200, "{}", paid.body);
    let balance = || {
        let (status, credits) = api.call("GET", "/v1/customers/acme/credits", ACME, None);
        assert_eq!(status, 200, "{credits}");
        credits["available"].as_str().unwrap_or_default().to_owned()
    };
    wait_until("the pack is granted", Duration::from_secs(30), || {
        balance() == "1000"
    });

    // PRO through Checkout: the fallback plan ends when PRO starts.
    let (status, plan) = api.call(
        "POST",
        "/v1/customers/acme/checkout",
        ACME,
        with("plan", "PRO"),
    );
    assert_eq!(status, 200, "{plan}");
    let plan_session = plan["id"].as_str().unwrap().to_owned();
    let paid_plan = runtime
        .block_on(control(
            emulator.addr(),
            &format!("checkout/{plan_session}/complete"),
            &json!({}),
        ))
        .unwrap();
    assert_eq!(paid_plan.status, 200, "{}", paid_plan.body);
    let plan_now = || {
        let (_, entitlements) = api.call("GET", "/v1/customers/acme/entitlements", ACME, None);
        entitlements["plan"].as_str().unwrap_or_default().to_owned()
    };
    wait_until("the customer is on PRO", Duration::from_secs(30), || {
        plan_now() == "PRO"
    });

    // Invoices, by API and by CLI, with links that answer.
    wait_until("the invoices arrive", Duration::from_secs(30), || {
        let (_, page) = api.call("GET", "/v1/customers/acme/invoices", ACME, None);
        page["data"]
            .as_array()
            .is_some_and(|d| d.len() == 1 && d[0]["status"] == "paid")
    });
    let listed = tally(&["invoices", "list", "--customer", "acme"]);
    assert!(
        listed.contains("paid") && listed.contains("4900 usd"),
        "{listed}"
    );
    let (_, page) = api.call("GET", "/v1/customers/acme/invoices", ACME, None);
    let invoice = page["data"][0]["id"].as_str().unwrap().to_owned();
    let shown = tally(&["invoices", "show", &invoice]);
    let pdf = shown
        .lines()
        .find_map(|l| l.trim().strip_prefix("pdf "))
        .unwrap_or_else(|| panic!("{shown}"))
        .trim()
        .to_owned();
    let path = &pdf[pdf.find("/_emulator/").unwrap()..];
    let answer = runtime
        .block_on(call(emulator.addr(), "GET", path, None, &[], None))
        .unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.headers["content-type"], "application/pdf");

    // The pack refunded in Stripe: what is left of it is voided.
    let intent = paid.body["payment_intent"].as_str().unwrap().to_owned();
    runtime
        .block_on(call(
            emulator.addr(),
            "POST",
            "/v1/refunds",
            Some(STRIPE_KEY),
            &[("payment_intent", intent)],
            None,
        ))
        .unwrap();
    wait_until("the refund voids the pack", Duration::from_secs(30), || {
        balance() == "0"
    });

    // The customer leaves through Stripe's portal, now: back on the fallback plan.
    let (status, portal) = api.call(
        "POST",
        "/v1/customers/acme/billing-portal",
        ACME,
        Some(json!({ "return_url": "https://app.example.com/account" })),
    );
    assert_eq!(status, 200, "{portal}");
    let portal_id = portal["url"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    let canceled = runtime
        .block_on(control(
            emulator.addr(),
            &format!("portal/{portal_id}/cancel"),
            &json!({ "at_period_end": false }),
        ))
        .unwrap();
    assert_eq!(canceled.status, 200, "{}", canceled.body);
    wait_until(
        "the canceled customer is back on the fallback plan",
        Duration::from_secs(60),
        || plan_now() == "FREE",
    );
    let outcomes: Vec<(String, String)> = runtime
        .block_on(
            sqlx::query_as("SELECT type, outcome FROM stripe_webhook_events WHERE outcome <> 'applied' AND outcome <> 'ignored'")
                .fetch_all(&db.pool),
        )
        .unwrap();
    assert!(
        outcomes.is_empty(),
        "every event applied: {outcomes:?}\n{}",
        work.log("serve")
    );
}
