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
use tally_billing::AlertRule;
use tally_credits::RateCard;
use tally_quota::CustomerUsage;

use crate::store::{rules_of, threshold, AlertError, BALANCE_BELOW, USAGE_CROSSED};
use crate::telemetry;

/// Changes one evaluation takes at most.
const BATCH: i64 = 5_000;

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
    /// Customers that could not be evaluated: set aside in `customer_errors`, tried again
    /// later.
    pub set_aside: Vec<String>,
}

/// One rule as it applies to one customer.
struct Applied<'a> {
    /// `plan:<plan>:<rule>` or `customer:<rule id>`.
    key: String,
    rule: &'a AlertRule,
}

/// The loop's name in `customer_errors`.
pub const STAGE: &str = "alerts";

/// Customers set aside earlier that one evaluation tries again at most.
const RETRIES: i64 = 100;

/// Takes up to a batch of changes and evaluates the customers they name (and those set aside
/// earlier whose retry is due). A customer that cannot be evaluated (an override that no
/// longer fits its plan, usage or a balance beyond a decimal, a write Postgres refuses) is set
/// aside in `customer_errors` and tried again later; everyone else is evaluated and the
/// changes are taken. Only Postgres being away fails the whole evaluation.
pub async fn evaluate_once(
    pool: &PgPool,
    rates: &RateCard,
    now: DateTime<Utc>,
) -> Result<Evaluation, AlertError> {
    let mut tx = pool.begin().await?;
    let mut customers = tally_db::changes::take(&mut tx, BATCH).await?;
    let more = customers.len() as i64 >= BATCH;
    customers.extend(tally_db::customer_errors::due(&mut tx, STAGE, RETRIES).await?);
    customers.sort_unstable();
    customers.dedup();
    let mut report = Evaluation {
        customers: customers.len(),
        more,
        ..Evaluation::default()
    };
    if customers.is_empty() {
        return Ok(report);
    }
    let read = tally_quota::usage_against_limits(pool, &customers, now)
        .await
        .map_err(|e| AlertError::Read(format!("reading usage: {e}")))?;
    let mut failed: BTreeMap<String, String> = read
        .failed
        .into_iter()
        .map(|(customer, error)| (customer, format!("reading usage: {error}")))
        .collect();
    let usage: HashMap<String, CustomerUsage> = read
        .customers
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
        let (balances, unreadable) =
            tally_credits::projected_balances_isolating(pool, &with_balance_rules, rates, now)
                .await?;
        for (customer, error) in unreadable {
            failed.insert(customer, format!("reading the credit balance: {error}"));
        }
        balances
    };
    let mut evaluated = Vec::new();
    for (customer, applied) in &rules {
        if failed.contains_key(*customer) {
            continue;
        }
        // Each customer in a savepoint: a write Postgres refuses for one customer is undone
        // for that customer alone.
        let mut savepoint = sqlx::Connection::begin(&mut *tx).await?;
        let context = Context {
            usage: usage.get(*customer),
            balance: balances.get(*customer).copied().unwrap_or_default(),
            now,
        };
        match evaluate_customer(&mut savepoint, customer, applied, &context).await {
            Ok((fired, rearmed)) => {
                savepoint.commit().await?;
                report.fired.extend(fired);
                report.rearmed += rearmed;
                evaluated.push((*customer).to_owned());
            }
            Err(AlertError::Store(error)) if !tally_db::is_retryable(&error) => {
                savepoint.rollback().await?;
                failed.insert((*customer).to_owned(), error.to_string());
            }
            Err(other) => return Err(other),
        }
    }
    // Customers without rules were evaluated too (nothing to do).
    evaluated.extend(
        customers
            .iter()
            .filter(|c| !rules.contains_key(c.as_str()) && !failed.contains_key(*c))
            .cloned(),
    );
    tally_db::customer_errors::clear(&mut tx, STAGE, &evaluated).await?;
    for (customer, error) in &failed {
        tracing::warn!(%customer, %error, "a customer's alert rules cannot be evaluated; set aside (tally status lists it), the others go on");
        tally_db::customer_errors::record(&mut tx, STAGE, customer, error).await?;
    }
    tx.commit().await?;
    report.set_aside = failed.into_keys().collect();
    telemetry::fired(report.fired.len());
    Ok(report)
}

/// What a customer's rules are evaluated against.
struct Context<'a> {
    usage: Option<&'a CustomerUsage>,
    balance: rust_decimal::Decimal,
    now: DateTime<Utc>,
}

/// Evaluates one customer's rules; returns the event ids fired and the rules re-armed.
async fn evaluate_customer(
    tx: &mut PgConnection,
    customer: &str,
    applied: &[Applied<'_>],
    context: &Context<'_>,
) -> Result<(Vec<String>, usize), AlertError> {
    let mut fired_ids = Vec::new();
    let mut rearmed = 0;
    for rule in applied {
        match (
            &rule.rule.meter,
            rule.rule.percent,
            rule.rule.credit_balance_below,
        ) {
            (Some(meter), Some(percent), _) => {
                let Some(live) = context.usage else {
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
                    tx,
                    &rule.key,
                    customer,
                    used.period_start,
                    USAGE_CROSSED,
                    data,
                    context.now,
                )
                .await?;
                fired_ids.extend(fired);
            }
            (_, _, Some(below)) => {
                let balance = context.balance;
                if balance < below {
                    let data = json!({ "rule": rule.key, "below": below, "balance": balance });
                    let fired = fire(
                        tx,
                        &rule.key,
                        customer,
                        context.now,
                        BALANCE_BELOW,
                        data,
                        context.now,
                    )
                    .await?;
                    fired_ids.extend(fired);
                } else if rearm(tx, &rule.key, customer).await? {
                    rearmed += 1;
                }
            }
            _ => {}
        }
    }
    Ok((fired_ids, rearmed))
}

/// Each plan's rules, from the definitions `tally plans apply` stored.
async fn plan_rules(pool: &PgPool) -> Result<HashMap<String, Vec<AlertRule>>, AlertError> {
    let plans = tally_billing::list_plans(pool)
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
