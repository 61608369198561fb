//! The scheduler in `tally serve`: applies what is due at period ends to tally-managed
//! subscriptions ([`super::step`]), then puts customers whose subscription ended on the
//! fallback plan, if one is configured.
//!
//! Safe with several replicas: subscriptions are taken with `FOR UPDATE SKIP LOCKED`, a batch
//! a transaction, and a replica that takes one after another committed finds it no longer due
//! (Postgres re-checks the condition on the locked row). Plain period ends (an active monthly
//! or yearly subscription with nothing scheduled) are renewed as a set: [`step`] computes each,
//! one statement writes them and one audits them. The rest go one at a time, each in a
//! savepoint. A subscription that fails (an error is logged and counted) is left for the next
//! run; the others go on: a set that fails is rolled back and its subscriptions go one at a
//! time, to find the one at fault.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::admin::{
    audit, ensure_fallback, try_lock_customer, try_lock_customers, write, write_all,
    SubscriptionError, AUDIT_ENTITY,
};
use super::advance::Transition;
use super::period::Interval;
use super::{step, Status, SubscriptionRecord, COLUMNS};
use crate::plan::PlanDefinition;
use crate::store::{Audit, BillingStoreError};
use crate::telemetry;

/// `[subscriptions]` in tally.toml.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubscriptionsConfig {
    /// The plan a customer moves to when their subscription ends (canceled, a trial that
    /// expired, a fixed term that ended, or deleted in Stripe). Unset (the default): none, and
    /// a customer without a subscription is refused with NO_ACTIVE_SUBSCRIPTION (fail secure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_plan: Option<String>,
    /// How often `tally serve` applies period ends and the fallback.
    #[serde(with = "tally_core::duration")]
    pub schedule_every: Duration,
}

impl Default for SubscriptionsConfig {
    fn default() -> Self {
        SubscriptionsConfig {
            fallback_plan: None,
            schedule_every: Duration::from_secs(10),
        }
    }
}

impl SubscriptionsConfig {
    /// The fallback plan must be one of `[[plans]]`; the interval at least a second.
    pub fn validate(&self, plans: &[PlanDefinition]) -> Result<(), String> {
        if let Some(fallback) = &self.fallback_plan {
            if !plans.iter().any(|plan| &plan.name == fallback) {
                return Err(format!(
                    "subscriptions.fallback_plan {fallback:?} is not in [[plans]]; define it there or remove the setting"
                ));
            }
        }
        if self.schedule_every < Duration::from_secs(1) {
            return Err("subscriptions.schedule_every must be at least 1s".into());
        }
        Ok(())
    }
}

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedulerRun {
    /// Transitions applied (renewals, trial ends, cancellations, term ends).
    pub transitions: usize,
    /// Customers put on the fallback plan.
    pub fallbacks: usize,
    /// Subscriptions that failed and are left for the next run.
    pub failed: usize,
    /// Customers whose subscription changed (for the quota cache).
    pub customers: Vec<String>,
}

/// The actor the scheduler's audit rows name.
pub const ACTOR: &str = "scheduler";

/// The loop's name in `customer_errors`.
pub(crate) const STAGE: &str = "subscriptions";

