//! `[sink]` and `[stripe]` in `tally.toml`.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tally_core::config::Secret;

/// How the sink paces itself and its outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    /// Time between billing passes when running as a daemon.
    #[serde(with = "tally_core::duration")]
    pub interval: Duration,
    /// A 5-minute slot is billed once it ended this long ago, so the aggregator has committed
    /// the events that arrive on time. Later events are billed as a new revision of the slot.
    #[serde(with = "tally_core::duration")]
    pub settle_delay: Duration,
    /// Slots accounted for in one Postgres transaction.
    pub slots_per_transaction: usize,
    /// Requests to Stripe in flight at once: v2 stream requests of up to 100 pairs' events, or
    /// v1 calls of one event. A pair's rows go one request at a time, in order.
    pub concurrency: usize,
    /// How long a sink process holds an outbox row it is sending. If it dies, another
    /// process (or the next run) sends the row after this, with the same identifier.
    #[serde(with = "tally_core::duration")]
    pub lease: Duration,
    /// Attempts at one submission within a pass before it waits for a later pass.
    pub attempts_per_pass: u32,
    /// First retry delay; doubled per attempt, with jitter, up to `backoff_max`.
    #[serde(with = "tally_core::duration")]
    pub backoff_initial: Duration,
    #[serde(with = "tally_core::duration")]
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
    /// 20/s for test keys (Stripe allows 25) and 950/s for live keys, `sk_live_` or `rk_live_`
    /// (1,000).
    /// Several sink processes share the account's limit: divide it between them.
    pub max_requests_per_second: u32,
    /// Time limit of one call.
    #[serde(with = "tally_core::duration")]
    pub request_timeout: Duration,
    /// How the sink sends meter events: `"v2"`, Stripe's meter event stream (100 events a
    /// request, up to 10,000 events/s), or `"v1"`, one event a call under
    /// `max_requests_per_second`. Unset: v2 where the account has it (a meter event session can
    /// be created), else v1.
    pub meter_events: Option<MeterEventsApi>,
    /// Where the v2 stream is served. Empty: `https://meter-events.stripe.com/` when `api_base`
    /// is Stripe's, else `api_base` (the emulator serves both).
    pub meter_events_base: String,
    /// Meter events per second this sink process sends through the v2 stream. 0 picks 9,500,
    /// under Stripe's 10,000. Several sink processes share the account's limit.
    pub max_meter_events_per_second: u32,
}

/// The meter event API the sink bills through (`stripe.meter_events`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MeterEventsApi {
    V1,
    V2,
}

/// Stripe's API, where the default stream base applies.
const STRIPE_API_BASE: &str = "https://api.stripe.com/";
const STRIPE_METER_EVENTS_BASE: &str = "https://meter-events.stripe.com/";

impl Default for StripeConfig {
    fn default() -> Self {
        StripeConfig {
            api_base: STRIPE_API_BASE.into(),
            secret_key: Secret::default(),
            max_requests_per_second: 0,
            request_timeout: Duration::from_secs(30),
            meter_events: None,
            meter_events_base: String::new(),
            max_meter_events_per_second: 0,
        }
    }
}

impl StripeConfig {
    /// Whether the key is a live-mode key (`sk_live_`, or a restricted `rk_live_`): live rate
    /// limits, live webhooks only, no loopback return URLs.
    pub fn is_live(&self) -> bool {
        let key = self.secret_key.expose();
        key.starts_with("sk_live_") || key.starts_with("rk_live_")
    }

    /// The rate to use: the configured one, else the default for the key's mode.
    pub fn requests_per_second(&self) -> u32 {
        match self.max_requests_per_second {
            0 if self.is_live() => 950,
            0 => 20,
            rate => rate,
        }
    }

    /// The v2 stream's events per second: the configured rate, else 9,500.
    pub fn meter_events_per_second(&self) -> u32 {
        match self.max_meter_events_per_second {
            0 => 9_500,
            rate => rate,
        }
    }

