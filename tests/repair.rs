//! `tally reconcile --repair` as an operator runs it: the built binary against Postgres and the
//! Stripe emulator.
//!
//! Stripe withdraws events it had accepted (here: meter event adjustments made outside tally,
//! as Stripe's own asynchronous validation would drop them). Reconcile finds the drift; the
//! repair refuses while Stripe may still be catching up, shows what it would send on a dry run
//! and writes nothing, queues each proven repair once (also with two applies racing), and after
//! the sink's next pass Stripe holds exactly the windows again, every unit once. Stripe holding
//! more than tally sent is explained, never "repaired".

use chrono::{DateTime, TimeDelta, Utc};
use rust_decimal::Decimal;
use tally_tests::*;

/// The billing harness, with Stripe-side helpers below.
struct Harness(BillingHarness);

impl std::ops::Deref for Harness {
    type Target = BillingHarness;
    fn deref(&self) -> &BillingHarness {
        &self.0
    }
}

impl Harness {
    fn start() -> Harness {
        Harness(BillingHarness::start(""))
    }

    fn count(&self, query: &str) -> i64 {
        self.sql(sqlx::query_scalar(query).fetch_one(&self.db.pool))
            .unwrap()
    }

    /// The identifier of the sent row of `meter` whose value is `value`.
    fn identifier(&self, meter: &str, value: i64) -> String {
        self.sql(
            sqlx::query_scalar(
                "SELECT identifier FROM stripe_submissions
                 WHERE meter = $1 AND value = $2 AND status = 'sent'",
            )
            .bind(meter)
            .bind(Decimal::from(value))
            .fetch_one(&self.db.pool),
        )
        .unwrap()
    }

    /// POSTs a form to the emulator's Stripe API, as a Stripe client would.
    fn stripe_post(&self, path: &str, form: &str) {
        let authorization = format!("Bearer {STRIPE_KEY}");
        let (status, answer) = http(
            &self.emulator.addr().to_string(),
            "POST",
            path,
            &[
                ("Authorization", &authorization),
                ("Content-Type", "application/x-www-form-urlencoded"),
            ],
            form,
        )
        .unwrap();
        assert_eq!(status, 200, "{answer}");
    }

    /// Stripe withdraws an event it had accepted, as its asynchronous validation does.
    fn stripe_drops(&self, event_name: &str, identifier: &str) {
        let identifier = identifier.replace(':', "%3A");
        self.stripe_post(
            "/v1/billing/meter_event_adjustments",
            &format!("event_name={event_name}&type=cancel&cancel%5Bidentifier%5D={identifier}"),
        );
    }

    /// An event sent to Stripe by someone other than tally.
    fn stripe_gets_extra(&self, at: DateTime<Utc>, value: i64) {
        self.stripe_post(
            "/v1/billing/meter_events",
            &format!(
                "event_name=api_calls&payload%5Bstripe_customer_id%5D=cus_acme&payload%5Bvalue%5D={value}&timestamp={}&identifier=not-tally-1",
                at.timestamp()
            ),
        );
    }
}

fn minutes(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:00Z").to_string()
}

