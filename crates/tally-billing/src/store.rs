//! Plans, subscriptions and overrides in Postgres. Every change writes an `entitlement_audit`
//! row in the same transaction.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};

use crate::plan::{Entitlements, Override, PlanDefinition};

#[derive(Debug, thiserror::Error)]
pub enum BillingStoreError {
    #[error("Postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("plan {plan:?} is no longer in tally.toml but {subscriptions} subscription(s) are on it; move them to another plan first, or keep the plan in [[plans]]")]
    PlanInUse { plan: String, subscriptions: i64 },
    #[error("customer {customer:?} already has an active or trialing subscription; cancel it first (one per customer)")]
    SecondLiveSubscription { customer: String },
    #[error("no plan {0:?}; run `tally plans apply` after adding it to [[plans]] in tally.toml")]
    UnknownPlan(String),
    #[error("stored data does not decode: {0}")]
    Corrupt(String),
    #[error("the plans as written do not fit the overrides of {count} customer(s) on them ({examples}); change those overrides first (PUT /v1/customers/{{id}}/overrides) or keep what they need in the plan")]
    OverridesDoNotFit { count: usize, examples: String },
    /// The customer's override no longer fits its plan (the plan changed under it, in Stripe
    /// or by the fallback plan): its entitlements cannot be known until one of them changes.
    #[error("the override of customer {customer:?} does not fit its plan {plan:?}: {why}; change the override (PUT /v1/customers/{{id}}/overrides) to fit the plan")]
    OverrideDoesNotFit {
        customer: String,
        plan: String,
        why: String,
    },
    /// The quota cache's last load of this customer failed moments ago with this Postgres
    /// error; it asks Postgres again once `failed_load_ttl` has passed.
    #[error("Postgres failed moments ago ({0}); the quota check asks it again once failed_load_ttl has passed (1 s by default)")]
    RecentlyFailed(String),
}

/// What `apply_plans` did to one plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanChange {
    Created(String),
    Updated(String),
    Unchanged(String),
    Deleted(String),
}

/// One `entitlement_audit` row.
pub(crate) struct Audit<'a> {
    pub(crate) entity: &'a str,
    pub(crate) key: &'a str,
    pub(crate) action: &'a str,
    pub(crate) before: Option<&'a Value>,
    pub(crate) after: Option<&'a Value>,
    pub(crate) actor: &'a str,
    pub(crate) reason: Option<&'a str>,
}

