//! The demo's Postgres: the configured server, else the local one on 127.0.0.1:5432, else a
//! throwaway cluster started with the local `initdb`/`pg_ctl` in a temporary directory. In all
//! three the demo works in a database of its own, so it never touches existing data.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use sqlx::PgPool;

const LOCAL_SERVER: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A database made for one demo run; dropped (and the throwaway server stopped) by `close`.
pub(crate) struct DemoDatabase {
    pub(crate) pool: PgPool,
    pub(crate) name: String,
    pub(crate) server_url: String,
    throwaway: Option<Throwaway>,
}

struct Throwaway {
    dir: tempfile::TempDir,
    pg_ctl: PathBuf,
    as_postgres: bool,
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
            let (url, throwaway) = start_throwaway()?;
            (url, Some(throwaway))
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
        let url = tally_db::testing::with_database(&server_url, &name);
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
        if let Some(throwaway) = self.throwaway {
            let mut stop = postgres_command(&throwaway.pg_ctl, throwaway.as_postgres);
            stop.arg("-D")
                .arg(throwaway.dir.path().join("data"))
                .args(["-m", "fast", "stop"]);
            let _ = stop.output();
        }
        Ok(())
    }
}

fn start_throwaway() -> anyhow::Result<(String, Throwaway)> {
    let Some(bin) = postgres_bin_dir() else {
        bail!("no PostgreSQL server on 127.0.0.1:5432 and no initdb to start one; install PostgreSQL (Debian/Ubuntu: apt-get install postgresql) or pass --database-url");
    };
    let as_postgres = is_root();
    let dir = tempfile::Builder::new().prefix("tally-demo-pg").tempdir()?;
    if as_postgres {
        // initdb and postgres refuse to run as root: run them as the postgres user.
        let owned = Command::new("chown")
            .arg("postgres")
            .arg(dir.path())
            .status();
        if !owned.is_ok_and(|s| s.success()) {
            bail!("running as root, the throwaway Postgres must run as user postgres, which does not exist; create it (useradd --system postgres) or pass --database-url");
        }
    }
    let port = free_port()?;
    let data = dir.path().join("data");
    let output = postgres_command(&bin.join("initdb"), as_postgres)
        .arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "--auth=trust", "-E", "UTF8"])
        .output()
        .context("running initdb")?;
    if !output.status.success() {
        bail!("initdb failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let options = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
        dir.path().display()
    );
    let pg_ctl = bin.join("pg_ctl");
    let output = postgres_command(&pg_ctl, as_postgres)
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(dir.path().join("server.log"))
        .args(["-w", "-o", &options, "start"])
        .output()
        .context("running pg_ctl start")?;
    if !output.status.success() {
        bail!(
            "pg_ctl start failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    println!("  started a throwaway PostgreSQL on 127.0.0.1:{port}");
    Ok((
        format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        Throwaway {
            dir,
            pg_ctl,
            as_postgres,
        },
    ))
}

fn postgres_command(program: &Path, as_postgres: bool) -> Command {
    if as_postgres {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn postgres_bin_dir() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| {
            dirs.filter_map(|d| d.ok())
                .map(|d| d.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    candidates.sort();
    candidates.reverse();
    candidates.extend(["/usr/bin", "/usr/local/bin"].map(PathBuf::from));
    candidates
        .into_iter()
        .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
