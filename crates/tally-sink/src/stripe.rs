//! Calls to Stripe: async-stripe's typed requests, sent by our own `StripeClient`.
//!
//! async-stripe's bundled client folds the response into `StripeError` and drops the
//! `Stripe-Should-Retry` header, which Stripe says overrides the status-code guess; it also
//! opens a new connection per request. This client keeps connections alive, sends one attempt
//! per call (the sink's loop retries with the same identifier), and reports status, header and
//! Stripe's error body so the loop can tell retry from give up.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use stripe_client_core::{
    CustomizedStripeRequest, RequestStrategy, StripeClient, StripeClientErr, StripeMethod,
    StripeRequest,
};

use crate::config::StripeConfig;
use crate::limiter::RateLimiter;

/// Why a call did not succeed, with what the loop needs to decide.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", self.describe())]
pub struct StripeCallError {
    /// HTTP status; `None` when no response arrived (connection, timeout) or it was unreadable.
    pub status: Option<u16>,
    /// `Stripe-Should-Retry`, when Stripe sent it.
    pub should_retry: Option<bool>,
    /// `error.type` and `error.code` from Stripe's body.
    pub kind: Option<String>,
    pub code: Option<String>,
    pub message: String,
    /// The call that failed opened a v2 meter event session: its refusal says nothing of the
    /// events that were to follow.
    pub session: bool,
}

impl StripeCallError {
    /// A call that got no answer from Stripe, or none that could be read.
    pub fn transport(message: impl Into<String>) -> StripeCallError {
        StripeCallError {
            status: None,
            should_retry: None,
            kind: None,
            code: None,
            message: message.into(),
            session: false,
        }
    }

    /// Stripe refuses whoever is calling, not what the call carries: the key (401, 403), the
    /// address (404), or the meter event session. Retried later, never marked on the rows: a
    /// revoked key or a wrong `stripe.api_base` must not fail a whole backlog.
    pub fn refuses_the_caller(&self) -> bool {
        match self.status {
            Some(401 | 403 | 404) => true,
            Some(status) => self.session && (400..500).contains(&status),
            None => false,
        }
    }

    fn describe(&self) -> String {
        match self.status {
            Some(status) => format!(
                "Stripe answered {status} {}{}: {}",
                self.kind.as_deref().unwrap_or("error"),
                self.code
                    .as_deref()
                    .map(|c| format!(" ({c})"))
                    .unwrap_or_default(),
                self.message
            ),
            None => format!("no answer from Stripe: {}", self.message),
        }
    }

    /// Stripe already holds an event with this identifier: on a retry, that is our event.
    pub fn is_duplicate_identifier(&self) -> bool {
        self.status == Some(400)
            && self
                .message
                .starts_with("An event already exists with identifier")
    }

    /// The event to cancel is canceled already: on a retry, by our earlier attempt.
    pub fn is_already_canceled(&self) -> bool {
        self.status == Some(400) && self.message.contains("has already been canceled")
    }

    /// Stripe may have recorded the call although it did not say so: no answer arrived (a
    /// timeout, a dropped connection), or it answered with a server error.
    pub fn may_have_reached_stripe(&self) -> bool {
        self.status.is_none_or(|status| status >= 500)
    }

    /// A v2 meter event session's token has expired: create a new session and send again.
    pub fn is_session_expired(&self) -> bool {
        self.status == Some(401)
            && (self.kind.as_deref() == Some("temporary_session_expired")
                || self.code.as_deref() == Some("billing_meter_event_session_expired"))
    }

    /// Another request under the same idempotency key is still running (409).
    pub fn is_key_in_use(&self) -> bool {
        self.status == Some(409)
    }

    /// The idempotency key was first used with other parameters (400 `idempotency_error`):
    /// Stripe keeps that first answer for 24 hours and will not give it to this request.
    pub fn is_key_used_otherwise(&self) -> bool {
        self.status == Some(400) && self.kind.as_deref() == Some("idempotency_error")
    }

    /// Stripe has no such object (`resource_missing`).
    pub fn is_not_found(&self) -> bool {
        self.status == Some(404)
    }

    pub fn is_rate_limit(&self) -> bool {
        self.status == Some(429)
    }

    /// Whether sending the same call again may succeed. `Stripe-Should-Retry` decides when
    /// present; otherwise 409, 429, 5xx and no answer at all are retried.
    pub fn is_retryable(&self) -> bool {
        if let Some(retry) = self.should_retry {
            return retry;
        }
        match self.status {
            None => true,
            Some(status) => status == 409 || status == 429 || status >= 500,
        }
    }

