//! Reading usage: `GET /v1/customers/{id}/usage` and `GET /v1/customers/{id}/invoice-preview`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, NaiveTime, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::json;
use tally_core::Aggregation;
use tally_credits::{CreditError, RateCard};
use tally_db::ExactDecimal;

use crate::auth::ReadableCustomer;
use crate::error::ApiError;
use crate::ApiState;

/// Most buckets one usage request may ask for.
const MAX_BUCKETS: i64 = 10_000;
/// Most points (buckets × group keys) one usage request may return: a meter grouped by a
/// high-cardinality key cannot make one request read and send millions of rows.
const MAX_POINTS: usize = 10_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UsageQuery {
    meter: String,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    /// `minute`, `hour` (default) or `day`.
    #[serde(default)]
    granularity: Option<String>,
    /// `true`: one series per group key (e.g. per model); default: summed.
    #[serde(default)]
    group_by: Option<bool>,
}

/// `GET /v1/customers/{id}/usage?meter&from&to&granularity&group_by`: the customer's usage of
/// one meter in buckets, merged by the meter's aggregation.
pub(crate) async fn usage(
    State(state): State<Arc<ApiState>>,
    ReadableCustomer(customer): ReadableCustomer,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let aggregation = tally_db::meters::aggregation_of(&state.reader_pool, &query.meter)
        .await
        .map_err(internal)?;
    let Some(aggregation) = aggregation else {
        return Err(ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "UNKNOWN_METER",
            format!("unknown meter {:?}", query.meter),
        ));
    };
    let granularity = query.granularity.as_deref().unwrap_or("hour");
    let bucket_seconds = match granularity {
        "minute" => 60,
        "hour" => 3600,
        "day" => 86_400,
        other => {
            return Err(ApiError::invalid(format!(
                "granularity {other:?}: use minute, hour or day"
            )))
        }
    };
    if query.to <= query.from {
        return Err(ApiError::invalid("`to` must be after `from`"));
    }
    let buckets = (query.to - query.from).num_seconds() / bucket_seconds + 1;
    if buckets > MAX_BUCKETS {
        return Err(ApiError::invalid(format!(
            "{buckets} {granularity} buckets requested; at most {MAX_BUCKETS}: narrow the range or use a coarser granularity"
        )));
    }
    let grouped = query.group_by.unwrap_or(false);
    // Minute and hour buckets read the minute windows, day buckets the daily rollup. A distinct
    // count cannot be added up, so unique_count recounts the stored distinct values instead.
    let day = "(day::timestamp AT TIME ZONE 'UTC')";
    let (table, time) = match (aggregation == Aggregation::UniqueCount, granularity) {
        (false, "day") => ("usage_daily", day),
        (false, _) => ("usage_minute", "window_start"),
        (true, "day") => ("usage_daily_values", day),
        (true, _) => ("usage_minute_values", "window_start"),
    };
    let merge = match aggregation {
        Aggregation::Max => "max(value)",
        Aggregation::Latest => {
            "(array_agg(value ORDER BY latest_at DESC NULLS LAST, latest_id DESC))[1]"
        }
        Aggregation::UniqueCount => "count(DISTINCT value)::numeric",
        Aggregation::Sum | Aggregation::Count => "sum(value)",
    };
    let bucket = if granularity == "hour" {
        format!("date_bin('1 hour', {time}, timestamptz '2000-01-01 00:00:00+00')")
    } else {
        time.to_owned()
    };
    let group = if grouped { "group_key" } else { "''" };
    let sql = format!(
        "SELECT {bucket} AS bucket, {group}::text AS group_key, {merge} AS value
         FROM {table}
         WHERE customer_id = $1 AND meter = $2 AND {time} >= $3 AND {time} < $4
         GROUP BY 1, 2 ORDER BY 2, 1 LIMIT {}",
        MAX_POINTS + 1
    );
    let rows: Vec<(DateTime<Utc>, String, Option<ExactDecimal>)> = sqlx::query_as(&sql)
        .bind(&customer)
        .bind(&query.meter)
        .bind(query.from)
        .bind(query.to)
        .fetch_all(&state.reader_pool)
        .await
        .map_err(internal)?;
    if rows.len() > MAX_POINTS {
        return Err(ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "RESULT_TOO_LARGE",
            format!("more than {MAX_POINTS} points (buckets × group keys); narrow the range, use a coarser granularity or leave out group_by"),
        ));
    }
    let mut series: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for (bucket, group_key, value) in rows {
        series
            .entry(group_key)
            .or_default()
            .push(json!({ "start": bucket, "value": value.unwrap_or_default().0 }));
    }
    let series: Vec<serde_json::Value> = series
        .into_iter()
        .map(|(group_key, points)| json!({ "group_key": group_key, "points": points }))
        .collect();
    Ok(Json(json!({
        "customer": customer, "meter": query.meter, "aggregation": aggregation,
        "granularity": granularity, "from": query.from, "to": query.to, "series": series,
    }))
    .into_response())
}

