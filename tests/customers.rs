//! `tally customers import` and `tally customers sync` as operators run them: the built
//! binary as separate processes against a fresh database and the Stripe emulator.
//!
//! Import: added / changed / unchanged, idempotent, all or nothing, 10,000 rows in one
//! statement, `-` for stdin. Sync: matches by metadata over several pages of Stripe's list,
//! refuses ambiguous claims, writes nothing on a dry run, and `--create` creates each Stripe
//! customer exactly once: with every answer lost after Stripe committed, with two syncs at
//! once, and with a sync killed part-way and run again. Finally, usage that waited for a
//! mapping is billed by the next `tally sink --once`.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use stripe_emulator::Faults;
use tally_tests::*;

/// The billing harness, with the import and sync helpers below.
struct Harness(BillingHarness);

impl std::ops::Deref for Harness {
    type Target = BillingHarness;
    fn deref(&self) -> &BillingHarness {
        &self.0
    }
}

impl Harness {
    fn start(extra_toml: &str) -> Harness {
        Harness(BillingHarness::start(extra_toml))
    }

    /// `tally customers import FILE` with `csv` as the file.
    fn import(&self, csv: &str) -> (bool, String) {
        let path = self.work.dir.path().join("customers.csv");
        std::fs::write(&path, csv).unwrap();
        self.tally(&["customers", "import", path.to_str().unwrap()])
    }

    /// Every mapping: customer → (Stripe customer, mapped_at).
    fn mappings(&self) -> BTreeMap<String, (String, DateTime<Utc>)> {
        self.sql(
            sqlx::query_as::<_, (String, String, DateTime<Utc>)>(
                "SELECT customer_id, stripe_customer_id, mapped_at FROM stripe_customers",
            )
            .fetch_all(&self.db.pool),
        )
        .unwrap()
        .into_iter()
        .map(|(customer, stripe, at)| (customer, (stripe, at)))
        .collect()
    }

    fn stripe_ids(&self) -> BTreeMap<String, String> {
        self.mappings()
            .into_iter()
            .map(|(customer, (stripe, _))| (customer, stripe))
            .collect()
    }

    /// Customers whose usage waits for a mapping (what the sink leaves unbilled).
    fn waiting(&self) -> Vec<String> {
        self.sql(
            sqlx::query_scalar(
                "SELECT DISTINCT customer_id FROM stripe_unmapped_usage ORDER BY customer_id",
            )
            .fetch_all(&self.db.pool),
        )
        .unwrap()
    }

    /// `value` api_calls for `customer` in the minute an hour ago, as the aggregator writes it.
    fn usage(&self, customer: &str, value: i64) {
        self.sql(plant_usage(
            &self.db.pool,
            customer,
            "api_calls",
            minute_ago(TimeDelta::hours(1)),
            value,
        ));
    }

    /// Usage for each of `customers` in one statement (for many customers).
    fn usage_for(&self, customers: &[String]) {
        self.sql(
            sqlx::query(
                "INSERT INTO usage_slot_changes (customer_id, meter, slot_start)
                 SELECT c, 'api_calls', date_trunc('hour', now()) - interval '1 hour' FROM unnest($1::text[]) c",
            )
            .bind(customers)
            .execute(&self.db.pool),
        )
        .unwrap();
    }

    /// An active subscription (and no usage) for `customer`.
    fn subscription(&self, customer: &str) {
        self.sql(async {
            sqlx::query(
                "INSERT INTO plans (name, definition) VALUES ('PRO', '{}') ON CONFLICT DO NOTHING",
            )
            .execute(&self.db.pool)
            .await
            .unwrap();
            tally_billing::testing::subscribe(&self.db.pool, customer, "PRO", Utc::now()).await;
        });
    }

    /// A Stripe customer, with `metadata[tally_customer]` when given; its id.
    fn stripe_customer(&self, tally_customer: Option<&str>) -> String {
        let body = match tally_customer {
            Some(id) => format!("name={id}&metadata%5Btally_customer%5D={id}"),
            None => "name=someone".to_owned(),
        };
        let bearer = format!("Bearer {STRIPE_KEY}");
        let (status, answer) = http(
            &self.emulator.addr().to_string(),
            "POST",
            "/v1/customers",
            &[
                ("Authorization", &bearer),
                ("Content-Type", "application/x-www-form-urlencoded"),
            ],
            &body,
        )
        .unwrap();
        assert_eq!(status, 200, "{answer}");
        let customer: serde_json::Value = serde_json::from_str(&answer).unwrap();
        customer["id"].as_str().unwrap().to_owned()
    }