    /// A bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self.status {
            None => "network",
            Some(429) => "rate_limit",
            Some(409) => "conflict",
            Some(400) => "invalid_request",
            Some(401 | 403) => "authentication",
            Some(404) => "not_found",
            Some(s) if s >= 500 => "server_error",
            Some(_) => "other",
        }
    }
}

impl StripeClientErr for StripeCallError {
    fn deserialize_err(message: impl std::fmt::Display) -> Self {
        StripeCallError::transport(format!("unreadable response: {message}"))
    }
}

/// The most of an error's message kept (it is logged and stored on every row of a request):
/// Stripe's are a sentence; a server answering megabytes is cut here.
pub(crate) const MAX_ERROR_MESSAGE: usize = 1000;

/// `text` cut to at most `max` bytes, on a character boundary, marked when cut.
fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &text[..end], text.len())
}

/// The most of a response read. Stripe's largest answers (a page of 100 objects) are well
/// under 1 MiB; a misbehaving server or proxy streaming without end stops here.
pub const MAX_RESPONSE_BYTES: usize = 8 << 20;

/// A Stripe API client over a pooled HTTP/1.1 connection (https, or http for the emulator).
#[derive(Clone)]
pub struct StripeHttp {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    api_base: String,
    authorization: HeaderValue,
    timeout: Duration,
}

impl std::fmt::Debug for StripeHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeHttp")
            .field("api_base", &self.api_base)
            .finish_non_exhaustive()
    }
}

impl StripeHttp {
    pub fn new(config: &StripeConfig) -> Result<StripeHttp, String> {
        config.validate()?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        let mut authorization =
            HeaderValue::from_str(&format!("Bearer {}", config.secret_key.expose())).map_err(
                |_| "the Stripe secret key holds characters a header cannot carry".to_owned(),
            )?;
        authorization.set_sensitive(true);
        Ok(StripeHttp {
            client,
            api_base: config.api_base.clone(),
            authorization,
            timeout: config.request_timeout,
        })
    }

    /// Creates a Stripe customer and returns its id (`cus_…`): for the demo and tests.
    pub async fn create_customer(&self, name: &str) -> Result<String, StripeCallError> {
        let customer = stripe_core::customer::CreateCustomer::new()
            .name(name)
            .send(self)
            .await?;
        Ok(customer.id.to_string())
    }

    /// `GET {api_base}{path}` as JSON, for the endpoints async-stripe has no request type for
    /// (the v2 events that carry meter event error reports).
    pub async fn get_json(&self, path: &str) -> Result<serde_json::Value, StripeCallError> {
        let url = format!("{}{path}", self.api_base);
        self.json_call(hyper::Method::GET, &url, &self.authorization, None)
            .await
    }

    /// `POST {api_base}{path}` with a JSON body, for Stripe's v2 endpoints (async-stripe has no
    /// v2): meter event sessions and adjustments.
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, StripeCallError> {
        let url = format!("{}{path}", self.api_base);
        self.json_call(hyper::Method::POST, &url, &self.authorization, Some(body))
            .await
    }

    /// `POST {url}` with a JSON body and `authorization` instead of the secret key: the v2
    /// meter event stream, with a session's token.
    pub async fn post_json_as(
        &self,
        url: &str,
        authorization: &HeaderValue,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, StripeCallError> {
        self.json_call(hyper::Method::POST, url, authorization, Some(body))
            .await
    }

    async fn json_call(
        &self,
        method: hyper::Method,
        url: &str,
        authorization: &HeaderValue,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, StripeCallError> {
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(url)
            .header(AUTHORIZATION, authorization.clone())
            .header(USER_AGENT, concat!("tally/", env!("CARGO_PKG_VERSION")))
            .header("stripe-version", stripe_shared::version::VERSION.as_str());
        if body.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let request = builder
            .body(Full::new(bytes))
            .map_err(|e| StripeCallError::transport(format!("bad request: {e}")))?;
        let body = match tokio::time::timeout(self.timeout, self.attempt(request)).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(StripeCallError::transport(format!(
                    "no response within {:?} (stripe.request_timeout)",
                    self.timeout
                )))
            }
        };
        serde_json::from_slice(&body)
            .map_err(|e| StripeCallError::transport(format!("unreadable response: {e}")))
    }

