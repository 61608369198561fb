//! Postgres for tally. Every stage connects through [`connect`], so an unreachable or
//! misconfigured database gives the same clear error everywhere, and the schema lives in one
//! place: the versioned SQL files in the top-level `migrations/`, embedded here.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

pub mod meters;
mod numeric;
pub mod rejects;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod throwaway;

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
    #[error("applying migrations failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("the database schema is behind this tally (migrations {0:?} not applied); run `tally migrate`, or pass --migrate")]
    SchemaBehind(Vec<i64>),
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
    let options: PgConnectOptions = url.parse().map_err(DbError::BadUrl)?;
    let target = describe(&options);
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(timeout)
        .connect_with(options)
        .await
        .map_err(|reason| DbError::Unreachable { target, reason })
}

/// A pool of up to `max_connections` that connects on first use, for daemons: one started
/// while Postgres is away comes up, and waits for it (each acquire gives up after `timeout`).
/// Only a malformed URL is an error here.
pub fn connect_lazy(url: &str, max_connections: u32, timeout: Duration) -> Result<PgPool, DbError> {
    if url.trim().is_empty() {
        return Err(DbError::NotConfigured);
    }
    let options: PgConnectOptions = url.parse().map_err(DbError::BadUrl)?;
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(timeout)
        .connect_lazy_with(options))
}

/// `host:port/database` of a Postgres URL, without its credentials: for messages and logs.
/// An unparsable URL is described as such, never echoed (it may hold a password).
pub fn describe_url(url: &str) -> String {
    url.parse::<PgConnectOptions>()
        .map_or_else(|_| "(an invalid Postgres URL)".to_owned(), |o| describe(&o))
}

fn describe(options: &PgConnectOptions) -> String {
    format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("(default database)")
    )
}

/// Applies every pending migration.
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    MIGRATOR.run(pool).await?;
    Ok(())
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

/// Fails with "run `tally migrate`" unless every embedded migration has been applied.
pub async fn check_schema(pool: &PgPool) -> Result<(), DbError> {
    let applied: Vec<i64> = match sqlx::query_scalar(
        "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
    )
    .fetch_all(pool)
    .await
    {
        Ok(applied) => applied,
        Err(reason) if is_retryable(&reason) => {
            return Err(DbError::Unreachable {
                target: describe(&pool.connect_options()),
                reason,
            })
        }
        // No migrations table: nothing is applied.
        Err(_) => Vec::new(),
    };
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
