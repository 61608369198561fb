//! The `tally` binary as an operator meets it: every command documented, and a setting that
//! cannot work refused with its cause and the fix, before anything starts.

use std::process::Command;

fn tally(args: &[&str]) -> (bool, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
    for (name, _) in std::env::vars() {
        if name.starts_with("TALLY_") || name == "DATABASE_URL" {
            command.env_remove(name);
        }
    }
    let output = command
        .current_dir(std::env::temp_dir())
        .args(args)
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
