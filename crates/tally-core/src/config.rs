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

/// What a hidden value is shown as.
pub const REDACTED: &str = "<redacted>";

/// A secret setting (database URL with password, API keys, signing secrets). `Debug` and
/// `Serialize` show it as [`REDACTED`] (an empty one as `""`, so that "not set" stays visible):
/// tally serializes its configuration only to show it (`tally config`), so no way of showing a
/// configuration can print a secret. Reading one that is not a string fails without repeating
/// the value.
#[derive(Clone, PartialEq, Eq, Default)]
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

    fn shown(&self) -> &'static str {
        if self.0.is_empty() {
            ""
        } else {
            REDACTED
        }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.shown())
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.shown())
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Through a `Value`: serde's own type errors quote the value ("invalid type: integer
        // `123`"), which for a secret would print it.
        match serde_json::Value::deserialize(deserializer)? {
            serde_json::Value::String(value) => Ok(Secret(value)),
            _ => Err(serde::de::Error::custom(
                "expected a string (the value is a secret, so it is not repeated here)",
            )),
        }
    }
}

/// True when a setting named `name` holds a credential, so that its value is never shown: the
/// name contains `password`, `secret` or `key` (in any case; this hides a few paths such as
/// `ssl.key.location` too, which is the safe side), or it is one librdkafka itself treats as
/// sensitive (`sasl.username`, `sasl.oauthbearer.config`, `ssl.ca.pem`).
pub fn names_secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["password", "secret", "key"]
        .iter()
        .any(|word| name.contains(word))
        || ["sasl.username", "sasl.oauthbearer.config", "ssl.ca.pem"].contains(&name.as_str())
}

/// Raw librdkafka options (`[kafka.options]`), passed through unchanged. The value of every
/// option whose name [names a secret](names_secret) (`sasl.password`, `ssl.key.password`,
/// `sasl.oauthbearer.client.secret`, …) is shown as [`REDACTED`] by `Debug` and `Serialize`;
/// [`KafkaOptions::redact`] hides them in text from librdkafka, which repeats a value it
/// refuses.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct KafkaOptions(BTreeMap<String, String>);

impl KafkaOptions {
    /// The value of option `name`, for the code that configures the client.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.insert(name.into(), value.into());
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every option with its value, for the code that configures the client.
    pub fn iter(&self) -> std::collections::btree_map::Iter<'_, String, String> {
        self.0.iter()
    }

    /// `text` with the value of every secret option replaced by [`REDACTED`]: for an error or
    /// log message from librdkafka, which quotes the value of an option it refuses.
    pub fn redact(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for (name, value) in &self.0 {
            if names_secret(name) && !value.is_empty() {
                text = text.replace(value.as_str(), REDACTED);
            }
        }
        text
    }

    /// The options as they may be shown.
    fn shown(&self) -> BTreeMap<&str, &str> {
        self.0
            .iter()
            .map(|(name, value)| {
                let shown = if names_secret(name) && !value.is_empty() {
                    REDACTED
                } else {
                    value.as_str()
                };
                (name.as_str(), shown)
            })
            .collect()
    }
}

impl std::fmt::Debug for KafkaOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.shown().fmt(f)
    }
}

impl Serialize for KafkaOptions {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.shown().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for KafkaOptions {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        // Through a `Value`, so that a refused value is never quoted back (it may be a
        // password).
        let serde_json::Value::Object(table) = serde_json::Value::deserialize(deserializer)? else {
            return Err(D::Error::custom(
                r#"expected a table of librdkafka options, e.g. { "linger.ms" = "5" } (the value is not repeated here: it may hold a password)"#,
            ));
        };
        table
            .into_iter()
            .map(|(name, value)| match value {
                serde_json::Value::String(value) => Ok((name, value)),
                // `sasl.password = "…"` unquoted is a table `sasl` holding `password`.
                serde_json::Value::Object(_) => Err(D::Error::custom(format!(
                    "`{}` is read as a nested table: quote librdkafka names that hold dots, e.g. \"{}\" = \"…\"",
                    name,
                    dotted(name.clone(), &value)
                ))),
                _ => Err(D::Error::custom(format!(
                    "option `{name}` must be a string, e.g. \"{name}\" = \"…\" (the value is not repeated here: it may hold a password)"
                ))),
            })
            .collect()
    }
}

