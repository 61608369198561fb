//! The quota middleware for Rust services: [`QuotaLayer`], a tower `Layer` (works with axum
//! 0.8's `Router::layer`, `route_layer` and `MethodRouter::layer`).
//!
//! For each request, before the handler:
//!
//! 1. The customer, as the service's own authentication established it: by default the
//!    [`AuthenticatedCustomer`] an authentication layer in front put in the request's
//!    extensions ([`QuotaLayer::customer`] to find it elsewhere). Never a header a client can
//!    set, unless the service says a gateway sets it ([`QuotaLayer::customer_from_trusted_header`]).
//!    None: 401 `UNAUTHORIZED`.
//! 2. The feature, when the route requires one ([`QuotaLayer::require_feature`]): off is 403
//!    `FEATURE_DISABLED`.
//! 3. [`Quota::check`] of the route's meter and quantity: a deny is 429 `LIMIT_EXCEEDED` with
//!    tally-api's body and `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` and
//!    `Retry-After` headers. Errors are answered as tally-api answers them
//!    (`NO_ACTIVE_SUBSCRIPTION` 404, `UNKNOWN_METER` 400, `STORE_UNAVAILABLE` 503, ...),
//!    `{"code", "message"}`. The handler does not run.
//!
//! After the handler, when its response is a success (2xx): the usage is emitted with
//! [`Emitter::emit`] (never blocks; an error is logged and counted, the response goes out
//! unchanged), and the `RateLimit-*` headers are added to the response when the meter has a
//! limit. A response that is not a 2xx emits nothing.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use axum::{routing::post, Router, Extension, Json};
//! # use rust_decimal::Decimal;
//! # use tally_quota::layer::{AuthenticatedCustomer, QuotaLayer, UsageQuantity};
//! # fn build(quota: Arc<tally_quota::Quota>, emitter: Arc<tally_emitter::Emitter>) -> Router {
//! async fn complete() -> (Extension<UsageQuantity>, Json<serde_json::Value>) {
//!     let tokens = Decimal::from(1234); // what the model used
//!     (Extension(UsageQuantity(tokens)), Json(serde_json::json!({ "text": "..." })))
//! }
//! // Your authentication, in front: it knows who the caller is.
//! async fn authenticate(
//!     mut request: axum::extract::Request,
//!     next: axum::middleware::Next,
//! ) -> axum::response::Response {
//!     let customer = "acme".to_owned(); // from the verified API key or session
//!     request.extensions_mut().insert(AuthenticatedCustomer(customer));
//!     next.run(request).await
//! }
//! Router::new()
//!     .route(
//!         "/v1/complete",
//!         post(complete).layer(
//!             QuotaLayer::new(quota, emitter, "tokens")
//!                 .quantity(Decimal::from(500)) // the estimate the check counts
//!                 .quantity_from_response()
//!                 .require_feature("api"),
//!         ),
//!     )
//!     .layer(axum::middleware::from_fn(authenticate))
//! # }
//! ```
//!
//! # Whom to bill, and which requests are the same
//!
//! Both decide money, so neither is taken from the client:
//!
//! - **The customer** comes from the service's authentication ([`AuthenticatedCustomer`] in
//!   the request's extensions, or [`QuotaLayer::customer`]). A header such as `x-customer-id`
//!   is read only when the service says a gateway sets it after authenticating the caller (and
//!   drops any the client sent): [`QuotaLayer::customer_from_trusted_header`].
//! - **The event id** is made by the server for every request (a UUIDv7, handed to the handler
//!   as [`MeteredRequestId`]), so each request is counted. A gateway or mesh that keeps one id
//!   across its own retries can be trusted for it ([`QuotaLayer::request_id_from_trusted_header`]):
//!   a retry under that id is then counted once. Either way the event id is scoped to the
//!   customer (`usage.rs`): one customer can never make another's request count once, nor
//!   pre-empt its ids; and two layers metering one request emit one event each.
//!
//! The quota check itself is made again for a retry: what it allows counts against the
//! customer in this process until the next refresh, when the committed usage (with the retry
//! counted once) replaces it.
//!
//! The event is dated at the start of the current minute (`usage.rs` says why: a retry within
//! the minute is then an exact copy, dropped silently; a later one a `conflicting_duplicate`
//! reject, counted once all the same).
//!
//! # Quantities
//!
//! Exact decimals, never floats. A route emits its fixed [`QuotaLayer::quantity`] (1 by
//! default), or with [`QuotaLayer::quantity_from_response`] what the handler put in the
//! response's extensions as [`UsageQuantity`] (tokens used, bytes sent); the check before the
//! handler then counts the route's quantity, an estimate, and the refresh after the aggregator
//! commits puts the real figure in its place.

