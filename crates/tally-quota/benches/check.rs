//! In-process quota checks: checks/s on a cache hit (1 and 2 threads), the latency of a hit
//! and of a miss (load from Postgres). Baseline in the same run: a check that reads Postgres
//! every time (what a service without the cache would do). Needs DATABASE_URL
//! (scripts/bench.sh quota sets it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rust_decimal::Decimal;
use tally_billing::testing::unlimited_customers;
use tally_quota::Quota;

const CUSTOMERS: usize = 1000;

fn main() {
    let runtime = tally_db::testing::runtime();
    let db = runtime.block_on(tally_db::testing::fresh_database());
    let customers = runtime.block_on(unlimited_customers(&db.pool, CUSTOMERS));
    let quota = Arc::new(
        runtime
            .block_on(Quota::new(db.pool.clone(), Duration::from_secs(3600)))
            .unwrap(),
    );

    // Misses: the first check of each customer loads it.
    let mut miss = Histogram::<u64>::new(3).unwrap();
    for customer in &customers {
        let started = Instant::now();
        runtime
            .block_on(quota.check(customer, "api_calls", Decimal::ONE))
            .unwrap();
        miss.record(started.elapsed().as_nanos() as u64).unwrap();
    }
    println!(
        "cache miss (load from Postgres): p50 {:.0} µs, p99 {:.0} µs",
        miss.value_at_quantile(0.5) as f64 / 1000.0,
        miss.value_at_quantile(0.99) as f64 / 1000.0
    );

    // Hits: one thread, then two.
    for threads in [1usize, 2] {
        let per_thread = 2_000_000;
        let started = Instant::now();
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let quota = quota.clone();
                let customers = customers.clone();
                let handle = runtime.handle().clone();
                std::thread::spawn(move || {
                    let mut latency = Histogram::<u64>::new(3).unwrap();
                    for i in 0..per_thread {
                        let customer = &customers[(i * 7 + t) % CUSTOMERS];
                        let begin = Instant::now();
                        // The hit path never awaits; block_on only polls it once.
                        let decision = handle
                            .block_on(quota.check(customer, "api_calls", Decimal::ONE))
                            .unwrap();
                        if i % 64 == 0 {
                            latency.record(begin.elapsed().as_nanos() as u64).unwrap();
                        }
                        std::hint::black_box(decision);
                    }
                    latency
                })
            })
            .collect();
        let mut latency = Histogram::<u64>::new(3).unwrap();
        for handle in handles {
            latency.add(handle.join().unwrap()).unwrap();
        }
        let elapsed = started.elapsed().as_secs_f64();
        println!(
            "cache hit, {threads} thread(s): {:.0} checks/s, p50 {} ns, p99 {} ns",
            (threads * per_thread) as f64 / elapsed,
            latency.value_at_quantile(0.5),
            latency.value_at_quantile(0.99)
        );
    }

    // Baseline: reading the subscription, plan and usage from Postgres on every check.
    let checks = 2000;
    let started = Instant::now();
    for i in 0..checks {
        // Dropping the cached entry makes the check load from Postgres, as it would without
        // a cache.
        let customer = &customers[i % CUSTOMERS];
        quota.invalidate(customer);
        runtime
            .block_on(quota.check(customer, "api_calls", Decimal::ONE))
            .unwrap();
    }
    println!(
        "baseline, no cache (Postgres every check): {:.0} checks/s",
        checks as f64 / started.elapsed().as_secs_f64()
    );
}
