//! The one harness of the tests that span stages (ARCHITECTURE.md: "real processes, killed
//! and restarted"): a Kafka-protocol broker (librdkafka's mock cluster, reached over TCP by
//! the processes too), a fresh database, the Stripe emulator, a `tally.toml`, and the built
//! `tally` binary run as separate processes.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use stripe_emulator::{Emulator, EmulatorConfig};
use tally_aggregator::{Aggregator, AggregatorConfig, AggregatorError, RunSummary};
use tally_core::config::{KafkaConfig, Secret};
use tally_core::MeterDefinition;
use tally_emitter::{Emitter, EmitterConfig};
use tally_sink::StripeConfig;
use tokio_util::sync::CancellationToken;

/// The Stripe key every test uses (live mode: the emulator allows 1,000 calls/s).
pub const STRIPE_KEY: &str = "sk_live_tally_tests";
/// Partitions of the test topic.
pub const PARTITIONS: i32 = 4;

/// The meters of every cross-stage test, as tally.toml holds them.
pub const METERS: &str = r#"
[[meters]]
name = "api_calls"
aggregation = "sum"

[[meters]]
name = "tokens"
aggregation = "sum"
group_by = ["model"]
stripe_event_name = "llm_tokens"

[[meters]]
name = "storage_gb"
aggregation = "max"
"#;

/// The built `tally` binary. `cargo test --workspace` builds it (the `tally` package has
/// integration tests); a test run on this package alone needs `cargo build -p tally` first.
pub fn tally_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/<test> → target/<profile>/tally
    let binary = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("tally"))
        .expect("a target directory");
    assert!(
        binary.is_file(),
        "{} is not built: run `cargo build -p tally` (scripts/test.sh builds it)",
        binary.display()
    );
    binary
}

/// `tally` as a child process sees it: none of the test's `TALLY_*` variables (tally refuses
/// ones it does not know, and the tests' own knobs are among them) and no `DATABASE_URL`.
pub fn tally_command() -> Command {
    let mut command = Command::new(tally_binary());
    for (name, _) in std::env::vars() {
        if name.starts_with("TALLY_") || name == "DATABASE_URL" {
            command.env_remove(name);
        }
    }
    command
}

/// A broker with a fresh topic and DLQ topic.
pub struct Broker {
    pub cluster: MockCluster<'static, DefaultProducerContext>,
    pub kafka: KafkaConfig,
}

impl Broker {
    pub fn start() -> Broker {
        let cluster = MockCluster::new(3).expect("mock cluster");
        let suffix = uuid::Uuid::now_v7().simple().to_string();
        let kafka = KafkaConfig {
            brokers: cluster.bootstrap_servers(),
            topic: format!("usage-events-{suffix}"),
            dlq_topic: format!("usage-events-dlq-{suffix}"),
            ..KafkaConfig::default()
        };
        cluster
            .create_topic(&kafka.topic, PARTITIONS, 3)
            .expect("topic");
        cluster
            .create_topic(&kafka.dlq_topic, 1, 3)
            .expect("dlq topic");
        Broker { cluster, kafka }
    }

    /// Every broker down (`true`) or up again.
    pub fn all_down(&self, down: bool) {
        for broker in 1..=3 {
            if down {
                self.cluster.broker_down(broker).expect("broker down");
            } else {
                self.cluster.broker_up(broker).expect("broker up");
            }
        }
    }
}

/// The Stripe emulator on a free port.
pub async fn emulator() -> Emulator {
    emulator_with(EmulatorConfig::default()).await
}

/// The Stripe emulator on a free port, with limits and faults of the test's choosing.
pub async fn emulator_with(config: EmulatorConfig) -> Emulator {
    Emulator::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .expect("emulator")
}

/// How the sink reaches `emulator` with the tests' key.
pub fn stripe_config(emulator: &Emulator) -> StripeConfig {
    StripeConfig {
        api_base: emulator.url(),
        secret_key: Secret::new(STRIPE_KEY),
        ..StripeConfig::default()
    }
}

