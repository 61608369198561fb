//! Webhook endpoints and event delivery, signed the way Stripe signs: header
//! `Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>" with the endpoint secret>`.
//!
//! Each endpoint has its own delivery queue: an event's first attempt goes out in the order the
//! events happened; one that fails (an answer other than 2xx, or none within
//! `DELIVERY_TIMEOUT`) is retried with backoff on its own while later events go out, until the
//! endpoint answers 2xx or the attempts run out (Stripe keeps trying for three days; the
//! emulator for `DELIVERY_ATTEMPTS`). So, as from Stripe, an endpoint that refuses an event
//! sees later ones first, and a slow endpoint holds back no other. `resend` delivers an event
//! again, which is how tests produce replays.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hmac::{KeyInit, Mac};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde_json::json;
use tokio::sync::mpsc;

use crate::billing::Change;
use crate::reply::Reply;
use crate::store::Form;

/// Delivery attempts per event before the emulator gives up on it.
const DELIVERY_ATTEMPTS: u32 = 8;
/// How long an endpoint has to answer one delivery before it counts as failed.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// The API version the event objects are rendered in.
const API_VERSION: &str = "2026-09-30.endive";

struct Endpoint {
    enabled_events: Vec<String>,
    /// The endpoint's own delivery queue (indices into the events).
    queue: mpsc::UnboundedSender<usize>,
}

impl Endpoint {
    fn wants(&self, event_type: &str) -> bool {
        self.enabled_events
            .iter()
            .any(|e| e == "*" || e == event_type)
    }
}

/// One event and what became of its deliveries.
#[derive(Debug, Clone, Serialize)]
pub struct EventRecord {
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub created: i64,
    /// The body as sent.
    #[serde(skip)]
    pub body: String,
    pub attempts: u32,
    /// The last HTTP status the endpoint answered (0: no answer).
    pub last_status: u16,
    pub delivered: bool,
}

#[derive(Default)]
struct State {
    endpoints: Vec<Endpoint>,
    events: Vec<EventRecord>,
    /// Thin (v2) events in full, as `GET /v2/core/events/{id}` answers them.
    thin: std::collections::HashMap<String, serde_json::Value>,
    next_id: u64,
}

/// Endpoints (each with its delivery task) and the event log.
pub(crate) struct Webhooks {
    state: Mutex<State>,
    /// Itself, for the delivery tasks of endpoints created later.
    me: std::sync::Weak<Webhooks>,
}

