//! What one run of the subscription scheduler (`tally_billing::subscriptions::run_due`) costs:
//! `TALLY_BENCH_SUBSCRIPTIONS` (default 10,000) tally-managed monthly subscriptions, all with
//! the same period end (everyone signed up at the same moment: the worst case of a renewal
//! day), renewed by a run one month and a day after they started. Then the same with two
//! concurrent runs (two `tally serve` replicas, each with its own pool), which must share the
//! work and renew each subscription exactly once. Baseline in the same run: the same renewals
//! as one set-based UPDATE with its audit rows, in one transaction (what Postgres needs for
//! the rows alone, without the scheduler's transaction per subscription).
//!
//! Each measurement gets its own fresh database, seeded by a bulk INSERT (the columns
//! `subscriptions::create` writes) and analyzed. Run: `scripts/bench.sh scheduler` (or
//! `cargo bench -p tally-billing --bench scheduler`); needs DATABASE_URL. Prints one figure a
//! line.

use std::time::{Duration, Instant};

use chrono::{DateTime, SubsecRound, TimeDelta, Utc};
use sqlx::PgPool;
use tally_billing::subscriptions::period::period_containing;
use tally_billing::subscriptions::{run_due, Interval, SchedulerRun, SubscriptionsConfig};
use tally_billing::{apply_plans, PlanDefinition};
use tally_db::testing::{fresh_database, TestDatabase};

const DEFAULT_SUBSCRIPTIONS: usize = 10_000;

/// The meter, plan `PRO` (monthly price) and `n` active monthly subscriptions anchored at
/// `anchor`, as `subscriptions::create` would leave them (the database's trigger writes their
/// `subscription_history`).
async fn seed(pool: &PgPool, n: usize, anchor: DateTime<Utc>) {
    sqlx::query(
        "INSERT INTO meters (name, aggregation, stripe_event_name) VALUES ('api_calls', 'sum', 'api_calls')",
    )
    .execute(pool)
    .await
    .expect("the meter is recorded");
    let plan: PlanDefinition = serde_json::from_value(serde_json::json!({
        "name": "PRO",
        "price": { "amount": "49.00", "currency": "usd", "interval": "month" },
        "limits": { "api_calls": { "limit": "10000", "period": "day" } }
    }))
    .expect("a valid plan");
    apply_plans(pool, &[plan], "bench")
        .await
        .expect("the plan is applied");
    let (start, end) =
        period_containing(anchor, Interval::Month, anchor).expect("a period in the calendar");
    sqlx::query(
        "INSERT INTO subscriptions (customer_id, plan, status, source, billing_interval,
                billing_anchor, started_at, trial_end, current_period_start, current_period_end,
                payment_method, status_since)
         SELECT 'customer-' || i, 'PRO', 'active', 'tally', 'month', $1, $1, NULL, $2, $3, true, $1
         FROM generate_series(0, $4 - 1) AS i",
    )
    .bind(anchor)
    .bind(start)
    .bind(end)
    .bind(i64::try_from(n).expect("a count"))
    .execute(pool)
    .await
    .expect("the subscriptions are inserted");
    // Statistics as autovacuum would have them a minute later.
    sqlx::query("ANALYZE").execute(pool).await.expect("analyze");
}

/// A fresh database with `n` subscriptions due at `now`.
async fn seeded(n: usize, anchor: DateTime<Utc>) -> TestDatabase {
    let db = fresh_database().await;
    seed(&db.pool, n, anchor).await;
    db
}

/// Fails unless every subscription was renewed exactly once: one `renew` audit row each, and
/// each now in its second period.
async fn check_renewed_once(pool: &PgPool, n: usize, now: DateTime<Utc>) {
    let renewals: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM entitlement_audit WHERE action = 'renew' AND actor = 'scheduler'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let distinct: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT entity_key) FROM entitlement_audit WHERE action = 'renew'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let in_next_period: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM subscriptions
         WHERE status = 'active' AND current_period_start <= $1 AND current_period_end > $1",
    )
    .bind(now)
    .fetch_one(pool)
    .await
    .unwrap();
    let n = i64::try_from(n).unwrap();
    assert_eq!(
        (renewals, distinct, in_next_period),
        (n, n, n),
        "every subscription renewed exactly once"
    );
}

fn print_run(name: &str, n: usize, elapsed: Duration) {
    println!("scheduler_{name}_seconds {:.3}", elapsed.as_secs_f64());
    println!(
        "scheduler_{name}_transitions_per_s {:.0}",
        n as f64 / elapsed.as_secs_f64()
    );
}

