//! The evaluator: takes the customers whose usage or credits changed (`customer_changes`),
//! evaluates their plan's and their own rules against the usage Postgres holds for the current
//! period and the projected credit balance, and records each crossing once (`alert_firings`),
//! with one pending delivery per endpoint, in the transaction that took the changes. A crash
//! leaves the changes to be taken again; a crossing already recorded is never recorded twice
//! (unique per rule, customer and period), so a restart does not fire again.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use tally_credits::RateCard;
use tally_quota::{AlertRule, CustomerUsage};

use crate::store::{rules_of, threshold, AlertError};
use crate::telemetry;

/// Changes one evaluation takes at most.
const BATCH: i64 = 5_000;

/// Event type of a usage rule's crossing.
pub const USAGE_CROSSED: &str = "usage.threshold_crossed";
/// Event type of a balance rule's crossing.
pub const BALANCE_BELOW: &str = "credits.balance_below";

/// What one evaluation did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evaluation {
    /// Customers evaluated.
    pub customers: usize,
    /// Event ids of the crossings recorded.
    pub fired: Vec<String>,
    /// Balance rules armed again (the balance is back at or above the amount).
    pub rearmed: usize,
    /// Whether changes were left for another evaluation.
    pub more: bool,
}

/// One rule as it applies to one customer.
struct Applied<'a> {
    /// `plan:<plan>:<rule>` or `customer:<rule id>`.
    key: String,
    rule: &'a AlertRule,
}

/// Takes up to a batch of changes and evaluates the customers they name.
pub async fn evaluate_once(
    pool: &PgPool,
    rates: &RateCard,
    now: DateTime<Utc>,
) -> Result<Evaluation, AlertError> {
    let mut tx = pool.begin().await?;
    let customers = tally_db::changes::take(&mut tx, BATCH).await?;
    let mut report = Evaluation {
        customers: customers.len(),
        ..Evaluation::default()
    };
    if customers.is_empty() {
        return Ok(report);
    }
    report.more = customers.len() as i64 >= BATCH;
    let usage: HashMap<String, CustomerUsage> =
        tally_quota::usage_against_limits(pool, &customers, now)
            .await
            .map_err(|e| AlertError::Read(format!("reading usage: {e}")))?
            .into_iter()
            .map(|u| (u.customer.clone(), u))
            .collect();
    let plan_rules = plan_rules(pool).await?;
    let own_rules = rules_of(pool, &customers).await?;
    let mut rules: BTreeMap<&str, Vec<Applied<'_>>> = BTreeMap::new();
    for (customer, live) in &usage {
        for rule in plan_rules
            .get(&live.entitlements.plan)
            .into_iter()
            .flatten()
        {
            rules.entry(customer).or_default().push(Applied {
                key: format!("plan:{}:{}", live.entitlements.plan, rule.key()),
                rule,
            });
        }
    }
    for own in &own_rules {
        rules.entry(&own.customer).or_default().push(Applied {
            key: format!("customer:{}", own.rule_id),
            rule: &own.rule,
        });
    }
    let with_balance_rules: Vec<&str> = rules
        .iter()
        .filter(|(_, rules)| rules.iter().any(|a| a.rule.credit_balance_below.is_some()))
        .map(|(customer, _)| *customer)
        .collect();
    let balances = if with_balance_rules.is_empty() {
        HashMap::new()
    } else {
        tally_credits::projected_balances(pool, &with_balance_rules, rates, now).await?
    };
    for (customer, applied) in &rules {
        for rule in applied {
            match (
                &rule.rule.meter,
                rule.rule.percent,
                rule.rule.credit_balance_below,
            ) {
                (Some(meter), Some(percent), _) => {
                    let Some(live) = usage.get(*customer) else {
                        continue;
                    };
                    let Some(used) = live.meters.iter().find(|m| &m.meter == meter) else {
                        continue;
                    };
                    if used.limit.is_unlimited() {
                        continue;
                    }
                    let Some(at) = threshold(used.limit.limit, percent) else {
                        continue;
                    };
                    if used.used < at {
                        continue;
                    }
                    let data = json!({
                        "rule": rule.key, "meter": meter, "percent": percent,
                        "limit": used.limit.limit, "threshold": at, "usage": used.used,
                        "period": used.limit.period, "period_start": used.period_start,
                        "period_end": used.resets_at, "plan": live.entitlements.plan,
                    });
                    let fired = fire(
                        &mut tx,
                        &rule.key,
                        customer,
                        used.period_start,
                        USAGE_CROSSED,
                        data,
                        now,
                    )
                    .await?;
                    report.fired.extend(fired);
                }
                (_, _, Some(below)) => {
                    let balance = balances.get(*customer).copied().unwrap_or_default();
                    if balance < below {
                        let data = json!({ "rule": rule.key, "below": below, "balance": balance });
                        let fired =
                            fire(&mut tx, &rule.key, customer, now, BALANCE_BELOW, data, now)
                                .await?;
                        report.fired.extend(fired);
                    } else if rearm(&mut tx, &rule.key, customer).await? {
                        report.rearmed += 1;
                    }
                }
                _ => {}
            }
        }
    }
    tx.commit().await?;
    telemetry::fired(report.fired.len());
    Ok(report)
}