impl Webhooks {
    pub(crate) fn start() -> Arc<Webhooks> {
        Arc::new_cyclic(|me| Webhooks {
            state: Mutex::new(State::default()),
            me: me.clone(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("webhook lock poisoned")
    }

    /// Queues an event for every endpoint that wants it.
    fn enqueue(state: &State, index: usize) {
        let event_type = &state.events[index].event_type;
        for endpoint in state.endpoints.iter().filter(|e| e.wants(event_type)) {
            let _ = endpoint.queue.send(index);
        }
    }

    /// `POST /v1/webhook_endpoints`: `url`, `enabled_events[]` (default every event). The
    /// answer carries the signing `secret`, as Stripe's does on creation only.
    pub(crate) fn create_endpoint(&self, form: &Form, livemode: bool, now: i64) -> Reply {
        let Some(url) = form.get("url") else {
            return Reply::missing("url");
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Reply::invalid(format!("Invalid URL: {url}"), Some("url"));
        }
        let mut enabled_events = form.array("enabled_events");
        if enabled_events.is_empty() {
            enabled_events.push("*".into());
        }
        let mut state = self.state();
        state.next_id += 1;
        let id = format!("we_emw{:010}", state.next_id);
        let secret = format!("whsec_{}", random_hex(32));
        let reply = Reply::json(
            200,
            &json!({
                "id": id, "object": "webhook_endpoint", "url": url, "secret": secret,
                "enabled_events": enabled_events, "status": "enabled", "livemode": livemode,
                "created": now, "api_version": API_VERSION, "metadata": {},
            }),
        );
        let (queue, deliveries) = mpsc::unbounded_channel();
        let target = Target {
            url: url.to_owned(),
            secret,
            took: Default::default(),
        };
        tokio::spawn(deliver(self.me.clone(), target, deliveries));
        state.endpoints.push(Endpoint {
            enabled_events,
            queue,
        });
        reply
    }

    /// Records the events of a change and queues their delivery.
    pub(crate) fn publish(&self, changes: Vec<Change>, created: i64) {
        let mut state = self.state();
        for change in changes {
            let livemode = change.object["livemode"].as_bool().unwrap_or(false);
            state.next_id += 1;
            let id = format!("evt_emw{:010}", state.next_id);
            let mut data = json!({ "object": change.object });
            if let Some(previous) = change.previous_attributes {
                data["previous_attributes"] = previous;
            }
            let body = json!({
                "id": id, "object": "event", "api_version": API_VERSION, "created": created,
                "livemode": livemode, "pending_webhooks": state.endpoints.len(),
                "request": { "id": null, "idempotency_key": null },
                "type": change.event_type, "data": data,
            })
            .to_string();
            state.events.push(EventRecord {
                id,
                event_type: change.event_type.to_owned(),
                created,
                body,
                attempts: 0,
                last_status: 0,
                delivered: false,
            });
            Self::enqueue(&state, state.events.len() - 1);
        }
    }

    /// A meter event was accepted for an event name no meter takes. Stripe reports that
    /// asynchronously with the thin event `v1.billing.meter.no_meter_found`: endpoints receive
    /// `{id, object: "v2.core.event", type, created, …}` and fetch the details from
    /// `GET /v2/core/events/{id}`.
    pub(crate) fn report_no_meter(
        &self,
        event_name: &str,
        identifier: Option<&str>,
        livemode: bool,
        now: i64,
    ) {
        let message = format!("No active meter was found for event_name `{event_name}`.");
        let report = MeterErrorReport {
            event_type: "v1.billing.meter.no_meter_found",
            code: "no_meter",
            message: &message,
            identifier,
        };
        self.report_meter_error(&report, livemode, now);
    }

    /// Reports an accepted meter event that Stripe then refused (the v2 stream's validation):
    /// the thin event `v1.billing.meter.error_report_triggered`.
    pub(crate) fn report_invalid_event(
        &self,
        code: &str,
        message: &str,
        identifier: Option<&str>,
        livemode: bool,
        now: i64,
    ) {
        let report = MeterErrorReport {
            event_type: "v1.billing.meter.error_report_triggered",
            code,
            message,
            identifier,
        };
        self.report_meter_error(&report, livemode, now);
    }

    fn report_meter_error(&self, report: &MeterErrorReport<'_>, livemode: bool, now: i64) {
        let MeterErrorReport {
            event_type,
            code,
            message,
            identifier,
        } = *report;
        let created = chrono::DateTime::from_timestamp(now, 0)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut state = self.state();
        state.next_id += 1;
        let id = format!("evt_emt{:010}", state.next_id);
        let thin = json!({
            "id": id, "object": "v2.core.event", "type": event_type,
            "created": created, "livemode": livemode, "context": null, "reason": null,
            "related_object": null,
        });
        let mut full = thin.clone();
        full["data"] = json!({
            "developer_message_summary": message,
            "reason": {
                "error_count": 1,
                "error_types": [{
                    "code": code,
                    "error_count": 1,
                    "sample_errors": [{
                        "error_message": message,
                        "request": { "identifier": identifier },
                    }],
                }],
            },
            "validation_start": created,
            "validation_end": created,
        });
        state.thin.insert(id.clone(), full);
        state.events.push(EventRecord {
            id,
            event_type: event_type.into(),
            created: now,
            body: thin.to_string(),
            attempts: 0,
            last_status: 0,
            delivered: false,
        });
        Self::enqueue(&state, state.events.len() - 1);
    }

    /// `GET /v2/core/events/{id}`: a thin event with its data.
    pub(crate) fn thin_event(&self, id: &str) -> Reply {
        match self.state().thin.get(id) {
            Some(event) => Reply::json(200, event),
            None => Reply::not_found(format!("No such event: '{id}'"), Some("id")),
        }
    }

    /// Delivers an event again (a replay, or an old event after newer ones).
    pub(crate) fn resend(&self, event_id: &str) -> Reply {
        let state = self.state();
        match state.events.iter().position(|e| e.id == event_id) {
            Some(index) => {
                Self::enqueue(&state, index);
                Reply::json(200, &json!({ "queued": event_id }))
            }
            None => Reply::not_found(format!("No such event: '{event_id}'"), Some("id")),
        }
    }

    pub(crate) fn events(&self) -> Vec<EventRecord> {
        self.state().events.clone()
    }
}

/// `t=<unix>,v1=<hex>` for `body`, as Stripe computes it.
pub fn signature_header(secret: &str, timestamp: i64, body: &str) -> String {
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(format!("{timestamp}.{body}").as_bytes());
    format!(
        "t={timestamp},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

fn random_hex(bytes: usize) -> String {
    let random: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    hex::encode(random)
}

/// Where an endpoint's deliveries go, the secret they are signed with, and the events it took
/// (so a retry stops once a resend got through).
#[derive(Clone)]
struct Target {
    url: String,
    secret: String,
    took: Arc<Mutex<std::collections::HashSet<usize>>>,
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// An endpoint's delivery task: each event's first attempt in the order the events happened;
/// an event that fails is retried on its own schedule while later events go out.
async fn deliver(
    webhooks: std::sync::Weak<Webhooks>,
    target: Target,
    mut deliveries: mpsc::UnboundedReceiver<usize>,
) {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    while let Some(index) = deliveries.recv().await {
        if attempt(&webhooks, &client, &target, index).await {
            continue;
        }
        let (webhooks, client, target) = (webhooks.clone(), client.clone(), target.clone());
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            for _ in 1..DELIVERY_ATTEMPTS {
                tokio::time::sleep(backoff).await;
                let took = target
                    .took
                    .lock()
                    .expect("took lock poisoned")
                    .contains(&index);
                if took || attempt(&webhooks, &client, &target, index).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(3));
            }
        });
    }
}

/// Sends the event once and records the answer; whether the endpoint took it (2xx in time).
/// `true` as well once the emulator is gone (nothing left to retry).
async fn attempt(
    webhooks: &std::sync::Weak<Webhooks>,
    client: &HttpClient,
    target: &Target,
    index: usize,
) -> bool {
    let Some(body) = webhooks
        .upgrade()
        .map(|w| w.state().events[index].body.clone())
    else {
        return true;
    };
    // Signed with the real clock, as Stripe signs at sending time.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let request = hyper::Request::post(&target.url)
        .header("content-type", "application/json; charset=utf-8")
        .header(
            "user-agent",
            "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
        )
        .header(
            "stripe-signature",
            signature_header(&target.secret, now, &body),
        )
        .body(Full::new(Bytes::from(body)));
    let status = match request {
        Ok(request) => {
            match tokio::time::timeout(DELIVERY_TIMEOUT, client.request(request)).await {
                Ok(Ok(response)) => response.status().as_u16(),
                _ => 0,
            }
        }
        Err(_) => 0,
    };
    let delivered = (200..300).contains(&status);
    if delivered {
        target
            .took
            .lock()
            .expect("took lock poisoned")
            .insert(index);
    }
    let Some(webhooks) = webhooks.upgrade() else {
        return true;
    };
    let mut state = webhooks.state();
    let record = &mut state.events[index];
    record.attempts += 1;
    record.last_status = status;
    record.delivered |= delivered;
    delivered
}

/// One meter error report: its thin event's type, Stripe's error code, and the event it names.
#[derive(Clone, Copy)]
struct MeterErrorReport<'a> {
    event_type: &'a str,
    code: &'a str,
    message: &'a str,
    identifier: Option<&'a str>,
}
