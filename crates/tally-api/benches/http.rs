//! `POST /v1/quota/check` over HTTP on loopback: an open-loop load generator offers a fixed
//! rate (default 10,000 checks/s, `TALLY_BENCH_RATE`) for `TALLY_BENCH_SECONDS` (default 5)
//! over keep-alive connections, and measures each request's latency from the moment it was
//! scheduled (so a stalled server cannot hide queueing). Server and load generator share the
//! machine's 2 cores. Baseline in the same run: the same check in process, without HTTP.
//!
//! `TALLY_BENCH_CUSTOMERS` (default 1,000) customers are checked in turn, each once before the
//! measured run; `TALLY_BENCH_CHANGES` of them a second (default 0) get usage committed the
//! way the aggregator commits it (a transaction every 100 ms naming them in
//! `customer_changes`); the cache follows the change feed unless `TALLY_BENCH_FEED=0`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use rust_decimal::Decimal;
use tally_api::{router, Access, ApiState, ApiToken, RateLimits, Scope, ServeConfig};
use tally_billing::testing::unlimited_customers;
use tally_quota::Quota;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "bench-token-0123456789abcdef";

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let rate = env("TALLY_BENCH_RATE", 10_000);
    let seconds = env("TALLY_BENCH_SECONDS", 5);
    let customers = env("TALLY_BENCH_CUSTOMERS", 1000) as usize;
    let changes = env("TALLY_BENCH_CHANGES", 0);
    let feed = env("TALLY_BENCH_FEED", 1) == 1;
    let server_runtime = tally_db::testing::runtime();
    let db = server_runtime.block_on(tally_db::testing::fresh_database());
    let (addr, stop, quota_baseline) = server_runtime.block_on(async {
        unlimited_customers(&db.pool, customers).await;
        let state = Arc::new(ApiState {
            fallback_plan: None,
            alert_destinations: Default::default(),
            billing: Default::default(),
            pipeline: Default::default(),
            quota: Quota::with_options(
                db.pool.clone(),
                tally_quota::QuotaOptions {
                    change_feed: feed,
                    ..tally_quota::QuotaOptions::new(Duration::from_millis(env(
                        "TALLY_BENCH_REFRESH_MS",
                        250,
                    )))
                },
            )
            .await
            .unwrap(),
            pool: db.pool.clone(),
            reader_pool: db.pool.clone(),
            access: Access::new(
                &[ApiToken::new("bench", Scope::Check, None, TOKEN)],
                &RateLimits::default(),
            ),
            metrics: None,
            emitter: None,
            stripe_webhook: None,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(tally_api::serve(
            listener,
            router(state, &ServeConfig::default()),
            ServeConfig::default().limits,
            stop.clone(),
        ));
        let baseline = Quota::new(db.pool.clone(), Duration::from_secs(1))
            .await
            .unwrap();
        (addr, stop, baseline)
    });

    let client_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // Warm-up (connections open, every customer cached once), then the measured run, while
    // the changes are committed.
    let warm_up = (customers as u64).div_ceil(rate).max(1);
    client_runtime.block_on(load(addr, rate, warm_up, customers));
    let changing = server_runtime.spawn(commit_changes(db.pool.clone(), customers, changes));
    let (latency, service, errors, elapsed) =
        client_runtime.block_on(load(addr, rate, seconds, customers));
    changing.abort();
    let feed = if feed { "the change feed" } else { "the timer" };
    println!(
        "{customers} customers, {changes} of them changed a second, the cache following {feed}"
    );
    println!(
        "HTTP quota checks offered at {rate}/s for {seconds}s: {} answered in {:.2}s ({:.0}/s), {errors} errors",
        latency.len(),
        elapsed.as_secs_f64(),
        latency.len() as f64 / elapsed.as_secs_f64()
    );
    println!(
        "latency from schedule: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        latency.value_at_quantile(0.5) as f64 / 1000.0,
        latency.value_at_quantile(0.99) as f64 / 1000.0,
        latency.value_at_quantile(0.999) as f64 / 1000.0,
        latency.max() as f64 / 1000.0
    );
    println!(
        "latency from send (without the load generator's 1 ms timer lateness): p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms",
        service.value_at_quantile(0.5) as f64 / 1000.0,
        service.value_at_quantile(0.99) as f64 / 1000.0,
        service.value_at_quantile(0.999) as f64 / 1000.0
    );
    stop.cancel();
    let in_process = server_runtime.block_on(async {
        quota_baseline
            .check("c1", "api_calls", Decimal::ONE)
            .await
            .unwrap();
        let started = Instant::now();
        for _ in 0..100_000 {
            quota_baseline
                .check("c1", "api_calls", Decimal::ONE)
                .await
                .unwrap();
        }
        started.elapsed()
    });
    println!(
        "baseline, the same check in process: {:.2} µs each",
        in_process.as_secs_f64() * 10.0
    );
}

/// Keep-alive connections, each taking the next scheduled request when its previous one is
/// answered (as wrk2 does). Latency counts from the schedule, so queueing is not hidden.
const CONNECTIONS: u64 = 64;

/// Usage for `per_second` customers a second, committed as the aggregator commits it: every
/// 100 ms one transaction adds to their daily rollup and names them in `customer_changes`.
async fn commit_changes(pool: sqlx::PgPool, customers: usize, per_second: u64) {
    let per_tick = (per_second / 10) as usize;
    if per_tick == 0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut next = 0usize;
    loop {
        tick.tick().await;
        let changed: Vec<String> = (0..per_tick)
            .map(|i| format!("c{}", (next + i * 7919) % customers))
            .collect();
        next += 1;
        let names: Vec<&str> = changed.iter().map(String::as_str).collect();
        let mut tx = pool.begin().await.unwrap();
        sqlx::query(
            "INSERT INTO usage_daily (customer_id, meter, day, group_key, value, event_count, first_updated, last_updated)
             SELECT c, 'api_calls', (now() AT TIME ZONE 'UTC')::date, '', 1, 1, now(), now()
             FROM unnest($1::text[]) AS c
             ON CONFLICT (customer_id, meter, day, group_key)
             DO UPDATE SET value = usage_daily.value + 1, event_count = usage_daily.event_count + 1",
        )
        .bind(&names)
        .execute(&mut *tx)
        .await
        .unwrap();
        tally_db::changes::record(&mut tx, &names).await.unwrap();
        tx.commit().await.unwrap();
    }
}

async fn load(
    addr: std::net::SocketAddr,
    rate: u64,
    seconds: u64,
    customers: usize,
) -> (Histogram<u64>, Histogram<u64>, u64, Duration) {
    let total = rate * seconds;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now() + Duration::from_millis(100);
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..CONNECTIONS {
        let next = next.clone();
        workers.spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(connection);
            let mut latency = Histogram::<u64>::new(3).unwrap();
            let mut service = Histogram::<u64>::new(3).unwrap();
            let mut errors = 0u64;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let scheduled = start + interval.mul_f64(i as f64);
                tokio::time::sleep_until(scheduled.into()).await;
                let body = format!(
                    r#"{{"customer":"c{}","meter":"api_calls","quantity":1}}"#,
                    i as usize % customers
                );
                let request = hyper::Request::post("/v1/quota/check")
                    .header("host", "bench")
                    .header("authorization", format!("Bearer {TOKEN}"))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap();
                let sent = Instant::now();
                match sender.send_request(request).await {
                    Ok(response) if response.status() == 200 => {
                        let _ = response.into_body().collect().await;
                        latency
                            .record((scheduled.elapsed().as_micros() as u64).max(1))
                            .unwrap();
                        service
                            .record((sent.elapsed().as_micros() as u64).max(1))
                            .unwrap();
                    }
                    _ => errors += 1,
                }
            }
            (latency, service, errors)
        });
    }
    let mut latency = Histogram::<u64>::new(3).unwrap();
    let mut service = Histogram::<u64>::new(3).unwrap();
    let mut errors = 0;
    while let Some(done) = workers.join_next().await {
        let (worker_latency, worker_service, worker_errors) = done.unwrap();
        latency.add(worker_latency).unwrap();
        service.add(worker_service).unwrap();
        errors += worker_errors;
    }
    (latency, service, errors, start.elapsed())
}
