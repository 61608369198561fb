//! Subscriptions tally manages itself, without a payment provider: created, changed, canceled
//! and reactivated through the admin API or `tally subscriptions`, renewed and ended by the
//! scheduler in `tally serve`. Subscriptions that follow Stripe live in the same table
//! (`stripe.rs` writes them); these functions refuse to edit one.
//!
//! - `period.rs`: how periods follow each other (a month or a year from an anchor, or a fixed
//!   term), pure.
//! - `advance.rs`: what happens at a period's end (renew, end a trial, apply a pending plan
//!   change or cancellation, end a term), pure.
//! - `admin.rs`: the operations the API and the CLI offer, each one transaction, audited with
//!   the actor and a reason; the fallback plan.
//! - `scheduler.rs`: `[subscriptions]` settings and the task that applies period ends and the
//!   fallback, safe with several `tally serve` replicas.

mod admin;
mod advance;
pub mod period;
mod scheduler;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use admin::HistorySpan;
pub use admin::{
    cancel, change_plan, create, customer_subscriptions, get, list_customers, live_subscription,
    reactivate, set_payment_method, Actor, CustomerPage, CustomerRow, NewSubscription,
    SubscriptionError, SubscriptionHistory, Term, When, MAX_PAGE,
};
pub(crate) use admin::{end_fallback, live_for_update, lock_customer};
pub use advance::{step, Transition};
pub use period::Interval;
pub use scheduler::{
    run_due, start_scheduler, SchedulerRun, SubscriptionsConfig, ACTOR as SCHEDULER_ACTOR,
};

/// tally's four statuses; only `active` and `trialing` grant entitlements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum Status {
    Trialing,
    Active,
    /// From Stripe only: behind on payment (no entitlements, not ended).
    PastDue,
    Canceled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Trialing => "trialing",
            Status::Active => "active",
            Status::PastDue => "past_due",
            Status::Canceled => "canceled",
        }
    }

    pub fn is_live(self) -> bool {
        matches!(self, Status::Trialing | Status::Active)
    }
}

impl std::str::FromStr for Status {
    type Err = String;

    fn from_str(text: &str) -> Result<Status, String> {
        match text {
            "trialing" => Ok(Status::Trialing),
            "active" => Ok(Status::Active),
            "past_due" => Ok(Status::PastDue),
            "canceled" => Ok(Status::Canceled),
            other => Err(format!(
                "status {other:?}: use trialing, active, past_due or canceled"
            )),
        }
    }
}

/// Who changes a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum Source {
    /// The admin API and `tally subscriptions`.
    Tally,
    /// Stripe's webhooks; the API refuses to edit it.
    Stripe,
    /// The scheduler, after a cancellation, on `[subscriptions] fallback_plan`; a new
    /// subscription replaces it.
    Fallback,
}

/// A subscription as the `subscriptions` table holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct SubscriptionRecord {
    #[sqlx(rename = "subscription_id")]
    pub id: i64,
    #[sqlx(rename = "customer_id")]
    pub customer: String,
    pub plan: String,
    pub status: Status,
    pub source: Source,
    pub billing_interval: Interval,
    /// Period n ends at the anchor plus n intervals.
    pub billing_anchor: DateTime<Utc>,
    pub started_at: DateTime<Utc>,
    pub trial_end: Option<DateTime<Utc>>,
    pub current_period_start: DateTime<Utc>,
    pub current_period_end: DateTime<Utc>,
    pub cancel_at_period_end: bool,
    /// The plan the subscription moves to at the end of the current period.
    pub pending_plan: Option<String>,
    pub payment_method: bool,
    pub ended_at: Option<DateTime<Utc>>,
    /// When the current plan and status took effect.
    pub status_since: DateTime<Utc>,
    pub stripe_subscription_id: Option<String>,
    pub stripe_status: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The columns of [`SubscriptionRecord`], for `SELECT {COLUMNS} FROM subscriptions`.
pub(crate) const COLUMNS: &str = "subscription_id, customer_id, plan, status, source, \
    billing_interval, billing_anchor, started_at, trial_end, current_period_start, \
    current_period_end, cancel_at_period_end, pending_plan, payment_method, ended_at, \
    status_since, stripe_subscription_id, stripe_status, created_at, updated_at";
