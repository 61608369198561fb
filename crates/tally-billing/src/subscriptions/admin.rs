//! The operations the admin API and `tally subscriptions` offer. Each is one transaction that
//! writes the subscription and its `entitlement_audit` row (who, why, before, after); the
//! database keeps `subscription_history`. A Stripe-managed subscription is refused: Stripe owns
//! it, and its next webhook would undo the edit.

use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};

use super::period::{period_containing, Interval};
use super::{Source, Status, SubscriptionRecord, COLUMNS};
use crate::store::{Audit, BillingStoreError};

/// Why a subscription operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubscriptionError {
    #[error("no subscription {0}; list a customer's with GET /v1/customers/{{id}}/subscriptions or `tally subscriptions list --customer ID`")]
    NotFound(i64),
    #[error("subscription {0} is managed by Stripe; change it in Stripe (its webhook brings the change to tally)")]
    StripeManaged(i64),
    #[error("subscription {id} has ended ({status}); create a new subscription instead")]
    Ended { id: i64, status: &'static str },
    #[error("subscription {0} has no cancellation pending; only a cancellation at period end can be undone")]
    NothingToReactivate(i64),
    #[error("subscription {0} is a fixed term and has no next period; change it now, or create a new subscription when the term ends")]
    NoNextPeriod(i64),
    #[error("{0}")]
    Invalid(String),
    #[error("a reason is required for every change; it is written to the audit trail")]
    ReasonRequired,
    #[error("the override of customer {customer:?} does not fit plan {plan:?}: {why}; change the override first (PUT /v1/customers/{{id}}/overrides) or pick another plan")]
    OverrideConflict {
        customer: String,
        plan: String,
        why: String,
    },
    #[error(transparent)]
    Store(#[from] BillingStoreError),
}

impl SubscriptionError {
    /// Stable code for API errors.
    pub fn code(&self) -> &'static str {
        match self {
            SubscriptionError::NotFound(_) => "NO_SUCH_SUBSCRIPTION",
            SubscriptionError::StripeManaged(_) => "STRIPE_MANAGED",
            SubscriptionError::Ended { .. } => "SUBSCRIPTION_ENDED",
            SubscriptionError::NothingToReactivate(_) => "NOTHING_TO_REACTIVATE",
            SubscriptionError::NoNextPeriod(_) => "NO_NEXT_PERIOD",
            SubscriptionError::Invalid(_) => "INVALID_SUBSCRIPTION",
            SubscriptionError::ReasonRequired => "REASON_REQUIRED",
            SubscriptionError::OverrideConflict { .. } => "OVERRIDE_CONFLICT",
            SubscriptionError::Store(BillingStoreError::UnknownPlan(_)) => "UNKNOWN_PLAN",
            SubscriptionError::Store(BillingStoreError::SecondLiveSubscription { .. }) => {
                "SECOND_LIVE_SUBSCRIPTION"
            }
            SubscriptionError::Store(_) => "STORE_UNAVAILABLE",
        }
    }
}

impl From<sqlx::Error> for SubscriptionError {
    fn from(error: sqlx::Error) -> Self {
        SubscriptionError::Store(error.into())
    }
}

/// Who makes a change and why, for the audit trail.
#[derive(Debug, Clone)]
pub struct Actor {
    pub name: String,
    pub reason: String,
}

/// Longest reason kept in the audit trail.
const MAX_REASON_CHARS: usize = 1000;

impl Actor {
    /// A reason is required: 1 to 1,000 characters, printable.
    pub fn new(name: impl Into<String>, reason: &str) -> Result<Actor, SubscriptionError> {
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(SubscriptionError::ReasonRequired);
        }
        if reason.chars().count() > MAX_REASON_CHARS || reason.chars().any(char::is_control) {
            return Err(SubscriptionError::Invalid(format!(
                "reason must be at most {MAX_REASON_CHARS} characters, without control characters"
            )));
        }
        Ok(Actor {
            name: name.into(),
            reason: reason.to_owned(),
        })
    }
}

/// How long a new subscription's periods are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Term {
    Month,
    Year,
    /// One term ending then; the subscription ends with it.
    Until(DateTime<Utc>),
}