/// Applies everything due by `now`, then the fallback. An error here is Postgres away (the
/// caller tries again next run); a subscription's own failure is counted in the result.
pub async fn run_due(
    pool: &PgPool,
    config: &SubscriptionsConfig,
    now: DateTime<Utc>,
) -> Result<SchedulerRun, BillingStoreError> {
    let requires_payment_method = plans_requiring_payment_method(pool).await?;
    let mut run = SchedulerRun::default();
    let mut failed: Vec<i64> = Vec::new();
    loop {
        // A batch per transaction (one commit, not one per subscription: at a month's start
        // every monthly subscription anchored on the 1st is due at once), each subscription in
        // a savepoint, so one that fails is rolled back alone and the batch goes on.
        let mut tx = pool.begin().await?;
        // A customer set aside earlier waits for its retry (`customer_errors`).
        let due: Vec<SubscriptionRecord> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM subscriptions s
             WHERE status IN ('active', 'trialing') AND source <> 'stripe'
               AND current_period_end <= $1 AND subscription_id <> ALL($2)
               AND NOT EXISTS (SELECT 1 FROM customer_errors e WHERE e.stage = $4
                               AND e.customer_id = s.customer_id AND e.retry_at > now())
             ORDER BY current_period_end LIMIT $3 FOR UPDATE SKIP LOCKED"
        ))
        .bind(now)
        .bind(&failed)
        .bind(BATCH)
        .bind(STAGE)
        .fetch_all(&mut *tx)
        .await?;
        if due.is_empty() {
            break;
        }
        let mut done = Vec::with_capacity(due.len());
        let mut set_aside = Vec::new();
        // The rows are locked already: a customer's lock is taken only if free (a create or a
        // cancel holding it waits for this row; waiting here would deadlock). Busy: left for
        // the next run.
        let customers: Vec<String> = due.iter().map(|s| s.customer.clone()).collect();
        let busy = try_lock_customers(&mut tx, &customers).await?;
        let (due, waiting): (Vec<_>, Vec<_>) =
            due.into_iter().partition(|s| !busy.contains(&s.customer));
        failed.extend(waiting.iter().map(|s| s.id));
        let (plain, mut one_by_one) = plain_renewals(due, &requires_payment_method, now);
        if !plain.is_empty() {
            let mut savepoint = sqlx::Connection::begin(&mut *tx).await?;
            match renew_all(&mut savepoint, &plain).await {
                Ok(renewed) => {
                    savepoint.commit().await?;
                    done.extend(renewed);
                }
                Err(error) => {
                    savepoint.rollback().await?;
                    tracing::warn!(subscriptions = plain.len(), %error, "renewing a set of subscriptions failed; renewing them one at a time to find the one at fault");
                    one_by_one.extend(plain.into_iter().map(|renewal| renewal.before));
                }
            }
        }
        for subscription in one_by_one {
            let (id, customer) = (subscription.id, subscription.customer.clone());
            let mut savepoint = sqlx::Connection::begin(&mut *tx).await?;
            match advance(
                &mut savepoint,
                subscription,
                &requires_payment_method,
                config,
                now,
            )
            .await
            {
                Ok(applied) => {
                    savepoint.commit().await?;
                    done.push((customer, applied));
                }
                Err(error) => {
                    savepoint.rollback().await?;
                    failed.push(id);
                    run.failed += 1;
                    telemetry::subscription_scheduler_error();
                    tracing::error!(subscription = id, %customer, %error, "could not advance the subscription at its period end; set aside (tally status lists it) and tried again later, the others go on");
                    set_aside.push((customer, error.to_string()));
                }
            }
        }
        let advanced: Vec<String> = done.iter().map(|(c, _)| c.clone()).collect();
        tally_db::customer_errors::clear(&mut tx, STAGE, &advanced).await?;
        for (customer, error) in &set_aside {
            tally_db::customer_errors::record(&mut tx, STAGE, customer, error).await?;
        }
        tx.commit().await?;
        for (customer, applied) in done {
            for action in &applied {
                telemetry::subscription_transition(action);
            }
            run.fallbacks += applied.iter().filter(|a| **a == "fallback").count();
            run.transitions += applied.iter().filter(|a| **a != "fallback").count();
            run.customers.push(customer);
        }
    }
    // Customers set aside whose subscriptions are no longer due at all (canceled, renewed by
    // hand, moved to Stripe): nothing is left to retry.
    sqlx::query(
        "DELETE FROM customer_errors e WHERE e.stage = $1 AND NOT EXISTS (
             SELECT 1 FROM subscriptions s
             WHERE s.customer_id = e.customer_id AND s.status IN ('active', 'trialing')
               AND s.source <> 'stripe' AND s.current_period_end <= $2)",
    )
    .bind(STAGE)
    .bind(now)
    .execute(pool)
    .await?;
    if let Some(plan) = &config.fallback_plan {
        fallback_sweep(pool, plan, &mut run).await?;
    }
    Ok(run)
}

