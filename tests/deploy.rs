//! The deploy files are real: the Prometheus rules load and their unit tests pass (promtool),
//! the systemd units verify (systemd-analyze), every `tally` command and flag in the compose
//! file and the crontab is one the binary takes, and every metric the alerts and the dashboard
//! name is one the code exports. Neither Docker nor a Prometheus server runs here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use tally_tests::{tally_binary, tally_command};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Runs a tool the CI script installs (scripts/lib/tools.sh).
fn tool(name: &str, args: &[&str], dir: &Path) -> String {
    let output = Command::new(name)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {name} ({e}): scripts/test.sh installs it (Debian package: prometheus for promtool, systemd for systemd-analyze)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{name} {args:?}:\n{text}");
    text
}

#[test]
fn the_alert_rules_load_and_their_unit_tests_pass() {
    let dir = root().join("deploy/prometheus");
    tool("promtool", &["check", "rules", "alerts.yml"], &dir);
    tool("promtool", &["test", "rules", "alerts.test.yml"], &dir);
    // The scrape configuration, with the rules where the compose file mounts them.
    let work = tempfile::tempdir().unwrap();
    let config = read("deploy/prometheus/prometheus.yml").replace(
        "/etc/prometheus/alerts.yml",
        dir.join("alerts.yml").to_str().unwrap(),
    );
    std::fs::write(work.path().join("prometheus.yml"), config).unwrap();
    tool(
        "promtool",
        &["check", "config", "prometheus.yml"],
        work.path(),
    );
}

#[test]
fn every_alert_has_a_summary_and_a_runbook_section() {
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&read("deploy/prometheus/alerts.yml")).unwrap();
    let runbook = read("docs/operations.md");
    let anchors: BTreeSet<String> = runbook
        .lines()
        .filter_map(|line| {
            line.strip_prefix('#')
                .map(|h| h.trim_start_matches('#').trim().to_lowercase())
        })
        .collect();
    let mut alerts = 0;
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().unwrap();
            assert!(
                rule["annotations"]["summary"].is_string(),
                "{name} has no summary"
            );
            let url = rule["annotations"]["runbook_url"]
                .as_str()
                .unwrap_or_default();
            let anchor = url.strip_prefix("docs/operations.md#").unwrap_or_else(|| {
                panic!("{name}: runbook_url {url:?} is not a docs/operations.md section")
            });
            assert_eq!(anchor, name.to_lowercase(), "{name}: runbook anchor");
            assert!(
                anchors.contains(anchor),
                "docs/operations.md has no section `{name}`"
            );
            alerts += 1;
        }
    }
    assert!(alerts >= 20, "{alerts} alerts");
}

/// Every `"tally_…"` string literal in the crates' sources: the metric names the code exports.
fn exported_metrics() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut stack = vec![root().join("crates")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for (i, _) in text.match_indices("\"tally_") {
                    let name: String = text[i + 1..]
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                        .collect();
                    names.insert(name);
                }
            }
        }
    }
    names
}

/// The `tally_…` names a PromQL text refers to.
fn referenced_metrics(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (i, _) in text.match_indices("tally_") {
        let before = text[..i].chars().last();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        names.insert(name);
    }
    names
}

#[test]
fn every_metric_the_alerts_and_the_dashboard_name_is_exported() {
    let exported = exported_metrics();
    assert!(
        exported.contains("tally_aggregator_consumer_lag_messages"),
        "{exported:?}"
    );
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&read("deploy/prometheus/alerts.yml")).unwrap();
    let rules: Vec<String> = rules["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|group| group["rules"].as_sequence().unwrap().iter())
        .map(|rule| rule["expr"].as_str().unwrap().to_owned())
        .collect();
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/tally.json")).unwrap();
    let queries: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().unwrap().iter())
        .map(|target| target["expr"].as_str().unwrap().to_owned())
        .collect();
    for (source, text) in [
        ("alerts.yml", rules.join("\n")),
        ("tally.json", queries.join("\n")),
    ] {
        let named = referenced_metrics(&text);
        assert!(named.len() >= 10, "{source} names only {named:?}");
        let unknown: Vec<&String> = named.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{source} names metrics the code does not export: {unknown:?}"
        );
    }
}

