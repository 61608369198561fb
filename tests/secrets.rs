//! Secrets never leave a `tally` process. A distinctive value is planted in every secret
//! setting (the Stripe webhook signing secret and secret key, Kafka SASL/SSL passwords and an
//! OAuth client secret in `kafka.options`, the database password, also as a `sslpassword` URL
//! parameter the driver does not read, and an API token), then the built binary runs the way
//! an operator meets it: `tally config`, `tally serve` with Postgres away (and answering
//! requests, some with a wrong token), `tally serve`, `tally aggregate` and `tally emit`
//! building Kafka clients from those options, `tally aggregate` and `tally sink` failing
//! against a database that does not answer while their `/metrics` and `/readyz` are read,
//! and `tally migrate`. Nothing any of them writes, and no response, may hold a planted value.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tally_tests::{
    free_port, http, runtime, tally_command, wait_until, Broker, KillOnDrop, METERS,
};

/// Every planted value starts with this, so that a fragment of one is found too.
const MARK: &str = "PLANTED";
const WEBHOOK_SECRET: &str = "whsec_PLANTEDwebhook7f3a9e";
const STRIPE_KEY: &str = "sk_test_PLANTEDstripe9c1d4b";
const SASL_PASSWORD: &str = "PLANTEDsasl4e2b8a";
const SSL_KEY_PASSWORD: &str = "PLANTEDsslkey8d5c1f";
const OAUTH_SECRET: &str = "PLANTEDoauth2a9f6e";
const DB_PASSWORD: &str = "PLANTEDdbpw6b1e0d";
const DB_SSL_PASSWORD: &str = "PLANTEDdbsslpw3c7d";
const TOKEN: &str = "PLANTEDtoken0123456789abcdef";
/// A token nobody configured, presented to the API: refused, and not written down either.
const WRONG_TOKEN: &str = "PLANTEDwrongtoken9876543210";

/// What the processes wrote and answered, by where it came from.
#[derive(Default)]
struct Seen(Vec<(String, String)>);

impl Seen {
    fn add(&mut self, what: impl Into<String>, text: impl Into<String>) {
        self.0.push((what.into(), text.into()));
    }

    fn add_output(&mut self, what: &str, output: &Output) {
        self.add(
            format!("{what} (stdout)"),
            String::from_utf8_lossy(&output.stdout),
        );
        self.add(
            format!("{what} (stderr)"),
            String::from_utf8_lossy(&output.stderr),
        );
    }

    /// Panics with every line that holds a planted value (or the token's hash).
    fn assert_clean(&self) {
        let hash = token_hash();
        let leaks: Vec<String> = self
            .0
            .iter()
            .flat_map(|(what, text)| {
                text.lines()
                    .filter(|line| line.contains(MARK) || line.contains(&hash))
                    .map(move |line| format!("{what}: {line}"))
            })
            .collect();
        assert!(
            leaks.is_empty(),
            "planted secrets were printed:\n{}",
            leaks.join("\n")
        );
    }
}

fn token_hash() -> String {
    tally_api::token_hash(TOKEN)
}

/// `postgres://user:DB_PASSWORD@host…?sslpassword=DB_SSL_PASSWORD&application_name=tally`.
fn with_password(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a postgres:// URL");
    let (userinfo, host) = rest.rsplit_once('@').unwrap_or(("postgres", rest));
    let user = userinfo.split(':').next().unwrap_or("postgres");
    let separator = if host.contains('?') { '&' } else { '?' };
    format!(
        "{scheme}://{user}:{DB_PASSWORD}@{host}{separator}sslpassword={DB_SSL_PASSWORD}&application_name=tally"
    )
}