/// The dotted name an unquoted TOML key was split from: `sasl` holding `{password: …}` is
/// `sasl.password`. Names only, never a value.
fn dotted(mut name: String, mut value: &serde_json::Value) -> String {
    while let serde_json::Value::Object(table) = value {
        let Some((key, inner)) = table.iter().next() else {
            break;
        };
        name = format!("{name}.{key}");
        value = inner;
    }
    name
}

impl From<BTreeMap<String, String>> for KafkaOptions {
    fn from(options: BTreeMap<String, String>) -> Self {
        KafkaOptions(options)
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for KafkaOptions {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(options: I) -> Self {
        KafkaOptions(
            options
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

impl<'a> IntoIterator for &'a KafkaOptions {
    type Item = (&'a String, &'a String);
    type IntoIter = std::collections::btree_map::Iter<'a, String, String>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
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
    /// The values of secret ones are never shown ([`KafkaOptions`]).
    pub options: KafkaOptions,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: String::new(),
            topic: "usage-events".into(),
            dlq_topic: "usage-events-dlq".into(),
            options: KafkaOptions::default(),
        }
    }
}

/// A setting that could not be used, naming where it came from and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{origin} is not valid TOML: {message}")]
    Syntax { origin: String, message: String },
    #[error("environment variable {var} is not a tally setting; {hint}")]
    UnknownEnv { var: String, hint: String },
    #[error("setting `{key}` (from {origin}) is invalid: {message}")]
    Invalid {
        key: String,
        origin: String,
        message: String,
    },
}

/// What to say of a `TALLY_*` variable that names no setting: the nearest one (a typo), else
/// the settings of its section, else where they are listed.
fn unknown_env_hint<'a>(var: &str, known: impl Iterator<Item = &'a String>) -> String {
    let known: Vec<&String> = known.collect();
    let nearest = known
        .iter()
        .map(|k| (edit_distance(var, k), *k))
        .min_by_key(|(distance, _)| *distance);
    if let Some((distance, name)) = nearest {
        if distance <= 3 {
            return format!("did you mean {name}? (or remove it)");
        }
    }
    // TALLY_<SECTION>_…: the section's settings.
    let section = var.splitn(3, '_').take(2).collect::<Vec<_>>().join("_") + "_";
    let same_section: Vec<&str> = known
        .iter()
        .filter(|k| k.starts_with(&section))
        .map(|k| k.as_str())
        .collect();
    if !same_section.is_empty() && same_section.len() <= 20 {
        return format!("remove it, or use one of {}", same_section.join(", "));
    }
    "remove it; `tally config` shows every setting, and tally.example.toml says what each does (each is TALLY_ and its path in capitals, e.g. TALLY_AGGREGATOR_BATCH_MAX_WAIT)".into()
}

/// Levenshtein distance, for suggesting the setting a typo meant.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let current = row[j + 1];
            row[j + 1] = (previous + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(current + 1);
            previous = current;
        }
    }
    row[b.len()]
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
                message: syntax_message(text, &e),
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
                hint: unknown_env_hint(var, by_var.keys()),
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
        let mut message = message
            .lines()
            .filter(|line| !line.starts_with("in `") && !line.trim().is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        if message.contains("expected a duration") || message.contains("unknown time unit") || message.contains("time unit needed") {
            message.push_str("; write a number with its unit, e.g. \"250ms\", \"5s\", \"10m\", \"1h\" or \"35days\"");
        }
        ConfigError::Invalid {
            key,
            origin,
            message,
        }
    })
}

