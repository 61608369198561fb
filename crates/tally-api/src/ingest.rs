//! `POST /v1/events`: usage from services not written in Rust, through the same emitter.
//!
//! A batch's life: each event is decoded and checked by the wire rules the aggregator uses
//! (native or CloudEvents; `id` and `timestamp` may be left out and are then assigned here);
//! refused events are stored in `rejected_events` (`received_via = 'http'`) before anything
//! else happens; the rest go to the emitter, and the answer waits until each is acknowledged by
//! Kafka or fsynced in the spool. So "accepted" means durable, and a failed request emitted
//! nothing unless it says otherwise.
//!
//! The meter is checked by the aggregator, against its `[[meters]]`: an unknown meter ends up
//! in `rejected_events` there.
//!
//! Answers: 200 when every event is accepted, 207 when some are not (read each result; retry
//! only `unavailable` ones, with the same ids), 400 for a body that is not a batch, 403 for a
//! token whose scope is not `ingest` or `admin`, 503 when ingest is not configured or the rejects cannot be stored.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tally_core::reject::printable;
use tally_core::{wire, Rejection};
use tally_db::rejects::{Received, Rejected};
use tally_emitter::{Durability, EmitError};

use crate::error::{json_body, ApiError};
use crate::{telemetry, ApiState};

/// Most events in one request.
pub const MAX_BATCH: usize = 1_000;
/// How long a request waits for its events to be acknowledged by Kafka or fsynced in the
/// spool; longer, and they are answered `unavailable` (retry with the same ids).
const DURABLE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct IngestRequest {
    /// Kept as the JSON text received: quantities are read from their digits by the wire
    /// rules, never through `f64`, and a refused event is stored byte for byte.
    events: Vec<Box<RawValue>>,
}

/// One event's result, in request order.
#[derive(Debug, Serialize)]
struct EventResult {
    index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    /// accepted | rejected (fix the event; it is in rejected_events) | unavailable (retry it
    /// later with the same id).
    status: &'static str,
    /// published (acknowledged by Kafka) | spooled (fsynced on this server's disk).
    #[serde(skip_serializing_if = "Option::is_none")]
    durability: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

pub(crate) async fn ingest(
    State(state): State<Arc<ApiState>>,
    body: Result<Json<IngestRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Some(emitter) = &state.emitter else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "INGEST_DISABLED",
            "this server has no Kafka to send events to; set kafka.brokers (TALLY_KAFKA_BROKERS) for `tally serve`",
        ));
    };
    let Json(request) = json_body(body)?;
    if request.events.len() > MAX_BATCH {
        return Err(ApiError::invalid(format!(
            "{} events in one request; send at most {MAX_BATCH}",
            request.events.len()
        )));
    }

    let now = Utc::now();
    let mut rejects = Vec::new();
    let mut valid = Vec::new();
    let mut new_id = || uuid::Uuid::now_v7().to_string();
    for (index, raw) in request.events.iter().enumerate() {
        match wire::decode_filling(raw.get().as_bytes(), now, &mut new_id) {
            Ok(event) => valid.push((index, event)),
            Err(rejection) => rejects.push(Reject::new(index, raw, rejection)),
        }
    }
    // Stored before anything is emitted: if this fails, the request changed nothing.
    store_rejects(&state.pool, &rejects).await?;

    let emitted = futures_util::future::join_all(valid.into_iter().map(|(index, event)| {
        let id = event.id.clone();
        async move {
            (
                index,
                id,
                emitter.emit_durable(event, DURABLE_DEADLINE).await,
            )
        }
    }))
    .await;

    let mut results: Vec<EventResult> = rejects
        .into_iter()
        .map(|reject| EventResult {
            index: reject.index,
            id: reject.id,
            status: "rejected",
            durability: None,
            code: Some(reject.rejection.reason.code()),
            message: Some(reject.rejection.detail),
        })
        .collect();
    for (index, id, outcome) in emitted {
        let (status, durability, code, message) = match outcome {
            Ok(Durability::Published) => ("accepted", Some("published"), None, None),
            Ok(Durability::Spooled) => ("accepted", Some("spooled"), None, None),
            Err(EmitError::Invalid(rejection)) => (
                "rejected",
                None,
                Some(rejection.reason.code()),
                Some(rejection.detail),
            ),
            Err(error @ EmitError::Overloaded) => (
                "unavailable",
                None,
                Some("EMITTER_OVERLOADED"),
                Some(error.to_string()),
            ),
            Err(error @ EmitError::Closed) => (
                "unavailable",
                None,
                Some("SHUTTING_DOWN"),
                Some(error.to_string()),
            ),
            Err(error @ EmitError::NotDurable(_)) => {
                // The disk's own words are for the operator, not the client.
                tracing::error!(event = %id, %error, "an event posted to /v1/events could not be made durable");
                (
                    "unavailable",
                    None,
                    Some("SPOOL_FAILED"),
                    Some("the event could not be made durable on this server; retry with the same id".to_owned()),
                )
            }
            Err(error @ EmitError::Timeout(_)) => (
                "unavailable",
                None,
                Some("DURABILITY_TIMEOUT"),
                Some(error.to_string()),
            ),
        };
        results.push(EventResult {
            index,
            id: Some(id),
            status,
            durability,
            code,
            message,
        });
    }
    results.sort_by_key(|r| r.index);

    let count = |status| results.iter().filter(|r| r.status == status).count();
    let (accepted, rejected, unavailable) =
        (count("accepted"), count("rejected"), count("unavailable"));
    telemetry::ingested("accepted", accepted as u64);
    telemetry::ingested("rejected", rejected as u64);
    telemetry::ingested("unavailable", unavailable as u64);
    let status = if accepted == results.len() {
        StatusCode::OK
    } else {
        StatusCode::MULTI_STATUS
    };
    let body = Json(serde_json::json!({
        "accepted": accepted, "rejected": rejected, "unavailable": unavailable,
        "results": results,
    }));
    Ok((status, body).into_response())
}

