//! `[serve]` in `tally.toml`: where `tally serve` listens, who may call it (hashed tokens with
//! scopes), and the edge limits that keep it standing when it faces the internet.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tally_core::config::Secret;

/// Hex SHA-256 of a token, as `[[serve.tokens]] sha256` holds it.
pub fn token_hash(plain: &str) -> String {
    hex::encode(Sha256::digest(plain.as_bytes()))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// Address `tally serve` listens on (the public API).
    pub listen: String,
    /// Address of the admin listener: `/metrics`, the detailed `/readyz` and `/healthz`,
    /// without a token. Keep it off the internet (e.g. 127.0.0.1:9188 or a private network).
    /// Empty: no admin listener, and the public `/metrics` and `/readyz` need an admin token.
    pub admin_listen: String,
    /// How often the quota check reloads a customer's entitlements, usage and credits in the
    /// background while it is being checked.
    #[serde(with = "tally_core::duration")]
    pub refresh: Duration,
    /// The oldest state a check may decide on: a customer whose cached state is older (after
    /// a quiet spell, or with the reloads behind) is loaded again before the answer, one load
    /// for every check waiting. At least `refresh`.
    #[serde(with = "tally_core::duration")]
    pub max_staleness: Duration,
    /// Follow Postgres's change feed (LISTEN `tally_changes`, migration 0019): a customer is
    /// reloaded when its usage, credits, subscription or override changed, within milliseconds
    /// of the commit, and not on a timer. Needs a connection that can LISTEN (not a pooler in
    /// transaction mode); while the feed is silent for 3 s the cache falls back to `refresh`
    /// and `max_staleness`.
    pub change_feed: bool,
    /// While the change feed is trusted, the oldest state a check decides on: the bound
    /// should a writer ever change a customer without notifying.
    #[serde(with = "tally_core::duration")]
    pub feed_max_age: Duration,
    /// Most customers the quota cache holds; beyond, the least recently checked are evicted.
    pub max_cached_customers: usize,
    /// API tokens (`[[serve.tokens]]`), stored as SHA-256 hashes: `tally tokens create`.
    pub tokens: Vec<ApiToken>,
    /// Signing secret (`whsec_…`) of the Stripe webhook endpoint `/v1/webhooks/stripe`. Also
    /// read from `STRIPE_WEBHOOK_SECRET`. Empty: the endpoint answers 503.
    pub stripe_webhook_secret: Secret,
    /// How long Stripe webhook events (and meter error reports) are kept; older ones are
    /// deleted hourly. At least 31 days: Stripe redelivers and resends events for 30 days,
    /// and a kept id is what recognises a redelivery.
    #[serde(with = "tally_core::duration")]
    pub webhook_retention: Duration,
    /// Origins (`https://app.example.com`) Checkout's `success_url` and `cancel_url` and the
    /// billing portal's `return_url` may point at. Empty: any https origin (http only to
    /// localhost).
    pub checkout_return_origins: Vec<String>,
    /// Connection and request limits.
    pub limits: EdgeLimits,
    /// Requests per second per token, by scope.
    pub rate_limits: RateLimits,
    /// The customer portal, the pricing page and the operator console.
    pub web: WebConfig,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: "127.0.0.1:8080".into(),
            admin_listen: String::new(),
            refresh: Duration::from_millis(250),
            max_staleness: Duration::from_secs(1),
            change_feed: true,
            feed_max_age: tally_quota::QuotaOptions::DEFAULT_FEED_MAX_AGE,
            max_cached_customers: 1_000_000,
            tokens: Vec::new(),
            stripe_webhook_secret: Secret::default(),
            webhook_retention: Duration::from_secs(90 * 86_400),
            checkout_return_origins: Vec::new(),
            limits: EdgeLimits::default(),
            rate_limits: RateLimits::default(),
            web: WebConfig::default(),
        }
    }
}