#[test]
fn proven_drift_is_sent_again_once_and_stripe_holds_the_windows() {
    let h = Harness::start();
    // 20 + 30 api_calls in two slots three hours ago, and storage at 7.
    let first = minute_ago(TimeDelta::minutes(190));
    let second = minute_ago(TimeDelta::minutes(170));
    h.sql(async {
        plant_usage(&h.db.pool, "acme", "api_calls", first, 20).await;
        plant_usage(&h.db.pool, "acme", "api_calls", second, 30).await;
        plant_usage(&h.db.pool, "acme", "storage_gb", first, 7).await;
        tally_sink::store::map_customer(&h.db.pool, "acme", "cus_acme")
            .await
            .unwrap();
    });
    let (ok, out) = h.tally(&["sink", "--once", "--create-stripe-meters"]);
    assert!(ok, "{out}");
    assert_eq!(h.emulator.sum("cus_acme", "api_calls"), 50);
    assert_eq!(h.emulator.last("cus_acme", "storage_gb"), Some(7));

    let (from, to) = (
        minutes(minute_ago(TimeDelta::hours(4))),
        minutes(minute_ago(TimeDelta::minutes(90))),
    );
    let reconcile = |extra: &[&str]| {
        let mut args = vec!["reconcile", "--from", &from, "--to", &to];
        args.extend_from_slice(extra);
        h.tally(&args)
    };
    let (ok, out) = reconcile(&[]);
    assert!(ok, "everything agrees before Stripe drops anything\n{out}");

    // Stripe drops the 30 and the storage value.
    h.stripe_drops("api_calls", &h.identifier("api_calls", 30));
    h.stripe_drops("storage_gb", &h.identifier("storage_gb", 7));
    assert_eq!(h.emulator.sum("cus_acme", "api_calls"), 20);

    // Sent minutes ago: Stripe may still be catching up, so nothing is proven yet.
    let (ok, out) = reconcile(&["--repair", "--apply"]);
    assert!(!ok, "{out}");
    assert_eq!(out.matches("DRIFT").count(), 2, "{out}");
    assert!(
        out.contains("not repaired: a row in the range was sent less than an hour ago"),
        "{out}"
    );
    assert_eq!(h.count("SELECT count(*) FROM billing_repairs"), 0);

    // As if sent two hours ago.
    h.sql(
        sqlx::query("UPDATE stripe_submissions SET sent_at = sent_at - interval '2 hours'")
            .execute(&h.db.pool),
    )
    .unwrap();
    let (ok, out) = reconcile(&["--repair"]);
    assert!(!ok, "a dry run leaves the drift\n{out}");
    assert!(
        out.contains(
            "acme / api_calls: would send 30 units Stripe lacks (Stripe 20, sent 50) to cus_acme"
        ),
        "{out}"
    );
    assert!(
        out.contains("acme / storage_gb: would send the value 7 again (Stripe holds 0)"),
        "{out}"
    );
    assert!(
        out.contains("dry run, nothing written; add --apply to queue 2 repair(s)"),
        "{out}"
    );
    assert_eq!(h.count("SELECT count(*) FROM billing_repairs"), 0);
    assert_eq!(
        h.count("SELECT count(*) FROM stripe_submissions WHERE repair_id IS NOT NULL"),
        0
    );

    // Two repairs of api_calls racing: one is queued.
    let range = (
        DateTime::parse_from_rfc3339(&from).unwrap().to_utc(),
        DateTime::parse_from_rfc3339(&to).unwrap().to_utc(),
    );
    let outcomes = h.sql(async {
        let stripe = tally_sink::StripeHttp::new(&stripe_config(&h.emulator)).unwrap();
        let read_at = Utc::now();
        let rows = tally_sink::reconcile(&h.db.pool, &stripe, 25, range.0, range.1)
            .await
            .unwrap();
        let plans = tally_sink::plan_repairs(&h.db.pool, &rows, range.0, range.1, Utc::now())
            .await
            .unwrap();
        let plan = plans.iter().find(|p| p.meter == "api_calls").unwrap();
        let meters = tally_sink::store::billed_meters(&h.db.pool).await.unwrap();
        let meter = &meters["api_calls"];
        let apply = || tally_sink::apply_repair(&h.db.pool, plan, meter, range.0, range.1, read_at);
        let (a, b) = tokio::join!(apply(), apply());
        [a.unwrap(), b.unwrap()]
    });
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| matches!(o, tally_sink::Applied::Queued { .. }))
            .count(),
        1,
        "{outcomes:?}"
    );

    // The CLI queues the other (its exit says what it found: drift); api_calls' repair is
    // already queued, so it is not drift.
    let (ok, out) = reconcile(&["--repair", "--apply"]);
    assert!(!ok, "{out}");
    assert_eq!(out.matches("DRIFT").count(), 1, "{out}");
    assert!(
        out.contains("acme / storage_gb: queued tally:storage_gb:acme:"),
        "{out}"
    );
    assert!(out.contains("repair queued: 30 units"), "{out}");
    let (ok, out) = reconcile(&["--repair", "--apply"]);
    assert!(ok, "no drift once every repair is queued\n{out}");
    assert!(out.contains("repair: no drift, nothing to repair"), "{out}");
    assert!(out.contains("repair queued: 30 units"), "{out}");
    assert!(out.contains("repair queued: 7 as the value"), "{out}");
    assert_eq!(h.count("SELECT count(*) FROM billing_repairs"), 2);

    // The sink sends the repairs; Stripe holds the windows, every unit once.
    let (ok, out) = h.tally(&["sink", "--once"]);
    assert!(ok, "{out}");
    assert_eq!(h.emulator.sum("cus_acme", "api_calls"), 50);
    assert_eq!(h.emulator.last("cus_acme", "storage_gb"), Some(7));
    let (ok, out) = reconcile(&["--repair", "--apply"]);
    assert!(ok, "{out}");
    assert!(out.contains("2 ok, 0 not yet billed"), "{out}");
    assert!(out.contains("repair: no drift, nothing to repair"), "{out}");
    assert_eq!(
        h.count(
            "SELECT count(*) FROM stripe_submissions WHERE repair_id IS NOT NULL AND status = 'sent'"
        ),
        2
    );
    // Finance sees 50 units billed for the usage, 30 of them repaired.
    let (sent, repaired): (Decimal, Decimal) = h
        .sql(
            sqlx::query_as(
                "SELECT sum(units_sent), sum(units_repaired) FROM finance_billed_daily
                 WHERE meter = 'api_calls'",
            )
            .fetch_one(&h.db.pool),
        )
        .unwrap();
    assert_eq!((sent, repaired), (Decimal::from(50), Decimal::from(30)));

    // Someone else sends 5 units to the customer at Stripe: shown, never "repaired".
    h.stripe_gets_extra(second, 5);
    let (ok, out) = reconcile(&["--repair", "--apply"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("acme / api_calls: not repaired: Stripe holds 5 more units than tally sent"),
        "{out}"
    );
    assert_eq!(h.count("SELECT count(*) FROM billing_repairs"), 2);
}
