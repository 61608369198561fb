//! Credits and Stripe agree: a sum meter priced in credits bills Stripe only for the usage
//! credits did not cover, per slot and exactly, through `tally sink --once` as a process. Usage
//! the burner has not burned yet is not billed (it may still be covered); once burned, what
//! stayed uncovered is billed, and a late event in a billed slot bills its own uncovered part.
//! A customer with no grant at all is billed for everything. Reconcile shows covered usage apart
//! and finds Stripe in agreement.

use chrono::TimeDelta;
use rust_decimal::Decimal;
use tally_credits::{grant, Actor, GrantKind, NewGrant, RateCard, RateDefinition};
use tally_tests::*;

/// Usage of `value` for `customer` in the window `minute`, as the aggregator commits it for a
/// priced meter: the window, its changed slot, and the queue row for the burner, in one
/// transaction.
async fn priced_usage(
    pool: &sqlx::PgPool,
    customer: &str,
    minute: chrono::DateTime<chrono::Utc>,
    value: i64,
) {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO usage_minute (customer_id, meter, window_start, group_key, value, event_count, latest_at, latest_id, first_updated, last_updated)
         VALUES ($1, 'api_calls', $2, '', $3, 1, $2, 'e', now(), now())
         ON CONFLICT (customer_id, meter, window_start, group_key)
         DO UPDATE SET value = usage_minute.value + EXCLUDED.value",
    )
    .bind(customer)
    .bind(minute)
    .bind(Decimal::from(value))
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query("INSERT INTO usage_slot_changes (customer_id, meter, slot_start) VALUES ($1, 'api_calls', $2)")
        .bind(customer)
        .bind(tally_core::window::slot_start(minute))
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO credit_usage_queue (customer_id, meter, group_key, window_start, quantity)
         VALUES ($1, 'api_calls', '', $2, $3)",
    )
    .bind(customer)
    .bind(minute)
    .bind(Decimal::from(value))
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

#[test]
fn credits_covered_usage_never_reaches_stripe_and_uncovered_usage_does_exactly() {
    let h = BillingHarness::start(
        "[[credits.rates]]\nmeter = \"api_calls\"\ncredits_per_unit = \"1\"\n",
    );
    let minute = minute_ago(TimeDelta::minutes(30));
    h.sql(async {
        tally_credits::rates::record(
            &h.db.pool,
            &[RateDefinition {
                meter: "api_calls".into(),
                credits_per_unit: Decimal::ONE,
                dimensions: Default::default(),
            }],
        )
        .await
        .unwrap();
        let ops = Actor::new("test", "prepaid").unwrap();
        grant(
            &h.db.pool,
            &NewGrant {
                customer: "acme".into(),
                kind: GrantKind::Purchased,
                amount: Decimal::from(600),
                priority: None,
                effective_at: Some(minute - TimeDelta::hours(1)),
                expires_at: None,
                idempotency_key: "pack".into(),
                description: None,
            },
            &ops,
        )
        .await
        .unwrap();
        for (customer, stripe) in [("acme", "cus_acme"), ("beta", "cus_beta")] {
            tally_sink::store::map_customer(&h.db.pool, customer, stripe)
                .await
                .unwrap();
        }
        priced_usage(&h.db.pool, "acme", minute, 1000).await;
        priced_usage(&h.db.pool, "beta", minute, 500).await;
    });
    let burn = || {
        h.sql(async {
            let rates = RateCard::load(&h.db.pool).await.unwrap();
            while tally_credits::burn_once(&h.db.pool, &rates)
                .await
                .unwrap()
                .1
            {}
        })
    };
    let bill = || {
        let (ok, out) = h.tally(&["sink", "--once", "--create-stripe-meters"]);
        assert!(ok, "{out}");
    };

    // Not burned yet: nothing is billed (credits may still pay for it), and reconcile says
    // the usage waits for the burner.
    bill();
    assert_eq!(h.emulator.sum("cus_acme", "api_calls"), 0);
    assert_eq!(h.emulator.sum("cus_beta", "api_calls"), 0);
    let range = (
        minute_ago(TimeDelta::hours(2))
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string(),
        minute_ago(TimeDelta::minutes(-2))
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string(),
    );
    let (ok, out) = h.tally(&["reconcile", "--from", &range.0, "--to", &range.1]);
    assert!(ok, "{out}");
    assert!(
        out.contains("waiting for the credit burner: 1000 units"),
        "{out}"
    );
    assert!(out.contains("UNBILLED"), "{out}");

    // Burned: 600 of acme's 1,000 covered, 400 billed; beta has no credits: 500 billed.
    burn();
    bill();
    assert_eq!(h.emulator.sum("cus_acme", "api_calls"), 400);
    assert_eq!(h.emulator.sum("cus_beta", "api_calls"), 500);

    // A late event in the same slot: queued, so not billed; burned, uncovered (no credits
    // left), billed; never twice.
    h.sql(priced_usage(&h.db.pool, "acme", minute, 250));
    bill();
    assert_eq!(h.emulator.sum("cus_acme", "api_calls"), 400);
    burn();
    bill();
    bill();
    assert_eq!(h.emulator.sum("cus_acme", "api_calls"), 650);

    // Reconcile agrees with Stripe and shows the covered usage apart.
    let from = minute_ago(TimeDelta::hours(2))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let to = minute_ago(TimeDelta::minutes(-2))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let (ok, out) = h.tally(&["reconcile", "--from", &from, "--to", &to]);
    assert!(ok, "{out}");
    assert!(out.contains("paid by credits: 600 units"), "{out}");
    // Finance sees covered and uncovered usage apart.
    let (covered, uncovered): (Decimal, Decimal) = h.sql(
        sqlx::query_as(
            "SELECT sum(covered), sum(uncovered) FROM finance_credit_usage_daily WHERE customer_id = 'acme'",
        )
        .fetch_one(&h.db.pool),
    )
    .unwrap();
    assert_eq!(
        (covered, uncovered),
        (Decimal::from(600), Decimal::from(650))
    );
}