impl Audit<'_> {
    pub(crate) async fn write(self, tx: &mut PgConnection) -> Result<(), BillingStoreError> {
        Audit::write_all(tx, &[self]).await
    }

    /// Writes the rows in one statement, in their order.
    pub(crate) async fn write_all(
        tx: &mut PgConnection,
        rows: &[Audit<'_>],
    ) -> Result<(), BillingStoreError> {
        let text = |f: fn(&Audit<'_>) -> Option<String>| rows.iter().map(f).collect::<Vec<_>>();
        let json = |f: fn(&Audit<'_>) -> Option<Value>| rows.iter().map(f).collect::<Vec<_>>();
        sqlx::query(
            "INSERT INTO entitlement_audit (entity, entity_key, action, before, after, actor, reason)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::jsonb[],
                                  $6::text[], $7::text[])",
        )
        .bind(text(|a| Some(a.entity.to_owned())))
        .bind(text(|a| Some(a.key.to_owned())))
        .bind(text(|a| Some(a.action.to_owned())))
        .bind(json(|a| a.before.cloned()))
        .bind(json(|a| a.after.cloned()))
        .bind(text(|a| Some(a.actor.to_owned())))
        .bind(text(|a| a.reason.map(str::to_owned)))
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}

/// The plans in Postgres, by name, each with its definition as stored.
pub async fn list_plans(pool: &PgPool) -> Result<Vec<(String, Value)>, BillingStoreError> {
    Ok(
        sqlx::query_as("SELECT name, definition FROM plans ORDER BY name")
            .fetch_all(pool)
            .await?,
    )
}

/// Makes the `plans` table equal to `plans` (from tally.toml): creates, updates and deletes,
/// each audited. A plan that still has subscriptions is not deleted: the whole apply fails.
pub async fn apply_plans(
    pool: &PgPool,
    plans: &[PlanDefinition],
    actor: &str,
) -> Result<Vec<PlanChange>, BillingStoreError> {
    let mut tx = pool.begin().await?;
    // One apply at a time: two concurrent applies would each audit the other's changes wrongly.
    sqlx::query("LOCK TABLE plans IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let stored: Vec<(String, Value)> = sqlx::query_as("SELECT name, definition FROM plans")
        .fetch_all(&mut *tx)
        .await?;
    let mut stored: std::collections::BTreeMap<String, Value> = stored.into_iter().collect();
    let mut changes = Vec::new();
    for plan in plans {
        let definition =
            serde_json::to_value(plan).map_err(|e| BillingStoreError::Corrupt(e.to_string()))?;
        let before = stored.remove(&plan.name);
        if before.as_ref() == Some(&definition) {
            changes.push(PlanChange::Unchanged(plan.name.clone()));
            continue;
        }
        sqlx::query(
            "INSERT INTO plans (name, definition) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET definition = excluded.definition, updated_at = now()",
        )
        .bind(&plan.name)
        .bind(&definition)
        .execute(&mut *tx)
        .await?;
        Audit {
            entity: "plan",
            key: &plan.name,
            action: if before.is_some() { "update" } else { "create" },
            before: before.as_ref(),
            after: Some(&definition),
            actor,
            reason: None,
        }
        .write(&mut tx)
        .await?;
        changes.push(match before {
            Some(_) => PlanChange::Updated(plan.name.clone()),
            None => PlanChange::Created(plan.name.clone()),
        });
    }
    // An override must fit its customer's plan: a plan changed under one would leave that
    // customer without entitlements (their checks and alerts would fail). Refused whole.
    let changed: Vec<&PlanDefinition> = plans
        .iter()
        .filter(|plan| {
            changes.iter().any(|c| {
                matches!(c, PlanChange::Updated(name) | PlanChange::Created(name) if name == &plan.name)
            })
        })
        .collect();
    check_overrides_fit(&mut tx, &changed).await?;
    for (name, before) in stored {
        let subscriptions: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM subscriptions WHERE plan = $1 OR pending_plan = $1",
        )
        .bind(&name)
        .fetch_one(&mut *tx)
        .await?;
        if subscriptions > 0 {
            return Err(BillingStoreError::PlanInUse {
                plan: name,
                subscriptions,
            });
        }
        sqlx::query("DELETE FROM plans WHERE name = $1")
            .bind(&name)
            .execute(&mut *tx)
            .await?;
        Audit {
            entity: "plan",
            key: &name,
            action: "delete",
            before: Some(&before),
            after: None,
            actor,
            reason: None,
        }
        .write(&mut tx)
        .await?;
        changes.push(PlanChange::Deleted(name));
    }
    tx.commit().await?;
    Ok(changes)
}

/// Refuses plans that do not fit the override of a customer who is (or will be, at its
/// period's end) on one of them.
async fn check_overrides_fit(
    tx: &mut PgConnection,
    plans: &[&PlanDefinition],
) -> Result<(), BillingStoreError> {
    if plans.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = plans.iter().map(|p| p.name.as_str()).collect();
    let rows: Vec<(String, String, Value)> = sqlx::query_as(
        "SELECT DISTINCT s.customer_id, p.plan, o.overrides
         FROM subscriptions s
         CROSS JOIN LATERAL (VALUES (s.plan), (s.pending_plan)) AS p(plan)
         JOIN customer_overrides o ON o.customer_id = s.customer_id
         WHERE p.plan = ANY($1) AND s.status IN ('active', 'trialing')
         ORDER BY 1, 2",
    )
    .bind(&names)
    .fetch_all(&mut *tx)
    .await?;
    let mut misfits = Vec::new();
    for (customer, plan, overrides) in rows {
        let Some(definition) = plans.iter().find(|p| p.name == plan) else {
            continue;
        };
        let why = match serde_json::from_value::<Override>(overrides) {
            Ok(overrides) => Entitlements::resolve(definition, Some(&overrides)).err(),
            Err(e) => Some(format!("the stored override does not decode: {e}")),
        };
        if let Some(why) = why {
            misfits.push(format!("{customer} on {plan}: {why}"));
        }
    }
    if misfits.is_empty() {
        return Ok(());
    }
    Err(BillingStoreError::OverridesDoNotFit {
        count: misfits.len(),
        examples: misfits.into_iter().take(5).collect::<Vec<_>>().join("; "),
    })
}

/// Whether `customer`'s override (if any) fits `plan`; the reason when it does not.
pub async fn override_fits(
    conn: &mut PgConnection,
    customer: &str,
    plan: &str,
) -> Result<Result<(), String>, BillingStoreError> {
    let stored: Option<Value> =
        sqlx::query_scalar("SELECT overrides FROM customer_overrides WHERE customer_id = $1")
            .bind(customer)
            .fetch_optional(&mut *conn)
            .await?;
    let Some(overrides) = decode::<Override>(stored)? else {
        return Ok(Ok(()));
    };
    let definition = plan_definition(conn, plan).await?;
    Ok(Entitlements::resolve(&definition, Some(&overrides)).map(|_| ()))
}

/// A plan's definition, read FOR SHARE: a `plans apply` changing it meanwhile is waited for,
/// so an override is checked against the plan as it is written (and the apply, which checks
/// the overrides it sees, sees this one's change).
async fn plan_definition(
    conn: &mut PgConnection,
    plan: &str,
) -> Result<PlanDefinition, BillingStoreError> {
    let definition: Option<Value> =
        sqlx::query_scalar("SELECT definition FROM plans WHERE name = $1 FOR SHARE")
            .bind(plan)
            .fetch_optional(&mut *conn)
            .await?;
    decode(definition)?.ok_or_else(|| BillingStoreError::UnknownPlan(plan.to_owned()))
}

/// A subscription as tally holds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct Subscription {
    pub customer_id: String,
    pub plan: String,
    pub status: String,
    pub current_period_start: DateTime<Utc>,
    pub current_period_end: DateTime<Utc>,
    pub cancel_at_period_end: bool,
}

/// Starts a subscription. A second active or trialing one for the customer is refused by the
/// database (a unique index), and reported as such.
pub async fn create_subscription(
    pool: &PgPool,
    subscription: &Subscription,
    actor: &str,
) -> Result<i64, BillingStoreError> {
    let mut tx = pool.begin().await?;
    let inserted = sqlx::query_scalar::<_, i64>(
        "INSERT INTO subscriptions (customer_id, plan, status, current_period_start, current_period_end,
                cancel_at_period_end, billing_anchor, started_at, status_since)
         VALUES ($1, $2, $3, $4, $5, $6, $4, $4, $4) RETURNING subscription_id",
    )
    .bind(&subscription.customer_id)
    .bind(&subscription.plan)
    .bind(&subscription.status)
    .bind(subscription.current_period_start)
    .bind(subscription.current_period_end)
    .bind(subscription.cancel_at_period_end)
    .fetch_one(&mut *tx)
    .await;
    let id = match inserted {
        Ok(id) => id,
        Err(sqlx::Error::Database(e))
            if e.constraint() == Some("subscriptions_one_live_per_customer") =>
        {
            return Err(BillingStoreError::SecondLiveSubscription {
                customer: subscription.customer_id.clone(),
            })
        }
        Err(sqlx::Error::Database(e)) if e.constraint() == Some("subscriptions_plan_fkey") => {
            return Err(BillingStoreError::UnknownPlan(subscription.plan.clone()))
        }
        Err(e) => return Err(e.into()),
    };
    let after = serde_json::to_value(subscription)
        .map_err(|e| BillingStoreError::Corrupt(e.to_string()))?;
    Audit {
        entity: "subscription",
        key: &subscription.customer_id,
        action: "create",
        before: None,
        after: Some(&after),
        actor,
        reason: None,
    }
    .write(&mut tx)
    .await?;
    tx.commit().await?;
    Ok(id)
}