/// `POST /v1/subscriptions`.
#[derive(Debug, Clone)]
pub struct NewSubscription {
    pub customer: String,
    pub plan: String,
    /// Default: now. May be in the past (periods are counted from it), not in the future.
    pub start: Option<DateTime<Utc>>,
    /// Trialing until then (in the future); paid periods start at the trial's end.
    pub trial_end: Option<DateTime<Utc>>,
    pub term: Term,
    /// Whether a payment method is on record (a plan with `requires_payment_method` needs one
    /// for a trial to convert).
    pub payment_method: bool,
}

/// When a change takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    Now,
    PeriodEnd,
}

/// How far ahead of this server's clock a start may be (the caller's clock may run ahead).
const START_TOLERANCE: TimeDelta = TimeDelta::minutes(5);

/// How far back a start may be. A backdated subscription restates the past: the finance views
/// count its plan (and MRR) from its start, so reports already taken for those days change;
/// a year covers moving customers from another billing system at their anniversary.
pub(crate) const MAX_BACKDATE: TimeDelta = TimeDelta::days(366);

/// Starts a tally-managed subscription. A live fallback subscription is replaced; any other
/// live subscription is refused (one per customer).
pub async fn create(
    pool: &PgPool,
    new: &NewSubscription,
    actor: &Actor,
) -> Result<SubscriptionRecord, SubscriptionError> {
    let now = Utc::now();
    tally_core::event::validate_customer(&new.customer)
        .map_err(|rejection| SubscriptionError::Invalid(rejection.detail))?;
    let start = new.start.unwrap_or(now);
    if start > now + START_TOLERANCE {
        return Err(SubscriptionError::Invalid(format!(
            "start {start} is in the future; create the subscription when it starts"
        )));
    }
    if start < now - MAX_BACKDATE {
        return Err(SubscriptionError::Invalid(format!(
            "start {start} is more than {} days ago: a backdated subscription restates finance's past days (its MRR counts from its start); start it at most a year back, e.g. at its last anniversary",
            MAX_BACKDATE.num_days()
        )));
    }
    let (interval, status, period) = match (new.term, new.trial_end) {
        (Term::Until(_), Some(_)) => return Err(SubscriptionError::Invalid(
            "a fixed-term subscription cannot have a trial; give trial_end or a term end, not both"
                .into(),
        )),
        (Term::Until(end), None) if end <= now || end <= start => {
            return Err(SubscriptionError::Invalid(format!(
                "the term's end {end} must be after its start and in the future"
            )))
        }
        (Term::Until(end), None) => (Interval::Fixed, Status::Active, (start, end)),
        (_, Some(trial_end)) if trial_end <= now || trial_end <= start => {
            return Err(SubscriptionError::Invalid(format!(
                "trial_end {trial_end} must be after the start and in the future"
            )))
        }
        (term, trial_end) => {
            let interval = if term == Term::Year {
                Interval::Year
            } else {
                Interval::Month
            };
            match trial_end {
                Some(trial_end) => (interval, Status::Trialing, (start, trial_end)),
                None => {
                    let period =
                        period_containing(start, interval, now.max(start)).ok_or_else(|| {
                            SubscriptionError::Invalid("start is beyond the calendar".into())
                        })?;
                    (interval, Status::Active, period)
                }
            }
        }
    };
    let mut tx = pool.begin().await?;
    lock_customer(&mut tx, &new.customer).await?;
    fits(&mut tx, &new.customer, &new.plan).await?;
    if let Some(live) = live_for_update(&mut tx, &new.customer).await? {
        if live.source != Source::Fallback {
            return Err(BillingStoreError::SecondLiveSubscription {
                customer: new.customer.clone(),
            }
            .into());
        }
        // It ends where the new one starts (a backdated start must not leave the customer
        // counted on two plans).
        let reason = format!(
            "replaced by a subscription to {}: {}",
            new.plan, actor.reason
        );
        end_fallback(&mut tx, &live, start.min(now), &actor.name, &reason).await?;
    }
    let inserted = sqlx::query_as::<_, SubscriptionRecord>(&format!(
        "INSERT INTO subscriptions (customer_id, plan, status, source, billing_interval,
                billing_anchor, started_at, trial_end, current_period_start, current_period_end,
                payment_method, status_since)
         VALUES ($1, $2, $3, 'tally', $4, $5, $5, $6, $7, $8, $9, $5)
         RETURNING {COLUMNS}"
    ))
    .bind(&new.customer)
    .bind(&new.plan)
    .bind(status)
    .bind(interval)
    .bind(start)
    .bind(new.trial_end)
    .bind(period.0)
    .bind(period.1)
    .bind(new.payment_method)
    .fetch_one(&mut *tx)
    .await;
    let created = match inserted {
        Ok(created) => created,
        Err(sqlx::Error::Database(e)) if e.constraint() == Some("subscriptions_plan_fkey") => {
            return Err(BillingStoreError::UnknownPlan(new.plan.clone()).into())
        }
        Err(e) => return Err(e.into()),
    };
    audit(
        &mut tx,
        "create",
        None,
        Some(&created),
        &actor.name,
        &actor.reason,
    )
    .await?;
    tx.commit().await?;
    Ok(created)
}