/// toml's message with the line and column, but without the line itself, which toml quotes:
/// it may hold a secret (an unterminated password string, say).
fn syntax_message(text: &str, error: &toml::de::Error) -> String {
    let message = error
        .message()
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let Some(before) = error.span().and_then(|span| text.get(..span.start)) else {
        return message;
    };
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    format!("line {line}, column {column}: {message}")
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
        #[serde(with = "crate::duration")]
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
        assert_eq!(cfg.kafka.options.get("linger.ms"), Some("5"));
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
        assert!(err.contains("did you mean TALLY_QUEUE_CAPACITY?"), "{err}");
        // Far from any: the way to find them, not a list of every one.
        let err = load::<Sample>(None, env(&[("TALLY_SOMETHING_ELSE_ENTIRELY", "3")]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("tally config"), "{err}");
        assert!(err.len() < 400, "{err}");
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
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

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct WithSecrets {
        kafka: KafkaConfig,
        key: Secret,
    }

    const PLANTED: &str = "hunter2-planted";

    #[test]
    fn secrets_serialize_hidden_and_empty_ones_stay_empty() {
        let file = format!(
            "key = \"{PLANTED}-key\"\n[kafka.options]\n\"sasl.password\" = \"{PLANTED}-sasl\"\n\
             \"SSL.Keystore.Password\" = \"{PLANTED}-keystore\"\n\
             \"sasl.oauthbearer.client.secret\" = \"{PLANTED}-oauth\"\n\"linger.ms\" = \"5\"\n"
        );
        let cfg: WithSecrets = load(Some(("t.toml", &file)), env(&[]), &[]).unwrap();
        assert_eq!(cfg.key.expose(), format!("{PLANTED}-key"));
        assert_eq!(
            cfg.kafka.options.get("sasl.password"),
            Some(&*format!("{PLANTED}-sasl"))
        );
        for shown in [
            toml::to_string(&cfg).unwrap(),
            serde_json::to_string(&cfg).unwrap(),
            format!("{cfg:?}"),
            format!("{cfg:#?}"),
        ] {
            assert!(!shown.contains(PLANTED), "{shown}");
            assert!(
                shown.contains("linger.ms") && shown.contains('5'),
                "{shown}"
            );
            assert!(shown.contains(REDACTED), "{shown}");
        }
        let empty = toml::to_string(&WithSecrets::default()).unwrap();
        assert!(empty.contains("key = \"\""), "{empty}");
    }

    #[test]
    fn secret_option_names() {
        for name in [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "sasl.oauthbearer.client.secret",
            "ssl.key.pem",
            "ssl.key.location",
            "sasl.username",
            "sasl.oauthbearer.config",
            "Some.API_KEY",
        ] {
            assert!(names_secret(name), "{name}");
        }
        for name in [
            "linger.ms",
            "security.protocol",
            "sasl.mechanisms",
            "ssl.ca.location",
        ] {
            assert!(!names_secret(name), "{name}");
        }
    }

    #[test]
    fn librdkafka_text_loses_secret_values() {
        let options: KafkaOptions = [("sasl.password", PLANTED), ("linger.ms", "5")]
            .into_iter()
            .collect();
        let text =
            format!("Client config error: invalid value \"{PLANTED}\" sasl.password {PLANTED}");
        let redacted = options.redact(&text);
        assert!(!redacted.contains(PLANTED), "{redacted}");
        assert!(redacted.contains("sasl.password"), "{redacted}");
    }

    #[test]
    fn refused_secret_values_are_not_repeated() {
        // A secret that is not a string, an option value that is not a string, options that
        // are not a table (a malformed TALLY_KAFKA_OPTIONS), dotted names left unquoted, and a
        // TOML syntax error on a secret's line: each names the setting, never the value.
        let cases = [
            (Some("key = 987654321\n"), vec![], "987654321"),
            (
                Some("[kafka.options]\n\"sasl.password\" = 987654321\n"),
                vec![],
                "987654321",
            ),
            (
                None,
                vec![(
                    "TALLY_KAFKA_OPTIONS",
                    r#"{ "sasl.password" = "hunter2-planted" "#,
                )],
                PLANTED,
            ),
            (
                Some("[kafka.options]\nsasl.password = \"hunter2-planted\"\n"),
                vec![],
                PLANTED,
            ),
            (Some("key = \"hunter2-planted\n"), vec![], PLANTED),
        ];
        for (file, vars, planted) in cases {
            let err = load::<WithSecrets>(file.map(|f| ("t.toml", f)), env(&vars), &[])
                .unwrap_err()
                .to_string();
            assert!(!err.contains(planted), "{err}");
            assert!(
                err.contains("key") || err.contains("kafka.options") || err.contains("line"),
                "{err}"
            );
        }
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
