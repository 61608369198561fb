//! The listener and the request pipeline. Every `/v1/` call goes through the same steps, in
//! Stripe's order: authenticate, account rate limit, idempotency key, route (validate, take the
//! customer+meter lock, injected faults, commit), then the injected dropped connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::billing::{Billing, Change};
use crate::checkout::Payer;
use crate::config::{EmulatorConfig, Faults};
use crate::idempotency::{Begin, IdempotencyKeys};
use crate::limits::{PairLocks, RateWindow};
use crate::reply::Reply;
use crate::store::{Form, MeterTotal, NewEvent, Stats, Store};
use crate::stream::{self, Sessions};
use crate::webhooks::{EventRecord, Webhooks};

const MAX_BODY_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// (`cause`, not `source`: the message says it once, and a chain would repeat it.)
    #[error("cannot listen on {addr}: {cause}; pick a free port (or 0 for any)")]
    Bind {
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error("invalid faults: {0}")]
    Faults(String),
}

struct EmulatorState {
    test_rate: u32,
    live_rate: u32,
    faults: Mutex<Faults>,
    rng: Mutex<StdRng>,
    store: Mutex<Store>,
    billing: Mutex<Billing>,
    webhooks: Arc<Webhooks>,
    stats: Mutex<Stats>,
    rate_window: Mutex<RateWindow>,
    /// Meter events per second the v2 stream takes per account.
    stream_rate: u32,
    stream_window: Mutex<RateWindow>,
    stream_sessions: Mutex<Sessions>,
    pair_locks: PairLocks,
    idempotency: IdempotencyKeys,
    /// Seconds added to the wall clock, so tests can step past the 24 h and 35 day rules.
    clock_offset: Mutex<i64>,
}

