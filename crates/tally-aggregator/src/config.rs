//! `[aggregator]` settings.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How the aggregator batches and how long it remembers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregatorConfig {
    /// Kafka consumer group (contract: `tally-aggregator`). Processes in one group split the
    /// topic's partitions.
    pub group_id: String,
    /// Join the group as a static member (Kafka static membership, KIP-345,
    /// `group.instance.id`): a process restarted under the same name gets its partitions back
    /// at once rather than after `session_timeout`. Off by default: brokers implement it
    /// unevenly (librdkafka's mock cluster not at all; tansu 0.6 loses static members in
    /// rebalances), and a member the broker does not serve holds its partitions without
    /// consuming. Turn it on with Apache Kafka 2.4 or later.
    pub static_membership: bool,
    /// This process's stable name in the group when `static_membership` is on. Unset:
    /// `tally-aggregator-<hostname>`. Two aggregators on one host need different names (e.g.
    /// `TALLY_AGGREGATOR_INSTANCE_ID=%i` in a systemd template).
    pub instance_id: Option<String>,
    /// How long the group waits for a silent member before giving its partitions to others
    /// (`session.timeout.ms`; brokers allow 6s to 30m by default).
    #[serde(with = "tally_core::duration")]
    pub session_timeout: Duration,
    /// A member whose partitions have lag and make no progress for this long (or that holds no
    /// partition this long while a partition nobody consumes has lag) is stalled: `/readyz`
    /// says so, and it leaves the group and joins again with a fresh consumer. `--once` gives
    /// up (exit 1) after consuming nothing for this long while it has not drained.
    #[serde(with = "tally_core::duration")]
    pub stall_timeout: Duration,
    /// A batch closes at this many events...
    pub batch_max_events: usize,
    /// ...or at this many bytes of raw events (bounds memory: events are up to 64 KiB)...
    pub batch_max_bytes: usize,
    /// ...or when its first event has waited this long (bounds freshness).
    #[serde(with = "tally_core::duration")]
    pub batch_max_wait: Duration,
    /// Batches committed at once, each over its own share of the partitions (its lane), on
    /// its own Postgres connection.
    pub parallel_commits: usize,
    /// Events whose timestamp is older than this are refused as `too_late`.
    #[serde(with = "tally_core::duration")]
    pub lateness_horizon: Duration,
    /// How long an event id is remembered for dedup; at least `lateness_horizon`.
    #[serde(with = "tally_core::duration")]
    pub dedup_retention: Duration,
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        AggregatorConfig {
            group_id: "tally-aggregator".into(),
            static_membership: false,
            instance_id: None,
            session_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(60),
            // Tuned by scripts/bench.sh aggregate: large enough that a backlog drains in big
            // transactions, while batch_max_wait keeps a live stream fresh.
            batch_max_events: 100_000,
            batch_max_bytes: 64 * 1024 * 1024,
            batch_max_wait: Duration::from_millis(200),
            parallel_commits: 2,
            lateness_horizon: Duration::from_secs(35 * 86_400),
            dedup_retention: Duration::from_secs(35 * 86_400),
        }
    }
}

impl AggregatorConfig {
    /// The name this process joins the group under: `instance_id`, or one derived from the
    /// host name, when `static_membership` is on; `None` (a dynamic member) when it is off.
    pub fn instance_id(&self) -> Option<String> {
        self.static_membership.then(|| {
            self.instance_id
                .clone()
                .unwrap_or_else(|| format!("tally-aggregator-{}", hostname()))
        })
    }

    /// Checks the settings; the error says what to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.group_id.is_empty() {
            return Err(
                "aggregator.group_id must not be empty (contract: \"tally-aggregator\")".into(),
            );
        }
        if self.instance_id.as_deref().is_some_and(str::is_empty) {
            return Err(
                "aggregator.instance_id must not be empty; leave it out to use the host name"
                    .into(),
            );
        }
        if self.instance_id.is_some() && !self.static_membership {
            return Err("aggregator.instance_id names this process for Kafka static membership, which is off: set aggregator.static_membership = true (with a broker that implements it, such as Apache Kafka 2.4 or later) or remove instance_id".into());
        }
        if self.stall_timeout < Duration::from_secs(5)
            || self.stall_timeout > Duration::from_secs(3600)
        {
            return Err("aggregator.stall_timeout must be between 5s and 1h, e.g. \"60s\"".into());
        }
        if self.session_timeout < Duration::from_secs(1) {
            return Err("aggregator.session_timeout must be at least 1s (brokers usually require 6s or more)".into());
        }
        if self.batch_max_events == 0 || self.batch_max_bytes == 0 {
            return Err(
                "aggregator.batch_max_events and batch_max_bytes must be at least 1".into(),
            );
        }
        if self.parallel_commits == 0 || self.parallel_commits > 16 {
            return Err("aggregator.parallel_commits must be 1 to 16".into());
        }
        if self.batch_max_wait.is_zero() {
            return Err("aggregator.batch_max_wait must be more than 0, e.g. \"200ms\"".into());
        }
        if self.lateness_horizon < Duration::from_secs(3600) {
            return Err("aggregator.lateness_horizon must be at least 1h".into());
        }
        if self.dedup_retention < self.lateness_horizon {
            return Err(format!(
                "aggregator.dedup_retention ({}) is shorter than aggregator.lateness_horizon ({}): a late re-send could be counted twice; make dedup_retention at least the horizon",
                tally_core::duration::format(self.dedup_retention),
                tally_core::duration::format(self.lateness_horizon)
            ));
        }
        Ok(())
    }
}

/// The machine's name, for default identities.
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_retention_covers_the_horizon() {
        AggregatorConfig::default().validate().unwrap();
        let config = AggregatorConfig {
            dedup_retention: Duration::from_secs(86_400),
            ..AggregatorConfig::default()
        };
        assert!(config.validate().unwrap_err().contains("counted twice"));
    }
}
