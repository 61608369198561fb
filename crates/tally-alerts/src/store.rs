//! The alert tables' one owner: customers' rules, endpoints, firings and deliveries, as the
//! API reads and changes them. (The evaluator and the sender write firings and deliveries in
//! `evaluate.rs` and `deliver.rs`.)

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;
use tally_billing::AlertRule;
use tally_db::ExactDecimal;

use crate::destination::Destinations;

/// Event type of a usage rule's crossing (in firings, deliveries and endpoint filters).
pub const USAGE_CROSSED: &str = "usage.threshold_crossed";
/// Event type of a balance rule's crossing.
pub const BALANCE_BELOW: &str = "credits.balance_below";

/// Why an alert operation was refused; [`AlertError::code`] is its stable API code.
#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error("{0}")]
    Invalid(String),
    #[error("customer {customer:?} has no alert rule {rule_id}; list them with GET /v1/customers/{{id}}/alerts")]
    NoSuchRule { customer: String, rule_id: i64 },
    #[error("no alert endpoint {0}; list them with GET /v1/alerts/endpoints")]
    NoSuchEndpoint(i64),
    #[error("there are {0} alert endpoints already, the most there may be; delete one you no longer use, or limit endpoints to customers and event types instead of adding one per customer")]
    TooManyEndpoints(i64),
    #[error("{0}")]
    Store(#[from] sqlx::Error),
    /// What a rule is evaluated against could not be read (usage, plans).
    #[error("{0}")]
    Read(String),
}

impl AlertError {
    pub fn code(&self) -> &'static str {
        match self {
            AlertError::Invalid(_) => "INVALID_ALERT",
            AlertError::NoSuchRule { .. } => "NO_SUCH_ALERT_RULE",
            AlertError::NoSuchEndpoint(_) => "NO_SUCH_ENDPOINT",
            AlertError::TooManyEndpoints(_) => "TOO_MANY_ENDPOINTS",
            AlertError::Store(_) | AlertError::Read(_) => "STORE_UNAVAILABLE",
        }
    }

    pub fn http_status(&self) -> u16 {
        match self {
            AlertError::Invalid(_) => 400,
            AlertError::NoSuchRule { .. } | AlertError::NoSuchEndpoint(_) => 404,
            AlertError::TooManyEndpoints(_) => 409,
            AlertError::Store(_) | AlertError::Read(_) => 503,
        }
    }
}

/// A customer's own alert rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CustomerRule {
    pub rule_id: i64,
    pub customer: String,
    #[serde(flatten)]
    pub rule: AlertRule,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
}

type RuleRow = (
    i64,
    String,
    Option<String>,
    Option<ExactDecimal>,
    Option<ExactDecimal>,
    String,
    DateTime<Utc>,
);

fn rule_of(row: RuleRow) -> CustomerRule {
    let (rule_id, customer, meter, percent, below, created_by, created_at) = row;
    CustomerRule {
        rule_id,
        customer,
        rule: AlertRule {
            meter,
            percent: percent.map(|p| p.0),
            credit_balance_below: below.map(|b| b.0),
        },
        created_by,
        created_at,
    }
}

const RULE_COLUMNS: &str = "rule_id, customer_id, meter, percent, below, created_by, created_at";

/// Adds a rule for one customer. `meters` are the known meters (a usage rule must name one).
pub async fn create_rule(
    pool: &PgPool,
    customer: &str,
    rule: &AlertRule,
    meters: &[String],
    actor: &str,
) -> Result<CustomerRule, AlertError> {
    tally_core::event::validate_customer(customer)
        .map_err(|rejection| AlertError::Invalid(rejection.detail))?;
    rule.validate(meters).map_err(AlertError::Invalid)?;
    let kind = if rule.meter.is_some() {
        "usage"
    } else {
        "credit_balance"
    };
    let mut tx = pool.begin().await?;
    let row: RuleRow = sqlx::query_as(&format!(
        "INSERT INTO alert_rules (customer_id, kind, meter, percent, below, created_by)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING {RULE_COLUMNS}"
    ))
    .bind(customer)
    .bind(kind)
    .bind(&rule.meter)
    .bind(rule.percent)
    .bind(rule.credit_balance_below)
    .bind(actor)
    .fetch_one(&mut *tx)
    .await?;
    // Evaluated at once, not at the customer's next usage.
    tally_db::changes::record(&mut tx, &[customer]).await?;
    tx.commit().await?;
    Ok(rule_of(row))
}