/// `[serve.web]`: tally's pages (`/portal`, `/pricing`, `/console`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebConfig {
    /// The address people reach `tally serve` at (`https://billing.example.com`), for the
    /// portal links `POST /v1/customers/{id}/portal-sessions` answers. Empty: `http://` and
    /// `serve.listen`. With https, the session cookies are `Secure`.
    pub public_url: String,
    /// Origins that may show the portal and the pricing page in an iframe
    /// (`frame-ancestors`). Empty: no page of tally's may be framed.
    pub frame_origins: Vec<String>,
    /// A portal session's life when the request does not say.
    #[serde(with = "tally_core::duration")]
    pub portal_session_ttl: Duration,
    /// The longest portal session a request may ask for.
    #[serde(with = "tally_core::duration")]
    pub portal_session_max_ttl: Duration,
    /// A console session's life from its login.
    #[serde(with = "tally_core::duration")]
    pub console_session_ttl: Duration,
    /// Whether `/console` is served (off by default: turn it on where operators reach it). An
    /// admin token is needed to log in.
    pub console: bool,
    /// The plans `/pricing` and the portal's plans page list, in this order. Empty: the
    /// self-serve plans and `[subscriptions] fallback_plan`, by name.
    pub pricing_plans: Vec<String>,
    /// The pages' colours and font, as CSS values (`"#4f46e5"`, `"system-ui"`).
    pub theme: Theme,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            public_url: String::new(),
            frame_origins: Vec::new(),
            portal_session_ttl: Duration::from_secs(3600),
            portal_session_max_ttl: Duration::from_secs(4 * 3600),
            console_session_ttl: Duration::from_secs(8 * 3600),
            console: false,
            pricing_plans: Vec::new(),
            theme: Theme::default(),
        }
    }
}

/// `[serve.web.theme]`: CSS custom properties of every page (`--tally-accent`, …). Empty keeps
/// tally's own.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Theme {
    pub accent: String,
    pub background: String,
    pub text: String,
    pub font: String,
}

impl Theme {
    /// The set properties, by their CSS names.
    pub fn properties(&self) -> Vec<(&'static str, &str)> {
        [
            ("--tally-accent", self.accent.as_str()),
            ("--tally-background", self.background.as_str()),
            ("--tally-text", self.text.as_str()),
            ("--tally-font", self.font.as_str()),
        ]
        .into_iter()
        .filter(|(_, value)| !value.is_empty())
        .collect()
    }
}

/// Whether `origin` is a bare origin: scheme, host and port in lowercase, nothing else.
fn is_origin(origin: &str) -> bool {
    let uri: Option<axum::http::Uri> = origin.parse().ok();
    let plain = uri.as_ref().is_some_and(|u| {
        matches!(u.scheme_str(), Some("https" | "http"))
            && u.authority().is_some()
            && u.path_and_query()
                .is_none_or(|p| p.as_str() == "/" || p.as_str().is_empty())
            && !origin.ends_with('/')
    });
    plain && origin.to_ascii_lowercase() == *origin
}

/// `[serve.limits]`: what one client, or all of them together, may hold of the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeLimits {
    /// A request's head (request line and headers) must arrive within this. The same clock
    /// starts when a keep-alive connection falls idle, so it is also the idle timeout: a
    /// connection that sends nothing for this long is closed.
    #[serde(with = "tally_core::duration")]
    pub header_read_timeout: Duration,
    /// A request (its body read and its answer) must be done within this; else 408.
    #[serde(with = "tally_core::duration")]
    pub request_timeout: Duration,
    /// Open connections; one more is answered 503 and closed.
    pub max_connections: usize,
    /// Requests being handled at once; one more is answered 503 with `Retry-After`.
    pub max_in_flight: usize,
    /// On SIGTERM, requests in flight get this long to finish; then connections are cut.
    #[serde(with = "tally_core::duration")]
    pub shutdown_timeout: Duration,
    /// Largest body of `POST /v1/events`.
    pub max_ingest_body_bytes: usize,
    /// Largest body of `POST /v1/webhooks/stripe` (Stripe's events are a few kB to ~100 kB).
    pub max_webhook_body_bytes: usize,
    /// Largest body of every other route (quota checks).
    pub max_body_bytes: usize,
}