/// Each plan's rules, from the definitions `tally plans apply` stored.
async fn plan_rules(pool: &PgPool) -> Result<HashMap<String, Vec<AlertRule>>, AlertError> {
    let plans = tally_quota::list_plans(pool)
        .await
        .map_err(|e| AlertError::Read(format!("reading plans: {e}")))?;
    Ok(plans
        .into_iter()
        .filter_map(|(name, definition)| {
            let alerts = definition.get("alerts")?.clone();
            // A definition tally wrote; one it cannot read has no rules rather than stopping
            // every customer's alerts.
            let rules: Vec<AlertRule> = serde_json::from_value(alerts).ok()?;
            Some((name, rules))
        })
        .collect())
}

/// The stable id receivers dedupe on: the same rule, customer and period give the same id.
fn event_id(rule: &str, customer: &str, period_start: DateTime<Utc>) -> String {
    let mut hash = Sha256::new();
    for part in [rule, customer, &period_start.to_rfc3339()] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    format!("evt_{}", &hex::encode(hash.finalize())[..32])
}

/// Records the crossing unless it was recorded already, with a pending delivery to every
/// endpoint. Returns the event id when it is new.
async fn fire(
    tx: &mut PgConnection,
    rule: &str,
    customer: &str,
    period_start: DateTime<Utc>,
    event_type: &str,
    data: serde_json::Value,
    now: DateTime<Utc>,
) -> Result<Option<String>, AlertError> {
    let id = event_id(rule, customer, period_start);
    let payload = json!({
        "id": id, "type": event_type, "created": now.timestamp(), "customer": customer,
        "data": data,
    });
    let firing: Option<i64> = sqlx::query_scalar(
        "INSERT INTO alert_firings (event_id, rule_key, customer_id, period_start, event_type,
                payload, fired_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING RETURNING firing_id",
    )
    .bind(&id)
    .bind(rule)
    .bind(customer)
    .bind(period_start)
    .bind(event_type)
    .bind(&payload)
    .bind(now)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(firing) = firing else {
        return Ok(None);
    };
    // One delivery per live endpoint the firing concerns (at most MAX_ENDPOINTS).
    sqlx::query(
        "INSERT INTO alert_deliveries (firing_id, endpoint_id, next_attempt_at)
         SELECT $1, endpoint_id, greatest($2, open_until) FROM alert_endpoints
         WHERE deleted_at IS NULL
           AND (customers IS NULL OR $3 = ANY (customers))
           AND (event_types IS NULL OR $4 = ANY (event_types))",
    )
    .bind(firing)
    .bind(now)
    .bind(customer)
    .bind(event_type)
    .execute(&mut *tx)
    .await?;
    Ok(Some(id))
}

/// A balance rule whose balance is back at or above its amount fires again at the next fall.
async fn rearm(tx: &mut PgConnection, rule: &str, customer: &str) -> Result<bool, AlertError> {
    let rearmed = sqlx::query(
        "UPDATE alert_firings SET rearmed_at = now()
         WHERE rule_key = $1 AND customer_id = $2 AND event_type = $3 AND rearmed_at IS NULL",
    )
    .bind(rule)
    .bind(customer)
    .bind(BALANCE_BELOW)
    .execute(&mut *tx)
    .await?;
    Ok(rearmed.rows_affected() > 0)
}
