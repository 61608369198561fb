//! Postgres for tally. Every stage connects through [`connect`], so an unreachable or
//! misconfigured database gives the same clear error everywhere, and the schema lives in one
//! place: the versioned SQL files in the top-level `migrations/`, embedded here.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

pub mod changes;
pub mod customer_errors;
mod isolate;
pub mod meters;
mod numeric;
pub mod rejects;
pub mod slot_changes;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod throwaway;

pub use isolate::isolate;
pub use numeric::ExactDecimal;

/// The schema, from `migrations/`. Applied by `tally migrate` (and by stages when asked).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// Why tally could not use the database. Each message names the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database.url is not set; pass --database-url, set DATABASE_URL, or set url under [database] in tally.toml")]
    NotConfigured,
    #[error("database.url is not a valid Postgres URL ({0}); expected postgres://user:password@host:5432/dbname")]
    BadUrl(sqlx::Error),
    #[error("cannot reach Postgres at {target} ({reason}); check that the server is running and that database.url is right")]
    Unreachable { target: String, reason: sqlx::Error },
    #[error("applying migrations failed: {}", migration_cause(.0))]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("the database schema is behind this tally (migrations {} not applied); run `tally migrate`, or pass --migrate", versions(.0))]
    SchemaBehind(Vec<i64>),
    #[error("database {database:?} does not exist on {server}; create it (`createdb {database}`, or CREATE DATABASE {database}) or point database.url at one that does, then run `tally migrate`")]
    NoSuchDatabase { database: String, server: String },
    #[error("Postgres at {target} refused user {user:?} ({reason}); grant it access to the database (or its tables: `tally migrate` needs to create them), or use another user in database.url")]
    NoPermission {
        target: String,
        user: String,
        reason: String,
    },
}

/// The migration error's cause, said once (sqlx's own message repeats its sources).
fn migration_cause(error: &sqlx::migrate::MigrateError) -> String {
    match error {
        sqlx::migrate::MigrateError::Execute(e)
        | sqlx::migrate::MigrateError::ExecuteMigration(e, _) => match e {
            sqlx::Error::Database(db) => db.message().to_owned(),
            other => other.to_string(),
        },
        other => other.to_string(),
    }
}

/// Versions as `1, 2, 3` (or `1 to 15` when they follow each other).
fn versions(versions: &[i64]) -> String {
    match (versions.first(), versions.last()) {
        (Some(first), Some(last))
            if versions.len() > 2 && versions.windows(2).all(|w| w[1] == w[0] + 1) =>
        {
            format!("{first} to {last}")
        }
        _ => versions
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    }
}

impl DbError {
    /// What a Postgres error says about the database itself (it does not exist, the user may
    /// not use it), as an error that says how to fix it; `None` for anything else.
    fn about_the_database(error: &sqlx::Error, options: &PgConnectOptions) -> Option<DbError> {
        let sqlx::Error::Database(db) = error else {
            return None;
        };
        match db.code().as_deref() {
            // invalid_catalog_name
            Some("3D000") => Some(DbError::NoSuchDatabase {
                database: options.get_database().unwrap_or("postgres").to_owned(),
                server: format!("{}:{}", options.get_host(), options.get_port()),
            }),
            // insufficient_privilege, invalid_authorization_specification, invalid_password
            Some("42501" | "28000" | "28P01") => Some(DbError::NoPermission {
                target: describe(options),
                user: options.get_username().to_owned(),
                reason: db.message().to_owned(),
            }),
            _ => None,
        }
    }
}

/// Connects a pool of up to `max_connections`, failing within `timeout` with a clear error.
pub async fn connect(
    url: &str,
    max_connections: u32,
    timeout: Duration,
) -> Result<PgPool, DbError> {
    if url.trim().is_empty() {
        return Err(DbError::NotConfigured);
    }
    let options = parse(url)?;
    let target = describe(&options);
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(timeout)
        .connect_with(options.clone())
        .await
        .map_err(|reason| {
            DbError::about_the_database(&reason, &options)
                .unwrap_or(DbError::Unreachable { target, reason })
        })
}

/// A pool of up to `max_connections` that connects on first use, for daemons: one started
/// while Postgres is away comes up, and waits for it (each acquire gives up after `timeout`).
/// Only a malformed URL is an error here.
pub fn connect_lazy(url: &str, max_connections: u32, timeout: Duration) -> Result<PgPool, DbError> {
    if url.trim().is_empty() {
        return Err(DbError::NotConfigured);
    }
    let options = parse(url)?;
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(timeout)
        .connect_lazy_with(options))
}

/// Like [`connect_lazy`], for readers whose queries the caller shapes (the usage API): every
/// statement on these connections is cancelled by Postgres after `statement_timeout`.
pub fn connect_lazy_bounded(
    url: &str,
    max_connections: u32,
    timeout: Duration,
    statement_timeout: Duration,
) -> Result<PgPool, DbError> {
    if url.trim().is_empty() {
        return Err(DbError::NotConfigured);
    }
    let milliseconds = statement_timeout.as_millis().max(1).to_string();
    let options = parse(url)?.options([("statement_timeout", milliseconds.as_str())]);
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(timeout)
        .connect_lazy_with(options))
}

