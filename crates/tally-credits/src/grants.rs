//! Credit grants and the ledger: the one owner of `credit_grants` and `credit_transactions`.
//! Granting, voiding, a customer's balance and ledger. Every movement of credits is a ledger
//! entry written in the same transaction as the grant's `remaining`, so the two always agree;
//! the ledger is append-only (a trigger refuses updates and deletes).

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use tally_db::ExactDecimal;

/// What kind of credits a grant holds; it sets the default order they are drawn in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum GrantKind {
    /// Bought: never expires, drawn first.
    Purchased,
    /// Granted by the plan each period; expires at the period's end; drawn second.
    Subscription,
    /// Given away, with an expiry date; drawn last.
    Promotional,
}

impl GrantKind {
    /// The priority a grant of this kind has when it names none (lower draws first).
    pub fn default_priority(self) -> i32 {
        match self {
            GrantKind::Purchased => 10,
            GrantKind::Subscription => 20,
            GrantKind::Promotional => 30,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            GrantKind::Purchased => "purchased",
            GrantKind::Subscription => "subscription",
            GrantKind::Promotional => "promotional",
        }
    }
}

/// The largest grant: far inside a 28-digit decimal however many are summed.
pub const MAX_GRANT: Decimal = Decimal::from_parts(0x4A51_0000, 0x0DE0_B6B3, 0, false, 0); // 10^18

/// A grant to make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewGrant {
    pub customer: String,
    pub kind: GrantKind,
    /// More than 0, at most 10^18, at most 9 decimal places.
    pub amount: Decimal,
    /// Lower draws first; default by kind (purchased 10, subscription 20, promotional 30).
    #[serde(default)]
    pub priority: Option<i32>,
    /// From when usage draws from it (default: now).
    #[serde(default)]
    pub effective_at: Option<DateTime<Utc>>,
    /// Required for promotional and subscription grants; purchased credits never expire
    /// unless given one.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    /// The same key for the same customer is the same grant: sending a top-up twice grants
    /// once. 1 to 200 printable characters.
    pub idempotency_key: String,
    #[serde(default)]
    pub description: Option<String>,
}

/// A grant as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grant {
    pub grant_id: i64,
    pub customer: String,
    pub kind: GrantKind,
    pub amount: Decimal,
    pub remaining: Decimal,
    pub priority: i32,
    pub effective_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub idempotency_key: String,
    pub subscription_id: Option<i64>,
    pub description: Option<String>,
    pub granted_by: String,
    pub reason: String,
    pub created_at: DateTime<Utc>,
    /// `expired` or `voided` once closed.
    pub closed_as: Option<String>,
    pub closed_at: Option<DateTime<Utc>>,
}

pub(crate) const GRANT_COLUMNS: &str = "grant_id, customer_id, kind, amount, remaining, priority,
    effective_at, expires_at, idempotency_key, subscription_id, description, granted_by, reason,
    created_at, closed_as, closed_at";

#[derive(sqlx::FromRow)]
pub(crate) struct GrantRow {
    grant_id: i64,
    customer_id: String,
    kind: GrantKind,
    amount: ExactDecimal,
    remaining: ExactDecimal,
    priority: Option<i32>,
    effective_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    idempotency_key: String,
    subscription_id: Option<i64>,
    description: Option<String>,
    granted_by: String,
    reason: String,
    created_at: DateTime<Utc>,
    closed_as: Option<String>,
    closed_at: Option<DateTime<Utc>>,
}

impl From<GrantRow> for Grant {
    fn from(row: GrantRow) -> Grant {
        Grant {
            grant_id: row.grant_id,
            customer: row.customer_id,
            kind: row.kind,
            amount: row.amount.0,
            remaining: row.remaining.0,
            priority: row.priority.unwrap_or(row.kind.default_priority()),
            effective_at: row.effective_at,
            expires_at: row.expires_at,
            idempotency_key: row.idempotency_key,
            subscription_id: row.subscription_id,
            description: row.description,
            granted_by: row.granted_by,
            reason: row.reason,
            created_at: row.created_at,
            closed_as: row.closed_as,
            closed_at: row.closed_at,
        }
    }
}