/// Records `meters` and creates their Stripe meters in the emulator, as `tally aggregate`
/// and `tally sink --create-stripe-meters` do at start-up.
pub async fn record_meters(pool: &sqlx::PgPool, meters: &[MeterDefinition], stripe: &StripeConfig) {
    tally_db::meters::record(pool, meters).await.unwrap();
    let client = tally_sink::StripeHttp::new(stripe).unwrap();
    tally_sink::create_stripe_meters(pool, &client)
        .await
        .unwrap();
}

/// The test meters (`METERS`) as definitions.
pub fn meters() -> Vec<MeterDefinition> {
    tally_core::meter::meters_from_toml(METERS).unwrap()
}

/// An aggregator on a thread of its own, as `tally aggregate` runs it. Dropped, it is stopped.
pub struct AggregatorThread {
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<Result<RunSummary, AggregatorError>>>,
}

impl AggregatorThread {
    /// Runs the aggregator as a daemon; its database work runs on `runtime`.
    pub fn start(
        config: AggregatorConfig,
        kafka: &KafkaConfig,
        meters: &[MeterDefinition],
        pool: &sqlx::PgPool,
        runtime: tokio::runtime::Handle,
    ) -> AggregatorThread {
        let aggregator = Aggregator::new(
            config,
            kafka.clone(),
            meters.to_vec(),
            pool.clone(),
            runtime,
        )
        .expect("aggregator");
        let stop = CancellationToken::new();
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || aggregator.run(tally_aggregator::RunMode::Daemon, &stop))
        };
        AggregatorThread {
            stop,
            thread: Some(thread),
        }
    }

    /// True while the aggregator runs (it never stops on its own).
    pub fn running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops it and fails the test if it had failed.
    pub fn stop(mut self) {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            thread
                .join()
                .expect("aggregator thread")
                .expect("aggregator run");
        }
    }
}

impl Drop for AggregatorThread {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An emitter with a spool of its own (removed with it).
pub struct TestEmitter {
    pub emitter: std::sync::Arc<Emitter>,
    _spool: tempfile::TempDir,
}

impl TestEmitter {
    pub fn start(kafka: &KafkaConfig) -> TestEmitter {
        let spool = tempfile::tempdir().unwrap();
        let mut config = EmitterConfig::default();
        config.spool.dir = spool.path().to_owned();
        TestEmitter {
            emitter: std::sync::Arc::new(Emitter::start(kafka, &config).expect("emitter")),
            _spool: spool,
        }
    }
}

impl std::ops::Deref for TestEmitter {
    type Target = Emitter;
    fn deref(&self) -> &Emitter {
        &self.emitter
    }
}

/// A working directory with a `tally.toml` for the processes of one test.
pub struct Workdir {
    pub dir: tempfile::TempDir,
}

impl Workdir {
    /// `tally.toml` with the test meters, the broker's topics and `extra` appended.
    pub fn new(kafka: &KafkaConfig, stripe_api_base: &str, extra: &str) -> Workdir {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            "[kafka]\nbrokers = \"{}\"\ntopic = \"{}\"\ndlq_topic = \"{}\"\n\n\
             [stripe]\napi_base = \"{stripe_api_base}\"\n\n{extra}\n{METERS}",
            kafka.brokers, kafka.topic, kafka.dlq_topic
        );
        std::fs::write(dir.path().join("tally.toml"), toml).unwrap();
        Workdir { dir }
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("tally.toml")
    }

    /// `tally <args>` as a child process, its output in `<name>.log`; killed when dropped.
    pub fn spawn(&self, name: &str, database_url: &str, args: &[&str]) -> KillOnDrop {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        KillOnDrop(
            self.command(database_url, args)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("tally starts"),
        )
    }

    /// `tally <args>` to completion: (success, stdout + stderr).
    pub fn run(&self, database_url: &str, args: &[&str]) -> (bool, String) {
        self.run_with(database_url, args, &[])
    }