/// One subscription.
pub async fn get(pool: &PgPool, id: i64) -> Result<SubscriptionRecord, SubscriptionError> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM subscriptions WHERE subscription_id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await?
    .ok_or(SubscriptionError::NotFound(id))
}

/// The customer's active or trialing subscription, if any.
pub async fn live_subscription(
    pool: &PgPool,
    customer: &str,
) -> Result<Option<SubscriptionRecord>, SubscriptionError> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM subscriptions
         WHERE customer_id = $1 AND status IN ('active', 'trialing')"
    ))
    .bind(customer)
    .fetch_optional(pool)
    .await?)
}

/// A subscription with every plan and status it had.
#[derive(Debug, Clone, Serialize)]
pub struct SubscriptionHistory {
    #[serde(flatten)]
    pub subscription: SubscriptionRecord,
    pub history: Vec<HistorySpan>,
}

/// A plan and status, and when they held (`to` is `None` for the current one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct HistorySpan {
    #[serde(skip)]
    pub subscription_id: i64,
    pub plan: String,
    pub status: Status,
    pub from: DateTime<Utc>,
    pub to: Option<DateTime<Utc>>,
}

/// Every subscription the customer had, newest first, each with its history.
pub async fn customer_subscriptions(
    pool: &PgPool,
    customer: &str,
) -> Result<Vec<SubscriptionHistory>, SubscriptionError> {
    let subscriptions: Vec<SubscriptionRecord> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM subscriptions WHERE customer_id = $1 ORDER BY subscription_id DESC"
    ))
    .bind(customer)
    .fetch_all(pool)
    .await?;
    let ids: Vec<i64> = subscriptions.iter().map(|s| s.id).collect();
    let spans: Vec<HistorySpan> = sqlx::query_as(
        "SELECT subscription_id, plan, status, valid_from AS \"from\", valid_to AS \"to\"
         FROM subscription_history WHERE subscription_id = ANY($1)
         ORDER BY valid_from, history_id",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    Ok(subscriptions
        .into_iter()
        .map(|subscription| SubscriptionHistory {
            history: spans
                .iter()
                .filter(|span| span.subscription_id == subscription.id)
                .cloned()
                .collect(),
            subscription,
        })
        .collect())
}

/// Moves the subscription to `plan`, now or at the end of its period. Asking for the plan it
/// is on (now) changes nothing; at period end it withdraws a scheduled change.
pub async fn change_plan(
    pool: &PgPool,
    id: i64,
    plan: &str,
    when: When,
    actor: &Actor,
) -> Result<SubscriptionRecord, SubscriptionError> {
    let mut tx = pool.begin().await?;
    let before = editable(&mut tx, id).await?;
    let known: Option<i32> = sqlx::query_scalar("SELECT 1 FROM plans WHERE name = $1")
        .bind(plan)
        .fetch_optional(&mut *tx)
        .await?;
    if known.is_none() {
        return Err(BillingStoreError::UnknownPlan(plan.to_owned()).into());
    }
    fits(&mut tx, &before.customer, plan).await?;
    let mut after = before.clone();
    let action = match when {
        When::Now => {
            after.plan = plan.to_owned();
            after.pending_plan = None;
            if after.plan != before.plan {
                after.status_since = Utc::now();
            }
            "change_plan"
        }
        When::PeriodEnd if before.billing_interval == Interval::Fixed => {
            return Err(SubscriptionError::NoNextPeriod(id))
        }
        When::PeriodEnd => {
            after.pending_plan = (plan != before.plan).then(|| plan.to_owned());
            "schedule_change"
        }
    };
    finish(tx, action, before, after, actor).await
}