/// The order grants are drawn in: priority (the kind's default when none is given), then the
/// one expiring first, then the oldest.
pub(crate) const DRAW_ORDER: &str = "coalesce(priority, CASE kind WHEN 'purchased' THEN 10
    WHEN 'subscription' THEN 20 ELSE 30 END), expires_at NULLS LAST, effective_at, grant_id";

/// Why a credit operation was refused; [`CreditError::code`] is its stable API code.
#[derive(Debug, thiserror::Error)]
pub enum CreditError {
    #[error("{0}")]
    Invalid(String),
    #[error("a reason is required for every grant and void; it is written to the ledger")]
    ReasonRequired,
    #[error("idempotency key {key:?} was already used for customer {customer:?} with a different grant (grant {grant_id}); use a new key for a new grant")]
    IdempotencyConflict {
        customer: String,
        key: String,
        grant_id: i64,
    },
    #[error("customer {customer:?} has no grant {grant_id}; list them with GET /v1/customers/{{id}}/credits or `tally credits balance`")]
    NoSuchGrant { customer: String, grant_id: i64 },
    #[error("grant {grant_id} is already closed ({closed_as}); nothing is left to void")]
    Closed { grant_id: i64, closed_as: String },
    /// A sum of credits (a balance, a period's credits) beyond what a 28-digit decimal holds.
    #[error("{0} is beyond what a 28-digit decimal holds and cannot be shown exactly; void or let expire the grants that make it so")]
    OutOfRange(&'static str),
    #[error("{0}")]
    Store(#[from] sqlx::Error),
}

impl CreditError {
    pub fn code(&self) -> &'static str {
        match self {
            CreditError::Invalid(_) => "INVALID_GRANT",
            CreditError::ReasonRequired => "REASON_REQUIRED",
            CreditError::IdempotencyConflict { .. } => "IDEMPOTENCY_CONFLICT",
            CreditError::NoSuchGrant { .. } => "NO_SUCH_GRANT",
            CreditError::Closed { .. } => "GRANT_CLOSED",
            CreditError::OutOfRange(_) => "CREDITS_OUT_OF_RANGE",
            CreditError::Store(e) if tally_db::is_data_error(e) => "CREDITS_OUT_OF_RANGE",
            CreditError::Store(_) => "STORE_UNAVAILABLE",
        }
    }

    /// The HTTP status the API answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            // As the subscription routes answer INVALID_SUBSCRIPTION and REASON_REQUIRED.
            CreditError::Invalid(_) | CreditError::ReasonRequired => 400,
            CreditError::IdempotencyConflict { .. } | CreditError::Closed { .. } => 409,
            CreditError::NoSuchGrant { .. } => 404,
            CreditError::OutOfRange(_) => 422,
            CreditError::Store(e) if tally_db::is_data_error(e) => 422,
            CreditError::Store(_) => 503,
        }
    }
}

/// Who makes a change and why, for the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub name: String,
    pub reason: String,
}

impl Actor {
    /// Both must be 1 to 1,000 printable characters.
    pub fn new(name: &str, reason: &str) -> Result<Actor, CreditError> {
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(CreditError::ReasonRequired);
        }
        for (field, value) in [("actor", name.trim()), ("reason", reason)] {
            if value.is_empty()
                || value.chars().count() > 1000
                || value.chars().any(char::is_control)
            {
                return Err(CreditError::Invalid(format!(
                    "{field} must be 1 to 1000 printable characters"
                )));
            }
        }
        Ok(Actor {
            name: name.trim().to_owned(),
            reason: reason.to_owned(),
        })
    }
}

