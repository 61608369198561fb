//! Self-serve billing with the built binary, as a team sets it up: `tally plans apply` (nothing
//! for sale yet), `tally plans sync --create` (the prices made in Stripe, checked and
//! recorded), `tally serve` as a process taking Stripe's signed webhooks. A customer buys a
//! credit pack and uses some of it, moves from the fallback plan to PRO through Checkout
//! (paying on the emulator's pages as a customer would), reads its invoices (API, `tally
//! invoices`, the finance view), is refunded, and leaves through Stripe's billing portal.
//!
//! The same customer's story again with every webhook held back, then delivered last first,
//! twice, with Stripe's retries of what tally refused: the same state.

use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::{json, Value};
use stripe_emulator::testing::{call, control};
use stripe_emulator::Emulator;
use tally_tests::*;

const ADMIN: &str = "self-serve-admin-token-0123456789";
const ACME: &str = "self-serve-acme-token-01234567890";
/// The webhook secret when the test delivers Stripe's events itself.
const HELD_BACK_SECRET: &str = "whsec_self_serve_held_back_0123456789";

/// tally as a team runs it for self-serve billing, over its own database and emulator.
struct SelfServe {
    runtime: tokio::runtime::Runtime,
    db: tally_db::testing::TestDatabase,
    emulator: Emulator,
    work: Workdir,
    api: JsonApi,
    secret: String,
    stripe_customer: String,
    _serve: KillOnDrop,
}

impl SelfServe {
    /// Plans applied and synced to Stripe, `acme` mapped and on the fallback plan FREE, `tally
    /// serve` listening. With `deliver`, the emulator sends its events to tally as Stripe
    /// would; without, they wait for the test.
    fn start(deliver: bool) -> SelfServe {
        let runtime = runtime();
        let (db, emulator) = runtime
            .block_on(async { (tally_db::testing::fresh_database().await, emulator().await) });
        let address = format!("127.0.0.1:{}", free_port());
        let secret = if deliver {
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
            endpoint.body["secret"].as_str().unwrap().to_owned()
        } else {
            HELD_BACK_SECRET.to_owned()
        };
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
                 [[credits.rates]]\nmeter = \"api_calls\"\ncredits_per_unit = \"1\"\n\n\
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
        let serve = work.spawn("serve", &db.url, &["serve"]);
        wait_until("tally serve listens", Duration::from_secs(30), || {
            std::net::TcpStream::connect(&address).is_ok()
        });
        SelfServe {
            runtime,
            db,
            emulator,
            work,
            api: JsonApi { address },
            secret,
            stripe_customer,
            _serve: serve,
        }
    }

    fn tally(&self, args: &[&str]) -> String {
        let (ok, out) = self.work.run(&self.db.url, args);
        assert!(ok, "tally {args:?}:\n{out}");
        out
    }

    /// The emulator's test controls (what a paying customer or a Stripe operator does).
    fn control(&self, path: &str, body: Value) -> Value {
        let answer = self
            .runtime
            .block_on(control(self.emulator.addr(), path, &body))
            .unwrap();
        assert_eq!(answer.status, 200, "{path}: {}", answer.body);
        answer.body
    }

    /// A call to Stripe's API (the emulator), as the team's dashboard would make it.
    fn stripe(&self, method: &str, path: &str, form: &[(&str, String)]) -> Value {
        let answer = self
            .runtime
            .block_on(call(
                self.emulator.addr(),
                method,
                path,
                Some(STRIPE_KEY),
                form,
                None,
            ))
            .unwrap();
        assert_eq!(answer.status, 200, "{path}: {}", answer.body);
        answer.body
    }

    fn checkout(&self, path: &str, what: (&str, &str)) -> String {
        let mut body = json!({ "success_url": "https://app.example.com/ok", "cancel_url": "https://app.example.com/back" });
        body[what.0] = json!(what.1);
        let (status, opened) = self.api.call("POST", path, ACME, Some(body));
        assert_eq!(status, 200, "{opened}");
        opened["id"].as_str().unwrap().to_owned()
    }

