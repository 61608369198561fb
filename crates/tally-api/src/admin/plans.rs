//! `GET /v1/plans` and `GET /v1/plans/{name}`: the plans as `tally plans apply` last wrote
//! them from tally.toml (which stays the one way to change them).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::error::ApiError;
use crate::ApiState;

pub(crate) async fn list(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    let plans: Vec<serde_json::Value> = tally_billing::list_plans(&state.pool)
        .await?
        .into_iter()
        .map(|(_, definition)| definition)
        .collect();
    Ok(Json(json!({ "plans": plans })).into_response())
}

pub(crate) async fn get(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    match tally_billing::store::get_plan(&state.pool, &name).await? {
        Some(plan) => Ok(Json(plan).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "UNKNOWN_PLAN",
            format!("no plan {name:?}; plans come from [[plans]] in tally.toml, applied with `tally plans apply`"),
        )),
    }
}
