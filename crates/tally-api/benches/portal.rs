//! The customer portal's pages over HTTP on loopback: time to the first byte of each page
//! (the answer's head), with 10,000 customers subscribed and 30 days of minute windows for the
//! customer shown (`api_calls`, and `tokens` in three series by model: 172,800 minute rows),
//! their daily rollups, and a usage row a day for every other customer. Each page is asked
//! `TALLY_BENCH_REQUESTS` times (default 300) by `TALLY_BENCH_CONNECTIONS` keep-alive
//! connections at once (default 4), after a warm-up; server and client share the machine's
//! 2 cores.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use tally_api::{router, Access, ApiState, ApiToken, Rate, Scope, ServeConfig};
use tally_billing::testing::unlimited_customers;
use tally_quota::Quota;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "bench-admin-token-0123456789abcdef";
const CUSTOMERS: usize = 10_000;
const SHOWN: &str = "c0";
const DAYS: i64 = 30;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn fill(pool: &sqlx::PgPool) {
    unlimited_customers(pool, CUSTOMERS).await;
    sqlx::query("INSERT INTO meters (name, aggregation, stripe_event_name, group_by) VALUES ('tokens', 'sum', 'tokens', '{model}')")
        .execute(pool)
        .await
        .unwrap();
    // The plan meters both (tokens unlimited): the portal charts the plan's meters.
    let plan: tally_billing::PlanDefinition = serde_json::from_value(serde_json::json!({
        "name": "PRO", "limits": {
            "api_calls": { "limit": "1000000000", "period": "day" },
            "tokens": { "limit": "-1", "period": "billing_period" } }
    }))
    .unwrap();
    tally_billing::apply_plans(pool, &[plan], "bench")
        .await
        .unwrap();
    // 30 days of minutes for the customer shown: api_calls, and tokens by model.
    sqlx::query(
        "INSERT INTO usage_minute (customer_id, meter, window_start, group_key, value, event_count, first_updated, last_updated)
         SELECT $1, m.meter, w, m.group_key, (extract(epoch FROM w)::bigint % 97) + 1, 1, now(), now()
         FROM generate_series(date_trunc('minute', now()) - make_interval(days => $2::int), date_trunc('minute', now()), interval '1 minute') AS w,
              (VALUES ('api_calls', ''), ('tokens', '{\"model\":\"small\"}'), ('tokens', '{\"model\":\"medium\"}'), ('tokens', '{\"model\":\"large\"}')) AS m(meter, group_key)",
    )
    .bind(SHOWN)
    .bind(DAYS as i32)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO usage_daily (customer_id, meter, day, group_key, value, event_count, first_updated, last_updated)
         SELECT customer_id, meter, (window_start AT TIME ZONE 'UTC')::date, group_key, sum(value), count(*), now(), now()
         FROM usage_minute WHERE customer_id = $1 GROUP BY 1, 2, 3, 4",
    )
    .bind(SHOWN)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO usage_daily (customer_id, meter, day, group_key, value, event_count, first_updated, last_updated)
         SELECT 'c' || i, 'api_calls', (now() AT TIME ZONE 'UTC')::date, '', i % 1000, 1, now(), now()
         FROM generate_series(1, $1::int - 1) AS i",
    )
    .bind(CUSTOMERS as i32)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE").execute(pool).await.unwrap();
}