/// A running emulator. Dropping it leaves the server running until `shutdown`.
pub struct Emulator {
    addr: SocketAddr,
    shared: Arc<EmulatorState>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Emulator {
    /// Listens on `addr` (port 0 picks a free one) and serves until `shutdown`.
    pub async fn start(
        addr: SocketAddr,
        config: EmulatorConfig,
    ) -> Result<Emulator, EmulatorError> {
        config.faults.validate().map_err(EmulatorError::Faults)?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|cause| EmulatorError::Bind { addr, cause })?;
        let addr = listener
            .local_addr()
            .map_err(|cause| EmulatorError::Bind { addr, cause })?;
        let shared = Arc::new(EmulatorState {
            test_rate: config.test_rate_per_second,
            live_rate: config.live_rate_per_second,
            faults: Mutex::new(config.faults),
            rng: Mutex::new(StdRng::seed_from_u64(config.seed)),
            store: Mutex::new(Store::default()),
            billing: Mutex::new(Billing::new(format!("http://{addr}"))),
            webhooks: Webhooks::start(),
            stats: Mutex::new(Stats::default()),
            rate_window: Mutex::new(RateWindow::default()),
            stream_rate: config.stream_events_per_second,
            stream_window: Mutex::new(RateWindow::default()),
            stream_sessions: Mutex::new(Sessions::default()),
            pair_locks: PairLocks::default(),
            idempotency: IdempotencyKeys::default(),
            clock_offset: Mutex::new(0),
        });
        let stop = CancellationToken::new();
        let task = tokio::spawn(accept_loop(listener, shared.clone(), stop.clone()));
        Ok(Emulator {
            addr,
            shared,
            stop,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The API base for a Stripe client: `http://127.0.0.1:PORT/` (async-stripe appends `v1/…`).
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    pub fn set_faults(&self, faults: Faults) -> Result<(), EmulatorError> {
        faults.validate().map_err(EmulatorError::Faults)?;
        *self.shared.faults.lock().expect("faults lock poisoned") = faults;
        Ok(())
    }

    pub fn stats(&self) -> Stats {
        self.shared
            .stats
            .lock()
            .expect("stats lock poisoned")
            .clone()
    }

    /// What Stripe holds, per customer and event name.
    pub fn totals(&self) -> Vec<MeterTotal> {
        self.shared
            .store
            .lock()
            .expect("store lock poisoned")
            .totals()
    }

    /// The sum Stripe holds for a customer and event name (0 when it holds nothing).
    pub fn sum(&self, customer: &str, event_name: &str) -> i64 {
        self.totals()
            .iter()
            .filter(|t| t.customer == customer && t.event_name == event_name)
            .map(|t| t.sum)
            .sum()
    }

    /// The last value Stripe holds for a customer and event name (`last` meters).
    pub fn last(&self, customer: &str, event_name: &str) -> Option<i64> {
        self.totals()
            .iter()
            .find(|t| t.customer == customer && t.event_name == event_name)
            .and_then(|t| t.last)
    }

    /// Every customer Stripe holds, oldest first, as `GET /v1/customers/{id}` returns them.
    pub fn customers(&self) -> Vec<serde_json::Value> {
        self.shared
            .store
            .lock()
            .expect("store lock poisoned")
            .customers()
    }

    /// Every webhook event so far, with its delivery state.
    pub fn events(&self) -> Vec<EventRecord> {
        self.shared.webhooks.events()
    }

    /// Moves the emulator's clock forward (for the 24 h cancel and 35 day timestamp rules).
    /// Forgets every meter event session: their tokens are refused from now on (401).
    pub fn revoke_meter_event_sessions(&self) {
        lock(&self.shared.stream_sessions).revoke_all();
    }

    pub fn advance_clock(&self, by: Duration) {
        *self
            .shared
            .clock_offset
            .lock()
            .expect("clock lock poisoned") += by.as_secs() as i64;
    }

    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<EmulatorState>, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "stripe-emulator: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            // Set by a handler that wants the connection closed without a response.
            let drop_connection = Arc::new(Notify::new());
            let service = {
                let drop_connection = drop_connection.clone();
                service_fn(move |request| {
                    let shared = shared.clone();
                    let drop_connection = drop_connection.clone();
                    async move { Ok::<_, Infallible>(handle(&shared, &drop_connection, request).await) }
                })
            };
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                _ = drop_connection.notified() => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

impl EmulatorState {
    fn now(&self) -> i64 {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs() as i64;
        wall + *self.clock_offset.lock().expect("clock lock poisoned")
    }

    /// Commits a validated meter event unless its identifier is taken (v1 and the stream
    /// alike), reports it when no meter takes it (Stripe accepts such an event and says so
    /// later), and counts it. Returns the reply and whether the event was new.
    fn commit_event(&self, event: NewEvent, livemode: bool) -> (Reply, bool) {
        let event_name = event.event_name.clone();
        let identifier = event.identifier.clone();
        let (reply, created, has_meter) = {
            let mut store = lock(&self.store);
            let has_meter = store.has_meter(&event_name);
            let (reply, created) = store.commit_meter_event(event, livemode, self.now());
            (reply, created, has_meter)
        };
        if created && !has_meter {
            self.webhooks
                .report_no_meter(&event_name, identifier.as_deref(), livemode, self.now());
        }
        self.count(|s| {
            if created {
                s.meter_events_created += 1;
            } else {
                s.duplicate_identifiers += 1;
            }
        });
        (reply, created)
    }

    fn count(&self, bump: impl FnOnce(&mut Stats)) {
        bump(&mut self.stats.lock().expect("stats lock poisoned"));
    }

    fn roll(&self, probability: f64) -> bool {
        probability > 0.0
            && self
                .rng
                .lock()
                .expect("rng lock poisoned")
                .random_bool(probability.min(1.0))
    }
}

/// What a route decided besides its reply.
struct Outcome {
    reply: Reply,
    /// Close the connection instead of answering (the reply is still stored for its key).
    drop_connection: bool,
}

impl From<Reply> for Outcome {
    fn from(reply: Reply) -> Outcome {
        Outcome {
            reply,
            drop_connection: false,
        }
    }
}

async fn handle(
    shared: &EmulatorState,
    drop_connection: &Notify,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return Reply::invalid("Request body too large or unreadable.", None).into_response()
        }
    };
    let path = parts.uri.path().to_owned();
    let query = Form::parse(parts.uri.query().unwrap_or("").as_bytes());
    if let Some(control) = path.strip_prefix("/_emulator/") {
        return control_api(shared, &parts.method, control, &body).into_response();
    }
    shared.count(|s| s.requests += 1);
    if parts.method == Method::POST && path == "/v2/billing/meter_event_stream" {
        // Authenticated by a meter event session's token, not the secret key.
        let token = parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let outcome = meter_event_stream(shared, token, &body).await;
        return answer(shared, drop_connection, outcome).await;
    }

    let api_key = match parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(api_key_of)
    {
        Some(key) if key.starts_with("sk_test_") || key.starts_with("sk_live_") => key.to_owned(),
        Some(key) => {
            let shown: String = key.chars().take(8).collect();
            return Reply::error(401, "invalid_request_error", None, format!("Invalid API Key provided: {shown}…"), None)
                .into_response();
        }
        None => {
            return Reply::error(401, "invalid_request_error", None, "You did not provide an API key. You need to provide your API key in the Authorization header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY').", None)
                .into_response()
        }
    };
    let livemode = api_key.starts_with("sk_live_");

    let rate = if livemode {
        shared.live_rate
    } else {
        shared.test_rate
    };
    let admitted = shared
        .rate_window
        .lock()
        .expect("rate lock poisoned")
        .admit(&api_key, rate, Instant::now());
    if !admitted {
        shared.count(|s| s.rate_limited += 1);
        return Reply::rate_limited("Request rate limit exceeded. You can learn more about rate limits here https://stripe.com/docs/rate-limits.").into_response();
    }

    let idempotency_key = match (&parts.method, parts.headers.get("idempotency-key")) {
        (&Method::POST, Some(value)) => value.to_str().ok().map(str::to_owned),
        _ => None,
    };
    let key_guard = match &idempotency_key {
        None => None,
        Some(key) => {
            let fingerprint = request_fingerprint(&path, &body);
            match shared
                .idempotency
                .begin(&api_key, key, fingerprint, shared.now())
            {
                Begin::New(guard) => Some(guard),
                Begin::Replay(reply) => {
                    shared.count(|s| s.idempotent_replays += 1);
                    return reply.into_response();
                }
                Begin::Conflict(reply) => return reply.into_response(),
            }
        }
    };

    let form = Form::parse(&body);
    let request = Routed {
        method: &parts.method,
        path: &path,
        query: &query,
        form: &form,
        body: &body,
        api_key: &api_key,
        livemode,
    };
    let outcome = route(shared, &request).await;
    if let Some(guard) = key_guard {
        guard.finish(&outcome.reply, shared.now());
    }
    answer(shared, drop_connection, outcome).await
}

/// Sends a route's reply, or closes the connection without one when it asked to.
async fn answer(
    shared: &EmulatorState,
    drop_connection: &Notify,
    outcome: Outcome,
) -> Response<Full<Bytes>> {
    if outcome.drop_connection {
        shared.count(|s| s.dropped_after_commit += 1);
        drop_connection.notify_one();
        std::future::pending::<()>().await;
    }
    outcome.reply.into_response()
}

/// The secret key of an `Authorization` header, as Stripe takes it: `Bearer <key>`, or HTTP
/// Basic with the key as the user name and no password (`curl -u sk_test_…:`).
fn api_key_of(authorization: &str) -> Option<String> {
    if let Some(key) = authorization.strip_prefix("Bearer ") {
        return Some(key.to_owned());
    }
    use base64::Engine as _;
    let encoded = authorization.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let credentials = String::from_utf8(decoded).ok()?;
    let (user, _password) = credentials.split_once(':').unwrap_or((&credentials, ""));
    Some(user.to_owned())
}

/// A stable fingerprint of a request's parameters, to spot a key reused with others.
fn request_fingerprint(path: &str, body: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    path.hash(&mut hasher);
    body.hash(&mut hasher);
    hasher.finish()
}

/// One authenticated API call, as the routes see it.
struct Routed<'a> {
    method: &'a Method,
    path: &'a str,
    query: &'a Form,
    form: &'a Form,
    body: &'a [u8],
    api_key: &'a str,
    livemode: bool,
}

async fn route(shared: &EmulatorState, request: &Routed<'_>) -> Outcome {
    let Routed {
        method,
        path,
        query,
        form,
        body,
        api_key,
        livemode,
    } = *request;
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (&Method::POST, ["v1", "billing", "meter_events"]) => {
            meter_event(shared, form, livemode).await
        }
        (&Method::POST, ["v2", "billing", "meter_event_session"]) => {
            if let Some(failure) = injected_failure(shared).await {
                return failure.into();
            }
            let now = shared.now();
            shared.count(|s| s.meter_event_sessions += 1);
            lock(&shared.stream_sessions).create(api_key, livemode, now).into()
        }
        (&Method::POST, ["v2", "billing", "meter_event_adjustments"]) => {
            let (event_name, identifier) = match stream::parse_adjustment(body) {
                Ok(parts) => parts,
                Err(reply) => return reply.into(),
            };
            let outcome = write(shared, |store, now| {
                match store.cancel(&event_name, &identifier, now) {
                    Ok(()) => {
                        let id = format!("mea_emu{:016x}", rand::random::<u64>());
                        let adjustment =
                            stream::adjustment_json(&id, &event_name, &identifier, livemode, now);
                        Reply::json(200, &adjustment)
                    }
                    Err(reply) => reply,
                }
            })
            .await;
            if outcome.reply.status == 200 {
                shared.count(|s| s.adjustments += 1);
            }
            outcome
        }
        (&Method::POST, ["v1", "billing", "meter_event_adjustments"]) => {
            let outcome = write(shared, |store, now| store.adjust(form, livemode, now)).await;
            if outcome.reply.status == 200 {
                shared.count(|s| s.adjustments += 1);
            }
            outcome
        }
        (&Method::POST, ["v1", "customers"]) => {
            let outcome = write(shared, |store, now| store.create_customer(form, livemode, now)).await;
            if outcome.reply.status == 200 {
                shared.count(|s| s.customers_created += 1);
            }
            outcome
        }
        (&Method::POST, ["v1", "billing", "meters"]) => {
            write(shared, |store, now| store.create_meter(form, livemode, now)).await
        }
        (&Method::POST, ["v1", "products"]) => billing(shared, |billing, _, now| {
            Ok((billing.create_product(form, livemode, now), Vec::new()))
        }),
        (&Method::GET, ["v1", "products", id]) => {
            billing(shared, |billing, _, _| Ok((billing.get_product(id), Vec::new())))
        }
        (&Method::POST, ["v1", "prices"]) => {
            billing(shared, |billing, _, now| {
                Ok((billing.create_price(form, livemode, now), Vec::new()))
            })
        }
        (&Method::GET, ["v1", "prices"]) => {
            billing(shared, |billing, _, _| Ok((billing.list_prices(query), Vec::new())))
        }
        (&Method::GET, ["v1", "prices", id]) => {
            billing(shared, |billing, _, _| Ok((billing.get_price(id), Vec::new())))
        }
        (&Method::POST, ["v1", "checkout", "sessions"]) => {
            // A session is opened while a customer waits: the faults of the sink's calls apply,
            // so a slow or failing Stripe can be shown to a Checkout as well.
            if let Some(failure) = injected_failure(shared).await {
                return failure.into();
            }
            billing(shared, |billing, store, now| {
                let customer = form.get("customer").unwrap_or_default();
                let reply =
                    billing.create_session(form, store.has_customer(customer), livemode, now);
                Ok((reply, Vec::new()))
            })
        }
        (&Method::GET, ["v1", "checkout", "sessions", id]) => {
            billing(shared, |billing, _, _| Ok((billing.get_session(id), Vec::new())))
        }
        (&Method::POST, ["v1", "checkout", "sessions", id, "expire"]) => {
            billing(shared, |billing, _, _| billing.expire_session(id))
        }
        (&Method::POST, ["v1", "refunds"]) => {
            billing(shared, |billing, _, now| billing.create_refund(form, now))
        }
        (&Method::POST, ["v1", "billing_portal", "sessions"]) => {
            billing(shared, |billing, store, now| {
                let customer = form.get("customer").unwrap_or_default();
                let reply =
                    billing.create_portal_session(form, store.has_customer(customer), livemode, now);
                Ok((reply, Vec::new()))
            })
        }
        (&Method::GET, ["v1", "invoices"]) => {
            billing(shared, |billing, _, _| Ok((billing.list_invoices(query), Vec::new())))
        }
        (&Method::GET, ["v1", "invoices", id]) => {
            billing(shared, |billing, _, _| Ok((billing.get_invoice(id), Vec::new())))
        }
        (&Method::POST, ["v1", "subscriptions"]) => billing(shared, |billing, store, now| {
            let customer = form.get("customer").unwrap_or_default();
            billing.create_subscription(form, store.has_customer(customer), livemode, now)
        }),
        (&Method::POST, ["v1", "subscriptions", id]) => {
            billing(shared, |billing, _, _| billing.update_subscription(id, form))
        }
        (&Method::DELETE, ["v1", "subscriptions", id]) => {
            billing(shared, |billing, _, now| billing.cancel_subscription(id, now))
        }
        (&Method::GET, ["v1", "subscriptions", id]) => billing(shared, |billing, _, _| {
            Ok((billing.get_subscription(id), Vec::new()))
        }),
        (&Method::POST, ["v1", "webhook_endpoints"]) => shared
            .webhooks
            .create_endpoint(form, livemode, shared.now())
            .into(),
        (&Method::GET, ["v1", "customers"]) => {
            read(shared, |store| store.list_customers(query)).await
        }
        (&Method::GET, ["v1", "customers", "search"]) => {
            read(shared, |store| store.search_customers(query)).await
        }
        (&Method::GET, ["v1", "customers", id]) => {
            read(shared, |store| store.get_customer(id)).await
        }
        (&Method::GET, ["v1", "billing", "meters"]) => {
            read(shared, |store| store.list_meters(query)).await
        }
        (&Method::GET, ["v2", "core", "events", id]) => shared.webhooks.thin_event(id).into(),
        (&Method::GET, ["v1", "billing", "meters", id, "event_summaries"]) => {
            read(shared, |store| store.summaries(id, query)).await
        }
        _ => Reply::not_found(
            format!("Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs or we can help at https://support.stripe.com/."),
            None,
        )
        .into(),
    }
}

