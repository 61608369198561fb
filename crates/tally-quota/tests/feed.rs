//! The change feed (migration 0019, `check/feed.rs`): a change committed by another connection
//! reaches the cache within milliseconds, a customer nobody changes is not reloaded, and a lost
//! listener connection costs nothing that was changed meanwhile.

use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use tally_billing::testing::unlimited_customers;
use tally_db::testing::fresh_database;
use tally_quota::{Decision, Quota, QuotaOptions};

async fn used(quota: &Quota, customer: &str) -> Decimal {
    quota
        .peek(customer, "api_calls", Decimal::ZERO)
        .await
        .unwrap()
        .used()
}

/// Usage committed as the aggregator commits it: the daily rollup and, in the same
/// transaction, the customer named in `customer_changes` (which notifies), or not.
async fn commit_usage(pool: &sqlx::PgPool, customer: &str, value: i64, notify: bool) {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO usage_daily (customer_id, meter, day, group_key, value, event_count, first_updated, last_updated)
         VALUES ($1, 'api_calls', (now() AT TIME ZONE 'UTC')::date, '', $2, 1, now(), now())
         ON CONFLICT (customer_id, meter, day, group_key) DO UPDATE SET value = usage_daily.value + excluded.value",
    )
    .bind(customer)
    .bind(Decimal::from(value))
    .execute(&mut *tx)
    .await
    .unwrap();
    if notify {
        tally_db::changes::record(&mut tx, &[customer])
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
}