    async fn attempt(
        &self,
        request: hyper::Request<Full<Bytes>>,
    ) -> Result<Bytes, StripeCallError> {
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| StripeCallError::transport(format!("{e}")))?;
        let status = response.status().as_u16();
        let should_retry = response
            .headers()
            .get("stripe-should-retry")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    StripeCallError::transport(format!(
                        "the response is longer than {MAX_RESPONSE_BYTES} bytes; no Stripe answer is; check stripe.api_base"
                    ))
                } else {
                    StripeCallError::transport(format!("response cut off: {e}"))
                }
            })?
            .to_bytes();
        if (200..300).contains(&status) {
            return Ok(body);
        }
        let error: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let field = |name: &str| error["error"][name].as_str().map(|s| bounded(s, 200));
        Err(StripeCallError {
            status: Some(status),
            should_retry,
            kind: field("type"),
            code: field("code"),
            message: bounded(
                &field("message").unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned()),
                MAX_ERROR_MESSAGE,
            ),
            session: false,
        })
    }
}

impl StripeClient for StripeHttp {
    type Err = StripeCallError;

    /// One attempt. A request customized with `RequestStrategy::Idempotent(key)` carries the
    /// key as `Idempotency-Key` (retries are the caller's loop, with the same key).
    async fn execute(&self, request: CustomizedStripeRequest) -> Result<Bytes, StripeCallError> {
        let (request, config) = request.into_pieces();
        let idempotency_key = match config.request_strategy {
            Some(RequestStrategy::Idempotent(key)) => {
                Some(HeaderValue::from_str(key.as_str()).map_err(|_| {
                    StripeCallError::transport(
                        "the idempotency key holds characters a header cannot carry",
                    )
                })?)
            }
            _ => None,
        };
        let mut uri = format!("{}v1{}", self.api_base, request.path);
        if let Some(query) = &request.query {
            uri.push('?');
            uri.push_str(query);
        }
        let method = match request.method {
            StripeMethod::Get => hyper::Method::GET,
            StripeMethod::Post => hyper::Method::POST,
            StripeMethod::Delete => hyper::Method::DELETE,
        };
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(uri)
            .header(AUTHORIZATION, self.authorization.clone())
            .header(USER_AGENT, concat!("tally/", env!("CARGO_PKG_VERSION")))
            .header("stripe-version", stripe_shared::version::VERSION.as_str());
        if request.body.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/x-www-form-urlencoded");
        }
        if let Some(key) = idempotency_key {
            builder = builder.header("idempotency-key", key);
        }
        let http_request = builder
            .body(Full::new(Bytes::from(request.body.unwrap_or_default())))
            .map_err(|e| StripeCallError::transport(format!("bad request: {e}")))?;
        match tokio::time::timeout(self.timeout, self.attempt(http_request)).await {
            Ok(result) => result,
            Err(_) => Err(StripeCallError::transport(format!(
                "no response within {:?} (stripe.request_timeout)",
                self.timeout
            ))),
        }
    }
}

/// The metadata key `tally customers sync` reads by default: its value is the tally customer id.
pub const DEFAULT_CUSTOMER_METADATA_KEY: &str = "tally_customer";

/// A Stripe customer as `tally customers sync` sees it: its id, and the tally customer its
/// metadata names (under the key the sync reads), if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeCustomer {
    pub id: String,
    pub tally_customer: Option<String>,
}

/// Stripe's customers for `tally customers sync`: listed and created under the account's rate
/// (`stripe.requests_per_second()`, the sink's token bucket), each call retried while Stripe
/// says it may succeed.
pub struct StripeCustomers<'a> {
    stripe: &'a StripeHttp,
    limiter: RateLimiter,
    metadata_key: String,
}