/// A prices, subscriptions or invoices call: no injected faults (they exist for the sink's
/// calls); the events the change produced are published for delivery.
fn billing(
    shared: &EmulatorState,
    change: impl FnOnce(&mut Billing, &Store, i64) -> Result<(Reply, Vec<Change>), Reply>,
) -> Outcome {
    let now = shared.now();
    let changed = {
        let store = shared.store.lock().expect("store lock poisoned");
        change(
            &mut shared.billing.lock().expect("billing lock poisoned"),
            &store,
            now,
        )
    };
    match changed {
        Ok((reply, changes)) => {
            shared.webhooks.publish(changes, now);
            reply.into()
        }
        Err(reply) => reply.into(),
    }
}

/// The injected delay and 5xx, decided before the call does anything.
async fn injected_failure(shared: &EmulatorState) -> Option<Reply> {
    let faults = shared.faults.lock().expect("faults lock poisoned").clone();
    if shared.roll(faults.delay) {
        shared.count(|s| s.delayed += 1);
        tokio::time::sleep(Duration::from_millis(faults.delay_ms)).await;
    }
    if shared.roll(faults.error_500) {
        shared.count(|s| s.injected_500 += 1);
        return Some(Reply::error(
            500,
            "api_error",
            None,
            "An unknown error occurred (injected by stripe-emulator).",
            None,
        ));
    }
    if shared.roll(faults.error_503) {
        shared.count(|s| s.injected_503 += 1);
        return Some(Reply::error(
            503,
            "api_error",
            None,
            "Service unavailable (injected by stripe-emulator).",
            None,
        ));
    }
    None
}