impl Default for EdgeLimits {
    fn default() -> Self {
        EdgeLimits {
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_connections: 4096,
            max_in_flight: 1024,
            shutdown_timeout: Duration::from_secs(20),
            max_ingest_body_bytes: 1 << 20,
            max_webhook_body_bytes: 512 << 10,
            max_body_bytes: 16 << 10,
        }
    }
}

/// `[serve.rate_limits]`: a token bucket per token, sized by the token's scope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimits {
    pub admin: Rate,
    pub ingest: Rate,
    pub check: Rate,
    pub customer: Rate,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            admin: Rate::new(1_000, 2_000),
            // A request carries up to 1,000 events.
            ingest: Rate::new(500, 1_000),
            // A gateway checks for every request it serves.
            check: Rate::new(50_000, 100_000),
            // A customer portal, read by people.
            customer: Rate::new(20, 60),
        }
    }
}

impl RateLimits {
    pub fn of(&self, scope: Scope) -> Rate {
        match scope {
            Scope::Admin => self.admin,
            Scope::Ingest => self.ingest,
            Scope::Check => self.check,
            Scope::Customer => self.customer,
        }
    }
}

/// A sustained rate and the burst allowed above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

impl Rate {
    pub const fn new(per_second: u32, burst: u32) -> Rate {
        Rate { per_second, burst }
    }
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Everything.
    Admin,
    /// `POST /v1/events` only.
    Ingest,
    /// Quota checks and entitlements for any customer (for gateways).
    Check,
    /// One customer's own entitlements, usage and invoice preview, and checks that count
    /// nothing (they do not change anybody's quota state).
    Customer,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Admin, Scope::Ingest, Scope::Check, Scope::Customer];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Ingest => "ingest",
            Scope::Check => "check",
            Scope::Customer => "customer",
        }
    }
}

/// One bearer token, as its SHA-256 hash, and what it may do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiToken {
    /// A name for logs and metrics (never the token).
    pub name: String,
    pub scope: Scope,
    /// The customer a `customer` token reads; absent for the other scopes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
    /// Hex SHA-256 of the token: `printf %s "$TOKEN" | sha256sum`.
    pub sha256: Secret,
    /// Tokens are no longer kept in plain text; present only to say so (see `validate`).
    #[serde(default, skip_serializing)]
    pub token: Option<Secret>,
}

impl ApiToken {
    /// A token entry for `plain` (tests, the demo, `tally tokens create`).
    pub fn new(name: &str, scope: Scope, customer: Option<&str>, plain: &str) -> ApiToken {
        ApiToken {
            name: name.to_owned(),
            scope,
            customer: customer.map(str::to_owned),
            sha256: Secret::new(token_hash(plain)),
            token: None,
        }
    }
}

impl WebConfig {
    fn validate(&self) -> Result<(), String> {
        if !self.public_url.is_empty() && !is_origin(self.public_url.trim_end_matches('/')) {
            return Err(format!(
                "serve.web.public_url {:?}: write the origin people reach tally at, e.g. \"https://billing.example.com\" (no path)",
                self.public_url
            ));
        }
        for origin in &self.frame_origins {
            if !is_origin(origin) {
                return Err(format!(
                    "serve.web.frame_origins: {origin:?} is not an origin; write scheme and host (and port) in lowercase, no path, e.g. \"https://app.example.com\""
                ));
            }
        }
        if self.portal_session_ttl.is_zero()
            || self.portal_session_ttl > self.portal_session_max_ttl
        {
            return Err("serve.web.portal_session_ttl must be more than 0 and at most portal_session_max_ttl".into());
        }
        if self.portal_session_max_ttl > Duration::from_secs(24 * 3600) {
            return Err("serve.web.portal_session_max_ttl is more than a day: a portal link is a bearer secret; keep sessions short (the default is 4h)".into());
        }
        if self.console_session_ttl.is_zero()
            || self.console_session_ttl > Duration::from_secs(24 * 3600)
        {
            return Err(
                "serve.web.console_session_ttl must be more than 0 and at most a day".into(),
            );
        }
        for (name, value) in self.theme.properties() {
            // A value goes into a stylesheet: letters, digits, spaces and `#(),.%-` only, so
            // it can close no rule and load nothing.
            let plain = value.len() <= 100
                && value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || " #(),.%-".contains(c));
            if !plain {
                return Err(format!(
                    "serve.web.theme: {name} {value:?} is not a plain CSS value; use a colour (\"#4f46e5\", \"rgb(79, 70, 229)\") or font names (\"system-ui, sans-serif\")"
                ));
            }
        }
        Ok(())
    }
}