mod response;
pub mod telemetry;
mod usage;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use chrono::Utc;
use http::header::HeaderName;
use http::request::Parts;
use http::{Request, Response};
use rust_decimal::Decimal;
use tally_emitter::Emitter;
use tower::{Layer, Service};

use crate::{Decision, Quota};
use response::{limit_exceeded, no_customer, quota_error, RateLimit};
pub use response::{RATELIMIT_LIMIT, RATELIMIT_REMAINING, RATELIMIT_RESET};
use telemetry::Counters;
pub use usage::event_id;

/// The customer a request is for, as the service's authentication established it: an
/// authentication layer in front of [`QuotaLayer`] puts it in the request's extensions. The
/// layer's customer by default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthenticatedCustomer(pub String);

/// The id the layer metered a request under (made by the server, or taken from a trusted
/// gateway's header), in the request's extensions for the handler and inner layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeteredRequestId(pub String);

/// The quantity a handler used, for a [`QuotaLayer::quantity_from_response`] route: put it in
/// the response's extensions (axum: return `Extension(UsageQuantity(q))` as a response part).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageQuantity(pub Decimal);

/// How the customer of a request is found.
type CustomerOf = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;

/// Meters the routes it wraps: checks before the handler, emits usage after it (see the
/// [module](self)). Cheap to clone.
#[derive(Clone)]
pub struct QuotaLayer {
    config: Arc<Config>,
}

#[derive(Clone)]
struct Config {
    quota: Arc<Quota>,
    emitter: Arc<Emitter>,
    meter: String,
    quantity: Decimal,
    from_response: bool,
    feature: Option<String>,
    customer: CustomerOf,
    /// A gateway's header the request id is taken from; `None`: made by the server.
    trusted_request_id: Option<HeaderName>,
    counters: Counters,
}

impl QuotaLayer {
    /// Meters `meter` with a quantity of 1 per request, for the [`AuthenticatedCustomer`] the
    /// service's authentication put in the request's extensions.
    ///
    /// # Panics
    ///
    /// When `meter` is not a valid meter name (`[a-z0-9_.-]{1,64}`): a mistake in the code
    /// that builds the router, like an invalid route path.
    pub fn new(quota: Arc<Quota>, emitter: Arc<Emitter>, meter: impl Into<String>) -> QuotaLayer {
        let meter = meter.into();
        if let Err(rule) = tally_core::event::validate_meter_name(&meter) {
            panic!("QuotaLayer::new: {rule}");
        }
        QuotaLayer {
            config: Arc::new(Config {
                quota,
                emitter,
                counters: Counters::register(&meter),
                meter,
                quantity: Decimal::ONE,
                from_response: false,
                feature: None,
                customer: Arc::new(authenticated_customer),
                trusted_request_id: None,
            }),
        }
    }

    /// How to find the customer of a request, from what the service's authentication
    /// established (its extensions). `None` answers 401 `UNAUTHORIZED`. Never from something
    /// the client sends as it likes.
    pub fn customer(
        mut self,
        customer: impl Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    ) -> QuotaLayer {
        Arc::make_mut(&mut self.config).customer = Arc::new(customer);
        self
    }