    /// Stripe customer id → the tally customer its metadata names, for every Stripe customer.
    fn stripe_claims(&self) -> Vec<(String, Option<String>)> {
        self.emulator
            .customers()
            .iter()
            .map(|c| {
                (
                    c["id"].as_str().unwrap().to_owned(),
                    c["metadata"]["tally_customer"].as_str().map(str::to_owned),
                )
            })
            .collect()
    }
}

/// Every tally customer in `customers` is mapped to the one Stripe customer whose metadata
/// names it, and Stripe holds exactly one customer per tally customer.
fn assert_created_once(h: &Harness, customers: &[String]) {
    let claims = h.stripe_claims();
    assert_eq!(
        claims.len(),
        customers.len(),
        "one Stripe customer each: {claims:?}"
    );
    let mapped = h.stripe_ids();
    for customer in customers {
        let claimed: Vec<&String> = claims
            .iter()
            .filter(|(_, claim)| claim.as_deref() == Some(customer.as_str()))
            .map(|(id, _)| id)
            .collect();
        assert_eq!(claimed.len(), 1, "{customer}: {claimed:?}");
        assert_eq!(mapped.get(customer), Some(claimed[0]), "{customer}");
    }
    assert!(h.waiting().is_empty(), "{:?}", h.waiting());
}

fn summary_line(output: &str) -> &str {
    output
        .lines()
        .find(|l| l.contains(" added, ") || l.contains(" matched, "))
        .unwrap_or_else(|| panic!("no summary in:\n{output}"))
}

#[test]
fn import_reports_added_changed_unchanged_and_again_changes_nothing() {
    let h = Harness::start("");
    let (ok, out) = h.tally(&["customers", "map", "old", "cus_old1"]);
    assert!(ok, "{out}");
    let (ok, out) = h.tally(&["customers", "map", "same", "cus_same"]);
    assert!(ok, "{out}");
    h.usage("acme", 5);
    assert_eq!(h.waiting(), ["acme"]);
    let before = h.mappings();

    let csv = "customer,stripe_customer_id\r\n\
               acme,cus_acme\r\n\
               old,cus_old2\r\n\
               same,cus_same\r\n\
               \"comma,customer\",cus_comma\r\n\
               acme,cus_acme\r\n";
    let (ok, out) = h.import(csv);
    assert!(ok, "{out}");
    assert!(
        summary_line(&out).contains("2 added, 1 changed, 1 unchanged"),
        "{out}"
    );
    assert!(out.contains("changed  old: cus_old1 → cus_old2"), "{out}");
    let after = h.mappings();
    assert_eq!(after["acme"].0, "cus_acme");
    assert_eq!(after["old"].0, "cus_old2");
    assert_eq!(after["comma,customer"].0, "cus_comma");
    assert_eq!(
        after["same"], before["same"],
        "an unchanged row is not written"
    );
    assert!(h.waiting().is_empty(), "acme's usage no longer waits");

    // The same file again: nothing changes, not even mapped_at.
    let (ok, out) = h.import(csv);
    assert!(ok, "{out}");
    assert!(
        summary_line(&out).contains("0 added, 0 changed, 4 unchanged"),
        "{out}"
    );
    assert_eq!(h.mappings(), after);

    // `-` reads standard input.
    let mut child = tally_command()
        .args(["--config", h.work.config().to_str().unwrap()])
        .args(["--database-url", &h.db.url])
        .args(["customers", "import", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"customer,stripe_customer_id\nacme,cus_acme\nnew,cus_new\n")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        out.contains("standard input: 1 added, 0 changed, 1 unchanged"),
        "{out}"
    );
    assert_eq!(h.stripe_ids()["new"], "cus_new");
}

