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

/// The example configuration, whose meters the commands below check against.
fn example_config() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../../tally.example.toml").to_owned()
}

#[test]
fn a_typo_is_answered_with_the_near_match_not_a_list_of_everything() {
    let (ok, output) = tally_with_env(&["config"], &[("TALLY_AGGREGATOR_BATCH_MAX_WIAT", "1s")]);
    assert!(!ok, "{output}");
    assert!(
        output.contains("did you mean TALLY_AGGREGATOR_BATCH_MAX_WAIT?"),
        "{output}"
    );
    assert!(output.len() < 400, "a short answer: {output}");

    let (ok, output) = tally_with_env(&["config"], &[("TALLY_SINK_INTERVAL", "5")]);
    assert!(
        !ok && output.contains("e.g. \"250ms\""),
        "an example: {output}"
    );

    let config = example_config();
    let (ok, output) = tally(&[
        "--config",
        &config,
        "emit",
        "--customer",
        "acme",
        "--meter",
        "api_cals",
        "--quantity",
        "1",
    ]);
    assert!(!ok, "{output}");
    assert!(output.contains("(defined: api_calls, "), "{output}");
}

#[test]
fn commands_offer_only_the_connections_they_use() {
    let (ok, help) = tally(&["tokens", "create", "--help"]);
    assert!(ok, "{help}");
    assert!(
        !help.contains("--database-url") && !help.contains("--kafka-brokers"),
        "{help}"
    );
    for command in [
        &["aggregate", "--help"][..],
        &["credits", "grant", "--help"],
    ] {
        let (ok, help) = tally(command);
        assert!(ok && help.contains("--database-url"), "{command:?}: {help}");
    }
    let (ok, refused) = tally(&[
        "tokens",
        "create",
        "--scope",
        "admin",
        "--database-url",
        "x",
    ]);
    assert!(!ok && refused.contains("--database-url"), "{refused}");
    // Before the command, as before.
    let (ok, output) = tally(&[
        "--database-url",
        "postgres://127.0.0.1:1/none",
        "aggregate",
        "--once",
    ]);
    assert!(!ok && output.contains("TALLY_KAFKA_BROKERS"), "{output}");
}

/// With Postgres (scripts/test.sh sets DATABASE_URL): a database that does not exist is named
/// as such, with the fix, by every command that needs it, once.
#[test]
fn a_database_that_does_not_exist_is_said_to_not_exist() {
    let Ok(server) = std::env::var("DATABASE_URL") else {
        eprintln!("DATABASE_URL is not set: skipped (scripts/test.sh sets it)");
        return;
    };
    let url = match server.rsplit_once('/') {
        Some((base, _)) => format!("{base}/tally_no_such_database"),
        None => panic!("DATABASE_URL {server:?} names no database"),
    };
    let config = example_config();
    for command in [
        &["migrate"][..],
        &["aggregate", "--once", "--kafka-brokers", "127.0.0.1:1"],
        &[
            "aggregate",
            "--once",
            "--migrate",
            "--kafka-brokers",
            "127.0.0.1:1",
        ],
        &["sink", "--once"],
        &["status"],
    ] {
        let mut args = vec!["--config", config.as_str(), "--database-url", url.as_str()];
        args.extend_from_slice(command);
        let (ok, output) = tally_with_env(&args, &[("STRIPE_SECRET_KEY", "sk_test_cli")]);
        assert!(!ok, "{command:?}: {output}");
        assert_eq!(
            output
                .matches("\"tally_no_such_database\" does not exist")
                .count(),
            1,
            "{command:?}: {output}"
        );
        assert!(
            output.contains("createdb tally_no_such_database")
                && !output.contains("schema is behind"),
            "{command:?}: {output}"
        );
    }
}

#[test]
fn unsafe_retention_and_staleness_settings_are_refused_with_the_fix() {
    let (ok, output) = tally_with_env(&["config"], &[("TALLY_SERVE_WEBHOOK_RETENTION", "7days")]);
    assert!(!ok && output.contains("at least \"31days\""), "{output}");
    let (ok, output) = tally_with_env(
        &["config"],
        &[
            ("TALLY_SERVE_REFRESH", "2s"),
            ("TALLY_SERVE_MAX_STALENESS", "1s"),
        ],
    );
    assert!(!ok && output.contains("serve.max_staleness"), "{output}");
    let (ok, output) = tally_with_env(&["config"], &[]);
    assert!(ok && output.contains("webhook_retention"), "{output}");
}
