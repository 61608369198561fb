//! Who is calling, and may they: hashed bearer tokens with scopes, a token bucket per token,
//! and the gate every route passes before its body is read.
//!
//! Tokens are kept as SHA-256 hashes (a token is 256 random bits, so a fast hash is enough:
//! nothing to brute-force). The presented token is hashed once and its digest looked up. What
//! the lookup's timing could tell is how close the digest of an attacker's guess is to a
//! stored digest, which says nothing about any token (SHA-256 is preimage resistant); a
//! byte-by-byte comparison of tokens themselves would tell how much of one matched, and their
//! lengths. The lookup costs the same with one token or ten thousand customer tokens.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::config::{ApiToken, Rate, RateLimits, Scope};
use crate::error::ApiError;
use crate::{telemetry, ApiState};

/// The configured tokens, by hash, and their rate buckets.
pub struct Access {
    by_hash: HashMap<[u8; 32], Caller>,
    buckets: Vec<Mutex<Bucket>>,
}

impl Access {
    /// Hashes that are not 64 hex digits match nothing (`ServeConfig::validate` refuses them).
    pub fn new(tokens: &[ApiToken], rates: &RateLimits) -> Access {
        let mut by_hash = HashMap::new();
        let mut buckets = Vec::new();
        for token in tokens {
            let mut hash = [0u8; 32];
            if hex::decode_to_slice(token.sha256.expose(), &mut hash).is_err() {
                tracing::error!(token = %token.name, "serve.tokens sha256 is not 64 hex digits; the token matches nothing");
                continue;
            }
            let caller = Caller(Arc::new(CallerToken {
                name: token.name.clone(),
                scope: token.scope,
                customer: token.customer.clone(),
                bucket: Some(buckets.len()),
            }));
            buckets.push(Mutex::new(Bucket::new(rates.of(token.scope))));
            by_hash.insert(hash, caller);
        }
        Access { by_hash, buckets }
    }

    /// The caller the `Authorization: Bearer …` header names.
    pub(crate) fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHORIZED",
                    "send an API token as `Authorization: Bearer <token>`",
                )
            })?;
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.by_hash.get(&digest).cloned().ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                "unknown API token",
            )
        })
    }

    /// The admin token whose SHA-256 is `digest`, for a console session that token opened: a
    /// token removed from the configuration, or replaced under the same name, ends its
    /// sessions.
    pub(crate) fn admin_by_digest(&self, digest: &[u8]) -> Option<Caller> {
        let digest: [u8; 32] = digest.try_into().ok()?;
        self.by_hash
            .get(&digest)
            .filter(|caller| caller.scope() == Scope::Admin)
            .cloned()
    }

    /// Takes one request from the caller's bucket, or says how many seconds until one is there.
    fn take(&self, caller: &Caller) -> Result<(), u64> {
        let Some(bucket) = caller.0.bucket else {
            return Ok(());
        };
        self.buckets[bucket]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(Instant::now())
    }
}

/// A token bucket: `burst` requests at once, refilled at `per_second`.
struct Bucket {
    rate: Rate,
    available: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: Rate) -> Bucket {
        Bucket {
            rate,
            available: f64::from(rate.burst),
            at: Instant::now(),
        }
    }

    fn take(&mut self, now: Instant) -> Result<(), u64> {
        let per_second = f64::from(self.rate.per_second);
        let refilled = now.saturating_duration_since(self.at).as_secs_f64() * per_second;
        self.available = (self.available + refilled).min(f64::from(self.rate.burst));
        self.at = now;
        if self.available >= 1.0 {
            self.available -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - self.available) / per_second).ceil().max(1.0) as u64)
        }
    }
}

/// Who is calling: one configured token. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Caller(Arc<CallerToken>);

#[derive(Debug)]
struct CallerToken {
    name: String,
    scope: Scope,
    customer: Option<String>,
    /// Its rate bucket in `Access::buckets`; `None` for a portal session's caller (the portal's
    /// pages are rate-limited per session by `web`).
    bucket: Option<usize>,
}

impl Caller {
    /// A portal session's caller: customer scope, for its one customer; named after the
    /// session, so what it does (a Checkout, an alert rule) is traced to the admin call that
    /// opened the session.
    pub(crate) fn portal(customer: &str, session: &str) -> Caller {
        Caller(Arc::new(CallerToken {
            name: format!("portal:{session}"),
            scope: Scope::Customer,
            customer: Some(customer.to_owned()),
            bucket: None,
        }))
    }