#[test]
fn a_bad_line_refuses_the_whole_file_and_writes_nothing() {
    let h = Harness::start("");
    let (ok, out) = h.tally(&["customers", "map", "old", "cus_old1"]);
    assert!(ok, "{out}");
    let before = h.mappings();

    let csv = "customer,stripe_customer_id\n\
               acme,cus_acme\n\
               old,cus_old2\n\
               beta,acct_123\n\
               tab\tin,cus_tab\n\
               acme,cus_other\n\
               gamma,cus_gamma\n";
    let (ok, out) = h.import(csv);
    assert!(!ok, "{out}");
    assert!(
        out.contains("line 4: \"acct_123\" is not a Stripe customer id; they start with cus_"),
        "{out}"
    );
    assert!(
        out.contains("line 5: customer \"tab\\u{9}in\" is not an id events can carry"),
        "{out}"
    );
    assert!(
        out.contains(
            "line 6: customer \"acme\" is mapped to cus_other here and to cus_acme on line 2"
        ),
        "{out}"
    );
    assert!(out.contains("3 problem(s), nothing imported"), "{out}");
    assert_eq!(
        h.mappings(),
        before,
        "nothing written, not even the good lines"
    );

    // No header: refused with the header to add.
    let (ok, out) = h.import("acme,cus_acme\n");
    assert!(!ok, "{out}");
    assert!(
        out.contains("line 1: no header: the first line must be `customer,stripe_customer_id`"),
        "{out}"
    );
    // A customer id longer than events may carry.
    let long = "x".repeat(257);
    let (ok, out) = h.import(&format!("customer,stripe_customer_id\n{long},cus_long\n"));
    assert!(!ok, "{out}");
    assert!(
        out.contains("line 2: customer") && out.contains("1 to 256 characters"),
        "{out}"
    );
    assert_eq!(h.mappings(), before);
}

#[test]
fn ten_thousand_rows_import_in_one_transaction() {
    let h = Harness::start("");
    // 2,000 mapped already: 1,000 as the file has them, 1,000 to another Stripe customer.
    let premapped: Vec<(String, String)> = (0..2_000)
        .map(|i| {
            let stripe = if i < 1_000 {
                format!("cus_{i:05}")
            } else {
                format!("cus_x{i:05}")
            };
            (format!("customer-{i:05}"), stripe)
        })
        .collect();
    h.sql(tally_sink::store::map_customers(&h.db.pool, &premapped))
        .unwrap();
    let customers: Vec<String> = (0..10_000).map(|i| format!("customer-{i:05}")).collect();
    h.usage_for(&customers);
    let mut csv = String::from("customer,stripe_customer_id\n");
    for i in 0..10_000 {
        csv.push_str(&format!("customer-{i:05},cus_{i:05}\n"));
    }
    let started = Instant::now();
    let (ok, out) = h.import(&csv);
    let elapsed = started.elapsed();
    assert!(ok, "{out}");
    let summary = summary_line(&out);
    assert!(
        summary
            .contains("8000 added, 1000 changed, 1000 unchanged (10000 mappings; one transaction"),
        "{summary}"
    );
    eprintln!("10,000-row import: {summary}; the process took {elapsed:?}");
    assert_eq!(h.stripe_ids().len(), 10_000);
    assert_eq!(h.stripe_ids()["customer-01500"], "cus_01500");
    assert!(h.waiting().is_empty());
    assert!(elapsed < Duration::from_secs(30), "{elapsed:?}");

    let started = Instant::now();
    let (ok, out) = h.import(&csv);
    assert!(ok, "{out}");
    assert!(
        summary_line(&out).contains("0 added, 0 changed, 10000 unchanged"),
        "{out}"
    );
    eprintln!(
        "10,000-row re-import: {}; the process took {:?}",
        summary_line(&out),
        started.elapsed()
    );
}