/// A refused event, bound for `rejected_events`.
struct Reject {
    index: usize,
    /// The event as received.
    raw: Vec<u8>,
    id: Option<String>,
    customer: Option<String>,
    meter: Option<String>,
    rejection: Rejection,
}

impl Reject {
    /// Keeps the event as received, byte for byte, and what can be read of it (made printable:
    /// a refused event may carry a NUL, which Postgres `text` cannot hold).
    fn new(index: usize, raw: &RawValue, rejection: Rejection) -> Reject {
        let fields: Map<String, Value> = serde_json::from_str(raw.get()).unwrap_or_default();
        let field = |names: &[&str]| {
            names
                .iter()
                .find_map(|name| fields.get(*name).and_then(Value::as_str))
                .map(|text| printable(text.to_owned()))
        };
        Reject {
            index,
            raw: raw.get().as_bytes().to_vec(),
            id: field(&["id"]),
            customer: field(&["customer", "subject"]),
            meter: field(&["meter", "type"]),
            rejection,
        }
    }
}

async fn store_rejects(pool: &sqlx::PgPool, rejects: &[Reject]) -> Result<(), ApiError> {
    if rejects.is_empty() {
        return Ok(());
    }
    let rows: Vec<Rejected<'_>> = rejects
        .iter()
        .map(|r| Rejected {
            reason: r.rejection.reason.code(),
            detail: &r.rejection.detail,
            event_id: r.id.as_deref(),
            customer: r.customer.as_deref(),
            meter: r.meter.as_deref(),
            raw: &r.raw,
            received: Received::Http,
        })
        .collect();
    tally_db::rejects::insert(pool, &rows)
        .await
        .map_err(|error| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "STORE_UNAVAILABLE",
                "cannot store the refused events, so nothing was emitted; retry the request",
            )
            .with_detail(format!("storing rejected events: {error}"))
        })?;
    Ok(())
}