async fn wait_for(quota: &Quota, customer: &str, want: i64, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < within {
        if used(quota, customer).await == Decimal::from(want) {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}

/// A cache following the feed, with the timer's defaults (250 ms refresh, 1 s staleness).
async fn with_feed(pool: &sqlx::PgPool) -> Quota {
    let options = QuotaOptions {
        change_feed: true,
        ..QuotaOptions::new(Duration::from_millis(250))
    };
    Quota::with_options(pool.clone(), options).await.unwrap()
}

async fn listening(quota: &Quota) {
    let started = Instant::now();
    while !quota.change_feed_listening() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the change feed never listened"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The timer alone would reload a checked customer every 250 ms: with the feed it does not,
/// so a change that notifies is seen at once and one that does not (a hand-written SQL update)
/// only after `feed_max_age`.
#[tokio::test]
async fn a_committed_change_is_seen_at_once_and_an_unchanged_customer_is_not_reloaded() {
    let db = fresh_database().await;
    let customers = unlimited_customers(&db.pool, 2).await;
    let quota = with_feed(&db.pool).await;
    listening(&quota).await;
    assert_eq!(used(&quota, &customers[0]).await, Decimal::ZERO);
    assert_eq!(used(&quota, &customers[1]).await, Decimal::ZERO);

    commit_usage(&db.pool, &customers[0], 5, true).await;
    let seen = wait_for(&quota, &customers[0], 5, Duration::from_secs(5)).await;
    assert!(seen.is_some(), "a notified change is seen");

    // Quiet customers are checked for two seconds (eight timer refreshes): no reload.
    let before = quota.cache_counts().background_loads;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        used(&quota, &customers[1]).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        quota.cache_counts().background_loads,
        before,
        "nothing changed, nothing reloaded"
    );

    // A change that does not notify is not seen on the timer's schedule...
    commit_usage(&db.pool, &customers[1], 7, false).await;
    assert_eq!(
        wait_for(&quota, &customers[1], 7, Duration::from_secs(1)).await,
        None
    );
    // ...and the next one that does brings it along.
    commit_usage(&db.pool, &customers[1], 1, true).await;
    assert!(wait_for(&quota, &customers[1], 8, Duration::from_secs(5))
        .await
        .is_some());
}

/// Notifications sent while the listener's connection is down are lost: the new connection
/// reloads every cached customer, so a change made in between is seen all the same.
#[tokio::test]
async fn a_change_made_while_the_listener_was_cut_off_is_seen_after_it_reconnects() {
    let db = fresh_database().await;
    let customers = unlimited_customers(&db.pool, 1).await;
    let quota = Quota::with_options(
        db.pool.clone(),
        QuotaOptions {
            max_staleness: Duration::from_secs(60),
            change_feed: true,
            ..QuotaOptions::new(Duration::from_secs(60))
        },
    )
    .await
    .unwrap();
    listening(&quota).await;
    assert_eq!(used(&quota, &customers[0]).await, Decimal::ZERO);

    let cut: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        cut,
        vec![true],
        "the listener's connection is found and cut"
    );
    commit_usage(&db.pool, &customers[0], 3, true).await;
    assert!(
        wait_for(&quota, &customers[0], 3, Duration::from_secs(10))
            .await
            .is_some(),
        "seen after the listener reconnected (the timer is a minute here)"
    );
}

/// A customer named in a notification that this process does not cache costs nothing, and one
/// named in a notification while its first load runs is loaded again.
#[tokio::test]
async fn notifications_for_customers_not_cached_load_nothing() {
    let db = fresh_database().await;
    let customers = unlimited_customers(&db.pool, 1).await;
    let quota = with_feed(&db.pool).await;
    listening(&quota).await;
    let mut tx = db.pool.begin().await.unwrap();
    let strangers: Vec<String> = (0..5000).map(|i| format!("stranger-{i}")).collect();
    let strangers: Vec<&str> = strangers.iter().map(String::as_str).collect();
    tally_db::changes::record(&mut tx, &strangers)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let counts = quota.cache_counts();
    assert_eq!(
        (counts.cached, counts.background_loads, counts.waited_loads),
        (0, 0, 0)
    );
    assert_eq!(used(&quota, &customers[0]).await, Decimal::ZERO);
}

/// A reload that fails (Postgres refuses the batch) takes the customer's change mark with it:
/// it is put back and tried again, so the change is seen without another notification.
#[tokio::test]
async fn a_change_whose_reload_failed_is_reloaded_again_without_another_notification() {
    let db = fresh_database().await;
    let customers = unlimited_customers(&db.pool, 1).await;
    let quota = with_feed(&db.pool).await;
    listening(&quota).await;
    assert_eq!(used(&quota, &customers[0]).await, Decimal::ZERO);

    sqlx::query("ALTER TABLE usage_daily RENAME TO usage_daily_away")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    tally_db::changes::record(&mut tx, &[customers[0].as_str()])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // its reload fails meanwhile
    sqlx::query("ALTER TABLE usage_daily_away RENAME TO usage_daily")
        .execute(&db.pool)
        .await
        .unwrap();
    commit_usage(&db.pool, &customers[0], 4, false).await;
    let started = Instant::now();
    loop {
        let seen = quota.peek(&customers[0], "api_calls", Decimal::ZERO).await;
        if let Ok(Decision::Allow { used, .. }) = seen {
            if used == Decimal::from(4) {
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the failed reload was never retried"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What the triggers send, whatever the writer: ids of the longest valid kind come in payloads
/// Postgres accepts, every id once; an id no valid customer has (written by hand in SQL) says
/// "everyone" instead of failing the writer; a session with another search_path still writes.
#[tokio::test]
async fn the_triggers_notify_every_customer_in_payloads_postgres_accepts() {
    let db = fresh_database().await;
    let mut listener = sqlx::postgres::PgListener::connect_with(&db.pool)
        .await
        .unwrap();
    listener.listen("tally_changes").await.unwrap();
    // 256 characters of 4 bytes each: 1 KiB, the longest valid id.
    let long: Vec<String> = (0..40)
        .map(|i| format!("{i:03}{}", "𝔘".repeat(253)))
        .collect();
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL search_path TO pg_catalog")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("INSERT INTO public.customer_changes (customer_id, meter) SELECT c, '' FROM unnest($1::text[]) c")
        .bind(&long)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut named = std::collections::BTreeSet::new();
    while named.len() < long.len() {
        let notification = tokio::time::timeout(Duration::from_secs(5), listener.recv())
            .await
            .expect("every customer is notified")
            .unwrap();
        let payload = notification.payload();
        assert!(payload.len() < 8000, "{} bytes", payload.len());
        let mut lines = payload.split('\n');
        assert_eq!(lines.next(), Some("customers"));
        named.extend(lines.map(str::to_owned));
    }
    assert_eq!(named, long.iter().cloned().collect());

    let too_long = "x".repeat(5000);
    sqlx::query("INSERT INTO customer_changes (customer_id, meter) VALUES ($1, ''), ('acme', '')")
        .bind(&too_long)
        .execute(&db.pool)
        .await
        .expect("the writer's statement still succeeds");
    let notification = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(notification.payload(), "everyone");
}

/// Entries kept current by the feed are older than `max_staleness` (1 s) as a rule. When the
/// feed's connection is cut they are judged from when the feed last vouched for them, so the
/// checks after it do not all wait for loads at once (a stampede on the pool the feed needs to
/// come back); the customers are reloaded in the background instead.
#[tokio::test]
async fn a_cut_feed_does_not_make_every_check_wait_for_a_load() {
    let db = fresh_database().await;
    let customers = unlimited_customers(&db.pool, 200).await;
    let quota = with_feed(&db.pool).await;
    listening(&quota).await;
    for customer in &customers {
        used(&quota, customer).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await; // older than max_staleness
    let waited = quota.cache_counts().waited_loads;
    let _: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for customer in &customers {
        used(&quota, customer).await;
    }
    let waited = quota.cache_counts().waited_loads - waited;
    assert!(waited < 10, "{waited} of 200 checks waited for a load");
}
