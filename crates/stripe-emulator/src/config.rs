//! What the emulator enforces and which faults it injects.

use serde::{Deserialize, Serialize};

/// Faults injected into the calls that carry usage (meter events, adjustments, customers, the v2
/// session) and into Checkout Session creation, each a probability between 0 and 1. Settable at
/// start and at run time (`Emulator::set_faults`, `POST /_emulator/faults`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Answer 500 `api_error` without doing anything (stored under an idempotency key, as Stripe does).
    pub error_500: f64,
    /// Answer 503 without doing anything (not stored under an idempotency key).
    pub error_503: f64,
    /// Hold the call for `delay_ms` before handling it (while holding the customer+meter lock).
    pub delay: f64,
    pub delay_ms: u64,
    /// Commit the call, then close the connection without a response: the client cannot know
    /// whether Stripe has the event.
    pub drop_after_commit: f64,
}

impl Faults {
    pub fn validate(&self) -> Result<(), String> {
        for (name, p) in [
            ("error_500", self.error_500),
            ("error_503", self.error_503),
            ("delay", self.delay),
            ("drop_after_commit", self.drop_after_commit),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!(
                    "fault {name} = {p}: a probability must be between 0 and 1"
                ));
            }
        }
        Ok(())
    }
}

/// The emulator's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct EmulatorConfig {
    /// Calls per second allowed for an `sk_test_` key (Stripe: 25).
    pub test_rate_per_second: u32,
    /// Calls per second allowed for an `sk_live_` key (Stripe: 1,000).
    pub live_rate_per_second: u32,
    /// Meter events per second the v2 stream takes per account (Stripe: 10,000).
    pub stream_events_per_second: u32,
    pub faults: Faults,
    /// Seed for fault decisions, so a failing test can be replayed.
    pub seed: u64,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            test_rate_per_second: 25,
            live_rate_per_second: 1000,
            stream_events_per_second: 10_000,
            faults: Faults::default(),
            seed: 0x5742_1be0,
        }
    }
}