/// The customer's own rules (not its plan's).
pub async fn list_rules(pool: &PgPool, customer: &str) -> Result<Vec<CustomerRule>, AlertError> {
    let rows: Vec<RuleRow> = sqlx::query_as(&format!(
        "SELECT {RULE_COLUMNS} FROM alert_rules WHERE customer_id = $1 ORDER BY rule_id"
    ))
    .bind(customer)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(rule_of).collect())
}

/// The rules of several customers, for the evaluator.
pub(crate) async fn rules_of(
    pool: &PgPool,
    customers: &[String],
) -> Result<Vec<CustomerRule>, sqlx::Error> {
    let rows: Vec<RuleRow> = sqlx::query_as(&format!(
        "SELECT {RULE_COLUMNS} FROM alert_rules WHERE customer_id = ANY($1) ORDER BY rule_id"
    ))
    .bind(customers)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(rule_of).collect())
}

pub async fn delete_rule(pool: &PgPool, customer: &str, rule_id: i64) -> Result<(), AlertError> {
    let deleted = sqlx::query("DELETE FROM alert_rules WHERE customer_id = $1 AND rule_id = $2")
        .bind(customer)
        .bind(rule_id)
        .execute(pool)
        .await?;
    if deleted.rows_affected() == 0 {
        return Err(AlertError::NoSuchRule {
            customer: customer.to_owned(),
            rule_id,
        });
    }
    Ok(())
}

/// Where alerts are delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Endpoint {
    pub endpoint_id: i64,
    pub url: String,
    pub description: Option<String>,
    /// Only these customers' alerts (`None`: every customer's).
    pub customers: Option<Vec<String>>,
    /// Only these event types (`None`: all).
    pub event_types: Option<Vec<String>>,
    /// Until when the secret a rotation replaced still signs too.
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
    /// Deliveries that failed in a row; at [`crate::deliver::BREAKER_FAILURES`] the endpoint
    /// is left alone until `open_until`.
    pub consecutive_failures: i32,
    pub open_until: Option<DateTime<Utc>>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
}

const ENDPOINT_COLUMNS: &str = "endpoint_id, url, description, customers, event_types,
    previous_secret_expires_at, consecutive_failures, open_until, created_by, created_at";

/// Live endpoints at most: every firing is queued for each endpoint it concerns, so the
/// number bounds the work one crossing makes.
pub const MAX_ENDPOINTS: i64 = 50;
/// Customers one endpoint may be limited to at most.
pub const MAX_ENDPOINT_CUSTOMERS: usize = 1000;

/// What a new endpoint is.
#[derive(Debug, Clone, Default)]
pub struct NewEndpoint<'a> {
    pub url: &'a str,
    pub description: Option<&'a str>,
    pub customers: Option<Vec<String>>,
    pub event_types: Option<Vec<String>>,
}

