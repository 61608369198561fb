//! `tally credits` as an operator runs it: the built binary against a fresh database.
//!
//! A grant (as `$USER`), the same top-up again (one grant), the same key for another amount
//! (refused), usage burned as the burner in `tally aggregate` does, the balance in draw order,
//! the ledger as JSON and in pages, a void and a second void (refused); refusals exit 1 with
//! the stable code and the fix, and a missing or blank reason is refused before any database.

use std::process::{Output, Stdio};

use chrono::{DurationRound, TimeDelta, Utc};
use rust_decimal::Decimal;
use serde_json::Value;
use tally_credits::queue::CountedUsage;
use tally_credits::{RateCard, RateDefinition};
use tally_tests::{tally_command, BillingHarness};

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn decimal(value: &Value) -> Decimal {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{value} is not a decimal string"))
        .parse()
        .unwrap()
}

fn d(text: &str) -> Decimal {
    text.parse().unwrap()
}

/// Usage of `api_calls` committed this minute and burned, as `tally aggregate` would (0.5
/// credits a call).
fn burn(h: &BillingHarness, customer: &str, calls: i64) {
    h.sql(async {
        let rate = RateDefinition {
            meter: "api_calls".into(),
            credits_per_unit: d("0.5"),
            dimensions: Default::default(),
        };
        tally_credits::rates::record(&h.db.pool, &[rate])
            .await
            .unwrap();
        let usage = [CountedUsage {
            customer,
            meter: "api_calls",
            group_key: "",
            window_start: Utc::now().duration_trunc(TimeDelta::minutes(1)).unwrap(),
            quantity: Decimal::from(calls),
        }];
        let mut tx = h.db.pool.begin().await.unwrap();
        tally_credits::queue::enqueue(&mut tx, &usage)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let rates = RateCard::load(&h.db.pool).await.unwrap();
        let (report, _) = tally_credits::burn_once(&h.db.pool, &rates).await.unwrap();
        assert_eq!(report.entries, 1, "{report:?}");
    });
}

