//! What `tally_quota::layer::QuotaLayer` costs per request, in process: an axum route with the
//! layer against the same route without it (the baseline, measured in the same run, in
//! alternating blocks so that both see the same machine). The customer is already in the quota
//! cache; the emitter publishes into librdkafka's mock cluster in this process (3 brokers, a
//! topic of 4 partitions replicated 3 times, as tests/support.rs `Broker::start` makes them),
//! so `emit()` is real and its publisher shares the machine with the requests.
//!
//! Run: `scripts/bench.sh layer` (or `cargo bench -p tally-quota --features layer --bench
//! layer`). Needs DATABASE_URL (the cache's first load). `TALLY_BENCH_REQUESTS` (default
//! 1,000,000) requests per variant, driven one at a time with `ServiceExt::oneshot` on a clone
//! of the router, on one thread. Prints one figure a line:
//!
//! - `layer_baseline_*`: the route without the layer;
//! - `layer_allow_*`: with the layer, allowed (check, handler, emit, `RateLimit-*` headers);
//! - `layer_deny_*`: with the layer, denied (429 `LIMIT_EXCEEDED`, its body and headers; the
//!   handler does not run, nothing is emitted);
//! - `*_overhead_*`: the difference to the baseline;
//! - what the emitter did with the allowed requests' events.
//!
//! Not included: a metrics recorder (the layer's counters are no-ops without one) and the
//! quota cache's background refresh (set to an hour, so no reload runs during the blocks).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use axum::routing::get;
use axum::Router;
use chrono::{TimeDelta, Utc};
use hdrhistogram::Histogram;
use rdkafka::mocking::MockCluster;
use tally_billing::testing::subscribe;
use tally_billing::{apply_plans, PlanDefinition};
use tally_core::config::KafkaConfig;
use tally_emitter::{Emitter, EmitterConfig};
use tally_quota::layer::{AuthenticatedCustomer, QuotaLayer};
use tally_quota::Quota;
use tower::ServiceExt;

/// Requests per variant unless `TALLY_BENCH_REQUESTS` says otherwise.
const DEFAULT_REQUESTS: usize = 1_000_000;
/// Blocks per variant; the variants take turns block by block.
const ROUNDS: usize = 20;
/// Requests per variant before measuring (allocator, caches, the producer's connections).
const WARMUP: usize = 20_000;
/// On plan `PRO` (a billion calls a day): every request is allowed.
const ALLOWED: &str = "c-allowed";
/// On plan `TINY` (one call a day), used up before measuring: every request is denied.
const DENIED: &str = "c-denied";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Baseline,
    Allow,
    Deny,
}

impl Variant {
    const ALL: [Variant; 3] = [Variant::Baseline, Variant::Allow, Variant::Deny];

    fn name(self) -> &'static str {
        match self {
            Variant::Baseline => "baseline",
            Variant::Allow => "allow",
            Variant::Deny => "deny",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Variant::Baseline => "/plain",
            Variant::Allow | Variant::Deny => "/metered",
        }
    }

    fn customer(self) -> &'static str {
        match self {
            Variant::Baseline | Variant::Allow => ALLOWED,
            Variant::Deny => DENIED,
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Variant::Baseline | Variant::Allow => StatusCode::OK,
            Variant::Deny => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

async fn handler() -> &'static str {
    "ok"
}

/// One request as the service's authentication passes it on: the customer it established
/// (the layer makes the request id).
fn request(variant: Variant, _n: usize) -> Request<Body> {
    let mut request = Request::builder()
        .uri(variant.path())
        .body(Body::empty())
        .expect("a valid request");
    request
        .extensions_mut()
        .insert(AuthenticatedCustomer(variant.customer().to_owned()));
    request
}

async fn send(app: &Router, request: Request<Body>) -> Response<Body> {
    app.clone().oneshot(request).await.expect("infallible")
}

/// Meter `api_calls`; plans `PRO` (a billion a day) and `TINY` (one a day, hard); the two
/// customers subscribed.
async fn seed(pool: &sqlx::PgPool) {
    sqlx::query(
        "INSERT INTO meters (name, aggregation, stripe_event_name) VALUES ('api_calls', 'sum', 'api_calls')",
    )
    .execute(pool)
    .await
    .expect("the meter is recorded");
    let plans: Vec<PlanDefinition> = serde_json::from_value(serde_json::json!([
        { "name": "PRO", "limits": { "api_calls": { "limit": "1000000000", "period": "day" } } },
        { "name": "TINY", "limits": { "api_calls": { "limit": "1", "period": "day", "enforcement": "hard" } } },
    ]))
    .expect("valid plans");
    apply_plans(pool, &plans, "bench")
        .await
        .expect("the plans are applied");
    let start = Utc::now() - TimeDelta::days(1);
    subscribe(pool, ALLOWED, "PRO", start).await;
    subscribe(pool, DENIED, "TINY", start).await;
}