/// Cancels the subscription now (it ends; with `fallback`, the customer moves to that plan)
/// or at the end of its period.
pub async fn cancel(
    pool: &PgPool,
    id: i64,
    when: When,
    fallback: Option<&str>,
    actor: &Actor,
) -> Result<SubscriptionRecord, SubscriptionError> {
    let mut tx = pool.begin().await?;
    let before = editable(&mut tx, id).await?;
    let mut after = before.clone();
    match when {
        When::PeriodEnd => {
            after.cancel_at_period_end = true;
            finish(tx, "schedule_cancel", before, after, actor).await
        }
        When::Now => {
            let now = Utc::now();
            after.status = Status::Canceled;
            after.ended_at = Some(now);
            after.status_since = now;
            after.cancel_at_period_end = false;
            after.pending_plan = None;
            let after = write(&mut tx, &after).await?;
            audit(
                &mut tx,
                "cancel",
                Some(&before),
                Some(&after),
                &actor.name,
                &actor.reason,
            )
            .await?;
            if let Some(plan) = fallback {
                let reason = format!("fallback plan after a cancellation: {}", actor.reason);
                ensure_fallback(&mut tx, &after, plan, &actor.name, &reason).await?;
            }
            tx.commit().await?;
            Ok(after)
        }
    }
}

/// Withdraws a cancellation scheduled for the period's end.
pub async fn reactivate(
    pool: &PgPool,
    id: i64,
    actor: &Actor,
) -> Result<SubscriptionRecord, SubscriptionError> {
    let mut tx = pool.begin().await?;
    let before = editable(&mut tx, id).await?;
    if !before.cancel_at_period_end {
        return Err(SubscriptionError::NothingToReactivate(id));
    }
    let mut after = before.clone();
    after.cancel_at_period_end = false;
    finish(tx, "reactivate", before, after, actor).await
}

/// Records whether a payment method is on record (tally takes no payments; the caller says).
pub async fn set_payment_method(
    pool: &PgPool,
    id: i64,
    on_record: bool,
    actor: &Actor,
) -> Result<SubscriptionRecord, SubscriptionError> {
    let mut tx = pool.begin().await?;
    let before = editable(&mut tx, id).await?;
    let mut after = before.clone();
    after.payment_method = on_record;
    finish(tx, "payment_method", before, after, actor).await
}

/// One customer in [`list_customers`]: their live subscription, else their latest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct CustomerRow {
    #[sqlx(rename = "customer_id")]
    pub customer: String,
    pub subscription_id: i64,
    pub plan: String,
    pub status: Status,
    pub source: Source,
    pub current_period_end: DateTime<Utc>,
    pub cancel_at_period_end: bool,
}

/// A page of customers, and the cursor of the next (`None`: the last page).
#[derive(Debug, Clone, Serialize)]
pub struct CustomerPage {
    pub customers: Vec<CustomerRow>,
    pub next: Option<String>,
}

/// Most customers on one page.
pub const MAX_PAGE: i64 = 500;