impl NewGrant {
    fn validate(&self, now: DateTime<Utc>) -> Result<(), CreditError> {
        let invalid = |m: String| Err(CreditError::Invalid(m));
        tally_core::event::validate_customer(&self.customer)
            .map_err(|rejection| CreditError::Invalid(rejection.detail))?;
        if self.amount <= Decimal::ZERO || self.amount > MAX_GRANT {
            return invalid(format!(
                "amount {} must be more than 0 and at most 10^18",
                self.amount
            ));
        }
        if self.amount.normalize().scale() > 9 {
            return invalid(format!(
                "amount {} has more than 9 decimal places",
                self.amount
            ));
        }
        if self.priority.is_some_and(|p| !(0..=1000).contains(&p)) {
            return invalid("priority must be 0 to 1000 (lower draws first)".into());
        }
        let key = &self.idempotency_key;
        if key.is_empty() || key.chars().count() > 200 || key.chars().any(char::is_control) {
            return invalid("idempotency_key must be 1 to 200 printable characters".into());
        }
        if self
            .description
            .as_ref()
            .is_some_and(|d| d.chars().count() > 1000 || d.chars().any(char::is_control))
        {
            return invalid("description must be at most 1000 printable characters".into());
        }
        let effective_at = self.effective_at.unwrap_or(now);
        match (self.kind, self.expires_at) {
            (GrantKind::Promotional | GrantKind::Subscription, None) => {
                return invalid(format!(
                    "a {} grant needs expires_at (only purchased credits may never expire)",
                    self.kind.as_str()
                ))
            }
            (_, Some(expires_at)) if expires_at <= effective_at || expires_at <= now => {
                return invalid(format!(
                    "expires_at {expires_at} must be in the future and after effective_at {effective_at}"
                ))
            }
            _ => {}
        }
        Ok(())
    }

    /// Whether a stored grant is this one (a repeat of the same request).
    fn same_as(&self, grant: &Grant) -> bool {
        // Postgres keeps microseconds.
        let micros = |at: DateTime<Utc>| at.timestamp_micros();
        grant.kind == self.kind
            && grant.amount == self.amount
            && self.priority.is_none_or(|p| p == grant.priority)
            && self
                .expires_at
                .is_none_or(|at| Some(micros(at)) == grant.expires_at.map(micros))
            && self
                .effective_at
                .is_none_or(|at| micros(at) == micros(grant.effective_at))
    }
}

/// A grant made, or found (the same idempotency key was used before for the same grant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    pub grant: Grant,
    /// `false`: the key was used before; nothing new was granted.
    pub created: bool,
}

/// Idempotency keys starting with this are the plan grants' (`plan_grant_key` in SQL): an
/// admin grant under one would block or pre-empt a plan's period credits.
pub const PLAN_KEY_PREFIX: &str = "plan:";

/// Idempotency keys of the credit packs bought through Stripe Checkout, `checkout:<session
/// id>`: reserved like the plan grants', so no operator grant can pre-empt a paid pack.
pub const CHECKOUT_KEY_PREFIX: &str = "checkout:";

/// Who makes a grant: an operator (API, CLI), or tally itself (a plan's period credits, a
/// paid credit pack).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Issuer {
    Operator,
    System,
}

/// Grants credits, once per idempotency key: a repeat with the same key and the same grant
/// answers the first grant; the same key with a different grant is refused. Keys starting
/// with `plan:` are refused: they are the plan grants'.
pub async fn grant(pool: &PgPool, new: &NewGrant, actor: &Actor) -> Result<Granted, CreditError> {
    let mut tx = pool.begin().await?;
    let granted = grant_in(&mut tx, new, None, actor, Utc::now(), Issuer::Operator).await?;
    tx.commit().await?;
    Ok(granted)
}