/// `host:port/database` of a Postgres URL, without its credentials: for messages and logs.
/// An unparsable URL is described as such, never echoed (it may hold a password).
pub fn describe_url(url: &str) -> String {
    parse(url).map_or_else(|_| "(an invalid Postgres URL)".to_owned(), |o| describe(&o))
}

/// The query parameters sqlx 0.8's Postgres driver reads (`PgConnectOptions::parse_from_url`),
/// besides `options[…]`.
const DRIVER_PARAMETERS: [&str; 18] = [
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// Parses a Postgres URL. A query parameter the driver does not read (libpq's `sslpassword`,
/// `connect_timeout`, …) is dropped with a warning that names it: the driver would log its
/// value, which may be a password.
fn parse(url: &str) -> Result<PgConnectOptions, DbError> {
    let Some((base, query)) = url.split_once('?') else {
        return url.parse().map_err(DbError::BadUrl);
    };
    let (query, fragment) = match query.split_once('#') {
        Some((query, fragment)) => (query, Some(fragment)),
        None => (query, None),
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let name = percent_decode(pair.split_once('=').map_or(*pair, |(name, _)| name));
            let known = DRIVER_PARAMETERS.contains(&name.as_str())
                || (name.starts_with("options[") && name.ends_with(']'));
            if !known && !name.is_empty() {
                tracing::warn!(
                    parameter = %name,
                    "database.url has a parameter tally's Postgres driver does not support; it is ignored"
                );
            }
            known
        })
        .collect();
    let mut cleaned = base.to_owned();
    if !kept.is_empty() {
        cleaned.push('?');
        cleaned.push_str(&kept.join("&"));
    }
    if let Some(fragment) = fragment {
        cleaned.push('#');
        cleaned.push_str(fragment);
    }
    cleaned.parse().map_err(DbError::BadUrl)
}

/// `%XX` and `+` decoded, as URL query names are.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |at: usize| {
            bytes
                .get(at)
                .and_then(|b| char::from(*b).to_digit(16))
                .map(|d| d as u8)
        };
        match (bytes[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(high), Some(low)) => {
                out.push(high * 16 + low);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A Postgres URL as it may be shown: the password (in the user info, or a query parameter
/// whose name [names a secret](tally_core::config::names_secret), such as `password` or
/// `sslpassword`) replaced by `****`, the rest (user, host, port, database) kept so an
/// operator can see where tally connects. Text that is not a `scheme://` URL is hidden whole.
/// An empty URL stays empty.
pub fn redact_url(url: &str) -> String {
    if url.is_empty() {
        return String::new();
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return "(hidden: not a postgres:// URL)".to_owned();
    };
    // The user info ends at the last '@', so a password holding an unencoded '/', '?' or '@'
    // is still hidden whole (an '@' in a query value may hide more than needed: the safe side).
    let rest = match rest.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:****@{host}"),
            None => rest.to_owned(),
        },
        None => rest.to_owned(),
    };
    let (rest, query) = match rest.split_once('?') {
        Some((rest, query)) => (rest, Some(query)),
        None => (rest.as_str(), None),
    };
    let mut shown = format!("{scheme}://{rest}");
    if let Some(query) = query {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) if tally_core::config::names_secret(&percent_decode(name)) => {
                    format!("{name}=****")
                }
                _ => pair.to_owned(),
            })
            .collect();
        shown.push('?');
        shown.push_str(&pairs.join("&"));
    }
    shown
}

fn describe(options: &PgConnectOptions) -> String {
    format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("(default database)")
    )
}

/// Applies every pending migration; returns how many it applied.
pub async fn migrate(pool: &PgPool) -> Result<usize, DbError> {
    let before = applied_versions(pool).await?.len();
    // sqlx creates its table with IF NOT EXISTS: Postgres's notice that it exists is noise.
    if let Err(error) = MIGRATOR.run(pool).await {
        if let sqlx::migrate::MigrateError::Execute(e) = &error {
            if let Some(clear) = DbError::about_the_database(e, &pool.connect_options()) {
                return Err(clear);
            }
        }
        return Err(error.into());
    }
    let after = applied_versions(pool).await?.len();
    Ok(after.saturating_sub(before))
}

/// The versions applied, empty when the migrations table does not exist yet.
async fn applied_versions(pool: &PgPool) -> Result<Vec<i64>, DbError> {
    match sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
        .fetch_all(pool)
        .await
    {
        Ok(applied) => Ok(applied),
        Err(reason) => {
            let options = pool.connect_options();
            if let Some(clear) = DbError::about_the_database(&reason, &options) {
                return Err(clear);
            }
            if is_retryable(&reason) {
                return Err(DbError::Unreachable {
                    target: describe(&options),
                    reason,
                });
            }
            // No migrations table (undefined_table): nothing is applied.
            match &reason {
                sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01") => {
                    Ok(Vec::new())
                }
                _ => Err(DbError::Unreachable {
                    target: describe(&options),
                    reason,
                }),
            }
        }
    }
}