/// Customers with a subscription, by id, after the cursor `after`, filtered by the plan and
/// status of their live (else latest) subscription.
pub async fn list_customers(
    pool: &PgPool,
    plan: Option<&str>,
    status: Option<Status>,
    after: Option<&str>,
    limit: i64,
) -> Result<CustomerPage, SubscriptionError> {
    let limit = limit.clamp(1, MAX_PAGE);
    let customers: Vec<CustomerRow> = sqlx::query_as(
        "SELECT * FROM (
            SELECT DISTINCT ON (customer_id) customer_id, subscription_id, plan, status, source,
                   current_period_end, cancel_at_period_end
            FROM subscriptions WHERE customer_id > $1
            ORDER BY customer_id, status IN ('active', 'trialing') DESC, subscription_id DESC
         ) latest
         WHERE ($2::text IS NULL OR plan = $2) AND ($3::text IS NULL OR status = $3)
         ORDER BY customer_id LIMIT $4",
    )
    .bind(after.unwrap_or(""))
    .bind(plan)
    .bind(status)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let next = (customers.len() as i64 == limit)
        .then(|| customers.last().map(|c| c.customer.clone()))
        .flatten();
    Ok(CustomerPage { customers, next })
}

/// Puts a customer whose subscription `ended` on the fallback plan, monthly from the moment it
/// ended, unless they have a live subscription again. The caller holds the customer's lock
/// or the ended row's (`ensure_fallback` takes the customer's).
pub(crate) async fn ensure_fallback(
    tx: &mut PgConnection,
    ended: &SubscriptionRecord,
    plan: &str,
    actor: &str,
    reason: &str,
) -> Result<Option<SubscriptionRecord>, SubscriptionError> {
    mark_fallback_checked(tx, ended.id).await?;
    if ended.source == Source::Fallback {
        return Ok(None); // canceling the fallback itself leaves the customer without a plan
    }
    lock_customer(tx, &ended.customer).await?;
    if live_for_update(tx, &ended.customer).await?.is_some() {
        return Ok(None);
    }
    let start = ended.ended_at.unwrap_or_else(Utc::now);
    let (period_start, period_end) =
        period_containing(start, Interval::Month, Utc::now().max(start)).ok_or_else(|| {
            SubscriptionError::Invalid("the fallback's period is beyond the calendar".into())
        })?;
    let created = sqlx::query_as::<_, SubscriptionRecord>(&format!(
        "INSERT INTO subscriptions (customer_id, plan, status, source, billing_interval,
                billing_anchor, started_at, current_period_start, current_period_end, status_since)
         VALUES ($1, $2, 'active', 'fallback', 'month', $3, $3, $4, $5, $3)
         RETURNING {COLUMNS}"
    ))
    .bind(&ended.customer)
    .bind(plan)
    .bind(start)
    .bind(period_start)
    .bind(period_end)
    .fetch_one(&mut *tx)
    .await;
    let created = match created {
        Ok(created) => created,
        Err(sqlx::Error::Database(e)) if e.constraint() == Some("subscriptions_plan_fkey") => {
            return Err(BillingStoreError::UnknownPlan(plan.to_owned()).into())
        }
        Err(e) => return Err(e.into()),
    };
    audit(tx, "create", None, Some(&created), actor, reason).await?;
    Ok(Some(created))
}

/// Ends a live fallback subscription because the customer got a real one, at `end` but not
/// before the fallback took effect itself; audited as a `replace`.
pub(crate) async fn end_fallback(
    tx: &mut PgConnection,
    live: &SubscriptionRecord,
    end: DateTime<Utc>,
    actor: &str,
    reason: &str,
) -> Result<(), BillingStoreError> {
    let end = end.max(live.status_since);
    let mut replaced = live.clone();
    replaced.status = Status::Canceled;
    replaced.ended_at = Some(end);
    replaced.status_since = end;
    let replaced = write(tx, &replaced).await?;
    mark_fallback_checked(tx, replaced.id).await?;
    audit(tx, "replace", Some(live), Some(&replaced), actor, reason).await
}

async fn mark_fallback_checked(tx: &mut PgConnection, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE subscriptions SET fallback_checked_at = now() WHERE subscription_id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// The advisory lock key of a customer's subscriptions, `customer` the SQL expression naming
/// the customer (`$1`, a column).
fn customer_lock(customer: &str) -> String {
    format!("hashtextextended('tally.subscriptions:' || {customer}, 0)")
}

/// Serializes everything that may give a customer a live subscription (create, the fallback,
/// a Stripe webhook), so that "has none, so add one" cannot race. Taken before any of the
/// customer's subscription rows is locked (held already, it is taken again at once).
pub(crate) async fn lock_customer(
    tx: &mut PgConnection,
    customer: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "SELECT pg_advisory_xact_lock({})",
        customer_lock("$1")
    ))
    .bind(customer)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// [`lock_customer`] if it is free now: `false` when another transaction holds it (the