#[test]
fn sync_matches_by_metadata_over_pages_refuses_ambiguous_and_dry_runs() {
    let h = Harness::start("");
    // 230 Stripe customers naming c000..c229, interleaved with 20 that name nobody and one
    // naming a customer tally does not know: three pages of 100.
    let mut named = BTreeMap::new();
    for i in 0..230 {
        if i % 12 == 0 {
            h.stripe_customer(None);
        }
        let customer = format!("c{i:03}");
        named.insert(customer.clone(), h.stripe_customer(Some(&customer)));
    }
    h.stripe_customer(Some("stranger"));
    let amb = [
        h.stripe_customer(Some("amb")),
        h.stripe_customer(Some("amb")),
    ];

    // Usage waits for c000..c199, amb and lonely; c200..c229 have subscriptions only; c005 is
    // mapped by hand already (to another Stripe customer: the sync leaves it).
    let mut waiting: Vec<String> = (0..200).map(|i| format!("c{i:03}")).collect();
    waiting.extend(["amb".to_owned(), "lonely".to_owned()]);
    h.usage_for(&waiting);
    for i in 200..230 {
        h.subscription(&format!("c{i:03}"));
    }
    let (ok, out) = h.tally(&["customers", "map", "c005", "cus_byhand"]);
    assert!(ok, "{out}");
    let before = h.mappings();
    let customers_before = h.emulator.customers().len();

    // Dry runs, with and without --create: they report and write nothing.
    for args in [
        &["customers", "sync", "--dry-run"][..],
        &["customers", "sync", "--dry-run", "--create"][..],
    ] {
        let (ok, out) = h.tally(args);
        assert!(!ok, "amb is ambiguous: exit 1\n{out}");
        assert!(out.contains("matched  would map c007 → "), "{out}");
        assert!(out.contains("dry run: nothing written or created"), "{out}");
        assert_eq!(h.mappings(), before, "{args:?} wrote nothing");
        assert_eq!(
            h.emulator.customers().len(),
            customers_before,
            "{args:?} created nothing"
        );
    }
    let (_, out) = h.tally(&["customers", "sync", "--dry-run", "--create"]);
    assert!(
        out.contains("would create a Stripe customer for lonely"),
        "{out}"
    );

    let (ok, out) = h.tally(&["customers", "sync"]);
    assert!(!ok, "amb is ambiguous: exit 1\n{out}");
    let summary = summary_line(&out);
    assert!(
        summary.starts_with("229 matched, 0 created, 1 ambiguous, 0 failed, 1 left"),
        "{summary}"
    );
    assert!(
        summary.contains("(253 Stripe customer(s) read in 3 page(s))"),
        "{summary}"
    );
    let mut amb_sorted = amb.clone();
    amb_sorted.sort();
    assert!(
        out.contains(&format!(
            "AMBIGUOUS amb: Stripe customers {}, {} all have metadata tally_customer=amb; not mapped",
            amb_sorted[0], amb_sorted[1]
        )),
        "{out}"
    );
    assert!(
        out.contains("left     lonely: no Stripe customer has metadata tally_customer=lonely"),
        "{out}"
    );

    let mapped = h.stripe_ids();
    for (customer, stripe_id) in &named {
        let expected = if customer == "c005" {
            "cus_byhand"
        } else {
            stripe_id
        };
        assert_eq!(mapped[customer], expected, "{customer}");
    }
    assert!(!mapped.contains_key("amb") && !mapped.contains_key("lonely"));
    assert!(
        !mapped.contains_key("stranger"),
        "only customers tally knows are mapped"
    );
    assert_eq!(
        h.waiting(),
        ["amb", "lonely"],
        "the others' usage is billable now"
    );
    assert_eq!(
        h.emulator.customers().len(),
        customers_before,
        "sync without --create creates nothing"
    );

    // Run again: nothing new to match, the same two remain.
    let (_, out) = h.tally(&["customers", "sync"]);
    assert!(
        summary_line(&out).starts_with("0 matched, 0 created, 1 ambiguous, 0 failed, 1 left"),
        "{out}"
    );
}

#[test]
fn sync_create_creates_once_when_every_answer_is_lost() {
    let h = Harness::start("");
    let customers: Vec<String> = (0..25).map(|i| format!("n{i:02}")).collect();
    h.usage_for(&customers);
    // Stripe commits each create and the connection drops before the answer: the sync retries
    // with the same Idempotency-Key and gets the customer it created.
    h.emulator
        .set_faults(Faults {
            drop_after_commit: 1.0,
            ..Faults::default()
        })
        .unwrap();
    let (ok, out) = h.tally(&["customers", "sync", "--create"]);
    assert!(ok, "{out}");
    assert!(
        summary_line(&out).starts_with("0 matched, 25 created, 0 ambiguous, 0 failed, 0 left"),
        "{out}"
    );
    let stats = h.emulator.stats();
    assert_eq!(stats.customers_created, 25, "{stats:?}");
    assert_eq!(stats.dropped_after_commit, 25, "{stats:?}");
    assert_eq!(
        stats.idempotent_replays, 25,
        "each retry was a replay: {stats:?}"
    );
    assert_created_once(&h, &customers);
    let claims = h.stripe_claims();
    let first = &h.emulator.customers()[0];
    assert_eq!(
        first["name"], first["metadata"]["tally_customer"],
        "{claims:?}"
    );

    // Run again: everybody is mapped, nothing is created.
    h.emulator.set_faults(Faults::default()).unwrap();
    let (ok, out) = h.tally(&["customers", "sync", "--create"]);
    assert!(ok, "{out}");
    assert!(out.contains("nothing to sync"), "{out}");
    assert_eq!(h.emulator.stats().customers_created, 25);
}