/// Customers whose latest subscription ended elsewhere (canceled in Stripe, by the API
/// without a fallback configured then, before the setting was on) move to the fallback plan.
async fn fallback_sweep(
    pool: &PgPool,
    plan: &str,
    run: &mut SchedulerRun,
) -> Result<(), BillingStoreError> {
    // Subscriptions this run leaves alone: failed, or their customer busy (next run).
    let mut passed_over: Vec<i64> = Vec::new();
    loop {
        let mut tx = pool.begin().await?;
        // Locks in the one order: the customer's first (tried, never waited for: the webhook
        // or API call holding it will be done by the next run), then the row.
        let candidate: Option<(i64, String)> = sqlx::query_as(
            "SELECT subscription_id, customer_id FROM subscriptions
             WHERE status = 'canceled' AND fallback_checked_at IS NULL AND source <> 'fallback'
               AND subscription_id <> ALL($1)
             ORDER BY subscription_id LIMIT 1",
        )
        .bind(&passed_over)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((candidate, candidate_customer)) = candidate else {
            return Ok(());
        };
        if !try_lock_customer(&mut tx, &candidate_customer).await? {
            passed_over.push(candidate);
            continue;
        }
        let ended: Option<SubscriptionRecord> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM subscriptions s
             WHERE subscription_id = $1 AND status = 'canceled' AND fallback_checked_at IS NULL
             FOR UPDATE"
        ))
        .bind(candidate)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(ended) = ended else {
            passed_over.push(candidate); // changed since it was read
            continue;
        };
        let (id, customer) = (ended.id, ended.customer.clone());
        let outcome: Result<bool, SubscriptionError> = async {
            // Only the customer's latest subscription decides: an old one ended long ago says
            // nothing about a customer who subscribed since.
            let latest: i64 = sqlx::query_scalar(
                "SELECT max(subscription_id) FROM subscriptions WHERE customer_id = $1",
            )
            .bind(&ended.customer)
            .fetch_one(&mut *tx)
            .await?;
            if latest != ended.id {
                sqlx::query("UPDATE subscriptions SET fallback_checked_at = now() WHERE subscription_id = $1")
                    .bind(ended.id)
                    .execute(&mut *tx)
                    .await?;
                return Ok(false);
            }
            let reason = "fallback plan: the customer's subscription ended";
            Ok(ensure_fallback(&mut tx, &ended, plan, ACTOR, reason).await?.is_some())
        }
        .await;
        match outcome {
            Ok(created) => {
                tx.commit().await?;
                if created {
                    telemetry::subscription_transition("fallback");
                    run.fallbacks += 1;
                    run.customers.push(customer);
                }
            }
            Err(error) => {
                passed_over.push(id);
                run.failed += 1;
                telemetry::subscription_scheduler_error();
                tracing::error!(subscription = id, %customer, %error, "could not put the customer on the fallback plan; retried next run");
            }
        }
    }
}

/// Most subscriptions advanced in one transaction. Each holds its customer's advisory lock until
/// the commit, and Postgres's lock table is shared (64 locks a connection by default): a batch
/// stays well under it.
const BATCH: i64 = 200;

/// A plain period end: the renewals [`step`] computes for it, each a new period and nothing
/// else.
struct PlainRenewal {
    before: SubscriptionRecord,
    /// The subscription after each missed period end, in order.
    periods: Vec<SubscriptionRecord>,
}

/// Splits due subscriptions into plain renewals (active, monthly or yearly, no cancel or plan
/// change scheduled, so every step due is a renewal) and the rest.
fn plain_renewals(
    due: Vec<SubscriptionRecord>,
    requires_payment_method: &HashMap<String, bool>,
    now: DateTime<Utc>,
) -> (Vec<PlainRenewal>, Vec<SubscriptionRecord>) {
    let requires = |plan: &str| requires_payment_method.get(plan).copied().unwrap_or(false);
    let mut plain = Vec::new();
    let mut rest = Vec::new();
    for subscription in due {
        let simple = subscription.status == Status::Active
            && !subscription.cancel_at_period_end
            && subscription.pending_plan.is_none()
            && matches!(
                subscription.billing_interval,
                Interval::Month | Interval::Year
            );
        if !simple {
            rest.push(subscription);
            continue;
        }
        let mut periods: Vec<SubscriptionRecord> = Vec::new();
        let mut renewals_only = true;
        while let Some((transition, next)) =
            step(periods.last().unwrap_or(&subscription), requires, now)
        {
            renewals_only &= transition
                == Transition::Renewed {
                    plan_changed_from: None,
                };
            periods.push(next);
        }
        if renewals_only && !periods.is_empty() {
            plain.push(PlainRenewal {
                before: subscription,
                periods,
            });
        } else {
            rest.push(subscription);
        }
    }
    (plain, rest)
}