/// `GET /v1/customers/{id}/invoice-preview`: usage in the current billing period × the plan's
/// unit prices (sum and count meters with a `unit_price`), less the usage prepaid credits paid
/// for.
pub(crate) async fn invoice_preview(
    State(state): State<Arc<ApiState>>,
    ReadableCustomer(customer): ReadableCustomer,
) -> Result<Response, ApiError> {
    Ok(Json(invoice_preview_of(&state, &customer).await?).into_response())
}

/// The invoice preview's body (also part of `GET /v1/customers/{id}`).
pub(crate) async fn invoice_preview_of(
    state: &ApiState,
    customer: &str,
) -> Result<serde_json::Value, ApiError> {
    let (subscription, entitlements) = state.quota.entitlements(customer).await?;
    // Usage is summed over whole UTC days of the period (`usage_daily`); credits are counted
    // over the same days, so that the credited part of a line is a part of its quantity.
    let days = |at: DateTime<Utc>| at.date_naive().and_time(NaiveTime::MIN).and_utc();
    let (days_from, days_to) = (
        days(subscription.current_period_start),
        days(subscription.current_period_end),
    );
    let credits =
        tally_credits::applied_in_period(&state.reader_pool, customer, days_from, days_to).await?;
    let rates = RateCard::load(&state.reader_pool)
        .await
        .map_err(CreditError::Store)?;
    let balance = tally_credits::balance(&state.reader_pool, customer, &rates, Utc::now()).await?;
    let mut lines = Vec::new();
    let mut total = Decimal::ZERO;
    for (meter, limit) in &entitlements.limits {
        let Some(unit_price) = limit.unit_price else {
            continue;
        };
        let quantity: Option<ExactDecimal> = sqlx::query_scalar(
            "SELECT sum(d.value) FROM usage_daily d JOIN meters m ON m.name = d.meter
             WHERE d.customer_id = $1 AND d.meter = $2 AND d.day >= $3::date AND d.day < $4::date
               AND m.aggregation IN ('sum', 'count')",
        )
        .bind(customer)
        .bind(meter)
        .bind(days_from.date_naive())
        .bind(days_to.date_naive())
        .fetch_one(&state.reader_pool)
        .await
        .map_err(internal)?;
        let quantity = quantity.unwrap_or_default().0;
        let out_of_range = || {
            ApiError::new(
                axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                "USAGE_OUT_OF_RANGE",
                format!("the usage of {meter} times its unit price is beyond what a 28-digit decimal holds; the preview cannot be computed exactly"),
            )
        };
        // At most the quantity: whatever the ledger holds, credits never make a line negative.
        let credited = credits
            .per_meter
            .get(meter)
            .map_or(Decimal::ZERO, |c| c.quantity)
            .min(quantity);
        let amount = (quantity - credited)
            .checked_mul(unit_price)
            .ok_or_else(out_of_range)?;
        total = total.checked_add(amount).ok_or_else(out_of_range)?;
        lines.push(json!({
            "meter": meter, "quantity": quantity, "credited_quantity": credited,
            "unit_price": unit_price, "amount": amount,
        }));
    }
    Ok(json!({
        "customer": customer, "plan": entitlements.plan,
        "period_start": subscription.current_period_start, "period_end": subscription.current_period_end,
        "lines": lines, "total": total,
        "credits": { "applied": credits.applied, "uncovered": credits.uncovered, "balance": balance.projected },
    }))
}

fn internal(error: sqlx::Error) -> ApiError {
    if tally_db::is_data_error(&error) {
        return ApiError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "USAGE_OUT_OF_RANGE",
            "this customer's usage is beyond what a 28-digit decimal holds and cannot be shown exactly",
        )
        .with_detail(format!("reading usage: {error}"));
    }
    if tally_db::is_statement_timeout(&error) {
        return ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "QUERY_TOO_EXPENSIVE",
            "the usage query ran longer than the server allows; narrow the range or use a coarser granularity",
        )
        .with_detail(format!("reading usage: {error}"));
    }
    ApiError::unavailable("STORE_UNAVAILABLE", format!("reading usage: {error}"))
}