/// [`grant`] inside a transaction (the burner's plan grants name their subscription).
pub(crate) async fn grant_in(
    tx: &mut PgConnection,
    new: &NewGrant,
    subscription_id: Option<i64>,
    actor: &Actor,
    now: DateTime<Utc>,
    issuer: Issuer,
) -> Result<Granted, CreditError> {
    new.validate(now)?;
    for (prefix, owner) in [
        (PLAN_KEY_PREFIX, "plan grants"),
        (CHECKOUT_KEY_PREFIX, "credit packs bought through Checkout"),
    ] {
        if issuer == Issuer::Operator && new.idempotency_key.starts_with(prefix) {
            return Err(CreditError::Invalid(format!(
                "idempotency keys starting with {prefix:?} are reserved for {owner}; choose another key"
            )));
        }
    }
    lock_customer(tx, &new.customer).await?;
    if let Some(existing) = find_by_key(tx, &new.customer, &new.idempotency_key).await? {
        if !new.same_as(&existing) {
            return Err(CreditError::IdempotencyConflict {
                customer: new.customer.clone(),
                key: new.idempotency_key.clone(),
                grant_id: existing.grant_id,
            });
        }
        return Ok(Granted {
            grant: existing,
            created: false,
        });
    }
    let row: GrantRow = sqlx::query_as(&format!(
        "INSERT INTO credit_grants (customer_id, kind, amount, remaining, priority, effective_at,
                expires_at, idempotency_key, subscription_id, description, granted_by, reason)
         VALUES ($1, $2, $3, 0, $4, $5, $6, $7, $8, $9, $10, $11)
         RETURNING {GRANT_COLUMNS}"
    ))
    .bind(&new.customer)
    .bind(new.kind)
    .bind(new.amount)
    .bind(new.priority)
    .bind(new.effective_at.unwrap_or(now))
    .bind(new.expires_at)
    .bind(&new.idempotency_key)
    .bind(subscription_id)
    .bind(&new.description)
    .bind(&actor.name)
    .bind(&actor.reason)
    .fetch_one(&mut *tx)
    .await?;
    let mut grant = Grant::from(row);
    tally_db::changes::record(tx, &[grant.customer.as_str()]).await?;
    // The grant entry brings remaining from 0 to the amount (the ledger moves it).
    record(
        tx,
        &grant.customer,
        grant.grant_id,
        "grant",
        grant.amount,
        actor,
    )
    .await?;
    grant.remaining = grant.amount;
    Ok(Granted {
        grant,
        created: true,
    })
}

/// A credit pack paid through Stripe Checkout: granted once per session (key
/// `checkout:<session id>`), inside the transaction that records the webhook event.
pub async fn grant_purchase(
    tx: &mut PgConnection,
    customer: &str,
    session_id: &str,
    credits: Decimal,
    expires_at: Option<DateTime<Utc>>,
    description: &str,
    actor: &Actor,
) -> Result<Granted, CreditError> {
    let new = NewGrant {
        customer: customer.to_owned(),
        kind: GrantKind::Purchased,
        amount: credits,
        priority: None,
        effective_at: None,
        expires_at,
        idempotency_key: format!("{CHECKOUT_KEY_PREFIX}{session_id}"),
        description: Some(description.to_owned()),
    };
    grant_in(tx, &new, None, actor, Utc::now(), Issuer::System).await
}

/// Voids what is left of a grant (a refund, a mistake): a `void` entry of the rest; what was
/// already consumed stays consumed.
pub async fn void(
    pool: &PgPool,
    customer: &str,
    grant_id: i64,
    actor: &Actor,
) -> Result<Grant, CreditError> {
    let mut tx = pool.begin().await?;
    let voided = void_in(&mut tx, customer, grant_id, actor).await?;
    tx.commit().await?;
    Ok(voided)
}

/// [`void`] inside a transaction (a refund voids a pack in the webhook's transaction).
pub async fn void_in(
    tx: &mut PgConnection,
    customer: &str,
    grant_id: i64,
    actor: &Actor,
) -> Result<Grant, CreditError> {
    take_back_in(tx, customer, grant_id, None, actor).await
}

