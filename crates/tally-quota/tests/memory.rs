//! What the quota cache costs in memory per cached customer: RSS before and after caching
//! 1,000,000 customers on a typical plan (three limited meters, two features), as a load
//! would cache them. Needs no database. Run alone, it prints one figure a line:
//!
//!     cargo test --release -p tally-quota --test memory -- --ignored --nocapture

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use tally_billing::store::Subscription;
use tally_billing::{Entitlements, PlanDefinition};
use tally_quota::{Quota, QuotaOptions};

const CUSTOMERS: usize = 1_000_000;

/// Resident memory of this process, from /proc (Linux).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux /proc");
    let kb: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmRSS line");
    kb * 1024
}

#[test]
#[ignore = "measures memory; run alone with --ignored --nocapture"]
fn memory_per_cached_customer() {
    let runtime = tally_db::testing::runtime();
    runtime.block_on(async {
        // Never connects: the customers are cached directly, as a load would cache them.
        let pool = sqlx::PgPool::connect_lazy("postgres://nobody@127.0.0.1:1/none").unwrap();
        let mut options = QuotaOptions::new(Duration::from_secs(3600));
        // Room to spare: each shard holds its share of the bound, and they fill unevenly.
        options.max_customers = 2 * CUSTOMERS;
        let quota = Quota::with_options(pool, options).await.unwrap();
        let plan: PlanDefinition = serde_json::from_value(serde_json::json!({
            "name": "PRO",
            "features": { "api": true, "sso": false },
            "limits": {
                "api_calls": { "limit": "100000", "period": "day" },
                "tokens": { "limit": "5000000", "period": "month", "enforcement": "grace", "grace_percent": "10" },
                "storage_gb": { "limit": "50", "period": "billing_period", "enforcement": "soft" }
            }
        }))
        .unwrap();
        let entitlements = Entitlements::resolve(&plan, None).unwrap();
        let start = Utc::now() - TimeDelta::days(3);
        let before = rss_bytes();
        for i in 0..CUSTOMERS {
            quota.insert_loaded(
                Subscription {
                    customer_id: format!("cus_{i:014}"),
                    plan: "PRO".into(),
                    status: "active".into(),
                    current_period_start: start,
                    current_period_end: start + TimeDelta::days(30),
                    cancel_at_period_end: false,
                },
                entitlements.clone(),
            );
        }
        let after = rss_bytes();
        let counts = quota.cache_counts();
        assert_eq!(counts.cached, CUSTOMERS);
        assert_eq!(counts.evicted, 0);
        let per_customer = (after - before) / CUSTOMERS as u64;
        println!("customers cached: {CUSTOMERS}");
        println!("rss added: {} MiB", (after - before) / (1024 * 1024));
        println!("bytes per cached customer: {per_customer}");
    });
}
