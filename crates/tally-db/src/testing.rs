//! A fresh, migrated database per test, on the server `DATABASE_URL` names (scripts/test.sh
//! sets it). Databases are named `tally_test_<unix seconds>_<pid>_<n>`; ones left by earlier
//! runs are dropped once they are two hours old.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::{Connection, PgConnection, PgPool};

/// A database created for one test.
#[derive(Debug, Clone)]
pub struct TestDatabase {
    pub url: String,
    pub pool: PgPool,
}

/// Creates and migrates a new database. Panics with a helpful message when there is no server.
pub async fn fresh_database() -> TestDatabase {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let server = std::env::var("DATABASE_URL").expect(
        "DATABASE_URL is not set: run the tests with scripts/test.sh, which finds or starts Postgres",
    );
    let mut admin = PgConnection::connect(&server)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to DATABASE_URL: {e}"));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    drop_stale_databases(&mut admin, now).await;
    let name = format!(
        "tally_test_{now}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let url = crate::with_database(&server, &name);
    let pool = crate::connect(&url, 8, Duration::from_secs(10))
        .await
        .unwrap();
    crate::migrate(&pool).await.unwrap();
    TestDatabase { url, pool }
}

async fn drop_stale_databases(admin: &mut PgConnection, now: u64) {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'tally_test_%'")
            .fetch_all(&mut *admin)
            .await
            .unwrap_or_default();
    for name in names {
        let created: Option<u64> = name
            .strip_prefix("tally_test_")
            .and_then(|rest| rest.split('_').next())
            .and_then(|secs| secs.parse().ok());
        if created.is_some_and(|secs| secs + 2 * 3600 < now) {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut *admin)
                .await;
        }
    }
}

/// The runtime tests and benchmarks drive tally with: two workers, as on the 2-core machines
/// tally is sized for (and as the `tally` commands run).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime starts")
}

#[cfg(test)]
mod tests {
    use crate::with_database;

    #[test]
    fn replaces_or_adds_the_database() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "t1"),
            "postgres://postgres@127.0.0.1:5432/t1"
        );
        assert_eq!(
            with_database("postgres://u:p@h/db?sslmode=disable", "t1"),
            "postgres://u:p@h/t1?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://h:5432", "t1"),
            "postgres://h:5432/t1"
        );
    }
}