/// A `tally.toml` with the planted secrets that live in the file (the others come from the
/// environment, as `STRIPE_SECRET_KEY`, `STRIPE_WEBHOOK_SECRET` and `DATABASE_URL`).
fn write_config(dir: &Path, name: &str, brokers: &str, listen: &str) -> PathBuf {
    let hash = token_hash();
    let text = format!(
        r#"[kafka]
brokers = "{brokers}"

[kafka.options]
"sasl.username" = "tally"
"sasl.password" = "{SASL_PASSWORD}"
"ssl.key.password" = "{SSL_KEY_PASSWORD}"
"sasl.oauthbearer.client.secret" = "{OAUTH_SECRET}"
"socket.timeout.ms" = "10000"

[stripe]
api_base = "http://127.0.0.1:1/"

[serve]
listen = "{listen}"

[[serve.tokens]]
name = "planted"
scope = "admin"
sha256 = "{hash}"
{METERS}"#
    );
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// `tally --config <config> <args>` with the environment's secrets and `database_url`.
fn tally(config: &Path, database_url: &str, args: &[&str]) -> Command {
    let mut command = tally_command();
    command
        .current_dir(config.parent().unwrap())
        .arg("--config")
        .arg(config)
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("STRIPE_SECRET_KEY", STRIPE_KEY)
        .env("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET)
        .env("TALLY_LOG", "info")
        .stdin(Stdio::null());
    command
}

/// `command` to completion, at most `limit`.
fn run(mut command: Command, limit: Duration) -> Output {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tally starts");
    let pid = child.id();
    let (done, waited) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match waited.recv_timeout(limit) {
        Ok(output) => output.expect("tally runs"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("tally did not finish within {limit:?}");
        }
    }
}

/// `command` in the background, its stdout and stderr in `log`; killed when dropped.
fn spawn(mut command: Command, log: &Path) -> KillOnDrop {
    let file = std::fs::File::create(log).unwrap();
    KillOnDrop(
        command
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("tally starts"),
    )
}

/// SIGTERM, then the exit within `limit` (SIGKILL after).
fn stop(mut child: KillOnDrop, limit: Duration) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn get(address: &str, path: &str, token: Option<&str>) -> String {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|b| ("Authorization", b.as_str()))
        .collect();
    match http(address, "GET", path, &headers, "") {
        Ok((status, body)) => format!("{status} {body}"),
        Err(error) => format!("no answer: {error}"),
    }
}

#[test]
fn no_output_of_any_command_holds_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    let mut seen = Seen::default();
    // Nothing listens here: Postgres is unreachable.
    let away = with_password(&format!("postgres://tally@127.0.0.1:{}/tally", free_port()));
    let serve_address = format!("127.0.0.1:{}", free_port());
    // Without brokers (serve skips ingest, so it starts), and with the test broker (every
    // Kafka client is built from the planted options).
    let no_kafka = write_config(dir.path(), "no-kafka.toml", "", &serve_address);
    let kafka = write_config(
        dir.path(),
        "kafka.toml",
        &broker.kafka.brokers,
        &format!("127.0.0.1:{}", free_port()),
    );

    // `tally config`: every setting shown, every secret hidden, the database still located.
    let output = run(tally(&kafka, &away, &["config"]), Duration::from_secs(30));
    let shown = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{shown}{output:?}");
    assert!(
        shown.contains("url = \"postgres://tally:****@127.0.0.1:")
            && shown.contains("sslpassword=****")
            && shown.contains("\"sasl.password\" = \"<redacted>\"")
            && shown.contains("\"sasl.username\" = \"<redacted>\"")
            && shown.contains("\"socket.timeout.ms\" = \"10000\"")
            && shown.contains("secret_key = \"<redacted>\"")
            && shown.contains("stripe_webhook_secret = \"<redacted>\""),
        "{shown}"
    );
    seen.add_output("tally config", &output);

    // A file that does not parse, on the line of a secret.
    let broken = dir.path().join("broken.toml");
    let text = std::fs::read_to_string(&kafka).unwrap().replace(
        &format!("\"sasl.password\" = \"{SASL_PASSWORD}\""),
        &format!("\"sasl.password\" = \"{SASL_PASSWORD}"),
    );
    std::fs::write(&broken, text).unwrap();
    let output = run(tally(&broken, &away, &["config"]), Duration::from_secs(30));
    assert!(!output.status.success(), "{output:?}");
    seen.add_output("tally config (broken file)", &output);

    // The daemons and one-shot commands against the database that does not answer, side by
    // side: each one-shot gives up after its attempts (tens of seconds).
    let aggregate_admin = format!("127.0.0.1:{}", free_port());
    let sink_admin = format!("127.0.0.1:{}", free_port());
    let aggregate_log = dir.path().join("aggregate.log");
    let sink_log = dir.path().join("sink.log");
    let serve_log = dir.path().join("serve.log");
    let aggregate = spawn(
        tally(
            &kafka,
            &away,
            &["aggregate", "--once", "--metrics-listen", &aggregate_admin],
        ),
        &aggregate_log,
    );
    let sink = spawn(
        tally(
            &kafka,
            &away,
            &["sink", "--once", "--metrics-listen", &sink_admin],
        ),
        &sink_log,
    );
    let serve = spawn(tally(&no_kafka, &away, &["serve"]), &serve_log);
    let migrate = std::thread::spawn({
        let (kafka, away) = (kafka.clone(), away.clone());
        move || run(tally(&kafka, &away, &["migrate"]), Duration::from_secs(60))
    });

    // `/metrics` and `/readyz` of the daemons once they know Postgres is away.
    for (what, address) in [("aggregate", &aggregate_admin), ("sink", &sink_admin)] {
        wait_until(
            &format!("tally {what} reports Postgres unreachable on /readyz"),
            Duration::from_secs(30),
            || {
                let ready = get(address, "/readyz", None);
                ready.contains("\"error\":\"") && !ready.contains("not reached yet")
            },
        );
        let metrics = get(address, "/metrics", None);
        assert!(
            metrics.starts_with("200") && metrics.contains("tally_"),
            "{metrics}"
        );
        seen.add(format!("tally {what} /metrics"), metrics);
        seen.add(
            format!("tally {what} /readyz"),
            get(address, "/readyz", None),
        );
    }

    // The API with Postgres away: the right token, a wrong one, none, and a forged webhook.
    wait_until("tally serve answers", Duration::from_secs(30), || {
        get(&serve_address, "/healthz", None).starts_with("200")
    });
    wait_until(
        "tally serve reports Postgres unreachable on /readyz",
        Duration::from_secs(30),
        || get(&serve_address, "/readyz", Some(TOKEN)).contains("\"error\":\""),
    );
    for (path, token) in [
        ("/metrics", Some(TOKEN)),
        ("/readyz", Some(TOKEN)),
        ("/v1/customers/acme/entitlements", Some(TOKEN)),
        ("/v1/customers/acme/entitlements", Some(WRONG_TOKEN)),
        ("/v1/customers/acme/entitlements", None),
    ] {
        let answer = get(&serve_address, path, token);
        seen.add(format!("tally serve GET {path}"), answer);
    }
    let bearer = format!("Bearer {WRONG_TOKEN}");
    for (path, headers) in [
        (
            "/v1/webhooks/stripe",
            vec![
                ("Stripe-Signature", "t=1,v1=00"),
                ("Content-Type", "application/json"),
            ],
        ),
        (
            "/v1/events",
            vec![
                ("Authorization", bearer.as_str()),
                ("Content-Type", "application/json"),
            ],
        ),
    ] {
        let answer = http(&serve_address, "POST", path, &headers, "{}")
            .map_or_else(|e| format!("no answer: {e}"), |(s, b)| format!("{s} {b}"));
        seen.add(format!("tally serve POST {path}"), answer);
    }
    let metrics = get(&serve_address, "/metrics", Some(TOKEN));
    assert!(metrics.starts_with("200"), "{metrics}");
    stop(serve, Duration::from_secs(30));
    seen.add(
        "tally serve (log)",
        std::fs::read_to_string(&serve_log).unwrap(),
    );

    // The one-shot commands end, saying Postgres did not answer.
    for (what, child, log) in [
        ("aggregate --once", aggregate, &aggregate_log),
        ("sink --once", sink, &sink_log),
    ] {
        let mut child = child;
        wait_until(
            &format!("tally {what} gives up on Postgres"),
            Duration::from_secs(120),
            || !matches!(child.try_wait(), Ok(None)),
        );
        let text = std::fs::read_to_string(log).unwrap();
        assert!(
            text.contains("Postgres at 127.0.0.1:"),
            "tally {what}:\n{text}"
        );
        seen.add(format!("tally {what} (log)"), text);
    }
    let output = migrate.join().unwrap();
    assert!(!output.status.success(), "{output:?}");
    seen.add_output("tally migrate", &output);

    // Kafka clients built from the planted options: librdkafka refuses the SSL ones in this
    // build (and repeats a refused value in its error), so each command stops, saying which.
    let output = run(
        tally(
            &kafka,
            &away,
            &[
                "emit",
                "--customer",
                "acme",
                "--meter",
                "api_calls",
                "--quantity",
                "1",
            ],
        ),
        Duration::from_secs(60),
    );
    seen.add_output("tally emit", &output);
    // (A librdkafka that took them would leave it serving: it is stopped after a while.)
    let serve_kafka_log = dir.path().join("serve-kafka.log");
    let mut serve = spawn(tally(&kafka, &away, &["serve"]), &serve_kafka_log);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && matches!(serve.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(100));
    }
    stop(serve, Duration::from_secs(30));
    seen.add(
        "tally serve with Kafka (log)",
        std::fs::read_to_string(&serve_kafka_log).unwrap(),
    );
    // The aggregator reaches its Kafka consumer only with Postgres up: a fresh database,
    // with the password planted in its URL (the test server trusts local connections).
    let database = runtime().block_on(tally_db::testing::fresh_database());
    let output = run(
        tally(
            &kafka,
            &with_password(&database.url),
            &["aggregate", "--once"],
        ),
        Duration::from_secs(120),
    );
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() || text.contains("kafka.options") || text.contains("Kafka"),
        "{text}"
    );
    seen.add_output("tally aggregate --once (Postgres up)", &output);

    seen.assert_clean();
}

/// A secret typed into a setting that is not one (a Stripe key pasted into `stripe.api_base`,
/// a password in `kafka.brokers`) is hidden by `tally config` all the same, and named on stderr.
#[test]
fn a_secret_in_the_wrong_setting_is_hidden_too() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tally.toml");
    std::fs::write(
        &config,
        "[stripe]\napi_base = \"sk_live_51Hmisplaced\"\n\n[kafka]\nbrokers = \"ops:hunter2@kafka:9092\"\n",
    )
    .unwrap();
    let output = tally_command()
        .arg("--config")
        .arg(&config)
        .arg("config")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let shown = String::from_utf8_lossy(&output.stdout);
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        !shown.contains("sk_live_51Hmisplaced") && !shown.contains("hunter2"),
        "{shown}"
    );
    assert!(shown.contains("api_base = \"<redacted>\""), "{shown}");
    assert!(
        said.contains("setting stripe.api_base holds what looks like a secret"),
        "{said}"
    );
    assert!(
        said.contains("setting kafka.brokers holds what looks like a secret"),
        "{said}"
    );
    assert!(!said.contains("hunter2"), "{said}");
}