impl ServeConfig {
    pub fn validate(&self) -> Result<(), String> {
        for origin in &self.checkout_return_origins {
            if !is_origin(origin) {
                return Err(format!(
                    "serve.checkout_return_origins: {origin:?} is not an origin; write scheme and host (and port) in lowercase, no path, e.g. \"https://app.example.com\""
                ));
            }
        }
        self.web.validate()?;
        if self.webhook_retention < Duration::from_secs(31 * 86_400) {
            return Err(format!(
                "serve.webhook_retention ({}) is shorter than 31 days: Stripe redelivers events for 30 days, and a redelivered event whose id was deleted would be applied again; use at least \"31days\"",
                tally_core::duration::format(self.webhook_retention)
            ));
        }
        if self.max_staleness < self.refresh {
            return Err(format!(
                "serve.max_staleness ({}) is shorter than serve.refresh ({}): checks would wait for a load every time; make it at least refresh (e.g. 4 × refresh)",
                tally_core::duration::format(self.max_staleness),
                tally_core::duration::format(self.refresh)
            ));
        }
        if self.feed_max_age < self.max_staleness || self.feed_max_age > Duration::from_secs(3600) {
            return Err(format!(
                "serve.feed_max_age ({}) must be between serve.max_staleness ({}) and 1 hour: it bounds how old the state a check decides on may be while the change feed is trusted (default \"2min\")",
                tally_core::duration::format(self.feed_max_age),
                tally_core::duration::format(self.max_staleness)
            ));
        }
        for token in &self.tokens {
            let name = &token.name;
            if token.token.is_some() {
                return Err(format!(
                    "serve.tokens {name:?}: plain `token` is no longer accepted; store its hash instead: `sha256 = \"…\"` from `printf %s \"$TOKEN\" | sha256sum`, or make a new one with `tally tokens create`"
                ));
            }
            let hash = token.sha256.expose();
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "serve.tokens {name:?}: sha256 must be 64 hex digits (`printf %s \"$TOKEN\" | sha256sum`)"
                ));
            }
            match (token.scope, &token.customer) {
                (Scope::Customer, None) => {
                    return Err(format!(
                        "serve.tokens {name:?}: a customer token needs `customer = \"…\"`"
                    ))
                }
                (Scope::Customer, Some(_)) | (_, None) => {}
                (scope, Some(_)) => {
                    return Err(format!(
                    "serve.tokens {name:?}: `customer` is only for scope = \"customer\", not {:?}",
                    scope.as_str()
                ))
                }
            }
        }
        let limits = &self.limits;
        for (name, value) in [
            ("max_connections", limits.max_connections),
            ("max_in_flight", limits.max_in_flight),
            ("max_ingest_body_bytes", limits.max_ingest_body_bytes),
            ("max_webhook_body_bytes", limits.max_webhook_body_bytes),
            ("max_body_bytes", limits.max_body_bytes),
        ] {
            if value == 0 {
                return Err(format!("serve.limits.{name} must be more than 0"));
            }
        }
        for (name, value) in [
            ("header_read_timeout", limits.header_read_timeout),
            ("request_timeout", limits.request_timeout),
        ] {
            if value.is_zero() {
                return Err(format!("serve.limits.{name} must be more than 0 s"));
            }
        }
        for scope in Scope::ALL {
            let rate = self.rate_limits.of(scope);
            if rate.per_second == 0 || rate.burst == 0 {
                return Err(format!(
                    "serve.rate_limits.{}: per_second and burst must be more than 0",
                    scope.as_str()
                ));
            }
        }
        if self.max_cached_customers == 0 {
            return Err("serve.max_cached_customers must be more than 0".into());
        }
        Ok(())
    }
}