    /// The quantity each request uses (1 by default); with
    /// [`QuotaLayer::quantity_from_response`], the estimate the check counts.
    ///
    /// # Panics
    ///
    /// When `quantity` is outside tally's domain (negative, above 10^15, more than 9 fraction
    /// digits): every event of the route would be refused.
    pub fn quantity(mut self, quantity: Decimal) -> QuotaLayer {
        if let Err(rejection) = tally_core::event::validate_quantity(quantity) {
            panic!("QuotaLayer::quantity: {}", rejection.detail);
        }
        Arc::make_mut(&mut self.config).quantity = quantity;
        self
    }

    /// Emits what the handler put in the response as [`UsageQuantity`] instead of the route's
    /// quantity. A successful response without one emits the route's quantity, logged and
    /// counted (`tally_quota_layer_missing_quantity_total`): usage is never dropped silently.
    pub fn quantity_from_response(mut self) -> QuotaLayer {
        Arc::make_mut(&mut self.config).from_response = true;
        self
    }

    /// Also requires `feature` on the customer's plan: off answers 403 `FEATURE_DISABLED`.
    pub fn require_feature(mut self, feature: impl Into<String>) -> QuotaLayer {
        Arc::make_mut(&mut self.config).feature = Some(feature.into());
        self
    }

    /// Reads the customer from `header`, which **a gateway in front sets after it
    /// authenticated the caller, and removes when a client sends it**. Without such a
    /// gateway any client could bill any customer: use [`AuthenticatedCustomer`] instead.
    pub fn customer_from_trusted_header(self, header: HeaderName) -> QuotaLayer {
        self.customer(move |parts: &Parts| {
            parts
                .headers
                .get(&header)
                .and_then(|value| value.to_str().ok())
                .filter(|customer| !customer.is_empty())
                .map(str::to_owned)
        })
    }

    /// Takes the request id from `header`, which **a gateway or mesh in front sets (keeping it
    /// on its own retries) and removes when a client sends it**: a retry under the same id is
    /// counted once. Without it (the default) every request gets an id of the server's, and a
    /// client cannot make its requests count once by repeating an id.
    pub fn request_id_from_trusted_header(mut self, header: HeaderName) -> QuotaLayer {
        Arc::make_mut(&mut self.config).trusted_request_id = Some(header);
        self
    }
}

/// The default customer: the [`AuthenticatedCustomer`] in the request's extensions.
fn authenticated_customer(parts: &Parts) -> Option<String> {
    parts
        .extensions
        .get::<AuthenticatedCustomer>()
        .map(|customer| customer.0.clone())
        .filter(|customer| !customer.is_empty())
}

impl<S> Layer<S> for QuotaLayer {
    type Service = QuotaService<S>;

    fn layer(&self, inner: S) -> QuotaService<S> {
        QuotaService {
            inner,
            config: Arc::clone(&self.config),
        }
    }
}

/// The service [`QuotaLayer`] wraps around a route.
#[derive(Clone)]
pub struct QuotaService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for QuotaService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: From<String> + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResBody>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The service that was polled ready goes into the future; a clone stays for the next.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(metered(Arc::clone(&self.config), inner, request))
    }
}

/// One request through the middleware.
async fn metered<S, ReqBody, ResBody>(
    config: Arc<Config>,
    mut inner: S,
    request: Request<ReqBody>,
) -> Result<Response<ResBody>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: From<String>,
{
    let (mut parts, body) = request.into_parts();
    let Some(customer) = (config.customer)(&parts) else {
        config.counters.refused.increment(1);
        return Ok(no_customer());
    };
    let request_id = request_id(&mut parts, config.trusted_request_id.as_ref());
    if let Some(feature) = &config.feature {
        if let Err(error) = config.quota.require_feature(&customer, feature).await {
            config.counters.refused.increment(1);
            return Ok(quota_error(&error));
        }
    }
    let decision = match config
        .quota
        .check(&customer, &config.meter, config.quantity)
        .await
    {
        Ok(decision) => decision,
        Err(error) => {
            config.counters.refused.increment(1);
            return Ok(quota_error(&error));
        }
    };
    match &decision {
        Decision::Allow { .. } => config.counters.allow.increment(1),
        Decision::Warn { .. } => config.counters.warn.increment(1),
        Decision::Deny { .. } => {
            config.counters.deny.increment(1);
            return Ok(limit_exceeded(&config.meter, &decision, Utc::now()));
        }
    }

    let mut response = inner.call(Request::from_parts(parts, body)).await?;
    if response.status().is_success() {
        emit(&config, &customer, &request_id, &response);
    }
    if let Some(rate_limit) = RateLimit::of(&decision, Utc::now()) {
        rate_limit.add_to(response.headers_mut());
    }
    Ok(response)
}

