//! The README's first command works: `tally demo` runs the whole pipeline and reconciles.

use std::process::Command;

use tally_tests::{http, reconcile_range, runtime, tally_command, KillOnDrop};

#[test]
fn demo_runs_end_to_end_and_reconciles() {
    let mut command = tally_command();
    command.args(["demo", "--customers", "25", "--events", "3000"]);
    if let Ok(url) = std::env::var("DATABASE_URL") {
        command.args(["--database-url", &url]);
    }
    let output = command.output().expect("tally runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "tally demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("emitted = windows = Stripe, for every customer and meter, to the unit."),
        "{stdout}"
    );
    for meter in ["api_calls", "storage_gb", "tokens"] {
        assert!(
            stdout.contains(&format!("{meter:<12} 25 of 25 customers")),
            "{meter}: {stdout}"
        );
    }
    assert!(stdout.contains("late wave"), "{stdout}");
}

/// `tally demo --keep-running` leaves a stack a newcomer can use: the printed broker, database,
/// API token and emulator work with `tally emit`, `tally reconcile` and the HTTP API, and
/// SIGTERM stops it cleanly.
#[test]
fn the_demo_keeps_running_and_prints_how_to_reach_each_part() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    let mut command = tally_command();
    command.args([
        "demo",
        "--customers",
        "5",
        "--events",
        "600",
        "--keep-running",
    ]);
    if let Ok(url) = std::env::var("DATABASE_URL") {
        command.args(["--database-url", &url]);
    }
    let mut demo = KillOnDrop(
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("tally runs"),
    );
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let mut printed = String::new();
    let field = |line: &str, prefix: &str, n: usize| -> Option<String> {
        line.trim_start()
            .strip_prefix(prefix)
            .and_then(|rest| rest.split_whitespace().nth(n).map(str::to_owned))
    };
    let (mut brokers, mut topic, mut database, mut api, mut token, mut stripe) =
        (None, None, None, None, None, None);
    let mut usage_url: Option<String> = None;
    let (mut console, mut portal) = (None, None);
    for line in lines.by_ref() {
        let line = line.unwrap();
        printed.push_str(&line);
        printed.push('\n');
        brokers = brokers.or_else(|| field(&line, "kafka ", 0));
        topic = topic.or_else(|| field(&line, "kafka ", 2));
        database = database.or_else(|| field(&line, "postgres ", 0));
        api = api.or_else(|| field(&line, "api ", 0));
        token = token.or_else(|| field(&line, "api ", 3));
        stripe = stripe.or_else(|| field(&line, "stripe ", 0));
        console = console.or_else(|| field(&line, "console ", 0));
        portal = portal.or_else(|| field(&line, "portal ", 0));
        if line.trim_start().starts_with("curl -s -H") {
            usage_url = line.rsplit('\'').nth(1).map(str::to_owned);
        }
        if line.starts_with("Ctrl-C stops it") {
            break;
        }
    }
    let missing = || format!("the demo did not print how to reach it:\n{printed}");
    assert!(printed.contains("emitted = windows = Stripe"), "{printed}");
    let (brokers, topic, database) = (
        brokers.unwrap_or_else(|| panic!("{}", missing())),
        topic.unwrap_or_else(|| panic!("{}", missing())),
        database.unwrap_or_else(|| panic!("{}", missing())),
    );
    let (api, token, stripe) = (
        api.unwrap_or_else(|| panic!("{}", missing())),
        token.unwrap_or_else(|| panic!("{}", missing())),
        stripe.unwrap_or_else(|| panic!("{}", missing())),
    );
    let tally = |args: &[&str]| {
        let mut command = tally_command();
        let output = command
            .env("TALLY_DATABASE_URL", &database)
            .env("TALLY_KAFKA_BROKERS", &brokers)
            .env("TALLY_KAFKA_TOPIC", &topic)
            .env("TALLY_STRIPE_API_BASE", &stripe)
            .env("STRIPE_SECRET_KEY", "sk_test_tally_demo")
            .current_dir(std::env::temp_dir())
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    };

    // An event emitted by another process is counted by the demo's aggregator.
    let id = format!("keep-running-{}", uuid::Uuid::now_v7());
    let (ok, output) = tally(&[
        "emit",
        "--customer",
        "cus-0000",
        "--meter",
        "api_calls",
        "--quantity",
        "3",
        "--id",
        &id,
    ]);
    assert!(ok, "tally emit: {output}");
    let runtime = runtime();
    let pool = runtime
        .block_on(tally_db::connect(&database, 1, Duration::from_secs(10)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let counted: i64 = runtime
            .block_on(
                sqlx::query_scalar("SELECT count(*) FROM event_ids WHERE id = $1")
                    .bind(&id)
                    .fetch_one(&pool),
            )
            .unwrap();
        if counted == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the emitted event was never counted"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    runtime.block_on(pool.close());

    // The printed API call answers with the printed token, and is refused without it.
    let address = api.trim_start_matches("http://");
    let usage_url = usage_url.unwrap_or_else(|| panic!("{}", missing()));
    let path = usage_url.trim_start_matches(&api);
    let bearer = format!("Bearer {token}");
    let (status, body) = http(address, "GET", path, &[("Authorization", &bearer)], "").unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, _) = http(address, "GET", path, &[], "").unwrap();
    assert_eq!(status, 401);

    // The printed console and portal links open once each (a POST from their page).
    for link in [console, portal] {
        let link = link.unwrap_or_else(|| panic!("{}", missing()));
        let path = link.trim_start_matches(&api);
        let (status, page) = http(address, "GET", path, &[], "").unwrap();
        assert_eq!(status, 200, "{link}: {page}");
        assert!(page.contains("id=\"open\""), "{page}");
        let (status, _) = http(address, "POST", path, &[], "").unwrap();
        assert_eq!(status, 303, "{link} opens");
        let (status, _) = http(address, "POST", path, &[], "").unwrap();
        assert_eq!(status, 401, "{link} opens once");
    }
    let (status, pricing) = http(address, "GET", "/pricing", &[], "").unwrap();
    assert_eq!(status, 200, "{pricing}");

    // `tally reconcile` over the demo's data agrees.
    let (from, to) = reconcile_range();
    let (ok, output) = tally(&["reconcile", "--from", &from, "--to", &to]);
    assert!(ok, "tally reconcile: {output}");

    // SIGTERM stops everything and the demo exits cleanly.
    let terminated = Command::new("kill")
        .args(["-TERM", &demo.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = demo.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the demo did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status:?}");
}