/// Registers an endpoint; the answer holds its signing secret, the only time it is shown.
/// `destinations` is where deliveries may go (`[alerts]`).
pub async fn create_endpoint(
    pool: &PgPool,
    destinations: &Destinations,
    new: &NewEndpoint<'_>,
    actor: &str,
) -> Result<(Endpoint, String), AlertError> {
    destinations
        .check_url(new.url)
        .map_err(AlertError::Invalid)?;
    if new
        .description
        .is_some_and(|d| d.chars().count() > 1000 || d.chars().any(char::is_control))
    {
        return Err(AlertError::Invalid(
            "description must be at most 1000 printable characters".into(),
        ));
    }
    if let Some(customers) = &new.customers {
        if customers.is_empty() || customers.len() > MAX_ENDPOINT_CUSTOMERS {
            return Err(AlertError::Invalid(format!(
                "customers: 1 to {MAX_ENDPOINT_CUSTOMERS} customer ids, or leave it out for every customer"
            )));
        }
        for customer in customers {
            tally_core::event::validate_customer(customer).map_err(|rejection| {
                AlertError::Invalid(format!("customers: {}", rejection.detail))
            })?;
        }
    }
    if let Some(types) = &new.event_types {
        if types.is_empty()
            || types
                .iter()
                .any(|t| ![USAGE_CROSSED, BALANCE_BELOW].contains(&t.as_str()))
        {
            return Err(AlertError::Invalid(format!(
                "event_types: one or both of {USAGE_CROSSED} and {BALANCE_BELOW}, or leave it out for both"
            )));
        }
    }
    let secret = new_secret();
    let mut tx = pool.begin().await?;
    // One registration at a time, so the count below is exact.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('tally.alert_endpoints'))")
        .execute(&mut *tx)
        .await?;
    let live: i64 =
        sqlx::query_scalar("SELECT count(*) FROM alert_endpoints WHERE deleted_at IS NULL")
            .fetch_one(&mut *tx)
            .await?;
    if live >= MAX_ENDPOINTS {
        return Err(AlertError::TooManyEndpoints(MAX_ENDPOINTS));
    }
    let endpoint: Endpoint = sqlx::query_as(&format!(
        "INSERT INTO alert_endpoints (url, secret, description, customers, event_types, created_by)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING {ENDPOINT_COLUMNS}"
    ))
    .bind(new.url)
    .bind(&secret)
    .bind(new.description)
    .bind(&new.customers)
    .bind(&new.event_types)
    .bind(actor)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((endpoint, secret))
}

fn new_secret() -> String {
    format!("whsec_{}", hex::encode(rand::random::<[u8; 32]>()))
}