impl<'a> StripeCustomers<'a> {
    /// `metadata_key` is checked against Stripe's rules for metadata keys (1 to 40 characters,
    /// no square brackets).
    pub fn new(
        stripe: &'a StripeHttp,
        requests_per_second: u32,
        metadata_key: &str,
    ) -> Result<StripeCustomers<'a>, String> {
        if metadata_key.is_empty()
            || metadata_key.chars().count() > 40
            || metadata_key.contains(['[', ']'])
        {
            return Err(format!(
                "{metadata_key:?} cannot be a Stripe metadata key: Stripe takes 1 to 40 characters without square brackets"
            ));
        }
        Ok(StripeCustomers {
            stripe,
            limiter: RateLimiter::new(requests_per_second),
            metadata_key: metadata_key.to_owned(),
        })
    }

    /// Every customer of the account: `GET /v1/customers`, 100 a page, `starting_after` the
    /// last of the page before, until `has_more` is false. Returns them and the pages read.
    pub async fn list(&self) -> Result<(Vec<StripeCustomer>, usize), StripeCallError> {
        let mut customers = Vec::new();
        let mut pages = 0;
        let mut after: Option<String> = None;
        loop {
            let mut request = stripe_core::customer::ListCustomer::new().limit(100);
            if let Some(after) = &after {
                request = request.starting_after(after.as_str());
            }
            let page = with_retries(&self.limiter, || request.send(self.stripe)).await?;
            pages += 1;
            customers.extend(page.data.iter().map(|customer| {
                StripeCustomer {
                    id: customer.id.as_str().to_owned(),
                    tally_customer: customer
                        .metadata
                        .as_ref()
                        .and_then(|m| m.get(&self.metadata_key))
                        .cloned(),
                }
            }));
            match (page.has_more, page.data.last()) {
                (true, Some(last)) => after = Some(last.id.as_str().to_owned()),
                _ => return Ok((customers, pages)),
            }
        }
    }

    /// Creates the Stripe customer of tally customer `customer` (`name` and
    /// `metadata[<key>]` are the id) with an `Idempotency-Key` derived from the id
    /// ([`customer_idempotency_key`]): a retry, or a sync run again after a crash within
    /// Stripe's 24 hours, gets the customer the first attempt created. Returns its id.
    pub async fn create(&self, customer: &str) -> Result<String, StripeCallError> {
        let key = stripe_client_core::IdempotencyKey::new(customer_idempotency_key(customer))
            .map_err(|e| StripeCallError::transport(e.to_string()))?;
        let metadata =
            std::collections::HashMap::from([(self.metadata_key.clone(), customer.to_owned())]);
        let request = stripe_core::customer::CreateCustomer::new()
            .name(customer)
            .metadata(metadata);
        let created = with_retries(&self.limiter, || {
            request
                .customize()
                .request_strategy(RequestStrategy::Idempotent(key.clone()))
                .send(self.stripe)
        })
        .await?;
        Ok(created.id.as_str().to_owned())
    }
}

/// `tally-customer-create:<customer>`, or, when the id holds anything but printable ASCII
/// without spaces (a header could not carry it, or would trim it) or the key would pass
/// Stripe's 255 characters, `tally-customer-create:xxh3:<128-bit hash of the id>`.
pub fn customer_idempotency_key(customer: &str) -> String {
    const PREFIX: &str = "tally-customer-create:";
    if customer.bytes().all(|b| b.is_ascii_graphic()) && PREFIX.len() + customer.len() <= 255 {
        format!("{PREFIX}{customer}")
    } else {
        let hash = xxhash_rust::xxh3::xxh3_128(customer.as_bytes());
        format!("{PREFIX}xxh3:{hash:032x}")
    }
}

/// One Stripe call outside the outbox (listing meters, reading summaries, creating a meter),
/// under the rate and retried while Stripe says it may succeed.
pub(crate) async fn with_retries<T, F, Fut>(
    limiter: &RateLimiter,
    send: F,
) -> Result<T, StripeCallError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StripeCallError>>,
{
    retrying(Some(limiter), send, |_| {}).await
}

/// [`with_retries`], told of each retryable failure (`on_retry`); `limiter` `None` for a call
/// that waits for the rate itself.
pub(crate) async fn retrying<T, F, Fut>(
    limiter: Option<&RateLimiter>,
    mut send: F,
    mut on_retry: impl FnMut(&StripeCallError),
) -> Result<T, StripeCallError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StripeCallError>>,
{
    let mut attempt = 0u32;
    loop {
        if let Some(limiter) = limiter {
            limiter.acquire().await;
        }
        match send().await {
            Err(error) if error.is_retryable() && attempt < 8 => {
                attempt += 1;
                on_retry(&error);
                tokio::time::sleep(Duration::from_millis(50 << attempt.min(6))).await;
            }
            answer => return answer,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn customer_idempotency_keys_are_stable_distinct_and_fit_a_header() {
        assert_eq!(
            customer_idempotency_key("acme"),
            "tally-customer-create:acme"
        );
        for odd in ["acme ", "ac me", "ácme", &"a".repeat(250)] {
            let key = customer_idempotency_key(odd);
            assert!(key.starts_with("tally-customer-create:xxh3:"), "{key}");
            assert!(key.len() <= 255);
            assert!(HeaderValue::from_str(&key).is_ok());
            assert_eq!(key, customer_idempotency_key(odd), "stable");
        }
        assert_ne!(
            customer_idempotency_key("acme "),
            customer_idempotency_key("acme")
        );
        assert_ne!(
            customer_idempotency_key("ac me"),
            customer_idempotency_key("ac  me")
        );
    }
}