#[test]
fn two_syncs_at_once_create_each_customer_once() {
    let h = Harness::start("");
    let customers: Vec<String> = (0..40).map(|i| format!("t{i:02}")).collect();
    h.usage_for(&customers);
    let mut first = h
        .work
        .spawn("sync-1", &h.db.url, &["customers", "sync", "--create"]);
    let mut second = h
        .work
        .spawn("sync-2", &h.db.url, &["customers", "sync", "--create"]);
    assert!(first.wait().unwrap().success(), "{}", h.work.log("sync-1"));
    assert!(second.wait().unwrap().success(), "{}", h.work.log("sync-2"));
    assert_eq!(
        h.emulator.stats().customers_created,
        40,
        "{:?}",
        h.emulator.stats()
    );
    assert_created_once(&h, &customers);
}

#[test]
fn a_sync_killed_after_creating_is_run_again_and_creates_nothing_twice() {
    // 10 calls a second: the kill lands part-way through the creates.
    let h = Harness::start("max_requests_per_second = 10\n");
    let customers: Vec<String> = (0..40).map(|i| format!("k{i:02}")).collect();
    h.usage_for(&customers);
    let mut sync = h
        .work
        .spawn("sync-1", &h.db.url, &["customers", "sync", "--create"]);
    wait_until(
        "the first sync created 8 customers",
        Duration::from_secs(60),
        || h.emulator.customers().len() >= 8,
    );
    kill(&mut sync);
    let created_before = h.emulator.customers().len();
    assert!(
        created_before < 40,
        "the kill came too late to cut the run: {created_before}"
    );
    // The cut at its worst: Stripe has the customers, tally has none of their mappings.
    h.sql(sqlx::query("DELETE FROM stripe_customers").execute(&h.db.pool))
        .unwrap();

    let (ok, out) = h.tally(&["customers", "sync", "--create"]);
    assert!(ok, "{out}");
    // What the first run created is matched by its metadata (a create that was in flight at
    // the kill may have landed since), the rest created.
    let counts: Vec<usize> = summary_line(&out)
        .split(", ")
        .take(2)
        .map(|part| part.split(' ').next().unwrap().parse().unwrap())
        .collect();
    let (matched, created) = (counts[0], counts[1]);
    assert_eq!(matched + created, 40, "{out}");
    assert!(matched >= created_before, "{out}");
    assert_eq!(h.emulator.stats().customers_created, 40);
    assert_created_once(&h, &customers);
}

#[test]
fn usage_that_waited_is_billed_after_sync_and_import() {
    let h = Harness::start("");
    h.usage("acme", 7);
    h.usage("beta", 11);
    let acme_stripe = h.stripe_customer(Some("acme"));
    let (ok, out) = h.tally(&["sink", "--once", "--create-stripe-meters"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("2 slots waiting for a customer mapping"),
        "{out}"
    );
    assert_eq!(h.emulator.sum(&acme_stripe, "api_calls"), 0);

    let (ok, out) = h.tally(&["customers", "sync"]);
    assert!(ok, "{out}");
    let (ok, out) = h.import("customer,stripe_customer_id\nbeta,cus_beta\n");
    assert!(ok, "{out}");
    assert!(h.waiting().is_empty());

    let (ok, out) = h.tally(&["sink", "--once"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("0 slots waiting for a customer mapping"),
        "{out}"
    );
    assert_eq!(h.emulator.sum(&acme_stripe, "api_calls"), 7);
    assert_eq!(h.emulator.sum("cus_beta", "api_calls"), 11);
}