/// How long a replaced secret still signs after a rotation, by default.
pub const ROTATION_OVERLAP: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Gives an endpoint a new secret (returned, the only time it is shown); the old one signs
/// too until `overlap` has passed, so receivers can switch without missing a delivery.
pub async fn rotate_secret(
    pool: &PgPool,
    endpoint_id: i64,
    overlap: std::time::Duration,
) -> Result<(Endpoint, String), AlertError> {
    if overlap > std::time::Duration::from_secs(7 * 24 * 3600) {
        return Err(AlertError::Invalid(
            "the previous secret may keep signing for at most 7 days".into(),
        ));
    }
    let secret = new_secret();
    let endpoint: Option<Endpoint> = sqlx::query_as(&format!(
        "UPDATE alert_endpoints
         SET previous_secret = secret, secret = $2,
             previous_secret_expires_at = now() + make_interval(secs => $3)
         WHERE endpoint_id = $1 AND deleted_at IS NULL
         RETURNING {ENDPOINT_COLUMNS}"
    ))
    .bind(endpoint_id)
    .bind(&secret)
    .bind(overlap.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    let endpoint = endpoint.ok_or(AlertError::NoSuchEndpoint(endpoint_id))?;
    Ok((endpoint, secret))
}

/// The endpoints in use (secrets are never shown again).
pub async fn list_endpoints(pool: &PgPool) -> Result<Vec<Endpoint>, AlertError> {
    let endpoints: Vec<Endpoint> = sqlx::query_as(&format!(
        "SELECT {ENDPOINT_COLUMNS} FROM alert_endpoints
         WHERE deleted_at IS NULL ORDER BY endpoint_id"
    ))
    .fetch_all(pool)
    .await?;
    Ok(endpoints)
}

/// Stops delivering to an endpoint: its pending deliveries are given up (one in flight is
/// not put back: `deliver.rs` records outcomes only of pending deliveries).
pub async fn delete_endpoint(pool: &PgPool, endpoint_id: i64) -> Result<(), AlertError> {
    let mut tx = pool.begin().await?;
    let deleted = sqlx::query(
        "UPDATE alert_endpoints SET deleted_at = now() WHERE endpoint_id = $1 AND deleted_at IS NULL",
    )
    .bind(endpoint_id)
    .execute(&mut *tx)
    .await?;
    if deleted.rows_affected() == 0 {
        return Err(AlertError::NoSuchEndpoint(endpoint_id));
    }
    sqlx::query(
        "UPDATE alert_deliveries SET status = 'failed', last_error = 'the endpoint was deleted'
         WHERE endpoint_id = $1 AND status = 'pending'",
    )
    .bind(endpoint_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// A crossing that fired.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Firing {
    pub event_id: String,
    pub event_type: String,
    pub rule: String,
    pub customer: String,
    pub period_start: DateTime<Utc>,
    pub fired_at: DateTime<Utc>,
    pub payload: serde_json::Value,
}

/// The customer's firings, newest first (at most `limit`).
pub async fn firings(pool: &PgPool, customer: &str, limit: i64) -> Result<Vec<Firing>, AlertError> {
    let firings: Vec<Firing> = sqlx::query_as(
        "SELECT event_id, event_type, rule_key AS rule, customer_id AS customer, period_start,
                fired_at, payload
         FROM alert_firings WHERE customer_id = $1 ORDER BY firing_id DESC LIMIT $2",
    )
    .bind(customer)
    .bind(limit.clamp(1, 1000))
    .fetch_all(pool)
    .await?;
    Ok(firings)
}

/// One delivery of a firing to an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Delivery {
    pub delivery_id: i64,
    pub event_id: String,
    pub event_type: String,
    pub customer: String,
    pub endpoint_id: i64,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

type DeliveryRow = (
    i64,
    String,
    String,
    String,
    i64,
    String,
    i32,
    DateTime<Utc>,
    Option<i32>,
    Option<String>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
);

/// Deliveries, newest first, optionally of one status, before delivery id `before`.
pub async fn deliveries(
    pool: &PgPool,
    status: Option<&str>,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<Delivery>, AlertError> {
    if status.is_some_and(|s| !matches!(s, "pending" | "delivered" | "failed")) {
        return Err(AlertError::Invalid(
            "status must be pending, delivered or failed".into(),
        ));
    }
    let rows: Vec<DeliveryRow> = sqlx::query_as(
        "SELECT d.delivery_id, f.event_id, f.event_type, f.customer_id, d.endpoint_id, d.status,
                d.attempts, d.next_attempt_at, d.last_status, d.last_error, d.created_at,
                d.delivered_at
         FROM alert_deliveries d JOIN alert_firings f USING (firing_id)
         WHERE ($1::text IS NULL OR d.status = $1) AND d.delivery_id < $2
         ORDER BY d.delivery_id DESC LIMIT $3",
    )
    .bind(status)
    .bind(before.unwrap_or(i64::MAX))
    .bind(limit.clamp(1, 1000))
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Delivery {
            delivery_id: r.0,
            event_id: r.1,
            event_type: r.2,
            customer: r.3,
            endpoint_id: r.4,
            next_attempt_at: (r.5 == "pending").then_some(r.7),
            status: r.5,
            attempts: r.6,
            last_status: r.8,
            last_error: r.9,
            created_at: r.10,
            delivered_at: r.11,
        })
        .collect())
}

/// The usage share a rule fires at, for the payload.
pub(crate) fn threshold(limit: Decimal, percent: Decimal) -> Option<Decimal> {
    limit
        .checked_mul(percent)?
        .checked_div(Decimal::ONE_HUNDRED)
}