    /// Where the v2 stream is (see `meter_events_base`).
    pub fn meter_events_base(&self) -> &str {
        if !self.meter_events_base.is_empty() {
            &self.meter_events_base
        } else if self.api_base == STRIPE_API_BASE {
            STRIPE_METER_EVENTS_BASE
        } else {
            &self.api_base
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
        check_base("stripe.api_base", &self.api_base, STRIPE_API_BASE)?;
        if !self.meter_events_base.is_empty() {
            check_base(
                "stripe.meter_events_base",
                &self.meter_events_base,
                STRIPE_METER_EVENTS_BASE,
            )?;
        }
        Ok(())
    }
}

/// A base URL the secret key (or a session token) is sent to: http(s), ending in '/', and
/// plain http only to this machine.
fn check_base(setting: &str, base: &str, stripes: &str) -> Result<(), String> {
    if !(base.starts_with("https://") || base.starts_with("http://")) || !base.ends_with('/') {
        return Err(format!(
            "{setting} {base:?} must be an http(s) URL ending in '/', e.g. {stripes}"
        ));
    }
    if let Some(rest) = base.strip_prefix("http://") {
        if !is_loopback_host(rest) {
            return Err(format!(
                "{setting} {base:?} is plain http to a host other than this machine: the secret key and billing data would cross the network unencrypted; use https:// (Stripe is {stripes}), or keep http for a local emulator on 127.0.0.1, [::1] or localhost"
            ));
        }
    }
    Ok(())
}

/// True when the authority at the start of `rest` (what follows `scheme://`) names this
/// machine: `localhost`, an address in 127.0.0.0/8, or `[::1]`.
fn is_loopback_host(rest: &str) -> bool {
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let host = match host_port.strip_prefix('[') {
        Some(bracketed) => match bracketed.split_once(']') {
            Some((host, _port)) => host,
            None => return false,
        },
        None => host_port.split(':').next().unwrap_or(""),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_base(api_base: &str) -> StripeConfig {
        StripeConfig {
            api_base: api_base.into(),
            secret_key: Secret::new("sk_test_config"),
            ..StripeConfig::default()
        }
    }

    #[test]
    fn restricted_live_keys_are_live() {
        for (key, live, rate) in [
            ("sk_live_x", true, 950),
            ("rk_live_x", true, 950),
            ("sk_test_x", false, 20),
            ("rk_test_x", false, 20),
        ] {
            let config = StripeConfig {
                secret_key: Secret::new(key),
                ..StripeConfig::default()
            };
            assert_eq!(
                (config.is_live(), config.requests_per_second()),
                (live, rate),
                "{key}"
            );
        }
    }

    #[test]
    fn the_stream_is_at_stripes_meter_events_host_or_beside_the_emulator() {
        let stripe = StripeConfig::default();
        assert_eq!(
            stripe.meter_events_base(),
            "https://meter-events.stripe.com/"
        );
        assert_eq!(
            with_base("http://127.0.0.1:12111/").meter_events_base(),
            "http://127.0.0.1:12111/"
        );
        let mut config = with_base("https://api.stripe.com/");
        config.meter_events_base = "http://10.0.0.5/".into();
        let error = config.validate().unwrap_err();
        assert!(error.contains("stripe.meter_events_base"), "{error}");
        config.meter_events_base = "https://meter-events.example/".into();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.meter_events_base(), "https://meter-events.example/");
        assert_eq!(StripeConfig::default().meter_events_per_second(), 9_500);
    }

    #[test]
    fn plain_http_only_reaches_this_machine() {
        for ok in [
            "https://api.stripe.com/",
            "https://stripe.internal:8443/",
            "http://127.0.0.1:12111/",
            "http://127.1.2.3/",
            "http://localhost:12111/",
            "http://LOCALHOST/",
            "http://[::1]:12111/",
        ] {
            assert_eq!(with_base(ok).validate(), Ok(()), "{ok}");
        }
        for refused in [
            "http://api.stripe.com/",
            "http://10.0.0.5:12111/",
            "http://0.0.0.0:12111/",
            "http://localhost.evil.example/",
            "http://127.0.0.1.evil.example/",
            "http://127.0.0.1@evil.example/",
            "http://[::2]/",
            "http://[::1/",
        ] {
            let error = with_base(refused).validate().unwrap_err();
            assert!(
                error.contains("stripe.api_base") && error.contains("https://"),
                "{refused}: {error}"
            );
        }
    }
}