fn main() {
    let n: usize = std::env::var("TALLY_BENCH_SUBSCRIPTIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_SUBSCRIPTIONS);
    let runtime = tally_db::testing::runtime();
    let config = SubscriptionsConfig::default();
    let anchor = Utc::now().trunc_subsecs(0);
    let (_, first_end) = period_containing(anchor, Interval::Month, anchor).unwrap();
    // One month and a day after the subscriptions started: each is due exactly once.
    let now = first_end + TimeDelta::days(1);
    println!(
        "# {n} monthly subscriptions due at the same moment; each measurement in a fresh database"
    );

    // One replica.
    let single = runtime.block_on(async {
        let db = seeded(n, anchor).await;
        let started = Instant::now();
        let run = run_due(&db.pool, &config, now).await.expect("run_due");
        let elapsed = started.elapsed();
        assert_eq!((run.transitions, run.failed, run.fallbacks), (n, 0, 0));
        check_renewed_once(&db.pool, n, now).await;
        let again = run_due(&db.pool, &config, now).await.expect("run_due");
        assert_eq!(again.transitions, 0, "nothing left due");
        elapsed
    });
    print_run("1replica", n, single);

    // Two replicas at once, each with its own pool, as two `tally serve` processes.
    let (both, runs) = runtime.block_on(async {
        let db = seeded(n, anchor).await;
        let other = tally_db::connect(&db.url, 8, Duration::from_secs(10))
            .await
            .expect("a second pool");
        let started = Instant::now();
        let replicas: Vec<_> = [db.pool.clone(), other.clone()]
            .into_iter()
            .map(|pool| {
                let config = config.clone();
                tokio::spawn(async move {
                    let run = run_due(&pool, &config, now).await.expect("run_due");
                    (run, started.elapsed())
                })
            })
            .collect();
        let mut runs: Vec<(SchedulerRun, Duration)> = Vec::new();
        for replica in replicas {
            runs.push(replica.await.expect("the replica's task"));
        }
        let elapsed = started.elapsed();
        let total: usize = runs.iter().map(|(run, _)| run.transitions).sum();
        let failed: usize = runs.iter().map(|(run, _)| run.failed).sum();
        assert_eq!((total, failed), (n, 0), "the replicas renewed each once");
        check_renewed_once(&db.pool, n, now).await;
        other.close().await;
        (elapsed, runs)
    });
    print_run("2replicas", n, both);
    for (i, (run, elapsed)) in runs.iter().enumerate() {
        println!(
            "scheduler_2replicas_replica{}_transitions {}",
            i + 1,
            run.transitions
        );
        println!(
            "scheduler_2replicas_replica{}_seconds {:.3}",
            i + 1,
            elapsed.as_secs_f64()
        );
    }
    println!(
        "scheduler_2replicas_transitions_total {}",
        runs.iter().map(|(run, _)| run.transitions).sum::<usize>()
    );
    println!(
        "scheduler_2replicas_speedup {:.2}",
        single.as_secs_f64() / both.as_secs_f64()
    );

    // Baseline: the same renewals set-based, one statement and one transaction.
    let baseline = runtime.block_on(async {
        let db = seeded(n, anchor).await;
        let (start, end) = period_containing(anchor, Interval::Month, now).unwrap();
        let started = Instant::now();
        let mut tx = db.pool.begin().await.unwrap();
        let renewed = sqlx::query(
            "WITH due AS (
                 SELECT subscription_id, to_jsonb(s.*) AS before FROM subscriptions s
                 WHERE status IN ('active', 'trialing') AND source <> 'stripe'
                   AND current_period_end <= $1
                 FOR UPDATE
             ), renewed AS (
                 UPDATE subscriptions s SET current_period_start = $2, current_period_end = $3,
                        updated_at = now()
                 FROM due WHERE s.subscription_id = due.subscription_id
                 RETURNING s.customer_id, due.before, to_jsonb(s.*) AS after
             )
             INSERT INTO entitlement_audit (entity, entity_key, action, before, after, actor, reason)
             SELECT 'subscription', customer_id, 'renew', before, after, 'scheduler', 'period ended; renewed'
             FROM renewed",
        )
        .bind(now)
        .bind(start)
        .bind(end)
        .execute(&mut *tx)
        .await
        .unwrap()
        .rows_affected();
        tx.commit().await.unwrap();
        let elapsed = started.elapsed();
        assert_eq!(renewed, u64::try_from(n).unwrap());
        check_renewed_once(&db.pool, n, now).await;
        elapsed
    });
    print_run("baseline_set_based", n, baseline);
    println!(
        "scheduler_1replica_vs_set_based {:.1}",
        single.as_secs_f64() / baseline.as_secs_f64()
    );
}
