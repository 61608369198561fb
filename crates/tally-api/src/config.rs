//! `[serve]` in `tally.toml`.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tally_core::config::Secret;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// Address `tally serve` listens on.
    pub listen: String,
    /// How long the quota check keeps a customer's entitlements and usage before reloading.
    #[serde(with = "humantime_serde")]
    pub refresh: Duration,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// API tokens (`[[serve.tokens]]`). A token without `customer` is an admin token.
    pub tokens: Vec<ApiToken>,
    /// Signing secret (`whsec_…`) of the Stripe webhook endpoint `/v1/webhooks/stripe`. Also
    /// read from `STRIPE_WEBHOOK_SECRET`. Empty: the endpoint answers 503.
    pub stripe_webhook_secret: Secret,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: "127.0.0.1:8080".into(),
            refresh: Duration::from_millis(250),
            max_body_bytes: 1 << 20,
            tokens: Vec::new(),
            stripe_webhook_secret: Secret::default(),
        }
    }
}

/// One bearer token and what it may read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiToken {
    /// A name for logs and audit (never the token).
    pub name: String,
    pub token: Secret,
    /// Only this customer's data; absent for an admin token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
}

impl ServeConfig {
    pub fn validate(&self) -> Result<(), String> {
        for token in &self.tokens {
            if token.token.expose().len() < 24 {
                return Err(format!(
                    "serve.tokens {:?}: a token must be at least 24 characters (e.g. `openssl rand -hex 24`)",
                    token.name
                ));
            }
        }
        if self.max_body_bytes == 0 {
            return Err("serve.max_body_bytes must be more than 0".into());
        }
        Ok(())
    }
}
