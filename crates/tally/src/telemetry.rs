//! Logs: human-readable on a terminal, JSON lines otherwise (for journald and log shippers).
//! Filter with `TALLY_LOG` (e.g. `TALLY_LOG=debug`, `TALLY_LOG=tally_emitter=trace`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// `default_level` applies when `TALLY_LOG` is unset: `info` for the stages, `warn` for the
/// demo, whose own progress lines say what happens.
pub(crate) fn init_logging(default_level: &str) {
    // Postgres's notices ("relation … already exists, skipping") are not the operator's,
    // whatever TALLY_LOG says, unless it names sqlx itself.
    const QUIET_NOTICES: &str = "sqlx::postgres::notice=error";
    let chosen = std::env::var("TALLY_LOG").unwrap_or_default();
    let filter = EnvFilter::try_from_env("TALLY_LOG").unwrap_or_else(|_| {
        EnvFilter::new(format!("{default_level},librdkafka=warn,rdkafka=warn"))
    });
    let filter = if chosen.contains("sqlx") {
        filter
    } else {
        filter.add_directive(QUIET_NOTICES.parse().expect("a valid directive"))
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        builder.init();
    } else {
        builder.json().init();
    }
}
