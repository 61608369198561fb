//! Layered configuration: defaults, then `tally.toml`, then `TALLY_*` environment variables
//! (flags are applied by the binary on top). Every scalar key has an environment variable named
//! after its path: `emitter.spool.max_bytes` is `TALLY_EMITTER_SPOOL_MAX_BYTES`. An unknown key
//! in the file or an unknown `TALLY_*` variable is an error that names it, because a misspelt
//! setting that is silently ignored is how billing pipelines lose data.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Environment variables with the `TALLY_` prefix that are not settings.
pub const RESERVED_ENV: [&str; 2] = ["TALLY_CONFIG", "TALLY_LOG"];

/// A secret setting (database URL with password, API keys): never shown by `Debug` or logs.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "\"<redacted>\""
        })
    }
}

/// Kafka settings shared by every stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated (`host:port,host:port`).
    pub brokers: String,
    /// Topic usage events travel on (contract: `usage-events`).
    pub topic: String,
    /// Topic refused events are copied to.
    pub dlq_topic: String,
    /// Raw librdkafka options passed through unchanged (e.g. `"security.protocol" = "ssl"`).
    pub options: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: String::new(),
            topic: "usage-events".into(),
            dlq_topic: "usage-events-dlq".into(),
            options: BTreeMap::new(),
        }
    }
}

/// A setting that could not be used, naming where it came from and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{origin} is not valid TOML: {message}")]
    Syntax { origin: String, message: String },
    #[error("environment variable {var} is not a tally setting; remove it or use one of: {known}")]
    UnknownEnv { var: String, known: String },
    #[error("setting `{key}` (from {origin}) is invalid: {message}")]
    Invalid {
        key: String,
        origin: String,
        message: String,
    },
}

/// Reads `T` from defaults, the file text (if any) and the environment.
///
/// `file` is `(display name, contents)`. `aliases` maps conventional variables onto keys (e.g.
/// `DATABASE_URL` onto `database.url`); the `TALLY_*` variable wins over its alias.
pub fn load<T>(
    file: Option<(&str, &str)>,
    env: impl IntoIterator<Item = (String, String)>,
    aliases: &[(&str, &str)],
) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Serialize + Default,
{
    let file_origin = file.map_or("defaults", |(name, _)| name).to_owned();
    let mut table = match file {
        Some((name, text)) => text
            .parse::<toml::Table>()
            .map_err(|e| ConfigError::Syntax {
                origin: name.to_owned(),
                message: e.to_string(),
            })?,
        None => toml::Table::new(),
    };

    let known = setting_paths(&T::default());
    let env: BTreeMap<String, String> = env.into_iter().collect();
    // key path -> the variable that set it, for error messages
    let mut from_env: BTreeMap<String, String> = BTreeMap::new();
    for (alias, key) in aliases {
        let tally_var = env_name(key);
        if let (Some(value), false) = (env.get(*alias), env.contains_key(&tally_var)) {
            if let Some(kind) = known.get(*key) {
                set_path(&mut table, key, to_toml(value, *kind));
                from_env.insert((*key).to_owned(), (*alias).to_owned());
            }
        }
    }
    let by_var: BTreeMap<String, &str> = known.keys().map(|k| (env_name(k), k.as_str())).collect();
    for (var, value) in env.iter().filter(|(v, _)| v.starts_with("TALLY_")) {
        if RESERVED_ENV.contains(&var.as_str()) {
            continue;
        }
        let Some(key) = by_var.get(var) else {
            return Err(ConfigError::UnknownEnv {
                var: var.clone(),
                known: by_var.keys().cloned().collect::<Vec<_>>().join(", "),
            });
        };
        set_path(&mut table, key, to_toml(value, known[*key]));
        from_env.insert((*key).to_owned(), var.clone());
    }

    let de = toml::Value::Table(table);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let origin = from_env
            .iter()
            .find(|(k, _)| key == **k || key.starts_with(&format!("{k}.")))
            .map_or(file_origin, |(_, var)| {
                format!("environment variable {var}")
            });
        // toml repeats the key path on a line of its own ("in `a.b`"); we already name it.
        let message = e.into_inner().to_string();
        let message = message
            .lines()
            .filter(|line| !line.starts_with("in `") && !line.trim().is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        ConfigError::Invalid {
            key,
            origin,
            message,
        }
    })
}

/// The environment variable for a key path: `emitter.spool.dir` → `TALLY_EMITTER_SPOOL_DIR`.
pub fn env_name(key: &str) -> String {
    format!("TALLY_{}", key.replace(['.', '-'], "_").to_uppercase())
}

/// What a default value looks like, to decide how to read an environment string.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Text,
    Unset,
    Literal,
}

