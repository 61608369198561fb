//! `[archive]` settings.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where the archive is kept, and how `tally archive` writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveConfig {
    /// The store the files go to: `file:///absolute/dir`, `s3://bucket/prefix`,
    /// `gs://bucket/prefix` or `az://container/prefix` ([`crate::ArchiveStore::open`]).
    pub url: String,
    /// The archiver's own Kafka consumer group: it reads the topic beside the aggregators,
    /// never taking their partitions.
    pub group_id: String,
    /// A flush starts once the files being written hold about this many bytes (the size of a
    /// file, when events arrive in order: 64–256 MiB suits DuckDB, Spark and Athena)...
    pub file_bytes: usize,
    /// ...or once its first record has waited this long, so recent hours become readable...
    #[serde(with = "tally_core::duration")]
    pub flush_every: Duration,
    /// ...or once this many hours are being written at once (late events from many hours
    /// each open a file; this bounds memory and the number of small files). Events the
    /// aggregator can count span at most the lateness horizon: 864 hours by default.
    pub max_open_files: usize,
    /// Files whose events are older than this are deleted (by `tally archive` as it runs).
    /// Unset: every file is kept.
    #[serde(
        with = "tally_core::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub retention: Option<Duration>,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig {
            url: "file:///var/lib/tally/archive".into(),
            group_id: "tally-archiver".into(),
            file_bytes: 128 * 1024 * 1024,
            flush_every: Duration::from_secs(120),
            max_open_files: 256,
            retention: None,
        }
    }
}

impl ArchiveConfig {
    /// Checks the settings; the error says what to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.group_id.is_empty() {
            return Err("archive.group_id must not be empty (default: \"tally-archiver\")".into());
        }
        if !(1024 * 1024..=1024 * 1024 * 1024).contains(&self.file_bytes) {
            return Err(
                "archive.file_bytes must be between 1 MiB and 1 GiB, e.g. 134217728 (128 MiB)"
                    .into(),
            );
        }
        if self.flush_every < Duration::from_secs(1) || self.flush_every > Duration::from_secs(3600)
        {
            return Err("archive.flush_every must be between 1s and 1h, e.g. \"2m\"".into());
        }
        if !(1..=1000).contains(&self.max_open_files) {
            return Err("archive.max_open_files must be 1 to 1000".into());
        }
        if self.retention.is_some_and(|keep| {
            keep < Duration::from_secs(86_400) || keep > Duration::from_secs(100 * 366 * 86_400)
        }) {
            return Err("archive.retention must be between 1 day (\"1d\") and 100 years, or unset to keep every file".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_keep_everything() {
        let config = ArchiveConfig::default();
        config.validate().unwrap();
        assert_eq!(config.retention, None);
        let short = ArchiveConfig {
            retention: Some(Duration::from_secs(60)),
            ..ArchiveConfig::default()
        };
        assert!(short.validate().unwrap_err().contains("between 1 day"));
    }
}
