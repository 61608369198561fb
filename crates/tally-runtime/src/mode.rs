//! How a stage runs: the same two ways for the aggregator and the sink.

/// Run as a daemon until stopped, or do what is there once and exit (cron, a systemd timer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunMode {
    /// Long-running: stop on cancellation, after finishing and committing the work in hand.
    Daemon,
    /// For cron: the aggregator drains up to the end offsets it saw when it took each
    /// partition; the sink makes one billing pass. Then return.
    Once,
}

impl RunMode {
    /// `daemon` or `once`, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            RunMode::Daemon => "daemon",
            RunMode::Once => "once",
        }
    }
}