#[test]
fn credits_are_granted_once_burned_read_back_and_voided_once() {
    let h = BillingHarness::start("");
    let top_up = [
        "credits",
        "grant",
        "--customer",
        "acme",
        "--amount",
        "100",
        "--kind",
        "purchased",
        "--idempotency-key",
        "order-1",
        "--description",
        "order 1",
        "--reason",
        "paid invoice 1",
    ];
    let granted = h.cli_json(&top_up);
    let purchased = granted["grant_id"].as_i64().expect("a grant id");
    assert_eq!(granted["customer"], "acme");
    assert_eq!(granted["kind"], "purchased");
    assert_eq!(granted["priority"], 10);
    assert_eq!(decimal(&granted["amount"]), d("100"));
    assert_eq!(granted["granted_by"], "ops-tester", "$USER is the actor");
    assert_eq!(granted["reason"], "paid invoice 1");

    // The same top-up again: the first grant, nothing new.
    let again = h.cli_ok(&top_up);
    assert!(again.starts_with("exists"), "{again}");
    assert!(
        again.contains(&format!("grant {purchased} ")),
        "the first grant: {again}"
    );
    assert!(again.contains("key order-1; order 1"), "{again}");
    // The same key for another amount is refused, with the code and the fix.
    let mut other = top_up;
    other[5] = "50";
    let error = h.cli_exits(1, &other);
    assert!(error.contains("IDEMPOTENCY_CONFLICT:"), "{error}");
    assert!(error.contains("use a new key"), "{error}");

    // A promotional grant, drawn after the purchased one.
    let expires = (Utc::now() + TimeDelta::days(30)).to_rfc3339();
    let promo = h.cli_ok(&[
        "credits",
        "grant",
        "--customer",
        "acme",
        "--amount",
        "20",
        "--kind",
        "promotional",
        "--expires-at",
        &expires,
        "--idempotency-key",
        "promo-1",
        "--actor",
        "alice",
        "--reason",
        "launch promotion",
    ]);
    assert!(promo.starts_with("granted"), "{promo}");
    assert!(promo.contains("promotional"), "{promo}");
    assert!(promo.contains("20 left of 20"), "{promo}");

    // 10 calls at 0.5: 5 credits drawn from the purchased grant.
    burn(&h, "acme", 10);
    let balance = h.cli_json(&["credits", "balance", "--customer", "acme"]);
    assert_eq!(decimal(&balance["available"]), d("115"));
    assert_eq!(decimal(&balance["pending"]), Decimal::ZERO);
    assert_eq!(decimal(&balance["projected"]), d("115"));
    assert_eq!(balance["grants"][0]["grant_id"], purchased);
    assert_eq!(decimal(&balance["grants"][0]["remaining"]), d("95"));
    assert_eq!(balance["grants"][1]["kind"], "promotional");
    let text = h.cli_ok(&["credits", "balance", "--customer", "acme"]);
    let mut lines = text.lines();
    let first = lines.next().unwrap();
    assert!(first.starts_with("acme: 115"), "{text}");
    assert!(first.contains("available"), "{text}");
    assert!(lines.next().unwrap().contains("purchased"), "{text}");
    assert!(lines.next().unwrap().contains("promotional"), "{text}");

    // The ledger: two grants and the consume, as JSON; then in pages of two.
    let ledger = h.cli_json(&["credits", "ledger", "--customer", "acme"]);
    let entries = ledger["entries"].as_array().unwrap();
    let kinds: Vec<&str> = entries
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["grant", "grant", "consume"]);
    assert_eq!(
        (entries[0]["actor"].as_str(), entries[1]["actor"].as_str()),
        (Some("ops-tester"), Some("alice"))
    );
    assert_eq!(decimal(&entries[2]["amount"]), d("-5"));
    assert_eq!(decimal(&entries[2]["quantity"]), d("10"));
    assert_eq!(entries[2]["grant_id"], purchased);
    assert_eq!(ledger["next_after"], entries[2]["transaction_id"]);
    let page = h.cli_ok(&["credits", "ledger", "--customer", "acme", "--limit", "2"]);
    let next = page
        .lines()
        .last()
        .and_then(|line| line.strip_prefix("next: --after "))
        .unwrap_or_else(|| panic!("a full page says how to go on: {page}"))
        .to_owned();
    assert_eq!(page.lines().count(), 3, "{page}");
    let rest = h.cli_ok(&["credits", "ledger", "--customer", "acme", "--after", &next]);
    assert_eq!(rest.lines().count(), 1, "{rest}");
    assert!(rest.contains("10 api_calls in"), "{rest}");

    // Void the purchased grant: what is left (95) is voided; the 5 consumed stay consumed.
    let id = purchased.to_string();
    let voided = h.cli_ok(&[
        "credits",
        "void",
        "--customer",
        "acme",
        "--grant",
        &id,
        "--reason",
        "refund",
    ]);
    assert!(voided.starts_with("voided"), "{voided}");
    assert!(voided.contains("0 left of 100"), "{voided}");
    let error = h.cli_exits(
        1,
        &[
            "credits",
            "void",
            "--customer",
            "acme",
            "--grant",
            &id,
            "--reason",
            "again",
        ],
    );
    assert!(error.starts_with("error: GRANT_CLOSED:"), "{error}");
    let error = h.cli_exits(
        1,
        &[
            "credits",
            "void",
            "--customer",
            "acme",
            "--grant",
            "999999",
            "--reason",
            "r",
        ],
    );
    assert!(error.contains("NO_SUCH_GRANT:"), "{error}");
    assert!(error.contains("tally credits balance"), "the fix: {error}");
    let ledger = h.cli_json(&["credits", "ledger", "--customer", "acme"]);
    let last = ledger["entries"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(
        (
            last["kind"].as_str(),
            decimal(&last["amount"]),
            last["actor"].as_str(),
            last["reason"].as_str()
        ),
        (Some("void"), d("-95"), Some("ops-tester"), Some("refund"))
    );
    let balance = h.cli_json(&["credits", "balance", "--customer", "acme"]);
    assert_eq!(decimal(&balance["available"]), d("20"));
}

#[test]
fn refusals_name_their_code_and_the_fix() {
    let h = BillingHarness::start("");
    let grant = |extra: &[&'static str]| {
        let mut args = vec![
            "credits",
            "grant",
            "--customer",
            "acme",
            "--amount",
            "10",
            "--idempotency-key",
            "k",
        ];
        args.extend_from_slice(extra);
        args
    };
    // Only purchased credits may never expire: the library's rule, with its code.
    let error = h.cli_exits(1, &grant(&["--kind", "promotional", "--reason", "promo"]));
    assert!(error.starts_with("error: INVALID_GRANT:"), "{error}");
    assert!(error.contains("needs expires_at"), "{error}");
    // A blank reason is refused before any database is reached.
    let output = tally_command()
        .current_dir(h.work.dir.path())
        .arg("--config")
        .arg(h.work.config())
        .args(["--database-url", "postgres://nobody@127.0.0.1:1/nowhere"])
        .args(grant(&["--kind", "purchased", "--reason", "  "]))
        .stdin(Stdio::null())
        .output()
        .expect("tally runs");
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("REASON_REQUIRED:"),
        "{}",
        stderr(&output)
    );
    // A missing --reason and an amount written in exponent notation are usage errors (2).
    let error = h.cli_exits(2, &grant(&["--kind", "purchased"]));
    assert!(error.contains("--reason"), "{error}");
    let mut scientific = grant(&["--kind", "purchased", "--reason", "r"]);
    scientific[5] = "1e3";
    let error = h.cli_exits(2, &scientific);
    assert!(error.contains("e.g. 100 or 12.5"), "{error}");
    // Nothing was granted.
    let text = h.cli_ok(&["credits", "balance", "--customer", "acme"]);
    assert!(text.contains("no open grants"), "{text}");
    let text = h.cli_ok(&["credits", "ledger", "--customer", "acme"]);
    assert_eq!(text.trim(), "acme has no ledger entries");
}