fn dropped_after_commit(shared: &EmulatorState) -> bool {
    let probability = shared
        .faults
        .lock()
        .expect("faults lock poisoned")
        .drop_after_commit;
    shared.roll(probability)
}

async fn read(shared: &EmulatorState, answer: impl FnOnce(&Store) -> Reply) -> Outcome {
    if let Some(failure) = injected_failure(shared).await {
        return failure.into();
    }
    answer(&shared.store.lock().expect("store lock poisoned")).into()
}

async fn write(shared: &EmulatorState, commit: impl FnOnce(&mut Store, i64) -> Reply) -> Outcome {
    if let Some(failure) = injected_failure(shared).await {
        return failure.into();
    }
    let reply = commit(
        &mut shared.store.lock().expect("store lock poisoned"),
        shared.now(),
    );
    let drop_connection = reply.status == 200 && dropped_after_commit(shared);
    Outcome {
        reply,
        drop_connection,
    }
}

async fn meter_event(shared: &EmulatorState, form: &Form, livemode: bool) -> Outcome {
    let now = shared.now();
    let validated = shared
        .store
        .lock()
        .expect("store lock poisoned")
        .validate_meter_event(form, now);
    let event = match validated {
        Ok(event) => event,
        Err(reply) => return reply.into(),
    };
    let event_name = form.get("event_name").unwrap_or_default();
    // Held until the reply is built (and across the injected delay), so a second concurrent
    // call for the same customer and meter sees the 429 Stripe would send.
    let Some(_pair) = shared.pair_locks.try_lock(&event.customer, event_name) else {
        shared.count(|s| s.concurrency_limited += 1);
        return Reply::rate_limited(&format!(
            "Too many concurrent requests for customer {} and meter event {event_name}: send one at a time.",
            event.customer
        ))
        .into();
    };
    if let Some(failure) = injected_failure(shared).await {
        return failure.into();
    }
    let (reply, created) = shared.commit_event(event, livemode);
    let drop_connection = created && dropped_after_commit(shared);
    Outcome {
        reply,
        drop_connection,
    }
}