    fn balance(&self) -> String {
        let (status, credits) = self
            .api
            .call("GET", "/v1/customers/acme/credits", ACME, None);
        assert_eq!(status, 200, "{credits}");
        credits["available"].as_str().unwrap_or_default().to_owned()
    }

    fn plan(&self) -> String {
        let (_, entitlements) = self
            .api
            .call("GET", "/v1/customers/acme/entitlements", ACME, None);
        entitlements["plan"].as_str().unwrap_or_default().to_owned()
    }

    /// Stripe's invoices of the subscription, oldest first.
    fn stripe_invoices(&self, subscription: &str) -> Vec<String> {
        let listed = self.stripe(
            "GET",
            &format!("/v1/invoices?subscription={subscription}&limit=100"),
            &[],
        );
        let mut invoices: Vec<(i64, String)> = listed["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["period_start"].as_i64().unwrap(),
                    i["id"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        invoices.sort();
        invoices.into_iter().map(|(_, id)| id).collect()
    }

    /// What the customer, the team and finance see once every event is in.
    fn state(&self) -> State {
        let (checkouts, invoices, subscriptions) = self.runtime.block_on(async {
            let checkouts =
                sqlx::query_as("SELECT mode, status FROM checkout_sessions ORDER BY created_at")
                    .fetch_all(&self.db.pool)
                    .await
                    .unwrap();
            let invoices = sqlx::query_as(
                "SELECT status, amount_due, amount_paid FROM finance_invoices
                 WHERE customer_id = 'acme' ORDER BY period_start, invoice_id",
            )
            .fetch_all(&self.db.pool)
            .await
            .unwrap();
            let subscriptions = sqlx::query_as(
                "SELECT plan, source, status FROM subscriptions
                 WHERE customer_id = 'acme' AND source = 'stripe' ORDER BY started_at",
            )
            .fetch_all(&self.db.pool)
            .await
            .unwrap();
            (checkouts, invoices, subscriptions)
        });
        State {
            plan: self.plan(),
            balance: self.balance(),
            checkouts,
            invoices,
            subscriptions,
        }
    }

    /// Every webhook tally has not answered 2xx, as Stripe would deliver it (signed).
    fn deliver(&self, event: &stripe_emulator::EventRecord) -> u16 {
        let signature = stripe_emulator::signature_header(
            &self.secret,
            chrono::Utc::now().timestamp(),
            &event.body,
        );
        let (status, _) = http(
            &self.api.address,
            "POST",
            "/v1/webhooks/stripe",
            &[
                ("Stripe-Signature", signature.as_str()),
                ("Content-Type", "application/json"),
            ],
            &event.body,
        )
        .unwrap();
        status
    }
}

#[derive(Debug, PartialEq)]
struct State {
    plan: String,
    balance: String,
    /// (mode, status) of each Checkout Session, in the order opened.
    checkouts: Vec<(String, String)>,
    /// (status, amount due, amount paid) of each invoice, by period.
    invoices: Vec<(String, i64, i64)>,
    /// (plan, source, status) of the Stripe subscriptions.
    subscriptions: Vec<(String, String, String)>,
}

/// Where both stories end: back on FREE, the pack refunded, PRO canceled, three invoices (the
/// first paid, the second voided after its payment failed, the third uncollectible).
fn final_state() -> State {
    let text = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    };
    State {
        plan: "FREE".into(),
        balance: "0".into(),
        checkouts: text(&[("payment", "refunded"), ("subscription", "complete")]),
        invoices: vec![
            ("paid".into(), 4900, 4900),
            ("void".into(), 4900, 0),
            ("uncollectible".into(), 4900, 0),
        ],
        subscriptions: vec![("PRO".into(), "stripe".into(), "canceled".into())],
    }
}

/// The customer's story, the same whether tally hears of it at once or later: buys the pack,
/// moves to PRO, is billed three periods (the second's payment fails and the team voids it; the
/// third is marked uncollectible), is refunded the pack, leaves through the portal. `between`
/// runs after each step (the live story checks what tally shows by then).
fn story(tally: &SelfServe, between: &mut dyn FnMut(Step, &SelfServe)) {
    let pack_session = tally.checkout("/v1/customers/acme/credits/checkout", ("pack", "small"));
    let paid = tally.control(&format!("checkout/{pack_session}/complete"), json!({}));
    let intent = paid["payment_intent"].as_str().unwrap().to_owned();
    between(Step::PackPaid, tally);

    let plan_session = tally.checkout("/v1/customers/acme/checkout", ("plan", "PRO"));
    let paid_plan = tally.control(&format!("checkout/{plan_session}/complete"), json!({}));
    let subscription = paid_plan["subscription"].as_str().unwrap().to_owned();
    between(Step::PlanPaid, tally);

    // The card declines from the second period: its invoices' payments fail.
    tally.control(
        &format!("customers/{}/card", tally.stripe_customer),
        json!({ "declines": true }),
    );
    for _ in 0..2 {
        tally.control(
            &format!("subscriptions/{subscription}/advance_period"),
            json!({}),
        );
    }
    let invoices = tally.stripe_invoices(&subscription);
    assert_eq!(invoices.len(), 3, "{invoices:?}");
    // Stripe retries the second (it fails again); the team voids it.
    tally.control(
        &format!("invoices/{}/payment_failed", invoices[1]),
        json!({}),
    );
    tally.control(&format!("invoices/{}/void", invoices[1]), json!({}));
    tally.control(
        &format!("invoices/{}/uncollectible", invoices[2]),
        json!({}),
    );
    between(Step::Invoiced, tally);

    tally.stripe("POST", "/v1/refunds", &[("payment_intent", intent)]);
    between(Step::Refunded, tally);

    let (status, portal) = tally.api.call(
        "POST",
        "/v1/customers/acme/billing-portal",
        ACME,
        Some(json!({ "return_url": "https://app.example.com/account" })),
    );
    assert_eq!(status, 200, "{portal}");
    let portal_id = portal["url"].as_str().unwrap().rsplit('/').next().unwrap();
    tally.control(
        &format!("portal/{portal_id}/cancel"),
        json!({ "at_period_end": false }),
    );
    between(Step::Left, tally);
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Step {
    PackPaid,
    PlanPaid,
    Invoiced,
    Refunded,
    Left,
}

#[test]
fn a_customer_buys_credits_and_a_plan_through_checkout_and_leaves_through_the_portal() {
    let tally = SelfServe::start(true);
    // Only the configured origins.
    let (status, answer) = tally.api.call(
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

    story(&tally, &mut |step, tally| match step {
        Step::PackPaid => {
            wait_until("the pack is granted", Duration::from_secs(30), || {
                tally.balance() == "1000"
            });
            // 300 of the credits used: usage the aggregator queued, burned as `tally aggregate`
            // burns it.
            tally.runtime.block_on(async {
                sqlx::query(
                    "INSERT INTO credit_usage_queue (customer_id, meter, group_key, window_start, quantity)
                     VALUES ('acme', 'api_calls', '', date_trunc('minute', now()), 300)",
                )
                .execute(&tally.db.pool)
                .await
                .unwrap();
                let rates = tally_credits::RateCard::load(&tally.db.pool).await.unwrap();
                tally_credits::burn_once(&tally.db.pool, &rates).await.unwrap();
            });
            assert_eq!(tally.balance(), "700");
        }
        Step::PlanPaid => {
            // The fallback plan ends when PRO starts.
            wait_until("the customer is on PRO", Duration::from_secs(30), || {
                tally.plan() == "PRO"
            });
            // Invoices, by API and by CLI, with links that answer.
            wait_until("the invoice arrives", Duration::from_secs(30), || {
                let (_, page) = tally
                    .api
                    .call("GET", "/v1/customers/acme/invoices", ACME, None);
                page["data"]
                    .as_array()
                    .is_some_and(|d| d.len() == 1 && d[0]["status"] == "paid")
            });
            let listed = tally.tally(&["invoices", "list", "--customer", "acme"]);
            assert!(
                listed.contains("paid") && listed.contains("4900 usd"),
                "{listed}"
            );
            let (_, page) = tally
                .api
                .call("GET", "/v1/customers/acme/invoices", ACME, None);
            let invoice = page["data"][0]["id"].as_str().unwrap().to_owned();
            let shown = tally.tally(&["invoices", "show", &invoice]);
            let pdf = shown
                .lines()
                .find_map(|l| l.trim().strip_prefix("pdf "))
                .unwrap_or_else(|| panic!("{shown}"))
                .trim()
                .to_owned();
            let path = &pdf[pdf.find("/_emulator/").unwrap()..];
            let answer = tally
                .runtime
                .block_on(call(tally.emulator.addr(), "GET", path, None, &[], None))
                .unwrap();
            assert_eq!(answer.status, 200);
            assert_eq!(answer.headers["content-type"], "application/pdf");
        }
        Step::Invoiced => {
            wait_until(
                "the failed, voided and uncollectible invoices are kept",
                Duration::from_secs(30),
                || {
                    let statuses: Vec<String> = tally
                        .state()
                        .invoices
                        .into_iter()
                        .map(|(status, _, _)| status)
                        .collect();
                    statuses == ["paid", "void", "uncollectible"]
                },
            );
            let shown = tally.tally(&["invoices", "list", "--customer", "acme"]);
            assert!(
                shown.contains("void") && shown.contains("uncollectible"),
                "{shown}"
            );
        }
        Step::Refunded => {
            // What is left of the pack is voided; what was used stays used.
            wait_until("the refund voids the pack", Duration::from_secs(30), || {
                tally.balance() == "0"
            });
            let (consumed, voided): (Decimal, Decimal) = tally
                .runtime
                .block_on(
                    sqlx::query_as(
                        "SELECT -sum(amount) FILTER (WHERE kind = 'consume'),
                                -sum(amount) FILTER (WHERE kind = 'void')
                         FROM credit_transactions WHERE customer_id = 'acme'",
                    )
                    .fetch_one(&tally.db.pool),
                )
                .unwrap();
            assert_eq!((consumed, voided), (Decimal::from(300), Decimal::from(700)));
        }
        Step::Left => {
            wait_until(
                "the canceled customer is back on the fallback plan",
                Duration::from_secs(60),
                || tally.plan() == "FREE",
            );
        }
    });
    wait_until("every event delivered", Duration::from_secs(30), || {
        tally.emulator.events().iter().all(|e| e.delivered)
    });
    assert_eq!(tally.state(), final_state());
    let outcomes: Vec<(String, String)> = tally
        .runtime
        .block_on(
            sqlx::query_as("SELECT type, outcome FROM stripe_webhook_events WHERE outcome <> 'applied' AND outcome <> 'ignored'")
                .fetch_all(&tally.db.pool),
        )
        .unwrap();
    assert!(
        outcomes.is_empty(),
        "every event applied: {outcomes:?}\n{}",
        tally.work.log("serve")
    );
}

/// Stripe does not deliver in order and delivers more than once. The same story with every
/// event held back, then delivered last first, twice; what tally refuses is retried after each
/// pass, as Stripe retries. The same state as when tally heard it live.
#[test]
fn the_same_webhooks_twice_and_in_reverse_order_give_the_same_state() {
    let tally = SelfServe::start(false);
    story(&tally, &mut |_, _| {});
    let events = tally.emulator.events();
    assert!(events.len() >= 15, "{}", events.len());
    for _ in 0..2 {
        let mut refused: Vec<&stripe_emulator::EventRecord> = events
            .iter()
            .rev()
            .filter(|event| !(200..300).contains(&tally.deliver(event)))
            .collect();
        for _retry in 0..3 {
            refused.retain(|event| !(200..300).contains(&tally.deliver(event)));
        }
        assert!(
            refused.is_empty(),
            "refused after Stripe's retries: {:?}\n{}",
            refused.iter().map(|e| &e.event_type).collect::<Vec<_>>(),
            tally.work.log("serve")
        );
    }
    assert_eq!(tally.state(), final_state());
}

/// What Checkout sells agrees with tally.toml: `plans apply` refuses a plan whose fee or unit
/// price Stripe's price does not match, changing nothing; without a Stripe key (a CI job, an
/// outage) it keeps the prices of what did not change, so Stripe's webhooks still name the plan.
#[test]
fn plans_apply_refuses_prices_that_disagree_and_keeps_what_did_not_change() {
    let tally = SelfServe::start(false);
    let recorded = || -> Vec<(String, Option<String>, Option<String>)> {
        tally
            .runtime
            .block_on(
                sqlx::query_as("SELECT price_id, plan, pack FROM stripe_prices ORDER BY price_id")
                    .fetch_all(&tally.db.pool),
            )
            .unwrap()
    };
    let plan_definition = || -> Value {
        tally
            .runtime
            .block_on(
                sqlx::query_scalar("SELECT definition FROM plans WHERE name = 'PRO'")
                    .fetch_one(&tally.db.pool),
            )
            .unwrap()
    };
    let before = recorded();
    assert_eq!(before.len(), 3, "{before:?}");
    let written = std::fs::read_to_string(tally.work.config()).unwrap();
    let rewrite = |from: &str, to: &str| {
        assert!(written.contains(from), "{from}");
        std::fs::write(tally.work.config(), written.replace(from, to)).unwrap();
    };
    let definition = plan_definition();
    for (from, to, names) in [
        ("amount = \"49.00\"", "amount = \"59.00\"", "[plans.price]"),
        (
            "currency = \"usd\", interval",
            "currency = \"eur\", interval",
            "[plans.price]",
        ),
        (
            "interval = \"month\"",
            "interval = \"year\"",
            "[plans.price]",
        ),
        (
            "unit_price = \"0.002\"",
            "unit_price = \"0.003\"",
            "unit_price",
        ),
    ] {
        rewrite(from, to);
        let (ok, out) = tally.work.run(&tally.db.url, &["plans", "apply"]);
        assert!(!ok, "{to}: {out}");
        assert!(
            out.contains(names)
                && out.contains("make them agree")
                && out.contains("nothing was changed"),
            "{to}: {out}"
        );
        assert_eq!(recorded(), before, "{to}");
        assert_eq!(plan_definition(), definition, "{to}");
    }

    // No key: the unchanged plans and packs keep their prices.
    std::fs::write(tally.work.config(), &written).unwrap();
    let no_key = [("STRIPE_SECRET_KEY", "")];
    let (ok, out) = tally
        .work
        .run_with(&tally.db.url, &["plans", "apply"], &no_key);
    assert!(ok, "{out}");
    assert!(out.contains("Stripe prices not checked"), "{out}");
    assert_eq!(recorded(), before);
    // A plan changed without a key: its prices are forgotten until a sync checks them; the
    // pack's stay.
    rewrite("limit = \"100000\"", "limit = \"200000\"");
    let (ok, out) = tally
        .work
        .run_with(&tally.db.url, &["plans", "apply"], &no_key);
    assert!(ok, "{out}");
    let kept: Vec<Option<String>> = recorded().into_iter().map(|(_, _, pack)| pack).collect();
    assert_eq!(kept, [Some("small".to_owned())]);
    let synced = tally.tally(&["plans", "sync"]);
    assert!(synced.contains("for sale  plan PRO: fee"), "{synced}");
    assert_eq!(recorded().len(), 3);
}