/// Every settable key path of `T`'s defaults, with the kind of its default value.
fn setting_paths<T: Serialize>(defaults: &T) -> BTreeMap<String, Kind> {
    fn walk(prefix: &str, value: &serde_json::Value, out: &mut BTreeMap<String, Kind>) {
        match value {
            serde_json::Value::Object(map) if !map.is_empty() => {
                for (k, v) in map {
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&path, v, out);
                }
            }
            serde_json::Value::String(_) => {
                out.insert(prefix.to_owned(), Kind::Text);
            }
            serde_json::Value::Null => {
                out.insert(prefix.to_owned(), Kind::Unset);
            }
            _ => {
                out.insert(prefix.to_owned(), Kind::Literal);
            }
        }
    }
    let mut out = BTreeMap::new();
    if let Ok(value) = serde_json::to_value(defaults) {
        walk("", &value, &mut out);
    }
    out
}

/// Reads an environment string: text settings verbatim, others as a TOML literal
/// (`8`, `true`, `["a","b"]`, `{ k = "v" }`), falling back to text so that the type error
/// names the variable.
fn to_toml(raw: &str, kind: Kind) -> toml::Value {
    if matches!(kind, Kind::Text) {
        return toml::Value::String(raw.to_owned());
    }
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

fn set_path(table: &mut toml::Table, key: &str, value: toml::Value) {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().unwrap_or(key);
    let mut current = table;
    for part in parts {
        let entry = current
            .entry(part.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(next) = entry else {
            return;
        };
        current = next;
    }
    current.insert(last.to_owned(), value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Sample {
        kafka: KafkaConfig,
        queue: Queue,
        database: Database,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Queue {
        capacity: u64,
        #[serde(with = "humantime_serde")]
        linger: Duration,
        enabled: bool,
    }

    impl Default for Queue {
        fn default() -> Self {
            Queue {
                capacity: 10,
                linger: Duration::from_millis(5),
                enabled: true,
            }
        }
    }

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Database {
        url: Option<String>,
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    const ALIASES: [(&str, &str); 1] = [("DATABASE_URL", "database.url")];

    #[test]
    fn file_then_env_override_defaults() {
        let file = "[queue]\ncapacity = 20\nlinger = \"1s\"\n[kafka]\nbrokers = \"a:9092\"\n";
        let cfg: Sample = load(
            Some(("tally.toml", file)),
            env(&[
                ("TALLY_QUEUE_CAPACITY", "30"),
                ("DATABASE_URL", "postgres://x"),
            ]),
            &ALIASES,
        )
        .unwrap();
        assert_eq!(cfg.queue.capacity, 30);
        assert_eq!(cfg.queue.linger, Duration::from_secs(1));
        assert!(cfg.queue.enabled);
        assert_eq!(cfg.kafka.brokers, "a:9092");
        assert_eq!(cfg.kafka.topic, "usage-events");
        assert_eq!(cfg.database.url.as_deref(), Some("postgres://x"));
    }

    #[test]
    fn tally_variable_beats_its_alias() {
        let cfg: Sample = load(
            None,
            env(&[("DATABASE_URL", "a"), ("TALLY_DATABASE_URL", "b")]),
            &ALIASES,
        )
        .unwrap();
        assert_eq!(cfg.database.url.as_deref(), Some("b"));
    }

    #[test]
    fn map_settings_take_inline_tables_from_env() {
        let cfg: Sample = load(
            None,
            env(&[("TALLY_KAFKA_OPTIONS", r#"{ "linger.ms" = "5" }"#)]),
            &[],
        )
        .unwrap();
        assert_eq!(cfg.kafka.options["linger.ms"], "5");
    }

    #[test]
    fn unknown_file_key_is_named() {
        let err = load::<Sample>(
            Some(("tally.toml", "[queue]\ncapacty = 3\n")),
            env(&[]),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("capacty"), "{err}");
        assert!(err.contains("tally.toml"), "{err}");
    }

    #[test]
    fn unknown_env_var_is_named() {
        let err = load::<Sample>(None, env(&[("TALLY_QUEUE_CAPACTY", "3")]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("TALLY_QUEUE_CAPACTY"), "{err}");
        assert!(err.contains("TALLY_QUEUE_CAPACITY"), "{err}");
    }

    #[test]
    fn bad_value_names_key_and_variable() {
        let err = load::<Sample>(None, env(&[("TALLY_QUEUE_CAPACITY", "many")]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("queue.capacity"), "{err}");
        assert!(err.contains("TALLY_QUEUE_CAPACITY"), "{err}");
        let err = load::<Sample>(
            Some(("t.toml", "[queue]\nlinger = \"soon\"")),
            env(&[]),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("queue.linger") && err.contains("t.toml"),
            "{err}"
        );
    }

    #[test]
    fn syntax_error_names_file() {
        let err = load::<Sample>(Some(("t.toml", "[queue")), env(&[]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("t.toml is not valid TOML"), "{err}");
    }

    #[test]
    fn secrets_do_not_print() {
        let secret = Secret::new("postgres://u:hunter2@db/tally");
        assert!(!format!("{secret:?}").contains("hunter2"));
        assert_eq!(secret.expose(), "postgres://u:hunter2@db/tally");
    }

    #[test]
    fn reserved_variables_are_not_settings() {
        assert!(load::<Sample>(
            None,
            env(&[("TALLY_CONFIG", "x"), ("TALLY_LOG", "debug")]),
            &[]
        )
        .is_ok());
    }
}
