//! One truth for meters in any start order (issue 11): the `tally` binary started the way a
//! systemd boot starts it, `tally migrate` first, then the sink and the server, before any
//! aggregator ever ran. Every command records tally.toml's meters; the sink checks Stripe
//! against them before it sends anything; the server knows them. Stripe's asynchronous
//! reports of meter events nobody bills reach tally through the webhook and `tally reconcile`.

use std::time::Duration;

use base64::Engine as _;
use tally_tests::*;

const TOKEN: &str = "start-order-admin-token-0123456789";

fn basic_auth() -> String {
    let credentials = base64::engine::general_purpose::STANDARD.encode(format!("{STRIPE_KEY}:"));
    format!("Basic {credentials}")
}

#[test]
fn meters_are_one_truth_whatever_starts_first() {
    let runtime = runtime();
    let broker = Broker::start();
    let db = runtime.block_on(tally_db::testing::fresh_database());
    let emulator = runtime.block_on(emulator());
    let serve_port = free_port();
    let serve_address = format!("127.0.0.1:{serve_port}");
    let emulator_address = emulator.addr().to_string();
    // The emulator takes HTTP Basic auth, as Stripe's own examples (`curl -u sk_…:`) use.
    let (status, body) = http(
        &emulator_address,
        "GET",
        "/v1/billing/meters",
        &[("Authorization", &basic_auth())],
        "",
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    // A webhook endpoint pointed at `tally serve`, as set up in the Stripe dashboard.
    let form = format!("url=http%3A%2F%2F{serve_address}%2Fv1%2Fwebhooks%2Fstripe");
    let (status, body) = http(
        &emulator_address,
        "POST",
        "/v1/webhook_endpoints",
        &[
            ("Authorization", &basic_auth()),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        &form,
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let secret: serde_json::Value = serde_json::from_str(&body).unwrap();
    let secret = secret["secret"].as_str().unwrap().to_owned();
    let work = Workdir::new(
        &broker.kafka,
        &emulator.url(),
        &format!(
            "[serve]\nlisten = \"{serve_address}\"\nstripe_webhook_secret = \"{secret}\"\n\n\
             [[serve.tokens]]\nname = \"admin\"\nscope = \"admin\"\nsha256 = \"{}\"\n",
            tally_api::token_hash(TOKEN)
        ),
    );

    // Before: the meters table was written only by `tally aggregate`, so right after
    // `tally migrate` a sink daemon found nothing to check and sent events Stripe would never
    // bill. Now it refuses to start while Stripe lacks a meter tally bills under...
    let (ok, output) = work.run(&db.url, &["migrate"]);
    assert!(ok && output.contains("3 meter(s) recorded"), "{output}");
    let (ok, output) = work.run(&db.url, &["sink", "--once"]);
    assert!(
        !ok && output.contains("Stripe has no meter for event name(s)"),
        "{output}"
    );
    for name in ["api_calls", "llm_tokens", "storage_gb"] {
        assert!(output.contains(name), "{output}");
    }
    // ...and `--create-stripe-meters` creates every one of them.
    let (ok, output) = work.run(&db.url, &["sink", "--create-stripe-meters", "--once"]);
    assert!(ok, "{output}");
    for name in ["api_calls", "llm_tokens", "storage_gb"] {
        assert!(
            output.contains(&format!("created Stripe meter \"{name}\"")),
            "{output}"
        );
    }

    // Before: `tally serve` read the meters once, at start, from a table only the aggregator
    // wrote, and answered UNKNOWN_METER for a configured meter. Now it knows it.
    let mut serve = work.spawn("serve", &db.url, &["serve"]);
    wait_until("tally serve answers", Duration::from_secs(30), || {
        http(&serve_address, "GET", "/healthz", &[], "").is_ok_and(|(s, _)| s == 200)
    });
    let bearer = format!("Bearer {TOKEN}");
    let check = |meter: &str| {
        http(
            &serve_address,
            "POST",
            "/v1/quota/check",
            &[
                ("Authorization", &bearer),
                ("Content-Type", "application/json"),
            ],
            &format!(r#"{{"customer":"acme","meter":"{meter}","quantity":1}}"#),
        )
        .unwrap()
    };
    let (status, body) = check("api_calls");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("NO_ACTIVE_SUBSCRIPTION"), "{body}");
    let (status, body) = check("not_a_meter");
    assert!(status == 400 && body.contains("UNKNOWN_METER"), "{body}");

    // Stripe accepts a meter event for an event name no meter takes and reports it later
    // (v1.billing.meter.no_meter_found, to the webhook endpoint); `tally reconcile` shows it.
    let now = chrono::Utc::now().timestamp();
    let (status, body) = http(
        &emulator_address,
        "POST",
        "/v1/billing/meter_events",
        &[("Authorization", &basic_auth()), ("Content-Type", "application/x-www-form-urlencoded")],
        &format!("event_name=ghost_meter&identifier=ghost-1&payload%5Bstripe_customer_id%5D=cus_1&payload%5Bvalue%5D=3&timestamp={now}"),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let pool = db.pool.clone();
    wait_until("the report reaches tally", Duration::from_secs(30), || {
        runtime
            .block_on(
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM stripe_meter_error_reports")
                    .fetch_one(&pool),
            )
            .unwrap()
            == 1
    });
    let (from, to) = reconcile_range();
    let (ok, output) = work.run(&db.url, &["reconcile", "--from", &from, "--to", &to]);
    assert!(!ok, "a report makes reconcile fail: {output}");
    assert!(
        output.contains("v1.billing.meter.no_meter_found")
            && output.contains("ghost_meter")
            && output.contains("ghost-1")
            && output.contains("no_meter"),
        "{output}"
    );
    assert!(alive(&mut serve), "{}", work.log("serve"));
    kill(&mut serve);
}
