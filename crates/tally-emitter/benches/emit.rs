//! `emit()` cost and publish throughput into librdkafka's mock cluster.
//!
//! Run: `scripts/bench.sh emitter` (or `cargo bench -p tally-emitter --bench emit`).
//! Prints one figure a line after criterion's own report:
//! - p50/p99/p99.9 of a single `emit()` call at a sustained offered rate, from 1 and 2 threads;
//! - events/s acknowledged by the broker with callers emitting as fast as the queue takes them;
//! - the same latency for the baseline a home-grown integration uses: encode and
//!   `producer.send()` on the caller's thread.

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::Criterion;
use hdrhistogram::Histogram;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, DefaultProducerContext, Producer};
use rdkafka::ClientConfig;
use rust_decimal::Decimal;
use tally_core::config::KafkaConfig;
use tally_core::{wire, UsageEvent};
use tally_emitter::{Emitter, EmitterConfig};

const PARTITIONS: i32 = 6;
/// Offered rate for the latency figures, all threads together.
const OFFERED_PER_S: u64 = 200_000;
const LATENCY_SECONDS: u64 = 3;
const THROUGHPUT_EVENTS: usize = 1_000_000;

struct Bench {
    _cluster: MockCluster<'static, DefaultProducerContext>,
    kafka: KafkaConfig,
    _spool: tempfile::TempDir,
    emitter: Arc<Emitter>,
}

fn bench() -> Bench {
    let cluster = MockCluster::new(1).expect("mock cluster");
    let topic = "usage-events-bench".to_owned();
    cluster.create_topic(&topic, PARTITIONS, 1).expect("topic");
    let kafka = KafkaConfig {
        brokers: cluster.bootstrap_servers(),
        topic,
        ..KafkaConfig::default()
    };
    let spool = tempfile::tempdir().unwrap();
    let mut config = EmitterConfig::default();
    config.spool.dir = spool.path().to_owned();
    let emitter = Arc::new(Emitter::start(&kafka, &config).unwrap());
    Bench {
        _cluster: cluster,
        kafka,
        _spool: spool,
        emitter,
    }
}

fn event(thread: usize, i: u64) -> UsageEvent {
    UsageEvent::new(
        format!("customer-{}", i % 10_000),
        "api_calls",
        Decimal::from(i % 10 + 1),
    )
    .with_dimension("region", if thread == 0 { "eu" } else { "us" })
}

/// Waits until the publisher has caught up, so the next measurement starts from an empty queue.
fn drain(emitter: &Emitter) {
    emitter.flush(Duration::from_secs(120)).expect("flush");
}

/// Criterion's mean cost of `emit()`, paced in bursts the publisher can absorb without spilling.
fn criterion_emit(c: &mut Criterion, b: &Bench) {
    c.bench_function("emit (1 thread, paced)", |bencher| {
        bencher.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            let mut i = 0;
            while i < iters {
                let burst = (iters - i).min(1_000);
                let events: Vec<UsageEvent> = (0..burst).map(|k| event(0, i + k)).collect();
                let start = Instant::now();
                for e in events {
                    black_box(b.emitter.emit(e)).unwrap();
                }
                spent += start.elapsed();
                i += burst;
                while b.emitter.queue_depth() > 0 {
                    std::thread::yield_now();
                }
            }
            spent
        })
    });
    drain(&b.emitter);
}

/// Emits at `OFFERED_PER_S / threads` per thread for `LATENCY_SECONDS`, timing every call.
/// Each thread builds its events before the clock starts a call; only `emit()` is timed.
fn paced_latency(threads: usize, call: impl Fn(usize, UsageEvent) + Sync) -> Histogram<u64> {
    let per_thread = OFFERED_PER_S / threads as u64;
    let total = per_thread * LATENCY_SECONDS;
    let burst = 100u64;
    let gap = Duration::from_nanos(1_000_000_000 * burst / per_thread);
    let barrier = Barrier::new(threads);
    let call = &call;
    let barrier = &barrier;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut hist = Histogram::<u64>::new(3).unwrap();
                    barrier.wait();
                    let start = Instant::now();
                    let mut sent = 0u64;
                    while sent < total {
                        let batch: Vec<UsageEvent> =
                            (0..burst).map(|k| event(t, sent + k)).collect();
                        for e in batch {
                            let t0 = Instant::now();
                            call(t, e);
                            hist.record(t0.elapsed().as_nanos() as u64).unwrap();
                        }
                        sent += burst;
                        let due = start + gap * (sent / burst) as u32;
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                    }
                    hist
                })
            })
            .collect();
        let mut all = Histogram::<u64>::new(3).unwrap();
        for h in handles {
            all.add(h.join().unwrap()).unwrap();
        }
        all
    })
}

/// Events/s from the first `emit()` to the broker's last acknowledgement, callers backing off
/// only when the queue is nearly full (as `Overloaded` would tell them to).
fn throughput(b: &Bench, threads: usize) -> f64 {
    let per_thread = (THROUGHPUT_EVENTS / threads) as u64;
    let before = b.emitter.stats();
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let emitter = &b.emitter;
            s.spawn(move || {
                for i in 0..per_thread {
                    while emitter.queue_depth() > 60_000 {
                        std::thread::yield_now();
                    }
                    emitter.emit(event(t, i)).unwrap();
                }
            });
        }
    });
    drain(&b.emitter);
    let elapsed = start.elapsed().as_secs_f64();
    let after = b.emitter.stats();
    let acked = (after.published + after.replayed) - (before.published + before.replayed);
    assert_eq!(
        acked,
        per_thread * threads as u64,
        "every event acknowledged"
    );
    acked as f64 / elapsed
}

fn print_latency(name: &str, hist: &Histogram<u64>) {
    println!("{name}_p50_ns {}", hist.value_at_quantile(0.50));
    println!("{name}_p99_ns {}", hist.value_at_quantile(0.99));
    println!("{name}_p999_ns {}", hist.value_at_quantile(0.999));
    println!("{name}_max_ns {}", hist.max());
}

fn main() {
    let b = bench();
    let mut c = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(5));
    criterion_emit(&mut c, &b);
    c.final_summary();

    println!("# figures (offered {OFFERED_PER_S} events/s for {LATENCY_SECONDS}s; throughput over {THROUGHPUT_EVENTS} events)");
    for threads in [1, 2] {
        let spooled_before = b.emitter.stats().spooled;
        let hist = paced_latency(threads, |_, e| {
            b.emitter.emit(e).unwrap();
        });
        drain(&b.emitter);
        print_latency(&format!("emit_{threads}thread"), &hist);
        println!(
            "emit_{threads}thread_spilled_events {}",
            b.emitter.stats().spooled - spooled_before
        );
    }
    for threads in [1, 2] {
        println!(
            "publish_{threads}thread_events_per_s {:.0}",
            throughput(&b, threads)
        );
    }

    // Baseline: what calling the producer directly from the request path costs.
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &b.kafka.brokers)
        .set("enable.idempotence", "true")
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let topic = b.kafka.topic.clone();
    let hist = paced_latency(1, |_, mut e| {
        e.id = uuid::Uuid::now_v7().to_string();
        let payload = wire::encode(&e);
        let record = BaseRecord::<str, [u8]>::to(&topic)
            .key(e.customer.as_str())
            .payload(&payload);
        // The request path must wait whenever librdkafka's buffer is full.
        let mut record = record;
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(1));
                }
            }
        }
        producer.poll(Duration::ZERO);
    });
    producer.flush(Duration::from_secs(60)).unwrap();
    print_latency("baseline_direct_send_1thread", &hist);
}