/// Writes plain renewals in one statement and their audit rows (one per period end, as
/// [`advance`] writes them) in another; the customers and what was applied to each.
async fn renew_all(
    tx: &mut PgConnection,
    renewals: &[PlainRenewal],
) -> Result<Vec<(String, Vec<&'static str>)>, SubscriptionError> {
    let last: Vec<SubscriptionRecord> = renewals
        .iter()
        .map(|r| r.periods.last().expect("a plain renewal renews").clone())
        .collect();
    let stored: HashMap<i64, SubscriptionRecord> = write_all(tx, &last)
        .await?
        .into_iter()
        .map(|s| (s.id, s))
        .collect();
    let reason = Transition::Renewed {
        plan_changed_from: None,
    }
    .reason();
    let json = |record: &SubscriptionRecord| {
        serde_json::to_value(record).map_err(|e| BillingStoreError::Corrupt(e.to_string()))
    };
    let mut rows: Vec<(String, serde_json::Value, serde_json::Value)> = Vec::new();
    let mut applied = Vec::with_capacity(renewals.len());
    for renewal in renewals {
        let Some(written) = stored.get(&renewal.before.id) else {
            return Err(BillingStoreError::Corrupt(format!(
                "subscription {} was not written",
                renewal.before.id
            ))
            .into());
        };
        let mut before = renewal.before.clone();
        for period in &renewal.periods {
            // Stored as one write: each step's record carries the write's `updated_at`.
            let after = SubscriptionRecord {
                updated_at: written.updated_at,
                ..period.clone()
            };
            rows.push((written.customer.clone(), json(&before)?, json(&after)?));
            before = after;
        }
        applied.push((
            written.customer.clone(),
            vec!["renew"; renewal.periods.len()],
        ));
    }
    let audits: Vec<Audit<'_>> = rows
        .iter()
        .map(|(customer, before, after)| Audit {
            entity: AUDIT_ENTITY,
            key: customer,
            action: "renew",
            before: Some(before),
            after: Some(after),
            actor: ACTOR,
            reason: Some(&reason),
        })
        .collect();
    Audit::write_all(tx, &audits).await?;
    Ok(applied)
}

/// Every transition due by `now` for one subscription (locked by the caller), each written and
/// audited, and the fallback after one that ends it; the actions applied.
async fn advance(
    tx: &mut PgConnection,
    due: SubscriptionRecord,
    requires_payment_method: &HashMap<String, bool>,
    config: &SubscriptionsConfig,
    now: DateTime<Utc>,
) -> Result<Vec<&'static str>, SubscriptionError> {
    let requires = |plan: &str| requires_payment_method.get(plan).copied().unwrap_or(false);
    let mut applied = Vec::new();
    let mut current = due;
    while let Some((transition, next)) = step(&current, requires, now) {
        let next = write(tx, &next).await?;
        let reason = transition.reason();
        audit(
            tx,
            transition.action(),
            Some(&current),
            Some(&next),
            ACTOR,
            &reason,
        )
        .await?;
        applied.push(transition.action());
        if let (true, Some(plan)) = (transition.ends(), &config.fallback_plan) {
            let reason = format!("fallback plan: {reason}");
            if ensure_fallback(tx, &next, plan, ACTOR, &reason)
                .await?
                .is_some()
            {
                applied.push("fallback");
            }
        }
        current = next;
    }
    Ok(applied)
}

/// Which plans' trials need a payment method to convert. Read as text and parsed here: a
/// stored value that is not a boolean is that plan's problem (logged; it counts as `true`, the
/// safe side), never every renewal's.
async fn plans_requiring_payment_method(
    pool: &PgPool,
) -> Result<HashMap<String, bool>, BillingStoreError> {
    let rows: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT name, definition ->> 'requires_payment_method' FROM plans")
            .fetch_all(pool)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(plan, requires)| {
            let requires = match requires.as_deref() {
                None | Some("false") => false,
                Some("true") => true,
                Some(other) => {
                    tracing::warn!(%plan, value = other, "the plan's stored requires_payment_method is not a boolean; taken as true");
                    true
                }
            };
            (plan, requires)
        })
        .collect())
}

/// Runs [`run_due`] every `schedule_every` until `stop`, supervised. `changed` is told each
/// customer whose subscription changed (to drop them from this process's quota cache).
pub fn start_scheduler(
    pool: PgPool,
    config: SubscriptionsConfig,
    stop: CancellationToken,
    changed: Arc<dyn Fn(&str) + Send + Sync>,
) -> JoinHandle<()> {
    telemetry::describe_scheduler();
    tally_runtime::supervise("subscription_scheduler", stop.clone(), move || {
        let (pool, config, stop, changed) =
            (pool.clone(), config.clone(), stop.clone(), changed.clone());
        async move {
            loop {
                match run_due(&pool, &config, Utc::now()).await {
                    Ok(run) => {
                        for customer in &run.customers {
                            changed(customer);
                        }
                        if run.transitions + run.fallbacks > 0 {
                            tracing::info!(
                                transitions = run.transitions,
                                fallbacks = run.fallbacks,
                                failed = run.failed,
                                "subscriptions advanced"
                            );
                        }
                    }
                    // Postgres away: waited out, the next run catches up.
                    Err(error) => {
                        tracing::warn!(%error, "the subscription scheduler could not reach Postgres; trying again next run")
                    }
                }
                if tally_runtime::sleep_unless_stopped(config.schedule_every, &stop).await {
                    return Ok(());
                }
            }
        }
    })
}
