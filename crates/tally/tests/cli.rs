//! The `tally` binary as an operator meets it: every command documented, and a setting that
//! cannot work refused with its cause and the fix, before anything starts.

use std::process::Command;

fn tally(args: &[&str]) -> (bool, String) {
    tally_with_env(args, &[])
}

/// `tally <args>` with only `env` of the test's own `TALLY_*` and `DATABASE_URL` variables.
fn tally_with_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
    for (name, _) in std::env::vars() {
        if name.starts_with("TALLY_") || name == "DATABASE_URL" {
            command.env_remove(name);
        }
    }
    let output = command
        .current_dir(std::env::temp_dir())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("tally runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn help_lists_every_command() {
    let (ok, help) = tally(&["--help"]);
    assert!(ok, "{help}");
    for command in [
        "demo",
        "migrate",
        "aggregate",
        "sink",
        "serve",
        "reconcile",
        "kafka",
        "stripe-emulator",
        "tokens",
        "status",
        "customers",
        "submissions",
        "finance",
        "export",
        "config",
    ] {
        assert!(
            help.contains(command),
            "`tally --help` lacks {command}:\n{help}"
        );
    }
}

#[test]
fn a_stage_without_its_broker_names_the_setting_and_the_fix() {
    let (ok, output) = tally(&[
        "aggregate",
        "--once",
        "--database-url",
        "postgres://127.0.0.1:1/none",
    ]);
    assert!(!ok, "{output}");
    assert!(
        output.contains("kafka.brokers") && output.contains("TALLY_KAFKA_BROKERS"),
        "{output}"
    );
}

#[test]
fn config_shows_every_setting_but_no_secret() {
    let (ok, output) = tally_with_env(
        &["config"],
        &[
            (
                "DATABASE_URL",
                "postgres://tally:hunter2-db@db.internal:5432/tally?sslpassword=hunter2-ssl",
            ),
            ("STRIPE_SECRET_KEY", "sk_live_hunter2-stripe"),
            ("STRIPE_WEBHOOK_SECRET", "whsec_hunter2-webhook"),
            (
                "TALLY_KAFKA_OPTIONS",
                r#"{ "sasl.password" = "hunter2-sasl", "SSL.Keystore.Password" = "hunter2-keystore", "sasl.oauthbearer.client.secret" = "hunter2-oauth", "linger.ms" = "7" }"#,
            ),
        ],
    );
    assert!(ok, "{output}");
    assert!(!output.contains("hunter2"), "{output}");
    for shown in [
        r#"url = "postgres://tally:****@db.internal:5432/tally?sslpassword=****""#,
        r#"secret_key = "<redacted>""#,
        r#"stripe_webhook_secret = "<redacted>""#,
        r#""sasl.password" = "<redacted>""#,
        r#""linger.ms" = "7""#,
    ] {
        assert!(
            output.contains(shown),
            "`tally config` lacks {shown}:\n{output}"
        );
    }
}

#[test]
fn a_refused_setting_is_named_without_repeating_a_secret() {
    let (ok, output) = tally_with_env(
        &["config"],
        &[(
            "TALLY_KAFKA_OPTIONS",
            r#"{ "sasl.password" = "hunter2-sasl" "#,
        )],
    );
    assert!(!ok, "{output}");
    assert!(output.contains("TALLY_KAFKA_OPTIONS"), "{output}");
    assert!(!output.contains("hunter2"), "{output}");
}

#[test]
fn the_sink_refuses_plain_http_to_another_machine() {
    let (ok, output) = tally_with_env(
        &[
            "sink",
            "--once",
            "--database-url",
            "postgres://127.0.0.1:1/none",
        ],
        &[
            ("STRIPE_SECRET_KEY", "sk_test_tally_cli"),
            ("TALLY_STRIPE_API_BASE", "http://stripe.example.com/"),
        ],
    );
    assert!(!ok, "{output}");
    assert!(
        output.contains("stripe.api_base") && output.contains("https://"),
        "{output}"
    );
    assert!(
        !output.contains("Postgres at"),
        "refused before the database: {output}"
    );
}

#[test]
fn tokens_create_prints_the_token_once_and_tally_toml_keeps_only_its_hash() {
    let dir = std::env::temp_dir().join(format!("tally-tokens-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tally.toml");
    std::fs::write(&path, "[serve]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let file = path.to_str().unwrap();

    let (ok, printed) = tally(&[
        "tokens",
        "create",
        "--scope",
        "customer",
        "--customer",
        "acme",
        "--append-to",
        file,
    ]);
    assert!(ok, "{printed}");
    let token = printed.trim();
    assert!(token.starts_with("tly_") && token.len() == 68, "{printed}");
    let stored = std::fs::read_to_string(&path).unwrap();
    assert!(
        !stored.contains(token),
        "the token itself was stored:\n{stored}"
    );
    assert!(stored.contains("scope = \"customer\"") && stored.contains("customer = \"acme\""));
    let hash = stored
        .lines()
        .find_map(|line| line.strip_prefix("sha256 = \""))
        .expect("a sha256 line")
        .trim_end_matches('"');
    assert_eq!(hash.len(), 64, "{stored}");
    let (ok, shown) = tally(&["--config", file, "config"]);
    assert!(ok, "the entry it wrote is a valid configuration: {shown}");
    assert!(!shown.contains(token) && !shown.contains(hash), "{shown}");

    // Without --append-to: the token and the entry to paste.
    let (ok, printed) = tally(&["tokens", "create", "--scope", "check", "--name", "gateway"]);
    assert!(ok, "{printed}");
    assert!(printed.contains("[[serve.tokens]]") && printed.contains("scope = \"check\""));

    // What cannot work is refused with the fix.
    let (ok, refused) = tally(&["tokens", "create", "--scope", "customer"]);
    assert!(!ok && refused.contains("--customer"), "{refused}");
    let (ok, refused) = tally(&["tokens", "create", "--scope", "admin", "--customer", "acme"]);
    assert!(!ok && refused.contains("--scope customer"), "{refused}");
    std::fs::write(
        &path,
        "[[serve.tokens]]\nname = \"old\"\nscope = \"admin\"\nsha256 = \"00\"\ntoken = \"plain-token-0123456789abcdef\"\n",
    )
    .unwrap();
    let (ok, refused) = tally(&["--config", file, "config"]);
    assert!(!ok && refused.contains("tally tokens create"), "{refused}");
    assert!(
        !refused.contains("plain-token-0123456789abcdef"),
        "{refused}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