fn main() {
    let requests: usize = std::env::var("TALLY_BENCH_REQUESTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_REQUESTS);
    let block = requests.div_ceil(ROUNDS);

    let runtime = tally_db::testing::runtime();
    let db = runtime.block_on(tally_db::testing::fresh_database());
    runtime.block_on(seed(&db.pool));
    // An hour: no background reload during the measurement (see the module's notes).
    let quota = Arc::new(
        runtime
            .block_on(Quota::new(db.pool.clone(), Duration::from_secs(3600)))
            .expect("quota"),
    );

    let cluster = MockCluster::new(3).expect("mock cluster");
    let suffix = uuid::Uuid::now_v7().simple().to_string();
    let kafka = KafkaConfig {
        brokers: cluster.bootstrap_servers(),
        topic: format!("usage-events-{suffix}"),
        ..KafkaConfig::default()
    };
    cluster.create_topic(&kafka.topic, 4, 3).expect("topic");
    let spool = tempfile::tempdir().expect("a spool directory");
    let mut emitter_config = EmitterConfig::default();
    emitter_config.spool.dir = spool.path().to_owned();
    let emitter = Arc::new(Emitter::start(&kafka, &emitter_config).expect("emitter"));

    let app = Router::new().route("/plain", get(handler)).route(
        "/metered",
        get(handler).layer(QuotaLayer::new(quota.clone(), emitter.clone(), "api_calls")),
    );

    let mut latency: Vec<Histogram<u64>> = Variant::ALL
        .iter()
        .map(|_| Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram"))
        .collect();
    let mut spent = [Duration::ZERO; 3];
    let mut sent = [0usize; 3];

    runtime.block_on(async {
        // The deny customer uses up its one call; both customers are then in the cache.
        for (variant, first) in [
            (Variant::Allow, StatusCode::OK),
            (Variant::Deny, StatusCode::OK),
            (Variant::Deny, StatusCode::TOO_MANY_REQUESTS),
        ] {
            let response = send(&app, request(variant, usize::MAX)).await;
            assert_eq!(response.status(), first);
            assert!(response.headers().contains_key("ratelimit-limit"));
        }
        let denied = send(&app, request(Variant::Deny, usize::MAX)).await;
        assert!(denied.headers().contains_key("retry-after"));

        for variant in Variant::ALL {
            for n in 0..WARMUP {
                black_box(send(&app, request(variant, n)).await);
            }
        }
        emitter.flush(Duration::from_secs(120)).expect("flush");
        let before = emitter.stats();

        for round in 0..ROUNDS {
            // Which variant goes first rotates from round to round.
            for k in 0..Variant::ALL.len() {
                let index = (round + k) % Variant::ALL.len();
                let variant = Variant::ALL[index];
                let histogram = &mut latency[index];
                let mut timed = Duration::ZERO;
                for _ in 0..block {
                    let n = WARMUP + sent[index];
                    sent[index] += 1;
                    let request = request(variant, n);
                    let started = Instant::now();
                    let response = send(&app, request).await;
                    let status = response.status();
                    drop(black_box(response));
                    let took = started.elapsed();
                    timed += took;
                    histogram
                        .record(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX))
                        .expect("in range");
                    assert_eq!(status, variant.status(), "{} request {n}", variant.name());
                }
                spent[index] += timed;
                if variant == Variant::Allow {
                    // The events of this block reach the broker before the next block starts:
                    // the publisher's work lands in the block that caused it.
                    emitter.flush(Duration::from_secs(120)).expect("flush");
                }
            }
        }

        let after = emitter.stats();
        let allowed = sent[Variant::Allow as usize] as u64;
        println!("# {} requests per variant, {ROUNDS} alternating blocks, one thread; oneshot on a cloned Router", block * ROUNDS);
        for (index, variant) in Variant::ALL.iter().enumerate() {
            let h = &latency[index];
            let name = variant.name();
            println!("layer_{name}_p50_ns {}", h.value_at_quantile(0.50));
            println!("layer_{name}_p99_ns {}", h.value_at_quantile(0.99));
            println!("layer_{name}_p999_ns {}", h.value_at_quantile(0.999));
            println!("layer_{name}_mean_ns {:.0}", h.mean());
            println!(
                "layer_{name}_requests_per_s {:.0}",
                sent[index] as f64 / spent[index].as_secs_f64()
            );
        }
        let base = &latency[Variant::Baseline as usize];
        for variant in [Variant::Allow, Variant::Deny] {
            let h = &latency[variant as usize];
            let name = variant.name();
            for (label, q) in [("p50", 0.50), ("p99", 0.99)] {
                let diff = h.value_at_quantile(q) as i64 - base.value_at_quantile(q) as i64;
                println!("layer_{name}_overhead_{label}_ns {diff}");
            }
            println!(
                "layer_{name}_overhead_mean_ns {:.0}",
                h.mean() - base.mean()
            );
        }
        println!("layer_allow_events_emitted {}", after.emitted - before.emitted);
        println!(
            "layer_allow_events_acknowledged {}",
            (after.published + after.replayed) - (before.published + before.replayed)
        );
        println!("layer_allow_events_spooled {}", after.spooled - before.spooled);
        println!(
            "layer_allow_emit_refused {}",
            (after.rejected + after.overloaded + after.dropped)
                - (before.rejected + before.overloaded + before.dropped)
        );
        assert_eq!(after.emitted - before.emitted, allowed, "one event per allowed request");
    });
    emitter.shutdown(Duration::from_secs(10));
}
