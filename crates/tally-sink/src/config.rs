//! `[sink]` and `[stripe]` in `tally.toml`.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tally_core::config::Secret;

/// How the sink paces itself and its outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    /// Time between billing passes when running as a daemon.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// A 5-minute slot is billed once it ended this long ago, so the aggregator has committed
    /// the events that arrive on time. Later events are billed as a new revision of the slot.
    #[serde(with = "humantime_serde")]
    pub settle_delay: Duration,
    /// Slots accounted for in one Postgres transaction.
    pub slots_per_transaction: usize,
    /// Customer+meter pairs being sent to Stripe at once (each pair one call at a time).
    pub concurrency: usize,
    /// How long a sink process holds an outbox row it is sending. If it dies, another
    /// process (or the next run) sends the row after this, with the same identifier.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// Attempts at one submission within a pass before it waits for a later pass.
    pub attempts_per_pass: u32,
    /// First retry delay; doubled per attempt, with jitter, up to `backoff_max`.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            interval: Duration::from_secs(300),
            settle_delay: Duration::from_secs(60),
            slots_per_transaction: 5000,
            concurrency: 32,
            lease: Duration::from_secs(120),
            attempts_per_pass: 6,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(60),
        }
    }
}

impl SinkConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.interval.is_zero() {
            return Err("sink.interval must be more than 0".into());
        }
        if self.slots_per_transaction == 0 || self.concurrency == 0 || self.attempts_per_pass == 0 {
            return Err(
                "sink.slots_per_transaction, sink.concurrency and sink.attempts_per_pass must be at least 1"
                    .into(),
            );
        }
        if self.lease < Duration::from_secs(1) {
            return Err("sink.lease must be at least 1s: it bounds how long one Stripe call (with its retries) may take".into());
        }
        if self.backoff_initial.is_zero() || self.backoff_max < self.backoff_initial {
            return Err(
                "sink.backoff_initial must be more than 0 and at most sink.backoff_max".into(),
            );
        }
        Ok(())
    }
}

/// Where Stripe is and how hard the sink may call it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StripeConfig {
    /// API base URL (with the trailing slash). Point it at `tally stripe-emulator` to test.
    pub api_base: String,
    /// Secret key (`sk_live_…` or `sk_test_…`). Also read from `STRIPE_SECRET_KEY`.
    pub secret_key: Secret,
    /// Calls per second this sink process makes. 0 picks a rate under the account's limit:
    /// 20/s for `sk_test_` keys (Stripe allows 25) and 950/s for `sk_live_` keys (1,000).
    /// Several sink processes share the account's limit: divide it between them.
    pub max_requests_per_second: u32,
    /// Time limit of one call.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for StripeConfig {
    fn default() -> Self {
        StripeConfig {
            api_base: "https://api.stripe.com/".into(),
            secret_key: Secret::default(),
            max_requests_per_second: 0,
            request_timeout: Duration::from_secs(30),
        }
    }
}

impl StripeConfig {
    /// The rate to use: the configured one, else the default for the key's mode.
    pub fn requests_per_second(&self) -> u32 {
        match self.max_requests_per_second {
            0 if self.secret_key.expose().starts_with("sk_live_") => 950,
            0 => 20,
            rate => rate,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let key = self.secret_key.expose();
        if key.is_empty() {
            return Err(
                "no Stripe secret key: set STRIPE_SECRET_KEY (or stripe.secret_key in tally.toml)"
                    .into(),
            );
        }
        if !(key.starts_with("sk_live_") || key.starts_with("sk_test_") || key.starts_with("rk_")) {
            return Err("the Stripe secret key must start with sk_live_, sk_test_ or rk_; copy it from the Stripe dashboard's API keys page".into());
        }
        if !(self.api_base.starts_with("https://") || self.api_base.starts_with("http://"))
            || !self.api_base.ends_with('/')
        {
            return Err(format!(
                "stripe.api_base {:?} must be an http(s) URL ending in '/', e.g. https://api.stripe.com/",
                self.api_base
            ));
        }
        Ok(())
    }
}