/// `POST /v2/billing/meter_event_stream`: a session's token, the account's events per second,
/// the request's shape; then each event is validated and committed or reported (`stream.rs`).
async fn meter_event_stream(shared: &EmulatorState, token: Option<&str>, body: &[u8]) -> Outcome {
    let now = shared.now();
    let session = match lock(&shared.stream_sessions).authenticate(token, now) {
        Ok(session) => session,
        Err(reply) => return reply.into(),
    };
    let events = match stream::parse_stream(body) {
        Ok(events) => events,
        Err(reply) => return reply.into(),
    };
    let admitted = lock(&shared.stream_window).admit_many(
        &session.api_key,
        events.len(),
        shared.stream_rate,
        Instant::now(),
    );
    if !admitted {
        shared.count(|s| s.rate_limited += 1);
        return Reply::rate_limited(&format!(
            "Meter event stream rate limit exceeded: this account may send {} events per second.",
            shared.stream_rate
        ))
        .into();
    }
    if let Some(failure) = injected_failure(shared).await {
        return failure.into();
    }
    let mut created = false;
    let mut refused = 0;
    for event in events {
        let checked = match event.timestamp {
            Some(Err(message)) => Err(("timestamp_invalid", message)),
            timestamp => lock(&shared.store)
                .check_meter_event(
                    Some(&event.event_name),
                    event.payload,
                    event.identifier.clone(),
                    timestamp.and_then(Result::ok),
                    now,
                )
                .map_err(|reply| {
                    let message = reply.error_field("message").unwrap_or_default();
                    let code = stream::error_code(reply.error_field("param").as_deref(), &message);
                    (code, message)
                }),
        };
        match checked {
            Ok(new) => created |= shared.commit_event(new, session.livemode).1,
            Err((code, message)) => {
                refused += 1;
                shared.webhooks.report_invalid_event(
                    code,
                    &message,
                    event.identifier.as_deref(),
                    session.livemode,
                    now,
                );
            }
        }
    }
    shared.count(|s| {
        s.stream_requests += 1;
        s.stream_events_refused += refused;
    });
    let drop_connection = created && dropped_after_commit(shared);
    Outcome {
        reply: Reply::json(200, &json!({})),
        drop_connection,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// `/_emulator/…`: state for tests and operators, fault switches, the clock.
fn control_api(shared: &EmulatorState, method: &Method, path: &str, body: &[u8]) -> Reply {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (&Method::GET, ["events"]) => {
            Reply::json(200, &json!({ "events": shared.webhooks.events() }))
        }
        (&Method::POST, ["events", id, "resend"]) => shared.webhooks.resend(id),
        (&Method::POST, ["subscriptions", id, "advance_period"]) => {
            billing(shared, |billing, store, _| {
                let usage = |meter: &str, customer: &str, start: i64, end: i64| {
                    store.metered_usage(meter, customer, start, end)
                };
                billing.advance_period(id, &usage)
            })
            .reply
        }
        (&Method::GET, [kind @ ("checkout" | "invoices" | "portal"), id]) => {
            let billing = shared.billing.lock().expect("billing lock poisoned");
            billing.page(kind, id)
        }
        (&Method::GET, ["invoices", id, "pdf"]) => shared
            .billing
            .lock()
            .expect("billing lock poisoned")
            .invoice_pdf(id),
        (&Method::POST, ["checkout", id, "complete"]) => {
            #[derive(serde::Deserialize)]
            struct Complete {
                #[serde(default = "card")]
                payment: Payer,
            }
            fn card() -> Payer {
                Payer::Card
            }
            let complete: Complete = if body.is_empty() {
                Complete {
                    payment: Payer::Card,
                }
            } else {
                match serde_json::from_slice(body) {
                    Ok(complete) => complete,
                    Err(error) => {
                        return Reply::invalid(
                            format!("complete: {error}; send {{\"payment\": \"card\"|\"async\"}}"),
                            None,
                        )
                    }
                }
            };
            billing(shared, |billing, _, now| {
                billing.complete_session(id, complete.payment, now)
            })
            .reply
        }
        (&Method::POST, ["checkout", id, "async_payment"]) => {
            #[derive(serde::Deserialize)]
            struct Settle {
                succeeded: bool,
            }
            match serde_json::from_slice::<Settle>(body) {
                Ok(settle) => {
                    billing(shared, |billing, _, _| {
                        billing.settle_async_payment(id, settle.succeeded)
                    })
                    .reply
                }
                Err(error) => Reply::invalid(
                    format!("async_payment: {error}; send {{\"succeeded\": true|false}}"),
                    None,
                ),
            }
        }
        (&Method::POST, ["payments", intent, "dispute"]) => {
            billing(shared, |billing, _, now| billing.dispute(intent, now)).reply
        }
        (&Method::POST, ["portal", id, "cancel"]) => {
            #[derive(serde::Deserialize)]
            struct Cancel {
                #[serde(default = "yes")]
                at_period_end: bool,
            }
            fn yes() -> bool {
                true
            }
            let cancel = serde_json::from_slice::<Cancel>(body).unwrap_or(Cancel {
                at_period_end: true,
            });
            billing(shared, |billing, _, now| {
                billing.portal_cancel(id, cancel.at_period_end, now)
            })
            .reply
        }
        (&Method::POST, ["customers", id, "card"]) => {
            #[derive(serde::Deserialize)]
            struct Card {
                declines: bool,
            }
            match serde_json::from_slice::<Card>(body) {
                Ok(card) => {
                    let mut billing = shared.billing.lock().expect("billing lock poisoned");
                    billing.set_card_declines(id, card.declines);
                    Reply::json(200, &json!({ "customer": id, "declines": card.declines }))
                }
                Err(error) => Reply::invalid(
                    format!("the body must be {{\"declines\": true|false}}: {error}"),
                    None,
                ),
            }
        }
        (&Method::POST, ["invoices", id, to]) => {
            billing(shared, |billing, _, now| {
                billing.change_invoice(id, to, now)
            })
            .reply
        }
        _ => control_settings(shared, method, path, body),
    }
}

fn control_settings(shared: &EmulatorState, method: &Method, path: &str, body: &[u8]) -> Reply {
    match (method, path) {
        (&Method::GET, "state") => {
            let stats = shared.stats.lock().expect("stats lock poisoned").clone();
            let faults = shared.faults.lock().expect("faults lock poisoned").clone();
            let totals = shared.store.lock().expect("store lock poisoned").totals();
            Reply::json(200, &json!({ "stats": stats, "faults": faults, "totals": totals, "now": shared.now() }))
        }
        (&Method::POST, "faults") => match serde_json::from_slice::<Faults>(body) {
            Ok(faults) => match faults.validate() {
                Ok(()) => {
                    *shared.faults.lock().expect("faults lock poisoned") = faults.clone();
                    Reply::json(200, &json!({ "faults": faults }))
                }
                Err(message) => Reply::invalid(message, None),
            },
            Err(error) => Reply::invalid(format!("faults: {error}"), None),
        },
        (&Method::POST, "clock") => {
            #[derive(serde::Deserialize)]
            struct Advance {
                advance_seconds: i64,
            }
            match serde_json::from_slice::<Advance>(body) {
                Ok(advance) => {
                    *shared.clock_offset.lock().expect("clock lock poisoned") += advance.advance_seconds;
                    Reply::json(200, &json!({ "now": shared.now() }))
                }
                Err(error) => Reply::invalid(format!("clock: {error}; send {{\"advance_seconds\": N}}"), None),
            }
        }
        _ => Reply::not_found(format!("no emulator control endpoint {method} /_emulator/{path}; try GET state, POST faults, POST clock, GET events, POST events/{{id}}/resend, POST subscriptions/{{id}}/advance_period"), None),
    }
}
