//! Subscriptions without Stripe, tried as the README tells a newcomer: `tally plans apply`, an
//! admin token, `tally serve`, a subscription through the API, then an allowed and a denied
//! check; no Stripe account, no SQL. Then the scheduler inside `tally serve` ends a trial that
//! has no payment method and moves the customer to the fallback plan.

use std::time::Duration;

use serde_json::{json, Value};
use tally_tests::*;

#[test]
fn from_plans_apply_to_an_allowed_and_a_denied_check_and_a_trial_the_scheduler_ends() {
    let address = format!("127.0.0.1:{}", free_port());
    let harness = BillingHarness::start(&format!(
        r#"[serve]
listen = "{address}"

[subscriptions]
schedule_every = "1s"
fallback_plan = "FREE"

[[plans]]
name = "FREE"
[plans.limits.api_calls]
limit = 3
period = "day"

[[plans]]
name = "PRO"
requires_payment_method = true
price = {{ amount = "49.00", currency = "usd", interval = "month" }}
[plans.limits.api_calls]
limit = 1000
period = "day"
"#
    ));
    let (ok, output) = harness.tally(&["migrate"]);
    assert!(ok, "{output}");
    let (ok, output) = harness.tally(&["plans", "apply"]);
    assert!(ok && output.contains("created   FREE"), "{output}");
    let config = harness.work.config();
    let (ok, token) = harness.tally(&[
        "tokens",
        "create",
        "--scope",
        "admin",
        "--append-to",
        config.to_str().unwrap(),
    ]);
    assert!(ok, "{token}");
    let bearer = format!("Bearer {}", token.trim());
    let mut serve = harness.work.spawn("serve", &harness.db.url, &["serve"]);
    wait_until("tally serve answers", Duration::from_secs(30), || {
        http(&address, "GET", "/healthz", &[], "").is_ok_and(|(status, _)| status == 200)
    });
    let call = |method: &str, path: &str, body: Value| -> (u16, Value) {
        let (status, text) = http(
            &address,
            method,
            path,
            &[
                ("Authorization", &bearer),
                ("Content-Type", "application/json"),
            ],
            &if body.is_null() {
                String::new()
            } else {
                body.to_string()
            },
        )
        .unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    };

    let (status, created) = call(
        "POST",
        "/v1/subscriptions",
        json!({ "customer": "acme", "plan": "FREE", "reason": "signed up" }),
    );
    assert_eq!(status, 201, "{created}");
    let check = |quantity: u32| {
        call(
            "POST",
            "/v1/quota/check",
            json!({ "customer": "acme", "meter": "api_calls", "quantity": quantity }),
        )
    };
    let (status, allowed) = check(3);
    assert_eq!(
        (status, allowed["decision"].as_str()),
        (200, Some("allow")),
        "{allowed}"
    );
    let (status, denied) = check(1);
    assert_eq!(
        (status, denied["code"].as_str()),
        (429, Some("LIMIT_EXCEEDED")),
        "{denied}"
    );

    // A trial on a plan that requires a payment method, none on record: when it ends, the
    // scheduler in `tally serve` cancels it and puts the customer on FREE.
    let trial_end = (chrono::Utc::now() + chrono::TimeDelta::seconds(3)).to_rfc3339();
    let (status, trial) = call(
        "POST",
        "/v1/subscriptions",
        json!({ "customer": "beta", "plan": "PRO", "trial_end": trial_end, "reason": "trial" }),
    );
    assert_eq!(
        (status, trial["status"].as_str()),
        (201, Some("trialing")),
        "{trial}"
    );
    wait_until(
        "the trial ends and beta is on FREE",
        Duration::from_secs(30),
        || {
            let (_, beta) = call("GET", "/v1/customers/beta", Value::Null);
            beta["subscription"]["plan"] == "FREE" && beta["subscription"]["source"] == "fallback"
        },
    );
    let (_, history) = call("GET", "/v1/customers/beta/subscriptions", Value::Null);
    let ended = &history["subscriptions"][1];
    assert_eq!(
        (ended["plan"].as_str(), ended["status"].as_str()),
        (Some("PRO"), Some("canceled")),
        "{history}"
    );
    assert!(alive(&mut serve.0), "{}", harness.work.log("serve"));
}

/// `tally serve` and `tally emit` from one directory with the default settings each have a
/// spool of their own; a `tally serve` that cannot listen stops before it makes one.
#[test]
fn serve_and_emit_run_side_by_side_and_a_server_that_cannot_listen_leaves_no_spool() {
    let broker = Broker::start();
    let runtime = runtime();
    let db = runtime.block_on(tally_db::testing::fresh_database());
    let serve_config = |address: &str| {
        format!(
            "[serve]\nlisten = \"{address}\"\n\n[[serve.tokens]]\nname = \"ingest\"\nscope = \"ingest\"\nsha256 = \"{}\"\n",
            tally_api::token_hash("tally_newcomer_token")
        )
    };

    // Its address taken: a clear error, and no spool directory left behind.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_address = taken.local_addr().unwrap().to_string();
    let refused = Workdir::new(
        &broker.kafka,
        "http://127.0.0.1:9/",
        &serve_config(&taken_address),
    );
    let (ok, output) = refused.run(&db.url, &["serve"]);
    assert!(!ok && output.contains("cannot listen on"), "{output}");
    assert!(
        !refused.dir.path().join("tally-spool").exists(),
        "a server that never listened left a spool: {output}"
    );

    let address = format!("127.0.0.1:{}", free_port());
    let work = Workdir::new(
        &broker.kafka,
        "http://127.0.0.1:9/",
        &serve_config(&address),
    );
    let (ok, output) = work.run(&db.url, &["migrate"]);
    assert!(ok, "{output}");
    let _serve = work.spawn("serve", &db.url, &["serve"]);
    wait_until("tally serve answers", Duration::from_secs(30), || {
        http(&address, "GET", "/healthz", &[], "").is_ok_and(|(status, _)| status == 200)
    });
    let (ok, output) = work.run(
        &db.url,
        &[
            "emit",
            "--customer",
            "acme",
            "--meter",
            "api_calls",
            "--quantity",
            "3",
        ],
    );
    assert!(ok && output.contains("published"), "{output}");
    assert!(work.dir.path().join("tally-emit-spool").is_dir());
}
