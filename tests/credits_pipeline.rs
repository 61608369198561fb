//! Credits burn exactly once through the real pipeline: `tally kafka` and `tally aggregate` as
//! separate processes, the aggregator (with its burner) killed with SIGKILL at random moments
//! and restarted, every event sent twice (a producer retry) and some ids re-sent later with
//! the same payload (an app retry). At the end, for every minute window, the `consume` entries
//! of the ledger account for exactly the window's usage, once; every grant's `remaining` is
//! its ledger's sum; what each customer burned is its usage × the rate, covered or not.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use tally_core::UsageEvent;
use tally_credits::{grant, Actor, GrantKind, NewGrant};
use tally_tests::*;

fn d(text: &str) -> Decimal {
    text.parse().unwrap()
}

#[test]
fn credits_burn_exactly_once_through_kills_and_duplicates() {
    let runtime = runtime();
    let db = runtime.block_on(tally_db::testing::fresh_database());
    let (work, kafka, _broker) = broker_process(
        &db.url,
        4,
        "[aggregator]\nsession_timeout = \"6s\"\nbatch_max_wait = \"100ms\"\n\n\
         [credits]\nburn_every = \"100ms\"\n\
         [[credits.rates]]\nmeter = \"api_calls\"\ncredits_per_unit = \"0.5\"\n\
         [[credits.rates]]\nmeter = \"tokens\"\ncredits_per_unit = \"0.001\"\n\
         [[credits.rates]]\nmeter = \"tokens\"\ncredits_per_unit = \"0.01\"\n\
         dimensions = { model = \"large\" }\n",
    );
    let (ok, output) = work.run(&db.url, &["migrate"]);
    assert!(ok, "{output}");

    // Ten customers: five with plenty of credits, five that run out (their rest is uncovered).
    let customers: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
    let ops = Actor::new("test", "prepaid").unwrap();
    for (i, customer) in customers.iter().enumerate() {
        let amount = if i < 5 { "1000000" } else { "40" };
        let new = NewGrant {
            customer: customer.clone(),
            kind: GrantKind::Purchased,
            amount: d(amount),
            priority: None,
            effective_at: Some(Utc::now() - TimeDelta::hours(2)),
            expires_at: None,
            idempotency_key: "initial".into(),
            description: None,
        };
        runtime.block_on(grant(&db.pool, &new, &ops)).unwrap();
    }

    let mut aggregate = work.spawn("aggregate-1", &db.url, &["aggregate"]);
    let emitter = TestEmitter::start(&kafka);
    let mut rng = rand::rngs::StdRng::seed_from_u64(16);
    let mut sent: Vec<UsageEvent> = Vec::new();
    let started = Instant::now();
    let mut next_kill = started + Duration::from_millis(rng.random_range(1_500..3_000));
    let (mut kills, mut starts) = (0, 1);
    while started.elapsed() < Duration::from_secs(15) {
        for _ in 0..100 {
            let customer = &customers[rng.random_range(0..customers.len())];
            let meter = if rng.random_bool(0.5) {
                "api_calls"
            } else {
                "tokens"
            };
            let quantity = Decimal::new(rng.random_range(1..10_000), 1);
            let at = Utc::now() - TimeDelta::seconds(rng.random_range(0..600));
            let mut event = UsageEvent::new(customer.clone(), meter, quantity)
                .with_id(format!("e-{}", sent.len()))
                .at(at);
            if meter == "tokens" {
                event = event.with_dimension("model", ["small", "large"][rng.random_range(0..2)]);
            }
            // Every event twice: a producer retry.
            emitter.emit(event.clone()).unwrap();
            emitter.emit(event.clone()).unwrap();
            sent.push(event);
        }
        // An app re-sends some earlier ids with the same payload.
        for _ in 0..20 {
            let again = sent[rng.random_range(0..sent.len())].clone();
            emitter.emit(again).unwrap();
        }
        std::thread::sleep(Duration::from_millis(30));
        if Instant::now() >= next_kill {
            kill(&mut aggregate.0);
            kills += 1;
            std::thread::sleep(Duration::from_millis(300));
            starts += 1;
            aggregate = work.spawn(&format!("aggregate-{starts}"), &db.url, &["aggregate"]);
            next_kill = Instant::now() + Duration::from_millis(rng.random_range(1_500..3_000));
        }
    }
    emitter.flush(Duration::from_secs(60)).unwrap();

    // Wait for every event counted once and every counted unit burned.
    let mut expected_usage: BTreeMap<String, Decimal> = BTreeMap::new();
    let mut expected_cost: BTreeMap<String, Decimal> = BTreeMap::new();
    for event in &sent {
        *expected_usage.entry(event.customer.clone()).or_default() += event.quantity;
        let rate = match (
            event.meter.as_str(),
            event.dimensions.get("model").map(String::as_str),
        ) {
            ("api_calls", _) => d("0.5"),
            (_, Some("large")) => d("0.01"),
            _ => d("0.001"),
        };
        *expected_cost.entry(event.customer.clone()).or_default() += event.quantity * rate;
    }
    let query = |sql: &str| -> BTreeMap<String, Decimal> {
        runtime
            .block_on(sqlx::query_as::<_, (String, Decimal)>(sql).fetch_all(&db.pool))
            .unwrap()
            .into_iter()
            .collect()
    };
    wait_until(
        "every event is counted once",
        Duration::from_secs(120),
        || query("SELECT customer_id, sum(value) FROM usage_minute GROUP BY 1") == expected_usage,
    );
    wait_until(
        "every counted window is burned",
        Duration::from_secs(60),
        || {
            runtime
                .block_on(
                    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM credit_usage_queue")
                        .fetch_one(&db.pool),
                )
                .unwrap()
                == 0
        },
    );

    // Each window's usage is accounted for by its consume entries exactly once.
    let mismatched: Vec<(String, String, String, String)> = runtime
        .block_on(
            sqlx::query_as(
                "SELECT w.customer_id, w.meter, w.window_start::text, w.value::text
                 FROM usage_minute w
                 LEFT JOIN (SELECT customer_id, meter, group_key, window_start, sum(quantity) AS q
                            FROM credit_transactions WHERE kind = 'consume'
                            GROUP BY 1, 2, 3, 4) c
                   USING (customer_id, meter, group_key, window_start)
                 WHERE c.q IS DISTINCT FROM w.value",
            )
            .fetch_all(&db.pool),
        )
        .unwrap();
    assert!(
        mismatched.is_empty(),
        "windows burned other than once: {mismatched:?}"
    );
    let burned = query(
        "SELECT customer_id, -sum(amount) FROM credit_transactions WHERE kind = 'consume' GROUP BY 1",
    );
    assert_eq!(burned, expected_cost, "usage × rate, covered or not");
    let remaining = query("SELECT customer_id, sum(remaining) FROM credit_grants GROUP BY 1");
    for (i, customer) in customers.iter().enumerate() {
        let granted = if i < 5 { d("1000000") } else { d("40") };
        let covered = expected_cost[customer].min(granted);
        assert_eq!(remaining[customer], granted - covered, "{customer}");
    }
    let disagreeing: i64 = runtime
        .block_on(
            sqlx::query_scalar(
                "SELECT count(*) FROM credit_grants g WHERE g.remaining <>
                   (SELECT sum(amount) FROM credit_transactions t WHERE t.grant_id = g.grant_id)",
            )
            .fetch_one(&db.pool),
        )
        .unwrap();
    assert_eq!(
        disagreeing, 0,
        "every grant's remaining is its ledger's sum"
    );
    assert!(kills >= 3, "the aggregator was killed {kills} times");
    println!(
        "events: {} (each sent at least twice), aggregator kills: {kills}",
        sent.len()
    );
    emitter.shutdown(Duration::from_secs(5));
}