    pub fn scope(&self) -> Scope {
        self.0.scope
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Refuses a customer token reading another customer.
    pub fn may_read(&self, customer: &str) -> Result<(), ApiError> {
        match (self.0.scope, &self.0.customer) {
            (Scope::Customer, Some(own)) if own == customer => Ok(()),
            (Scope::Customer, _) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "FORBIDDEN",
                "this token may only read its own customer",
            )),
            (Scope::Admin | Scope::Check | Scope::Ingest, _) => Ok(()),
        }
    }

    /// Whether a quota check by this caller counts against the customer's quota. A customer
    /// token only looks: it must not change anybody's quota state.
    pub fn counts_usage(&self) -> bool {
        self.0.scope != Scope::Customer
    }
}

/// What a route needs from a request before its body is read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    /// Scopes that may call the route; `None`: no token (health, the OpenAPI document, Stripe's
    /// signed webhooks).
    pub(crate) scopes: Option<&'static [Scope]>,
    /// Largest body, checked against `Content-Length` before anything is read, and enforced
    /// while reading a body without one.
    pub(crate) max_body_bytes: usize,
}

/// A request tally's own pages make of the API in-process, on behalf of the session's caller
/// (`web`): the page's session was checked already. Only code in this process can attach it;
/// nothing a client sends becomes a request extension.
#[derive(Clone)]
pub(crate) struct OnBehalf(pub(crate) Caller);

/// The gate: token, scope and rate limit are checked, and a declared body that is too large is
/// refused, before the body is read; the caller is then handed to the handler.
pub(crate) async fn gate(
    State((state, policy)): State<(Arc<ApiState>, Policy)>,
    mut request: Request,
    next: Next,
) -> Response {
    if let Some(scopes) = policy.scopes {
        let on_behalf = request.extensions().get::<OnBehalf>().cloned();
        let authenticated = match on_behalf {
            Some(OnBehalf(caller)) => Ok(caller),
            None => state.access.authenticate(request.headers()),
        };
        let caller = match authenticated {
            Ok(caller) => caller,
            Err(error) => {
                let mut response = error.into_response();
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return response;
            }
        };
        if !scopes.contains(&caller.scope()) {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "FORBIDDEN",
                format!(
                    "a token of scope {} may not call this route; it needs one of: {}",
                    caller.scope().as_str(),
                    scopes
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
            .into_response();
        }
        if let Err(retry_after) = state.access.take(&caller) {
            telemetry::rate_limited(caller.scope());
            let mut response = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "RATE_LIMITED",
                format!(
                    "too many requests for this token (scope {}); retry after {retry_after} s",
                    caller.scope().as_str()
                ),
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            return response;
        }
        request.extensions_mut().insert(caller);
    }
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > policy.max_body_bytes as u64) {
        return ApiError::too_large(policy.max_body_bytes).into_response();
    }
    next.run(request).await
}

/// The caller the gate let through.
impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiError::internal("route without a gate", "no caller on the request"))
    }
}

/// The `{id}` of a `/v1/customers/{id}/…` route, once the caller is known to be allowed to
/// read that customer.
pub(crate) struct ReadableCustomer(pub(crate) String);

impl<S: Send + Sync> FromRequestParts<S> for ReadableCustomer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(customer) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::invalid(e.body_text()))?;
        Caller::from_request_parts(parts, state)
            .await?
            .may_read(&customer)?;
        Ok(ReadableCustomer(customer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let start = Instant::now();
        let mut bucket = Bucket::new(Rate::new(10, 3));
        bucket.at = start;
        for _ in 0..3 {
            assert_eq!(bucket.take(start), Ok(()));
        }
        assert_eq!(bucket.take(start), Err(1));
        let later = start + std::time::Duration::from_millis(100);
        assert_eq!(bucket.take(later), Ok(()));
        assert_eq!(bucket.take(later), Err(1));
    }

    #[test]
    fn a_token_matches_its_hash_only() {
        let tokens = [
            ApiToken::new("ops", Scope::Admin, None, "tly_first"),
            ApiToken::new("acme", Scope::Customer, Some("acme"), "tly_second"),
        ];
        let access = Access::new(&tokens, &RateLimits::default());
        let headers = |token: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                header::AUTHORIZATION,
                format!("Bearer {token}").parse().unwrap(),
            );
            headers
        };
        assert_eq!(
            access.authenticate(&headers("tly_second")).unwrap().name(),
            "acme"
        );
        assert!(access.authenticate(&headers("tly_secon")).is_err());
        assert!(access
            .authenticate(&headers(&crate::config::token_hash("tly_first")))
            .is_err());
        assert!(access.authenticate(&HeaderMap::new()).is_err());
    }
}
