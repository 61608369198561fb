//! Shared by the sink's tests: a fresh database, an emulator, and usage written the way the
//! aggregator writes it (a window upsert plus a changed-slot row, in one transaction).

#![allow(dead_code)]

use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;
use stripe_emulator::{Emulator, EmulatorConfig};
use tally_core::window::slot_start;
use tally_db::testing::{fresh_database, TestDatabase};
use tally_sink::{MeterEventsApi, Sink, SinkConfig, StripeConfig};

pub(crate) const KEY: &str = "sk_live_tally_tests";

pub(crate) struct Setup {
    pub db: TestDatabase,
    pub emulator: Emulator,
    pub stripe: StripeConfig,
}

/// A database and an emulator; the sink bills through the v2 stream (the default where the
/// account has it, as the emulator's does).
pub(crate) async fn setup(emulator: EmulatorConfig) -> Setup {
    setup_api(emulator, None).await
}

/// As [`setup`], with `stripe.meter_events` set.
pub(crate) async fn setup_api(emulator: EmulatorConfig, api: Option<MeterEventsApi>) -> Setup {
    let db = fresh_database().await;
    sqlx::query(
        "INSERT INTO meters (name, aggregation, stripe_event_name) VALUES
            ('api_calls', 'sum', 'api_calls'), ('tokens', 'sum', 'llm_tokens'),
            ('storage_gb', 'max', 'storage_gb'), ('seats', 'latest', 'seats'),
            ('active_users', 'unique_count', 'active_users')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let emulator = Emulator::start("127.0.0.1:0".parse().unwrap(), emulator)
        .await
        .unwrap();
    let stripe = StripeConfig {
        api_base: emulator.url(),
        secret_key: tally_core::config::Secret::new(KEY),
        max_requests_per_second: 0,
        request_timeout: Duration::from_secs(5),
        meter_events: api,
        ..StripeConfig::default()
    };
    // The meters tally bills under, as an operator creates them in Stripe.
    let client = tally_sink::StripeHttp::new(&stripe).unwrap();
    let created = tally_sink::create_stripe_meters(&db.pool, &client)
        .await
        .unwrap();
    assert_eq!(created.len(), 4, "every billed meter: {created:?}");
    Setup {
        db,
        emulator,
        stripe,
    }
}

/// Sink settings for tests: bill slots as soon as they end, retry fast.
pub(crate) fn sink_config() -> SinkConfig {
    SinkConfig {
        interval: Duration::from_millis(200),
        settle_delay: Duration::ZERO,
        lease: Duration::from_secs(1),
        backoff_initial: Duration::from_millis(5),
        backoff_max: Duration::from_millis(200),
        ..SinkConfig::default()
    }
}

pub(crate) fn sink(setup: &Setup, config: SinkConfig) -> Sink {
    Sink::new(config, &setup.stripe, setup.db.pool.clone()).unwrap()
}

/// Adds to a minute window as the aggregator does (sum/count add, max keeps the larger,
/// latest takes the value with the later time), and marks its slot changed.
pub(crate) async fn add_usage(
    pool: &PgPool,
    customer: &str,
    meter: &str,
    minute: DateTime<Utc>,
    value: Decimal,
    at: DateTime<Utc>,
) {
    let mut tx = pool.begin().await.unwrap();
    let aggregation: String = sqlx::query_scalar("SELECT aggregation FROM meters WHERE name = $1")
        .bind(meter)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    let merge = match aggregation.as_str() {
        "max" => "greatest(w.value, excluded.value)",
        "latest" => {
            "CASE WHEN excluded.latest_at >= w.latest_at THEN excluded.value ELSE w.value END"
        }
        _ => "w.value + excluded.value",
    };
    sqlx::query(&format!(
        "INSERT INTO usage_minute AS w (customer_id, meter, window_start, group_key, value, event_count, latest_at, latest_id, first_updated, last_updated)
         VALUES ($1, $2, $3, '', $4, 1, $5, $5::text, now(), now())
         ON CONFLICT (customer_id, meter, window_start, group_key) DO UPDATE
            SET value = {merge}, event_count = w.event_count + 1,
                latest_at = greatest(w.latest_at, excluded.latest_at), latest_id = excluded.latest_id, last_updated = now()"
    ))
    .bind(customer)
    .bind(meter)
    .bind(minute)
    .bind(value)
    .bind(at)
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO usage_slot_changes (customer_id, meter, slot_start) VALUES ($1, $2, $3)",
    )
    .bind(customer)
    .bind(meter)
    .bind(slot_start(minute))
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

pub(crate) async fn map_all(pool: &PgPool, customers: &[String]) {
    let mappings: Vec<(String, String)> = customers
        .iter()
        .map(|c| (c.clone(), format!("cus_{c}")))
        .collect();
    tally_sink::store::map_customers(pool, &mappings)
        .await
        .unwrap();
}

pub(crate) async fn outbox_counts(pool: &PgPool) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'sent'), count(*) FILTER (WHERE status = 'failed') FROM stripe_submissions",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

pub(crate) async fn changes_left(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM usage_slot_changes")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// `tally reconcile` over the one slot starting at `slot`.
pub(crate) async fn reconcile_one_slot(
    setup: &Setup,
    slot: DateTime<Utc>,
) -> Vec<tally_sink::ReconcileRow> {
    let stripe = tally_sink::StripeHttp::new(&setup.stripe).unwrap();
    tally_sink::reconcile(
        &setup.db.pool,
        &stripe,
        900,
        slot,
        slot + chrono::TimeDelta::minutes(5),
    )
    .await
    .unwrap()
}