/// Takes back `amount` of what is left of a grant (all of it when `None`, or when less is left),
/// as one `void` entry; the grant closes as voided once nothing is left. A partial refund of a
/// pack takes back its share this way.
pub async fn take_back_in(
    tx: &mut PgConnection,
    customer: &str,
    grant_id: i64,
    amount: Option<Decimal>,
    actor: &Actor,
) -> Result<Grant, CreditError> {
    lock_customer(tx, customer).await?;
    let row: Option<GrantRow> = sqlx::query_as(&format!(
        "SELECT {GRANT_COLUMNS} FROM credit_grants WHERE grant_id = $1 AND customer_id = $2 FOR UPDATE"
    ))
    .bind(grant_id)
    .bind(customer)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(grant) = row.map(Grant::from) else {
        return Err(CreditError::NoSuchGrant {
            customer: customer.to_owned(),
            grant_id,
        });
    };
    if let Some(closed_as) = grant.closed_as {
        return Err(CreditError::Closed {
            grant_id,
            closed_as,
        });
    }
    tally_db::changes::record(tx, &[customer]).await?;
    if let Some(part) = amount.filter(|part| *part < grant.remaining) {
        if part > Decimal::ZERO {
            record(tx, customer, grant_id, "void", -part, actor).await?;
        }
        let left: GrantRow = sqlx::query_as(&format!(
            "SELECT {GRANT_COLUMNS} FROM credit_grants WHERE grant_id = $1"
        ))
        .bind(grant_id)
        .fetch_one(&mut *tx)
        .await?;
        return Ok(left.into());
    }
    // The void entry brings remaining to 0 (the ledger moves it).
    record(tx, customer, grant_id, "void", -grant.remaining, actor).await?;
    let voided: GrantRow = sqlx::query_as(&format!(
        "UPDATE credit_grants SET closed_at = now(), closed_as = 'voided'
         WHERE grant_id = $1 RETURNING {GRANT_COLUMNS}"
    ))
    .bind(grant_id)
    .fetch_one(&mut *tx)
    .await?;
    Ok(voided.into())
}

async fn record(
    tx: &mut PgConnection,
    customer: &str,
    grant_id: i64,
    kind: &str,
    amount: Decimal,
    actor: &Actor,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO credit_transactions (customer_id, grant_id, kind, amount, actor, reason)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(customer)
    .bind(grant_id)
    .bind(kind)
    .bind(amount)
    .bind(&actor.name)
    .bind(&actor.reason)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn find_by_key(
    tx: &mut PgConnection,
    customer: &str,
    key: &str,
) -> Result<Option<Grant>, sqlx::Error> {
    let row: Option<GrantRow> = sqlx::query_as(&format!(
        "SELECT {GRANT_COLUMNS} FROM credit_grants WHERE customer_id = $1 AND idempotency_key = $2"
    ))
    .bind(customer)
    .bind(key)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(row.map(Grant::from))
}

/// [`lock_customer`] for several customers at once, in one order (customer id) so that two
/// burners locking overlapping sets cannot deadlock.
pub(crate) async fn lock_customers(
    tx: &mut PgConnection,
    customers: &[&str],
) -> Result<(), sqlx::Error> {
    let mut sorted = customers.to_vec();
    sorted.sort_unstable();
    sqlx::query(
        "SELECT count(pg_advisory_xact_lock(hashtextextended('credits:' || c, 0)))
         FROM unnest($1::text[]) AS c",
    )
    .bind(&sorted)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Serializes everything that moves a customer's credits (grants, voids, the burner), so a
/// burn never draws from a grant a void is closing.
pub(crate) async fn lock_customer(
    tx: &mut PgConnection,
    customer: &str,
) -> Result<(), sqlx::Error> {
    lock_customers(tx, &[customer]).await
}

/// A grant of the customer's, open or closed.
pub async fn get_grant(pool: &PgPool, customer: &str, grant_id: i64) -> Result<Grant, CreditError> {
    let row: Option<GrantRow> = sqlx::query_as(&format!(
        "SELECT {GRANT_COLUMNS} FROM credit_grants WHERE grant_id = $1 AND customer_id = $2"
    ))
    .bind(grant_id)
    .bind(customer)
    .fetch_optional(pool)
    .await?;
    row.map(Grant::from)
        .ok_or_else(|| CreditError::NoSuchGrant {
            customer: customer.to_owned(),
            grant_id,
        })
}