/// True when the error means "try again": the server is away or busy (connection lost or
/// refused, restarting, out of disk or connections, an I/O error), the transaction lost a race
/// (serialization failure, deadlock, a concurrent insert of the same key), or a statement was
/// canceled. Not retryable: a bug, a bad schema, or data Postgres refuses ([`is_data_error`]).
pub fn is_retryable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code();
            let code = code.as_deref().unwrap_or("");
            // 23505 unique_violation: a concurrent claim of the same id.
            code == "23505"
                // 08 connection exception, 40 transaction rollback, 53 insufficient resources
                // (disk full, too many connections), 57 operator intervention (shutdown,
                // restart, cancel), 58 system error (I/O).
                || ["08", "40", "53", "57", "58"].iter().any(|class| code.starts_with(class))
        }
        _ => false,
    }
}

/// True when Postgres refused the data itself: SQLSTATE class 22 (data exception, such as a
/// NUL in text or a numeric overflow), 23 (integrity violation, but not 23505, the dedup race)
/// or 54 (program limit exceeded, such as an index row larger than a b-tree page allows).
/// Running the same statement again fails the same way: the caller must find the offending
/// row and set it aside.
pub fn is_data_error(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => {
            let code = db.code();
            let code = code.as_deref().unwrap_or("");
            (code.starts_with("22") || code.starts_with("23") || code.starts_with("54"))
                && code != "23505"
        }
        // A value read back that does not fit Rust's type (a sum beyond a decimal's range).
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => true,
        _ => false,
    }
}

/// Postgres cancelled the statement: `statement_timeout` ran out (SQLSTATE 57014).
pub fn is_statement_timeout(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().as_deref() == Some("57014"))
}

impl DbError {
    /// Postgres is away or busy: the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        match self {
            DbError::Unreachable { reason, .. } => is_retryable(reason),
            DbError::Migration(sqlx::migrate::MigrateError::Execute(e)) => is_retryable(e),
            _ => false,
        }
    }
}

/// Fails with "run `tally migrate`" unless every embedded migration has been applied (or with
/// what is wrong with the database itself: it does not exist, the user may not use it).
pub async fn check_schema(pool: &PgPool) -> Result<(), DbError> {
    let applied = applied_versions(pool).await?;
    let missing: Vec<i64> = MIGRATOR
        .iter()
        .map(|m| m.version)
        .filter(|v| !applied.contains(v))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(DbError::SchemaBehind(missing))
    }
}

/// `url` with its database name replaced by `database`.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_end = base
        .find("://")
        .map(|scheme| scheme + 3)
        .and_then(|start| base[start..].find('/').map(|slash| start + slash))
        .unwrap_or(base.len());
    let mut out = format!("{}/{database}", &base[..authority_end]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_urls_keep_where_but_not_the_password() {
        for (url, shown) in [
            ("", ""),
            (
                "postgres://tally:hunter2@db.internal:5432/tally",
                "postgres://tally:****@db.internal:5432/tally",
            ),
            (
                "postgres://tally@db.internal/tally?sslmode=require",
                "postgres://tally@db.internal/tally?sslmode=require",
            ),
            (
                "postgres://tally:hunter2@db/tally?sslmode=verify-full&sslpassword=hunter2&password=hunter2",
                "postgres://tally:****@db/tally?sslmode=verify-full&sslpassword=****&password=****",
            ),
            ("postgres://db/tally?pass%77ord=hunter2", "postgres://db/tally?pass%77ord=****"),
            ("postgres://u:hun/ter?2@db/tally", "postgres://u:****@db/tally"),
            ("postgres://u:hun@ter2@db/tally", "postgres://u:****@db/tally"),
            ("postgres://db/tally?password=hun@ter2", "postgres://db/tally?password=****"),
            ("host=db password=hunter2", "(hidden: not a postgres:// URL)"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn parameters_the_driver_ignores_are_dropped_and_known_ones_kept() {
        let options =
            parse("postgres://u:pw@db:5433/tally?sslpassword=hunter2&application_name=x&connect_timeout=3")
                .unwrap();
        assert_eq!(describe(&options), "db:5433/tally");
        assert_eq!(options.get_application_name(), Some("x"));
        let options = parse("postgres://u@db/tally?pass%77ord=pw&dbname=other").unwrap();
        assert_eq!(options.get_database(), Some("other"));
        assert!(parse("postgres://u@db:notaport/tally").is_err());
        assert_eq!(describe_url("not a url"), "(an invalid Postgres URL)");
    }
}
