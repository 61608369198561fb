//! Postgres for tally. Every stage connects through [`connect`], so an unreachable or
//! misconfigured database gives the same clear error everywhere, and the schema lives in one
//! place: the versioned SQL files in the top-level `migrations/`, embedded here.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

pub mod testing;

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

/// True when the error means "try again" (connection lost, serialization failure, deadlock,
/// a concurrent insert of the same key) rather than a bug or a bad schema.
pub fn is_retryable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => matches!(
            db.code().as_deref(),
            // serialization_failure, deadlock_detected, unique_violation (a concurrent claim),
            // admin_shutdown / crash_shutdown / cannot_connect_now (server restarting).
            Some("40001" | "40P01" | "23505" | "57P01" | "57P02" | "57P03")
        ),
        _ => false,
    }
}

/// Fails with "run `tally migrate`" unless every embedded migration has been applied.
pub async fn check_schema(pool: &PgPool) -> Result<(), DbError> {
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(pool)
            .await
            .unwrap_or_default();
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
