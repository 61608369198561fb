//! A throwaway PostgreSQL cluster started with the local `initdb`/`pg_ctl` in a temporary
//! directory: for `tally demo` on a machine without a server, and for tests that stop and
//! start Postgres under running processes (an outage that is really an outage).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Why a throwaway cluster could not be started or controlled; the message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ThrowawayError {
    #[error("no initdb/pg_ctl found; install PostgreSQL (Debian/Ubuntu: apt-get install postgresql) or point DATABASE_URL at a server")]
    NotInstalled,
    #[error("running as root, Postgres must run as user postgres, which does not exist; create it (useradd --system postgres) or point DATABASE_URL at a server")]
    NoPostgresUser,
    #[error("{step} failed: {detail}")]
    Failed { step: &'static str, detail: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A cluster in a temporary directory, listening on 127.0.0.1 on a free port; stopped and
/// deleted when dropped.
pub struct ThrowawayCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_postgres: bool,
    port: u16,
}

impl ThrowawayCluster {
    /// initdb (user `postgres`, trust auth) and start.
    pub fn start() -> Result<ThrowawayCluster, ThrowawayError> {
        let bin = postgres_bin_dir().ok_or(ThrowawayError::NotInstalled)?;
        let as_postgres = is_root();
        let dir = tempfile::Builder::new().prefix("tally-pg").tempdir()?;
        if as_postgres {
            // initdb and postgres refuse to run as root: run them as the postgres user.
            let owned = Command::new("chown")
                .arg("postgres")
                .arg(dir.path())
                .status();
            if !owned.is_ok_and(|s| s.success()) {
                return Err(ThrowawayError::NoPostgresUser);
            }
        }
        let port = free_port()?;
        let cluster = ThrowawayCluster {
            dir,
            bin,
            as_postgres,
            port,
        };
        cluster.run(
            "initdb",
            cluster
                .command("initdb")
                .arg("-D")
                .arg(cluster.data())
                .args(["-U", "postgres", "--auth=trust", "-E", "UTF8"]),
        )?;
        cluster.resume()?;
        Ok(cluster)
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (fast shutdown: connections are cut, as in a crash of the network or
    /// a restart of the database host).
    pub fn stop(&self) -> Result<(), ThrowawayError> {
        self.run(
            "pg_ctl stop",
            self.command("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-m", "fast", "-w", "stop"]),
        )
    }

    /// Starts the (stopped) server again on the same port.
    pub fn resume(&self) -> Result<(), ThrowawayError> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        self.run(
            "pg_ctl start",
            self.command("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .arg("-l")
                .arg(self.dir.path().join("server.log"))
                .args(["-w", "-o", &options, "start"]),
        )
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        }
    }

    fn run(&self, step: &'static str, command: &mut Command) -> Result<(), ThrowawayError> {
        let output = command.output()?;
        if output.status.success() {
            Ok(())
        } else {
            Err(ThrowawayError::Failed {
                step,
                detail: String::from_utf8_lossy(&output.stderr).into_owned(),
            })
        }
    }
}

impl Drop for ThrowawayCluster {
    fn drop(&mut self) {
        let _ = self.stop();
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
    candidates.into_iter().find(|dir| has_tools(dir))
}

fn has_tools(dir: &Path) -> bool {
    dir.join("initdb").is_file() && dir.join("pg_ctl").is_file()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
