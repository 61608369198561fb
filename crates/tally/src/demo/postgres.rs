//! The demo's Postgres: the configured server, else the local one on 127.0.0.1:5432, else a
//! throwaway cluster started with the local `initdb`/`pg_ctl` in a temporary directory. In all
//! three the demo works in a database of its own, so it never touches existing data.

use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use tally_db::throwaway::ThrowawayCluster;

const LOCAL_SERVER: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A database made for one demo run; dropped (and the throwaway server stopped) by `close`.
pub(crate) struct DemoDatabase {
    pub(crate) pool: PgPool,
    pub(crate) name: String,
    pub(crate) server_url: String,
    throwaway: Option<ThrowawayCluster>,
}

impl DemoDatabase {
    pub(crate) async fn open(configured: &str) -> anyhow::Result<DemoDatabase> {
        let (server_url, throwaway) = if !configured.is_empty() {
            (configured.to_owned(), None)
        } else if tally_db::connect(LOCAL_SERVER, 1, Duration::from_secs(2))
            .await
            .is_ok()
        {
            (LOCAL_SERVER.to_owned(), None)
        } else {
            let cluster = ThrowawayCluster::start()?;
            println!(
                "  started a throwaway PostgreSQL on 127.0.0.1:{}",
                cluster.port()
            );
            (cluster.url(), Some(cluster))
        };
        let admin = tally_db::connect(&server_url, 1, Duration::from_secs(10)).await?;
        let name = format!(
            "tally_demo_{}_{}",
            chrono::Utc::now().timestamp(),
            std::process::id()
        );
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .with_context(|| {
                format!("creating database {name}; the demo's Postgres user needs CREATEDB")
            })?;
        admin.close().await;
        let url = tally_db::with_database(&server_url, &name);
        let pool = tally_db::connect(&url, 12, Duration::from_secs(10)).await?;
        tally_db::migrate(&pool).await?;
        Ok(DemoDatabase {
            pool,
            name,
            server_url,
            throwaway,
        })
    }

    /// Drops the demo database unless `keep`, and stops a throwaway server.
    pub(crate) async fn close(self, keep: bool) -> anyhow::Result<()> {
        self.pool.close().await;
        if !keep && self.throwaway.is_none() {
            let admin = tally_db::connect(&self.server_url, 1, Duration::from_secs(10)).await?;
            sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&admin)
            .await?;
        }
        // A throwaway server stops (and its directory goes) when dropped.
        drop(self.throwaway);
        Ok(())
    }
}