/// The request's id: the trusted gateway's header when the layer has one and it is set;
/// otherwise (and by default) a new UUIDv7. An inner layer metering the same request uses the
/// id the outer one put in the extensions; the handler sees it there too.
fn request_id(parts: &mut Parts, trusted: Option<&HeaderName>) -> Vec<u8> {
    if let Some(MeteredRequestId(id)) = parts.extensions.get::<MeteredRequestId>() {
        return id.as_bytes().to_vec();
    }
    // Visible ASCII only: the id every layer hashes is then the very one in the extensions
    // (a lossy conversion would make distinct ids one).
    let from_gateway = trusted
        .and_then(|header| parts.headers.get(header))
        .and_then(|value| value.to_str().ok())
        .filter(|value| !value.is_empty())
        .map(str::to_owned);
    let id = from_gateway.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    parts.extensions.insert(MeteredRequestId(id.clone()));
    id.into_bytes()
}

/// Emits the usage of a successful response; a failure is logged and counted, never answered.
fn emit<ResBody>(config: &Config, customer: &str, request_id: &[u8], response: &Response<ResBody>) {
    let quantity = if config.from_response {
        match response.extensions().get::<UsageQuantity>() {
            Some(UsageQuantity(quantity)) => *quantity,
            None => {
                config.counters.missing_quantity.increment(1);
                tracing::warn!(
                    meter = %config.meter,
                    quantity = %config.quantity,
                    "the handler set no UsageQuantity on its response; the route's quantity is emitted instead"
                );
                config.quantity
            }
        }
    } else {
        config.quantity
    };
    let event = usage::usage_event(customer, &config.meter, quantity, request_id, Utc::now());
    let id = event.id.clone();
    if let Err(error) = config.emitter.emit(event) {
        config.counters.emit_failed(&error);
        // Usage of a request that was served is not counted: data at risk.
        tracing::error!(
            meter = %config.meter,
            customer,
            event_id = %id,
            %quantity,
            %error,
            "usage of a served request could not be emitted and is not counted"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(header: &[u8]) -> Parts {
        let mut request = Request::new(());
        request.headers_mut().insert(
            "x-gateway-id",
            http::HeaderValue::from_bytes(header).unwrap(),
        );
        request.into_parts().0
    }

    /// Every layer metering a request hashes the id the first one put in the extensions,
    /// byte for byte; an id that is not visible ASCII is not taken from the gateway (it used
    /// to be hashed raw by the outer layer and lossily by the inner ones, so two such ids were
    /// one for the inner layers).
    #[test]
    fn the_id_hashed_is_the_id_every_layer_sees() {
        let trusted = HeaderName::from_static("x-gateway-id");
        let mut gateway = parts(b"gw-1234");
        let outer = request_id(&mut gateway, Some(&trusted));
        let inner = request_id(&mut gateway, Some(&trusted));
        assert_eq!(
            (outer.as_slice(), inner.as_slice()),
            (&b"gw-1234"[..], &b"gw-1234"[..])
        );

        let (mut a, mut b) = (parts(b"id-\xff"), parts(b"id-\xfe"));
        let (outer_a, outer_b) = (
            request_id(&mut a, Some(&trusted)),
            request_id(&mut b, Some(&trusted)),
        );
        let (inner_a, inner_b) = (
            request_id(&mut a, Some(&trusted)),
            request_id(&mut b, Some(&trusted)),
        );
        assert_eq!((&outer_a, &outer_b), (&inner_a, &inner_b));
        assert_ne!(inner_a, inner_b);
        assert!(!outer_a.starts_with(b"id-"), "not taken from the gateway");
    }
}