/// Sets (replaces) a customer's override, with the reason and who set it. Refused
/// (`OverrideDoesNotFit`) unless it fits the customer's live plan and the plan it moves to at
/// the period's end, checked under the customer's lock, which plan changes take too (checked
/// apart, an override and a plan change at once could each fit the old other).
pub async fn set_override(
    pool: &PgPool,
    customer: &str,
    overrides: &Override,
    reason: &str,
    set_by: &str,
) -> Result<(), BillingStoreError> {
    let mut tx = pool.begin().await?;
    crate::subscriptions::lock_customer(&mut tx, customer).await?;
    let plans: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT plan, pending_plan FROM subscriptions
         WHERE customer_id = $1 AND status IN ('active', 'trialing')",
    )
    .bind(customer)
    .fetch_all(&mut *tx)
    .await?;
    let mut names: Vec<String> = Vec::new();
    for (plan, pending) in plans {
        names.push(plan);
        names.extend(pending);
    }
    for plan in &names {
        let definition = plan_definition(&mut tx, plan).await?;
        if let Err(why) = Entitlements::resolve(&definition, Some(overrides)) {
            return Err(BillingStoreError::OverrideDoesNotFit {
                customer: customer.to_owned(),
                plan: plan.clone(),
                why,
            });
        }
    }
    let before: Option<Value> = sqlx::query_scalar(
        "SELECT overrides FROM customer_overrides WHERE customer_id = $1 FOR UPDATE",
    )
    .bind(customer)
    .fetch_optional(&mut *tx)
    .await?;
    let after =
        serde_json::to_value(overrides).map_err(|e| BillingStoreError::Corrupt(e.to_string()))?;
    sqlx::query(
        "INSERT INTO customer_overrides (customer_id, overrides, reason, set_by) VALUES ($1, $2, $3, $4)
         ON CONFLICT (customer_id) DO UPDATE
            SET overrides = excluded.overrides, reason = excluded.reason, set_by = excluded.set_by, updated_at = now()",
    )
    .bind(customer)
    .bind(&after)
    .bind(reason)
    .bind(set_by)
    .execute(&mut *tx)
    .await?;
    let action = if before.is_some() { "update" } else { "create" };
    Audit {
        entity: "override",
        key: customer,
        action,
        before: before.as_ref(),
        after: Some(&after),
        actor: set_by,
        reason: Some(reason),
    }
    .write(&mut tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Removes a customer's override, with the reason and who removed it; `false` when there was
/// none.
pub async fn delete_override(
    pool: &PgPool,
    customer: &str,
    reason: &str,
    actor: &str,
) -> Result<bool, BillingStoreError> {
    let mut tx = pool.begin().await?;
    let before: Option<Value> = sqlx::query_scalar(
        "DELETE FROM customer_overrides WHERE customer_id = $1 RETURNING overrides",
    )
    .bind(customer)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(before) = before else {
        return Ok(false);
    };
    Audit {
        entity: "override",
        key: customer,
        action: "delete",
        before: Some(&before),
        after: None,
        actor,
        reason: Some(reason),
    }
    .write(&mut tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// A customer's override, if they have one.
pub async fn get_override(
    pool: &PgPool,
    customer: &str,
) -> Result<Option<Override>, BillingStoreError> {
    let stored: Option<Value> =
        sqlx::query_scalar("SELECT overrides FROM customer_overrides WHERE customer_id = $1")
            .bind(customer)
            .fetch_optional(pool)
            .await?;
    decode(stored)
}

/// A stored JSON document as `T`; one that does not decode is reported, never a panic.
fn decode<T: serde::de::DeserializeOwned>(
    stored: Option<Value>,
) -> Result<Option<T>, BillingStoreError> {
    stored
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| BillingStoreError::Corrupt(e.to_string()))
}

/// A plan as `tally plans apply` stored it.
pub async fn get_plan(
    pool: &PgPool,
    plan: &str,
) -> Result<Option<PlanDefinition>, BillingStoreError> {
    let stored: Option<Value> = sqlx::query_scalar("SELECT definition FROM plans WHERE name = $1")
        .bind(plan)
        .fetch_optional(pool)
        .await?;
    decode(stored)
}

/// What the customer would be entitled to on `plan`, with their override merged in (the
/// entitlements preview of a plan change). `Ok(Err(why))` when their override does not fit
/// that plan.
pub async fn preview_entitlements(
    pool: &PgPool,
    customer: &str,
    plan: &str,
) -> Result<Result<Entitlements, String>, BillingStoreError> {
    let definition = get_plan(pool, plan)
        .await?
        .ok_or_else(|| BillingStoreError::UnknownPlan(plan.to_owned()))?;
    let overrides = get_override(pool, customer).await?;
    Ok(Entitlements::resolve(&definition, overrides.as_ref()))
}

#[derive(sqlx::FromRow)]
struct LiveSubscriptionRow {
    customer_id: String,
    plan: String,
    status: String,
    current_period_start: DateTime<Utc>,
    current_period_end: DateTime<Utc>,
    cancel_at_period_end: bool,
    definition: Value,
    overrides: Option<Value>,
}

/// A customer's live subscription and resolved entitlements; `None` when the customer has no
/// active or trialing subscription (fail secure: no implicit free plan).
pub async fn entitlements(
    pool: &PgPool,
    customer: &str,
) -> Result<Option<(Subscription, Entitlements)>, BillingStoreError> {
    let mut found = live_customers(pool, &[customer.to_owned()]).await?;
    found
        .remove(customer)
        .map(|live| live.map(|live| (live.subscription, live.entitlements)))
        .transpose()
}

/// A customer's live subscription and resolved entitlements, and whether an override changed
/// them (the quota cache shares one copy of a plan's entitlements among the customers without).
pub struct LiveCustomer {
    pub subscription: Subscription,
    pub entitlements: Entitlements,
    pub overridden: bool,
}

/// The live subscriptions of many customers, in one query, with their entitlements resolved;
/// customers without one are absent. A customer whose stored plan or override does not decode,
/// or whose override does not fit its plan, gets its own error: one such customer never fails
/// the others (they are loaded in batches by the quota cache and the alert evaluator).
pub async fn live_customers(
    pool: &PgPool,
    customers: &[String],
) -> Result<HashMap<String, Result<LiveCustomer, BillingStoreError>>, BillingStoreError> {
    let rows: Vec<LiveSubscriptionRow> = sqlx::query_as(
        "SELECT s.customer_id, s.plan, s.status, s.current_period_start, s.current_period_end,
                s.cancel_at_period_end, p.definition, o.overrides
         FROM subscriptions s
         JOIN plans p ON p.name = s.plan
         LEFT JOIN customer_overrides o ON o.customer_id = s.customer_id
         WHERE s.customer_id = ANY($1) AND s.status IN ('active', 'trialing')",
    )
    .bind(customers)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| (row.customer_id.clone(), resolve_row(row)))
        .collect())
}

fn resolve_row(row: LiveSubscriptionRow) -> Result<LiveCustomer, BillingStoreError> {
    let corrupt = |what: &str, e: serde_json::Error| {
        BillingStoreError::Corrupt(format!("{what} of customer {}: {e}", row.customer_id))
    };
    let definition: PlanDefinition =
        serde_json::from_value(row.definition.clone()).map_err(|e| corrupt("the plan", e))?;
    let overridden = row.overrides.is_some();
    let overrides: Option<Override> = row
        .overrides
        .clone()
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| corrupt("the override", e))?;
    let entitlements = Entitlements::resolve(&definition, overrides.as_ref()).map_err(|why| {
        BillingStoreError::OverrideDoesNotFit {
            customer: row.customer_id.clone(),
            plan: row.plan.clone(),
            why,
        }
    })?;
    Ok(LiveCustomer {
        subscription: Subscription {
            customer_id: row.customer_id,
            plan: row.plan,
            status: row.status,
            current_period_start: row.current_period_start,
            current_period_end: row.current_period_end,
            cancel_at_period_end: row.cancel_at_period_end,
        },
        entitlements,
        overridden,
    })
}