fn main() {
    let requests = env("TALLY_BENCH_REQUESTS", 300);
    let connections = env("TALLY_BENCH_CONNECTIONS", 4);
    let server_runtime = tally_db::testing::runtime();
    let db = server_runtime.block_on(tally_db::testing::fresh_database());
    let started = Instant::now();
    server_runtime.block_on(fill(&db.pool));
    let rows: i64 = server_runtime.block_on(async {
        sqlx::query_scalar("SELECT count(*) FROM usage_minute")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    });
    println!(
        "{CUSTOMERS} customers, {rows} minute windows for {SHOWN} ({DAYS} days), filled in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let (addr, stop) = server_runtime.block_on(async {
        let mut config = ServeConfig::default();
        // The bench asks faster than a person: lift the portal session's request rate.
        config.rate_limits.customer = Rate::new(1_000_000, 1_000_000);
        let state = Arc::new(ApiState {
            fallback_plan: None,
            alert_destinations: Default::default(),
            billing: Default::default(),
            pipeline: Default::default(),
            quota: Quota::new(db.pool.clone(), Duration::from_millis(250))
                .await
                .unwrap(),
            pool: db.pool.clone(),
            reader_pool: db.pool.clone(),
            access: Access::new(
                &[ApiToken::new("bench", Scope::Admin, None, TOKEN)],
                &config.rate_limits,
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
            router(state, &config),
            config.limits.clone(),
            stop.clone(),
        ));
        (addr, stop)
    });

    let client_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    client_runtime.block_on(async {
        let cookie = open_portal(addr).await;
        for page in [
            "/portal",
            "/portal/usage?range=today",
            "/portal/usage?range=7d",
            "/portal/usage?range=30d",
            "/portal/usage?range=period",
            "/portal/credits",
            "/portal/plans",
            "/portal/alerts",
            "/portal/usage.csv?range=30d",
            "/pricing",
        ] {
            // Warm-up: connections, the quota cache, Postgres's buffers.
            load(addr, &cookie, page, 20, 2).await;
            let (first_byte, whole, bytes) = load(addr, &cookie, page, requests, connections).await;
            println!(
                "{page:<28} first byte p50 {:>6.2} ms  p99 {:>6.2} ms  max {:>6.2} ms | whole page p99 {:>6.2} ms, {bytes} bytes",
                first_byte.value_at_quantile(0.5) as f64 / 1000.0,
                first_byte.value_at_quantile(0.99) as f64 / 1000.0,
                first_byte.max() as f64 / 1000.0,
                whole.value_at_quantile(0.99) as f64 / 1000.0,
            );
        }
    });
    stop.cancel();
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: std::net::SocketAddr) -> Sender {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    sender
}

async fn open_portal(addr: std::net::SocketAddr) -> String {
    let mut sender = connect(addr).await;
    let request = hyper::Request::post(format!("/v1/customers/{SHOWN}/portal-sessions"))
        .header("host", addr.to_string())
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let session: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let url = session["url"].as_str().unwrap();
    let path = &url[url.find("/portal/").unwrap()..];
    let request = hyper::Request::post(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let cookie = response.headers()["set-cookie"].to_str().unwrap();
    cookie.split(';').next().unwrap().to_owned()
}

/// `requests` GETs of `path` over `connections` connections; time to the head, time to the
/// whole body, and the body's size.
async fn load(
    addr: std::net::SocketAddr,
    cookie: &str,
    path: &str,
    requests: u64,
    connections: u64,
) -> (Histogram<u64>, Histogram<u64>, usize) {
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..connections {
        let (cookie, path) = (cookie.to_owned(), path.to_owned());
        let share = requests / connections + u64::from(worker < requests % connections);
        workers.spawn(async move {
            let mut sender = connect(addr).await;
            let mut first = Histogram::<u64>::new(3).unwrap();
            let mut whole = Histogram::<u64>::new(3).unwrap();
            let mut size = 0;
            for _ in 0..share {
                let request = hyper::Request::get(&path)
                    .header("host", addr.to_string())
                    .header("cookie", &cookie)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let sent = Instant::now();
                let response = sender.send_request(request).await.unwrap();
                first.record(sent.elapsed().as_micros() as u64).unwrap();
                assert_eq!(response.status(), 200, "{path}");
                size = response
                    .into_body()
                    .collect()
                    .await
                    .unwrap()
                    .to_bytes()
                    .len();
                whole.record(sent.elapsed().as_micros() as u64).unwrap();
            }
            (first, whole, size)
        });
    }
    let mut first = Histogram::<u64>::new(3).unwrap();
    let mut whole = Histogram::<u64>::new(3).unwrap();
    let mut size = 0;
    while let Some(result) = workers.join_next().await {
        let (f, w, s) = result.unwrap();
        first.add(f).unwrap();
        whole.add(w).unwrap();
        size = s;
    }
    (first, whole, size)
}
