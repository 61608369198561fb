//! `tally subscriptions` as an operator runs it: the built binary against a fresh database.
//!
//! A subscription's life through the CLI (create → list → change at period end → cancel at
//! period end → reactivate → cancel now, landing on `[subscriptions] fallback_plan`), each
//! change audited with the actor and the reason; refusals exit 1 with the stable code and the
//! fix; a missing `--reason` is a usage error (exit 2); `--json` parses; trials, fixed terms,
//! the payment method, the customers page and its cursor, and a cancellation without a fallback.

use std::process::Output;

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::Value;
use tally_tests::BillingHarness;

/// The plans of these tests, and what the test asks of `[subscriptions]`.
fn plans(subscriptions: &str) -> String {
    format!(
        r#"
[[plans]]
name = "FREE"

[[plans]]
name = "PRO"
price = {{ amount = "49.00", currency = "usd", interval = "month" }}
requires_payment_method = true
[plans.limits.api_calls]
limit = 10000
period = "day"

[[plans]]
name = "ENTERPRISE"
price = {{ amount = "12000.00", currency = "usd", interval = "year" }}

[subscriptions]
{subscriptions}
"#
    )
}

/// A harness whose plans are applied.
fn start(subscriptions: &str) -> BillingHarness {
    let h = BillingHarness::start(&plans(subscriptions));
    let out = h.cli(&["plans", "apply"]);
    assert!(out.status.success(), "{}", stderr(&out));
    h
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The customer's subscription audit trail: (action, actor, reason), oldest first.
fn audit(h: &BillingHarness, customer: &str) -> Vec<(String, String, String)> {
    h.sql(
        sqlx::query_as(
            "SELECT action, actor, coalesce(reason, '') FROM entitlement_audit
             WHERE entity = 'subscription' AND entity_key = $1 ORDER BY audit_id",
        )
        .bind(customer)
        .fetch_all(&h.db.pool),
    )
    .unwrap()
}

/// (plan, status, source, pending_plan, cancel_at_period_end) of a subscription.
fn row(h: &BillingHarness, id: i64) -> (String, String, String, Option<String>, bool) {
    h.sql(
        sqlx::query_as(
            "SELECT plan, status, source, pending_plan, cancel_at_period_end
             FROM subscriptions WHERE subscription_id = $1",
        )
        .bind(id)
        .fetch_one(&h.db.pool),
    )
    .unwrap()
}

fn triple(action: &str, actor: &str, reason: &str) -> (String, String, String) {
    (action.to_owned(), actor.to_owned(), reason.to_owned())
}

#[test]
fn a_subscription_lives_through_the_cli_audited_and_lands_on_the_fallback() {
    let h = start(r#"fallback_plan = "FREE""#);

    // Create (as the default actor, $USER), with --json for the id.
    let created = h.cli_json(&[
        "subscriptions",
        "create",
        "acme",
        "PRO",
        "--payment-method",
        "--reason",
        "signed the order form",
    ]);
    let id = created["id"].as_i64().expect("an id");
    assert_eq!(created["customer"], "acme");
    assert_eq!(created["plan"], "PRO");
    assert_eq!(created["status"], "active");
    assert_eq!(created["billing_interval"], "month");
    assert_eq!(created["payment_method"], true);
    let id_text = id.to_string();
    let id_arg = id_text.as_str();

    // List: the customer's subscriptions with their history, as text and as JSON.
    let listed = h.cli_ok(&["subscriptions", "list", "--customer", "acme"]);
    let first = listed.lines().next().unwrap();
    assert!(first.contains(&format!("{id}  acme")), "{listed}");
    assert!(
        first.contains("PRO") && first.contains("active"),
        "{listed}"
    );
    assert!(first.contains("month "), "{listed}");
    assert!(listed.contains("→ now"), "the current span: {listed}");
    let history = h.cli_json(&["subscriptions", "list", "--customer", "acme"]);
    assert_eq!(history["customer"], "acme");
    assert_eq!(history["subscriptions"][0]["id"], id);
    assert_eq!(
        history["subscriptions"][0]["history"][0]["status"],
        "active"
    );
    assert!(history["subscriptions"][0]["history"][0]["to"].is_null());

    // Change at period end: scheduled, the plan stays until then.
    let out = h.cli_ok(&[
        "subscriptions",
        "change",
        id_arg,
        "ENTERPRISE",
        "--at",
        "period-end",
        "--actor",
        "alice",
        "--reason",
        "upgrade from the next period",
    ]);
    assert!(out.starts_with("scheduled"), "{out}");
    assert!(out.contains("→ ENTERPRISE at period end"), "{out}");
    assert_eq!(row(&h, id).0, "PRO");
    assert_eq!(row(&h, id).3.as_deref(), Some("ENTERPRISE"));

    // Cancel (at period end by default), then reactivate.
    let out = h.cli_ok(&[
        "subscriptions",
        "cancel",
        id_arg,
        "--actor",
        "bob",
        "--reason",
        "customer asked to leave",
    ]);
    assert!(out.starts_with("scheduled"), "{out}");
    assert!(out.contains("cancels at period end"), "{out}");
    assert_eq!(
        row(&h, id).1,
        "active",
        "still active until the period ends"
    );
    assert!(row(&h, id).4);
    // Asked again: nothing to do, nothing audited.
    let again = h.cli_ok(&["subscriptions", "cancel", id_arg, "--reason", "again"]);
    assert!(again.starts_with("unchanged"), "{again}");
    let out = h.cli_ok(&[
        "subscriptions",
        "reactivate",
        id_arg,
        "--actor",
        "bob",
        "--reason",
        "customer stays",
    ]);
    assert!(out.starts_with("reactivated"), "{out}");
    assert!(!out.contains("cancels at period end"), "{out}");
    assert!(!row(&h, id).4);

    // Cancel now: the subscription ends and the customer lands on the fallback plan.
    let out = h.cli_ok(&[
        "subscriptions",
        "cancel",
        id_arg,
        "--at",
        "now",
        "--actor",
        "carol",
        "--reason",
        "chargeback",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("canceled"), "{out}");
    assert!(lines[0].contains("canceled  ended "), "{out}");
    assert!(lines[1].starts_with("fallback"), "{out}");
    assert!(
        lines[1].contains("FREE") && lines[1].contains("(fallback plan)"),
        "{out}"
    );
    assert_eq!(row(&h, id).1, "canceled");
    let fallback: (i64, String, String, String) = h
        .sql(
            sqlx::query_as(
                "SELECT subscription_id, plan, status, source FROM subscriptions
                 WHERE customer_id = 'acme' AND status IN ('active', 'trialing')",
            )
            .fetch_one(&h.db.pool),
        )
        .unwrap();
    assert_eq!(
        (&fallback.1[..], &fallback.2[..], &fallback.3[..]),
        ("FREE", "active", "fallback")
    );
    let shown = h.cli_ok(&["subscriptions", "get", &fallback.0.to_string()]);
    assert!(
        shown.contains("FREE") && shown.contains("fallback plan"),
        "{shown}"
    );

    // Every change is audited with its actor and reason.
    assert_eq!(
        audit(&h, "acme"),
        [
            triple("create", "ops-tester", "signed the order form"),
            triple("schedule_change", "alice", "upgrade from the next period"),
            triple("schedule_cancel", "bob", "customer asked to leave"),
            triple("reactivate", "bob", "customer stays"),
            triple("cancel", "carol", "chargeback"),
            triple(
                "create",
                "carol",
                "fallback plan after a cancellation: chargeback"
            ),
        ]
    );

    // A change to the ended subscription is refused: exit 1, the code, the cause and the fix.
    let error = h.cli_exits(
        1,
        &["subscriptions", "change", id_arg, "PRO", "--reason", "oops"],
    );
    assert!(
        error.contains(&format!(
            "error: SUBSCRIPTION_ENDED: subscription {id} has ended (canceled); create a new subscription instead"
        )),
        "{error}"
    );
    assert_eq!(audit(&h, "acme").len(), 6, "a refusal writes nothing");

    // The ended subscription's history: active on PRO, then canceled.
    let history = h.cli_json(&["subscriptions", "list", "--customer", "acme"]);
    let ended = &history["subscriptions"][1];
    assert_eq!(ended["id"], id);
    let spans: Vec<(&str, &str)> = ended["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["plan"].as_str().unwrap(), s["status"].as_str().unwrap()))
        .collect();
    assert_eq!(spans, [("PRO", "active"), ("PRO", "canceled")]);

    // A new subscription replaces the fallback.
    let out = h.cli_ok(&[
        "subscriptions",
        "create",
        "acme",
        "PRO",
        "--reason",
        "back again",
    ]);
    assert!(out.starts_with("created"), "{out}");
    assert_eq!(row(&h, fallback.0).1, "canceled");
    assert_eq!(
        audit(&h, "acme")[6..],
        [
            triple(
                "replace",
                "ops-tester",
                "replaced by a subscription to PRO: back again"
            ),
            triple("create", "ops-tester", "back again"),
        ]
    );
}

#[test]
fn usage_errors_refusals_trials_terms_and_pages() {
    let h = start("");

    // --reason is required on every change: a usage error (exit 2), before any database.
    for args in [
        &["subscriptions", "create", "acme", "PRO"][..],
        &["subscriptions", "change", "1", "PRO"],
        &["subscriptions", "cancel", "1"],
        &["subscriptions", "reactivate", "1"],
        &[
            "subscriptions",
            "payment-method",
            "1",
            "--on-record",
            "true",
        ],
    ] {
        let output = h.cli(args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(stderr(&output).contains("--reason"), "{}", stderr(&output));
    }
    // The help says when a running `tally serve` sees a change made here.
    let help = h.cli_ok(&["subscriptions", "--help"]);
    assert!(help.contains("serve.refresh"), "{help}");
    // A blank reason is refused by the library's rule, with its code.
    let error = h.cli_exits(
        1,
        &["subscriptions", "create", "acme", "PRO", "--reason", "  "],
    );
    assert!(
        error.contains("error: REASON_REQUIRED: a reason is required"),
        "{error}"
    );
    let output = h.cli(&[
        "subscriptions",
        "change",
        "1",
        "PRO",
        "--at",
        "tomorrow",
        "--reason",
        "x",
    ]);
    assert_eq!(output.status.code(), Some(2));
    let output = h.cli(&[
        "subscriptions",
        "create",
        "acme",
        "PRO",
        "--start",
        "yesterday",
        "--reason",
        "x",
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("RFC 3339"), "{}", stderr(&output));

    // Refusals name the code and the fix.
    let error = h.cli_exits(
        1,
        &["subscriptions", "create", "acme", "GOLD", "--reason", "x"],
    );
    assert!(
        error.contains("error: UNKNOWN_PLAN: no plan \"GOLD\"; run `tally plans apply`"),
        "{error}"
    );
    let error = h.cli_exits(1, &["subscriptions", "get", "999999"]);
    assert!(
        error.contains("error: NO_SUCH_SUBSCRIPTION: no subscription 999999")
            && error.contains("tally subscriptions list --customer ID"),
        "{error}"
    );

    // A trial of 14 days, with a payment method recorded afterwards.
    let trial = h.cli_json(&[
        "subscriptions",
        "create",
        "beta",
        "PRO",
        "--trial-days",
        "14",
        "--reason",
        "trial",
    ]);
    assert_eq!(trial["status"], "trialing");
    assert_eq!(trial["payment_method"], false);
    let trial_end: DateTime<Utc> = trial["trial_end"].as_str().unwrap().parse().unwrap();
    let expected = Utc::now() + TimeDelta::days(14);
    assert!(
        (trial_end - expected).abs() < TimeDelta::minutes(1),
        "{trial_end}"
    );
    let trial_id = trial["id"].as_i64().unwrap().to_string();
    let text = h.cli_ok(&["subscriptions", "get", &trial_id]);
    assert!(
        text.contains("trialing  trial ") && text.contains(", then monthly"),
        "{text}"
    );
    let out = h.cli_ok(&[
        "subscriptions",
        "payment-method",
        &trial_id,
        "--on-record",
        "true",
        "--reason",
        "card on file",
    ]);
    assert!(
        out.starts_with("updated") && out.contains("payment method on record"),
        "{out}"
    );
    let again = h.cli_json(&[
        "subscriptions",
        "payment-method",
        &trial_id,
        "--on-record",
        "true",
        "--reason",
        "card on file",
    ]);
    assert_eq!(again["payment_method"], true);
    // A second live subscription for the same customer is refused.
    let error = h.cli_exits(
        1,
        &[
            "subscriptions",
            "create",
            "beta",
            "ENTERPRISE",
            "--reason",
            "x",
        ],
    );
    assert!(
        error.contains("error: SECOND_LIVE_SUBSCRIPTION:"),
        "{error}"
    );

    // A fixed term has no next period: a change at period end is refused, one now is not.
    let until = (Utc::now() + TimeDelta::days(90)).to_rfc3339();
    let term = h.cli_json(&[
        "subscriptions",
        "create",
        "gamma",
        "ENTERPRISE",
        "--until",
        &until,
        "--reason",
        "pilot",
    ]);
    assert_eq!(term["billing_interval"], "fixed");
    let term_id = term["id"].as_i64().unwrap().to_string();
    let error = h.cli_exits(
        1,
        &[
            "subscriptions",
            "change",
            &term_id,
            "PRO",
            "--at",
            "period-end",
            "--reason",
            "x",
        ],
    );
    assert!(error.contains("error: NO_NEXT_PERIOD:"), "{error}");
    let out = h.cli_ok(&[
        "subscriptions",
        "change",
        &term_id,
        "PRO",
        "--reason",
        "downgrade",
    ]);
    assert!(out.starts_with("changed") && out.contains("PRO"), "{out}");
    let out = h.cli_ok(&[
        "subscriptions",
        "change",
        &term_id,
        "PRO",
        "--reason",
        "downgrade",
    ]);
    assert!(out.starts_with("unchanged"), "{out}");
    // Nothing to reactivate.
    let error = h.cli_exits(
        1,
        &["subscriptions", "reactivate", &term_id, "--reason", "x"],
    );
    assert!(error.contains("error: NOTHING_TO_REACTIVATE:"), "{error}");

    // Cancel now without a fallback plan: the customer is left without a subscription.
    let out = h.cli_ok(&[
        "subscriptions",
        "cancel",
        &term_id,
        "--at",
        "now",
        "--reason",
        "pilot over",
    ]);
    assert!(
        out.contains("gamma has no subscription now") && out.contains("fallback_plan is not set"),
        "{out}"
    );

    // The customers page: one per page, then the cursor.
    let page = h.cli_ok(&["subscriptions", "list", "--limit", "1"]);
    assert!(page.starts_with("beta "), "{page}");
    assert!(page.ends_with("next: beta\n"), "{page}");
    let page = h.cli_json(&["subscriptions", "list", "--limit", "1", "--after", "beta"]);
    assert_eq!(page["customers"][0]["customer"], "gamma");
    assert_eq!(page["customers"][0]["status"], "canceled");
    assert_eq!(page["next"], "gamma");
    let page = h.cli_json(&["subscriptions", "list", "--limit", "1", "--after", "gamma"]);
    assert_eq!(page["customers"], Value::Array(vec![]));
    assert!(page["next"].is_null());
    let filtered = h.cli_ok(&["subscriptions", "list", "--status", "trialing"]);
    assert_eq!(filtered.lines().count(), 1, "{filtered}");
    assert!(filtered.starts_with("beta "), "{filtered}");
    let filtered = h.cli_ok(&["subscriptions", "list", "--plan", "FREE"]);
    assert_eq!(filtered, "no customers with a subscription match\n");
    let output = h.cli(&["subscriptions", "list", "--status", "live"]);
    assert_eq!(output.status.code(), Some(2));
    let output = h.cli(&[
        "subscriptions",
        "list",
        "--customer",
        "beta",
        "--plan",
        "PRO",
    ]);
    assert_eq!(
        output.status.code(),
        Some(2),
        "--customer lists one customer, unfiltered"
    );
}
