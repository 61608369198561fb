//! `[alerts]` in tally.toml.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[alerts]`: how often alert rules are evaluated and how deliveries are tried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// How often `tally aggregate` evaluates the rules of customers whose usage or credits
    /// changed, and sends the deliveries that are due.
    #[serde(with = "tally_core::duration")]
    pub evaluate_every: Duration,
    /// Time limit of one delivery (connect, send, answer).
    #[serde(with = "tally_core::duration")]
    pub delivery_timeout: Duration,
    /// A delivery not accepted (2xx) within this long of its first attempt is given up
    /// (`failed`).
    #[serde(with = "tally_core::duration")]
    pub retry_for: Duration,
    /// Allow `http://` endpoints (off: deliveries and their signatures would travel in clear).
    pub allow_http: bool,
    /// Allow endpoints on addresses that are not public: loopback, private ranges, link-local
    /// (the cloud's metadata service), internal names. Off: an API caller could otherwise make
    /// tally post (and report the answers of) services only tally can reach. Turn it on for
    /// receivers inside your own network.
    pub allow_private_networks: bool,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            evaluate_every: Duration::from_millis(500),
            delivery_timeout: Duration::from_secs(10),
            retry_for: Duration::from_secs(24 * 3600),
            allow_http: false,
            allow_private_networks: false,
        }
    }
}

impl AlertsConfig {
    /// Where deliveries may go.
    pub fn destinations(&self) -> crate::Destinations {
        crate::Destinations {
            allow_http: self.allow_http,
            allow_private_networks: self.allow_private_networks,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.evaluate_every < Duration::from_millis(10)
            || self.evaluate_every > Duration::from_secs(60)
        {
            return Err("alerts.evaluate_every must be between 10ms and 60s".into());
        }
        if self.delivery_timeout < Duration::from_millis(100)
            || self.delivery_timeout > Duration::from_secs(60)
        {
            return Err("alerts.delivery_timeout must be between 100ms and 60s".into());
        }
        if self.retry_for < Duration::from_secs(1)
            || self.retry_for > Duration::from_secs(7 * 24 * 3600)
        {
            return Err("alerts.retry_for must be between 1s and 7 days".into());
        }
        Ok(())
    }
}