/// The subcommand and flags of a `tally` command line, checked against `tally … --help`.
fn assert_real_command(words: &[String], context: &str) {
    let flags_at = words
        .iter()
        .position(|w| w.starts_with("--"))
        .unwrap_or(words.len());
    let (subcommand, rest) = words.split_at(flags_at);
    // Global flags before the subcommand (`--config FILE`) are in the top-level help.
    let subcommand: Vec<&str> = subcommand.iter().map(String::as_str).collect();
    let mut help = Command::new(tally_binary());
    help.args(&subcommand).arg("--help");
    let output = help.output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success() && !subcommand.is_empty(),
        "{context}: `tally {}` is not a command",
        subcommand.join(" ")
    );
    for flag in rest.iter().filter(|w| w.starts_with("--")) {
        let flag = flag.split('=').next().unwrap();
        assert!(
            text.contains(&format!("{flag} ")) || text.contains(&format!("{flag}\n")),
            "{context}: `tally {}` has no {flag}",
            subcommand.join(" ")
        );
    }
}

#[test]
fn every_tally_command_in_compose_is_real_and_its_settings_load() {
    let mut compose: serde_yaml::Value = serde_yaml::from_str(&read("docker-compose.yml")).unwrap();
    compose.apply_merge().unwrap();
    let services = compose["services"].as_mapping().unwrap();
    let mut tally_services = BTreeSet::new();
    for (name, service) in services {
        let name = name.as_str().unwrap();
        if service["image"].as_str() != Some("tally:local") {
            continue;
        }
        tally_services.insert(name.to_owned());
        let command: Vec<String> = service["command"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{name} has no command"))
            .iter()
            .map(|w| w.as_str().unwrap().to_owned())
            .collect();
        assert_real_command(&command, name);
        // Its TALLY_* settings, with the example configuration, load.
        let mut config = tally_command();
        config.args([
            "--config",
            root().join("tally.example.toml").to_str().unwrap(),
            "config",
        ]);
        for (key, value) in service["environment"].as_mapping().unwrap() {
            let key = key.as_str().unwrap();
            if key.starts_with("TALLY_") && key != "TALLY_CONFIG" {
                config.env(key, value.as_str().unwrap());
            }
        }
        let output = config.output().unwrap();
        assert!(
            output.status.success(),
            "{name}'s settings: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    for expected in [
        "migrate",
        "aggregate-1",
        "aggregate-2",
        "serve",
        "sink",
        "sink-emulated",
        "stripe-emulator",
    ] {
        assert!(
            tally_services.contains(expected),
            "compose lacks {expected}: {tally_services:?}"
        );
    }
    for service in ["kafka", "postgres", "prometheus", "grafana"] {
        assert!(services.contains_key(service), "compose lacks {service}");
    }
}

#[test]
fn the_systemd_units_verify_and_the_crontab_runs_real_commands_under_flock() {
    let work = tempfile::tempdir().unwrap();
    let binary = tally_binary();
    let mut units = Vec::new();
    for entry in std::fs::read_dir(root().join("deploy/systemd")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        // The units name the installed binary; verify them against the one just built.
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("/usr/local/bin/tally", binary.to_str().unwrap());
        for line in text.lines().filter(|l| l.starts_with("ExecStart=")) {
            let words: Vec<String> = line.split_whitespace().skip(1).map(str::to_owned).collect();
            let after_config = words
                .iter()
                .skip_while(|w| *w != "--config")
                .skip(2)
                .cloned()
                .collect::<Vec<_>>();
            assert_real_command(&after_config, &name);
        }
        std::fs::write(work.path().join(&name), text).unwrap();
        units.push(name);
    }
    units.sort();
    for expected in [
        "tally-aggregate.service",
        "tally-archive.service",
        "tally-sink.service",
        "tally-serve.service",
        "tally-sink-once.service",
        "tally-sink-once.timer",
    ] {
        assert!(
            units.contains(&expected.to_owned()),
            "deploy/systemd lacks {expected}"
        );
    }
    let mut args = vec!["verify", "--man=no"];
    args.extend(units.iter().map(String::as_str));
    tool("systemd-analyze", &args, work.path());

    let crontab = read("deploy/cron/tally.cron");
    let mut jobs = 0;
    for line in crontab
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(" tally "))
    {
        assert!(
            line.contains("flock -n"),
            "a cron job without flock: {line}"
        );
        let command = line
            .split("exec tally ")
            .nth(1)
            .unwrap_or_else(|| panic!("{line}"));
        let command = command.split('\'').next().unwrap();
        let words: Vec<String> = command.split_whitespace().map(str::to_owned).collect();
        let after_config: Vec<String> = words
            .iter()
            .skip_while(|w| *w != "--config")
            .skip(2)
            .cloned()
            .collect();
        assert_real_command(&after_config, "deploy/cron/tally.cron");
        jobs += 1;
    }
    assert_eq!(jobs, 3, "aggregate, sink and reconcile");
}