/// scheduler, which holds subscription rows already, must not wait for it).
pub(crate) async fn try_lock_customer(
    tx: &mut PgConnection,
    customer: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(&format!(
        "SELECT pg_try_advisory_xact_lock({})",
        customer_lock("$1")
    ))
    .bind(customer)
    .fetch_one(&mut *tx)
    .await
}

/// [`try_lock_customer`] for many customers in one statement: the ones another transaction
/// holds (the others are locked now).
pub(crate) async fn try_lock_customers(
    tx: &mut PgConnection,
    customers: &[String],
) -> Result<std::collections::HashSet<String>, sqlx::Error> {
    let busy: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT c FROM unnest($1::text[]) AS c WHERE NOT pg_try_advisory_xact_lock({})",
        customer_lock("c")
    ))
    .bind(customers)
    .fetch_all(&mut *tx)
    .await?;
    Ok(busy.into_iter().collect())
}

pub(crate) async fn live_for_update(
    tx: &mut PgConnection,
    customer: &str,
) -> Result<Option<SubscriptionRecord>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM subscriptions
         WHERE customer_id = $1 AND status IN ('active', 'trialing') FOR UPDATE"
    ))
    .bind(customer)
    .fetch_optional(&mut *tx)
    .await
}

/// Refuses a plan the customer's override does not fit (the customer would have no
/// entitlements: every check and alert of theirs would fail).
async fn fits(tx: &mut PgConnection, customer: &str, plan: &str) -> Result<(), SubscriptionError> {
    crate::store::override_fits(tx, customer, plan)
        .await?
        .map_err(|why| SubscriptionError::OverrideConflict {
            customer: customer.to_owned(),
            plan: plan.to_owned(),
            why,
        })
}