    /// [`Workdir::run`] with environment variables set (or emptied) for this run.
    pub fn run_with(
        &self,
        database_url: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> (bool, String) {
        let output = self
            .command(database_url, args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("tally runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    }

    /// What a child wrote so far.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    fn command(&self, database_url: &str, args: &[&str]) -> Command {
        let mut command = tally_command();
        command
            .current_dir(self.dir.path())
            .arg("--config")
            .arg(self.config())
            .args(["--database-url", database_url])
            .args(args)
            .env("STRIPE_SECRET_KEY", STRIPE_KEY)
            .env("TALLY_LOG", "info")
            .env_remove("DATABASE_URL");
        command
    }
}

impl Drop for Workdir {
    /// A failing test shows what every process wrote.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let Ok(entries) = std::fs::read_dir(self.dir.path()) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(60).collect();
                eprintln!("==== {} (last lines)", path.display());
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// The billing side without a broker: a fresh database with the test meters recorded, the
/// Stripe emulator, and a working directory whose `tally.toml` points at both. For tests of
/// the sink's and the operator's commands, which do not touch Kafka.
pub struct BillingHarness {
    pub db: tally_db::testing::TestDatabase,
    pub emulator: Emulator,
    pub work: Workdir,
    // Last: the emulator's server runs on it.
    pub runtime: tokio::runtime::Runtime,
}

impl BillingHarness {
    /// `tally <args>` against the harness's database, as `$USER=ops-tester`.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        tally_command()
            .current_dir(self.work.dir.path())
            .arg("--config")
            .arg(self.work.config())
            .args(["--database-url", &self.db.url])
            .args(args)
            .env("USER", "ops-tester")
            .stdin(Stdio::null())
            .output()
            .expect("tally runs")
    }

    /// [`BillingHarness::cli`], which must succeed: its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let output = self.cli(args);
        assert!(
            output.status.success(),
            "tally {args:?} failed ({:?}):\n{}{}",
            output.status.code(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `tally <args> --json`, parsed.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut args = args.to_vec();
        args.push("--json");
        let out = self.cli_ok(&args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}:\n{out}"))
    }

    /// [`BillingHarness::cli`], which must exit with `code`: its stderr.
    pub fn cli_exits(&self, code: i32, args: &[&str]) -> String {
        let output = self.cli(args);
        assert_eq!(
            output.status.code(),
            Some(code),
            "tally {args:?}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stderr).into_owned()
    }

    /// `extra_toml` is appended to `tally.toml`.
    pub fn start(extra_toml: &str) -> BillingHarness {
        let runtime = runtime();
        let (db, emulator) = runtime.block_on(async {
            let db = tally_db::testing::fresh_database().await;
            tally_db::meters::record(&db.pool, &meters()).await.unwrap();
            (db, emulator().await)
        });
        let kafka = KafkaConfig {
            brokers: "127.0.0.1:9".into(),
            ..KafkaConfig::default()
        };
        let work = Workdir::new(&kafka, &emulator.url(), extra_toml);
        BillingHarness {
            db,
            emulator,
            work,
            runtime,
        }
    }

    /// `tally <args>` against this database: (success, stdout + stderr).
    pub fn tally(&self, args: &[&str]) -> (bool, String) {
        self.work.run(&self.db.url, args)
    }

    pub fn sql<T>(&self, query: impl std::future::Future<Output = T>) -> T {
        self.runtime.block_on(query)
    }
}

/// A child process that is killed (SIGKILL) and reaped when dropped, also when the test
/// panics: no test leaves a `tally` process behind.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        kill(&mut self.0);
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// Kills a child (SIGKILL) and reaps it.
pub fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// True while the child has not exited.
pub fn alive(child: &mut Child) -> bool {
    matches!(child.try_wait(), Ok(None))
}

/// Polls `condition` every 100 ms until it holds; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A plain HTTP/1.1 request (no client library between the test and the wire): returns the
/// status and the body.
/// tally's HTTP API on `address`: JSON in and out, with a bearer token.
pub struct JsonApi {
    pub address: String,
}

impl JsonApi {
    /// (status, the answer as JSON, or as a JSON string when it is not JSON).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let auth = format!("Bearer {token}");
        let mut headers = vec![("Authorization", auth.as_str())];
        if body.is_some() {
            headers.push(("Content-Type", "application/json"));
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let (status, text) = http(&self.address, method, path, &headers, &body).unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    }
}

pub fn http(
    address: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// `--from` and `--to` for `tally reconcile`: the whole hours around now.
pub fn reconcile_range() -> (String, String) {
    let hour = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%dT%H:00:00Z").to_string();
    let now = chrono::Utc::now();
    (
        hour(now - chrono::TimeDelta::hours(1)),
        hour(now + chrono::TimeDelta::hours(1)),
    )
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Maps customers to Stripe customers (`cus_t00000`, `cus_t00001`, … in order), as
/// `tally customers map` does, and returns the mapping.
pub async fn map_customers(
    pool: &sqlx::PgPool,
    customers: &[String],
) -> std::collections::BTreeMap<String, String> {
    let mappings: Vec<(String, String)> = customers
        .iter()
        .enumerate()
        .map(|(i, c)| (c.clone(), format!("cus_t{i:05}")))
        .collect();
    tally_sink::store::map_customers(pool, &mappings)
        .await
        .unwrap();
    mappings.into_iter().collect()
}

/// `value` of `meter` for `customer` in the window starting at `minute`, written as the
/// aggregator writes it: the window and its changed slot, in one transaction.
pub async fn plant_usage(
    pool: &sqlx::PgPool,
    customer: &str,
    meter: &str,
    minute: chrono::DateTime<chrono::Utc>,
    value: i64,
) {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO usage_minute (customer_id, meter, window_start, group_key, value, event_count, latest_at, latest_id, first_updated, last_updated)
         VALUES ($1, $2, $3, '', $4, 1, $3, 'e', now(), now())",
    )
    .bind(customer)
    .bind(meter)
    .bind(minute)
    .bind(rust_decimal::Decimal::from(value))
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO usage_slot_changes (customer_id, meter, slot_start) VALUES ($1, $2, $3)",
    )
    .bind(customer)
    .bind(meter)
    .bind(tally_core::window::slot_start(minute))
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

/// The whole minute `ago` before now.
pub fn minute_ago(ago: chrono::TimeDelta) -> chrono::DateTime<chrono::Utc> {
    use chrono::Timelike;
    let at = chrono::Utc::now() - ago;
    at - chrono::TimeDelta::seconds(i64::from(at.second()))
        - chrono::TimeDelta::nanoseconds(i64::from(at.nanosecond()))
}

/// The runtime tests drive async code with (two workers, as on tally's machines).
pub fn runtime() -> tokio::runtime::Runtime {
    tally_db::testing::runtime()
}

/// `EmulatorConfig` re-exported for tests that tune the emulator.
pub use stripe_emulator::EmulatorConfig as StripeEmulatorConfig;

/// The ingest side of the pipeline in one process: a fresh database with the test meters, a
/// broker, an aggregator on its own thread and an emitter. Fields drop in order: the
/// aggregator stops before the broker and the database go.
pub struct IngestPipeline {
    pub aggregator: AggregatorThread,
    pub emitter: TestEmitter,
    pub broker: Broker,
    pub db: tally_db::testing::TestDatabase,
}

impl IngestPipeline {
    /// Must run inside a multi-threaded tokio runtime (the aggregator uses its handle).
    pub async fn start(batch_max_wait: Duration) -> IngestPipeline {
        let db = tally_db::testing::fresh_database().await;
        tally_db::meters::record(&db.pool, &meters()).await.unwrap();
        let broker = Broker::start();
        let aggregator = AggregatorThread::start(
            AggregatorConfig {
                batch_max_wait,
                ..AggregatorConfig::default()
            },
            &broker.kafka,
            &meters(),
            &db.pool,
            tokio::runtime::Handle::current(),
        );
        let emitter = TestEmitter::start(&broker.kafka);
        IngestPipeline {
            aggregator,
            emitter,
            broker,
            db,
        }
    }
}

/// One delivery an [`AlertReceiver`] took.
#[derive(Debug, Clone)]
pub struct ReceivedAlert {
    pub event: serde_json::Value,
    pub event_id: String,
    /// Whether `Tally-Signature` verified with the endpoint's secret.
    pub signed: bool,
    pub at: Instant,
    /// Answered 500 (one of the failures asked for), so not taken.
    pub refused: bool,
}

/// A webhook receiver, as a customer of tally's alerts would run one: verifies every
/// delivery's `Tally-Signature` with the endpoint's secret and records it; answers 500 to the
/// first `fail_first` deliveries (to make tally retry).
#[derive(Clone)]
pub struct AlertReceiver {
    pub url: String,
    secret: std::sync::Arc<std::sync::Mutex<String>>,
    received: std::sync::Arc<std::sync::Mutex<Vec<ReceivedAlert>>>,
    fail_first: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl AlertReceiver {
    /// Serves on a free port of 127.0.0.1 (on the current tokio runtime).
    pub async fn start(fail_first: usize) -> AlertReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver = AlertReceiver {
            url: format!("http://{}/hooks/tally", listener.local_addr().unwrap()),
            secret: Default::default(),
            received: Default::default(),
            fail_first: std::sync::Arc::new(fail_first.into()),
        };
        let state = receiver.clone();
        let app = axum::Router::new().route(
            "/hooks/tally",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let state = state.clone();
                    async move { state.take(&headers, &body) }
                },
            ),
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        receiver
    }

    /// Registers this receiver as an alert endpoint (it listens on loopback over plain HTTP,
    /// which the operator allows here) and returns the endpoint's secret.
    pub async fn register(&self, pool: &sqlx::PgPool) -> String {
        let on_premises = tally_alerts::Destinations {
            allow_http: true,
            allow_private_networks: true,
        };
        let new = tally_alerts::store::NewEndpoint {
            url: &self.url,
            ..Default::default()
        };
        let (_, secret) = tally_alerts::store::create_endpoint(pool, &on_premises, &new, "test")
            .await
            .unwrap();
        secret
    }

    /// The endpoint's secret, once registered.
    pub fn set_secret(&self, secret: &str) {
        *self.secret.lock().unwrap() = secret.to_owned();
    }

    fn take(&self, headers: &axum::http::HeaderMap, body: &[u8]) -> axum::http::StatusCode {
        let signature = headers
            .get("tally-signature")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let secret = self.secret.lock().unwrap().clone();
        let now = chrono::Utc::now().timestamp();
        let signed = tally_alerts::signature::verify(signature, &secret, body, now, 300).is_ok();
        let event: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let refuse = self
            .fail_first
            .fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |n| n.checked_sub(1),
            )
            .is_ok();
        self.received.lock().unwrap().push(ReceivedAlert {
            event_id: event["id"].as_str().unwrap_or_default().to_owned(),
            event,
            signed,
            at: Instant::now(),
            refused: refuse,
        });
        if refuse || !signed {
            axum::http::StatusCode::INTERNAL_SERVER_ERROR
        } else {
            axum::http::StatusCode::OK
        }
    }

    /// Every delivery so far, refused ones included.
    pub fn received(&self) -> Vec<ReceivedAlert> {
        self.received.lock().unwrap().clone()
    }

    /// The events taken (answered 2xx), each event id once.
    pub fn taken(&self) -> Vec<serde_json::Value> {
        let mut seen = std::collections::BTreeSet::new();
        self.received()
            .into_iter()
            .filter(|r| !r.refused && r.signed && seen.insert(r.event_id.clone()))
            .map(|r| r.event)
            .collect()
    }
}

/// `tally kafka` as a process of its own, on a free port, with topics named for one test, and a
/// working directory whose `tally.toml` points at it (with `extra` appended), for tests that run
/// `tally aggregate` as a separate process without Stripe. Returns once the broker listens.
pub fn broker_process(
    database_url: &str,
    partitions: u32,
    extra: &str,
) -> (Workdir, KafkaConfig, KillOnDrop) {
    let port = free_port();
    let suffix = uuid::Uuid::now_v7().simple().to_string();
    let kafka = KafkaConfig {
        brokers: format!("127.0.0.1:{port}"),
        topic: format!("usage-events-{suffix}"),
        dlq_topic: format!("usage-events-dlq-{suffix}"),
        ..KafkaConfig::default()
    };
    let work = Workdir::new(&kafka, "http://127.0.0.1:9/", extra);
    let broker = work.spawn(
        "kafka",
        database_url,
        &[
            "kafka",
            "--port",
            &port.to_string(),
            "--partitions",
            &partitions.to_string(),
        ],
    );
    wait_until("the broker listens", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    (work, kafka, broker)
}

/// What the windows must hold, per customer and meter.
pub type Sums = std::collections::BTreeMap<(String, String), rust_decimal::Decimal>;

/// Emits `count` events (ids `{prefix}-{i}` from `first`) over 40 customers, a timestamp in the
/// last ten minutes each, 5% of them sent twice; adds what each counts to `expected`.
pub fn emit_events(
    emitter: &TestEmitter,
    prefix: &str,
    first: usize,
    count: usize,
    expected: &mut Sums,
) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(first as u64);
    for i in first..first + count {
        let customer = format!("b{:02}", i % 40);
        let quantity = rust_decimal::Decimal::new(rng.random_range(1..1_000), 1);
        let at = chrono::Utc::now() - chrono::TimeDelta::seconds(rng.random_range(0..600));
        let event = tally_core::UsageEvent::new(customer.clone(), "api_calls", quantity)
            .with_id(format!("{prefix}-{i}"))
            .at(at);
        if rng.random_bool(0.05) {
            emitter.emit(event.clone()).unwrap();
        }
        emitter.emit(event).unwrap();
        *expected.entry((customer, "api_calls".into())).or_default() += quantity;
    }
}

/// What the minute windows hold, per customer and meter.
pub fn counted(runtime: &tokio::runtime::Runtime, pool: &sqlx::PgPool) -> Sums {
    runtime
        .block_on(
            sqlx::query_as::<_, (String, String, rust_decimal::Decimal)>(
                "SELECT customer_id, meter, sum(value) FROM usage_minute GROUP BY 1, 2",
            )
            .fetch_all(pool),
        )
        .unwrap()
        .into_iter()
        .map(|(customer, meter, sum)| ((customer, meter), sum))
        .collect()
}

/// Waits until the windows hold exactly `expected`; returns how long that took.
pub fn drained(
    runtime: &tokio::runtime::Runtime,
    pool: &sqlx::PgPool,
    expected: &Sums,
    timeout: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let now = counted(runtime, pool);
        if &now == expected {
            return started.elapsed();
        }
        let total = |s: &Sums| s.values().copied().sum::<rust_decimal::Decimal>();
        assert!(
            started.elapsed() < timeout,
            "not drained after {timeout:?}: {} of {} counted",
            total(&now),
            total(expected)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Runs `query` in DuckDB (PyPI `duckdb`, fetched by scripts/test.sh into
/// `TALLY_DUCKDB_PYTHONPATH`) and returns its rows, `|`-separated, one a line (none for a
/// statement such as COPY).
pub fn duckdb(query: &str) -> String {
    let path = std::env::var("TALLY_DUCKDB_PYTHONPATH").expect(
        "TALLY_DUCKDB_PYTHONPATH is not set: run the tests with scripts/test.sh, which fetches duckdb from PyPI",
    );
    let script = format!(
        "import duckdb\nresult = duckdb.sql({query:?})\nfor row in (result.fetchall() if result is not None else []):\n    print('|'.join(str(v) for v in row))\n"
    );
    let output = Command::new("python3")
        .env("PYTHONPATH", path)
        .args(["-c", &script])
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "{query}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}