/// The subscription, locked, if the API may change it: tally-managed and live. Locks in one
/// order everywhere: the customer's lock first (create, the fallback and Stripe's webhook take
/// it too), then the row; the other order deadlocks with a create.
async fn editable(tx: &mut PgConnection, id: i64) -> Result<SubscriptionRecord, SubscriptionError> {
    let customer: String =
        sqlx::query_scalar("SELECT customer_id FROM subscriptions WHERE subscription_id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(SubscriptionError::NotFound(id))?;
    lock_customer(tx, &customer).await?;
    let subscription: SubscriptionRecord = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM subscriptions WHERE subscription_id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(SubscriptionError::NotFound(id))?;
    if subscription.source == Source::Stripe {
        return Err(SubscriptionError::StripeManaged(id));
    }
    if !subscription.status.is_live() {
        return Err(SubscriptionError::Ended {
            id,
            status: subscription.status.as_str(),
        });
    }
    Ok(subscription)
}

/// Writes `after` and its audit row, and commits; a change that changes nothing writes neither.
async fn finish(
    mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    action: &str,
    before: SubscriptionRecord,
    after: SubscriptionRecord,
    actor: &Actor,
) -> Result<SubscriptionRecord, SubscriptionError> {
    if after == before {
        return Ok(before);
    }
    let after = write(&mut tx, &after).await?;
    audit(
        &mut tx,
        action,
        Some(&before),
        Some(&after),
        &actor.name,
        &actor.reason,
    )
    .await?;
    tx.commit().await?;
    Ok(after)
}

/// Writes every field an operation or a transition may change.
pub(crate) async fn write(
    tx: &mut PgConnection,
    subscription: &SubscriptionRecord,
) -> Result<SubscriptionRecord, sqlx::Error> {
    write_all(tx, std::slice::from_ref(subscription))
        .await?
        .pop()
        .ok_or(sqlx::Error::RowNotFound)
}

/// Writes subscriptions as they are (their ids say which), in one statement; returns them as
/// stored, in no particular order.
pub(crate) async fn write_all(
    tx: &mut PgConnection,
    subscriptions: &[SubscriptionRecord],
) -> Result<Vec<SubscriptionRecord>, sqlx::Error> {
    let ids: Vec<i64> = subscriptions.iter().map(|s| s.id).collect();
    let plans: Vec<String> = subscriptions.iter().map(|s| s.plan.clone()).collect();
    let statuses: Vec<&str> = subscriptions.iter().map(|s| s.status.as_str()).collect();
    let anchors: Vec<DateTime<Utc>> = subscriptions.iter().map(|s| s.billing_anchor).collect();
    let starts: Vec<DateTime<Utc>> = subscriptions
        .iter()
        .map(|s| s.current_period_start)
        .collect();
    let ends: Vec<DateTime<Utc>> = subscriptions.iter().map(|s| s.current_period_end).collect();
    let cancels: Vec<bool> = subscriptions
        .iter()
        .map(|s| s.cancel_at_period_end)
        .collect();
    let pending: Vec<Option<String>> = subscriptions
        .iter()
        .map(|s| s.pending_plan.clone())
        .collect();
    let methods: Vec<bool> = subscriptions.iter().map(|s| s.payment_method).collect();
    let ended: Vec<Option<DateTime<Utc>>> = subscriptions.iter().map(|s| s.ended_at).collect();
    let since: Vec<DateTime<Utc>> = subscriptions.iter().map(|s| s.status_since).collect();
    let trials: Vec<Option<DateTime<Utc>>> = subscriptions.iter().map(|s| s.trial_end).collect();
    sqlx::query_as(&format!(
        "UPDATE subscriptions s SET plan = u.plan, status = u.status,
                billing_anchor = u.billing_anchor, current_period_start = u.period_start,
                current_period_end = u.period_end, cancel_at_period_end = u.cancel,
                pending_plan = u.pending_plan, payment_method = u.payment_method,
                ended_at = u.ended_at, status_since = u.status_since, trial_end = u.trial_end,
                updated_at = now()
         FROM unnest($1::bigint[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[],
                     $6::timestamptz[], $7::bool[], $8::text[], $9::bool[], $10::timestamptz[],
                     $11::timestamptz[], $12::timestamptz[])
              AS u(id, plan, status, billing_anchor, period_start, period_end, cancel,
                   pending_plan, payment_method, ended_at, status_since, trial_end)
         WHERE s.subscription_id = u.id
         RETURNING {}",
        COLUMNS
            .split(", ")
            .map(|c| format!("s.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ")
    ))
    .bind(&ids)
    .bind(&plans)
    .bind(&statuses)
    .bind(&anchors)
    .bind(&starts)
    .bind(&ends)
    .bind(&cancels)
    .bind(&pending)
    .bind(&methods)
    .bind(&ended)
    .bind(&since)
    .bind(&trials)
    .fetch_all(&mut *tx)
    .await
}

/// What `entitlement_audit` calls a subscription (its rows are keyed by customer).
pub(crate) const AUDIT_ENTITY: &str = "subscription";

/// The `entitlement_audit` row of a subscription change (keyed by customer, as webhooks write
/// theirs).
pub(crate) async fn audit(
    tx: &mut PgConnection,
    action: &str,
    before: Option<&SubscriptionRecord>,
    after: Option<&SubscriptionRecord>,
    actor: &str,
    reason: &str,
) -> Result<(), BillingStoreError> {
    let json = |record: Option<&SubscriptionRecord>| -> Result<Option<Value>, BillingStoreError> {
        record
            .map(serde_json::to_value)
            .transpose()
            .map_err(|e| BillingStoreError::Corrupt(e.to_string()))
    };
    let (before_json, after_json) = (json(before)?, json(after)?);
    let customer = after.or(before).map_or("", |s| s.customer.as_str());
    Audit {
        entity: AUDIT_ENTITY,
        key: customer,
        action,
        before: before_json.as_ref(),
        after: after_json.as_ref(),
        actor,
        reason: Some(reason),
    }
    .write(tx)
    .await?;
    Ok(())
}
