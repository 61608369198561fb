//! The burner: draws committed usage down from grants, exactly once, and closes expired
//! grants. It runs in `tally aggregate` (every `credits.burn_every`, 250 ms by default).
//!
//! Exactly once rests on the queue: the aggregator adds a window's newly counted usage to
//! `credit_usage_queue` in the batch's own transaction (so a replayed, duplicate or rolled
//! back event is never queued, and a late one is queued when it is counted), and one burn
//! deletes the queue rows it takes in the transaction that writes their `consume` entries and
//! the grants' new `remaining`. A crash before the commit leaves the rows queued; after, they
//! are gone. Several burners (one per aggregator) take disjoint rows (`SKIP LOCKED`) and
//! serialize on each customer's advisory lock.
//!
//! Expiry: a grant past `expires_at` is closed with an `expire` entry of what is left, once no
//! usage from before its expiry is still queued for the customer (that usage draws from it
//! first). Plan grants: each live subscription on a plan with `[plans.credits]` gets its
//! period's grant (idempotency key `plan:<subscription>:<period start>`), expiring at the
//! period's end.

mod draw;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::grants::{
    grant_in, lock_customers, Actor, CreditError, GrantKind, Issuer, NewGrant, DRAW_ORDER,
};
use crate::rates::{FreshRates, RateCard};
use crate::telemetry;
use draw::{draw, OpenGrant, PricedUsage};

/// Queue rows one burn takes at most.
const BATCH: i64 = 5_000;

/// The actor burns, expiries and plan grants are recorded under.
pub const ACTOR: &str = "burner";

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BurnReport {
    /// Queue rows taken (one per window and aggregator batch).
    pub queued: usize,
    /// `consume` entries written.
    pub entries: usize,
    /// Customers whose credits moved.
    pub customers: Vec<String>,
    /// The oldest row taken had waited this long since its commit.
    pub oldest_wait: Option<Duration>,
}

/// Burns what is queued, up to a batch. Returns whether more is queued.
pub async fn burn_once(pool: &PgPool, rates: &RateCard) -> Result<(BurnReport, bool), sqlx::Error> {
    let report = burn_queued(pool, rates).await?;
    let more = report.queued as i64 >= BATCH;
    Ok((report, more))
}

/// What a settle did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settled {
    /// Grants closed as expired.
    pub expired: usize,
    /// Customers given their plan's period credits.
    pub plan_grants: Vec<String>,
}

/// Closes expired grants (see `expire`) and makes the plan grants that are due. Run after
/// the queue was drained, so usage from before an expiry draws from the grant first.
pub async fn settle(pool: &PgPool, now: DateTime<Utc>) -> Result<Settled, sqlx::Error> {
    Ok(Settled {
        expired: expire(pool, now).await?,
        plan_grants: grant_plan_credits(pool, now).await?,
    })
}

/// A window of a customer's queued usage: its start, meter and group key.
type WindowKey = (DateTime<Utc>, String, String);

/// A subscription due its period's plan credits: id, customer, plan, period start and end,
/// amount and priority (as the plan's definition has them), and the grant's idempotency key.
type DuePlanGrant = (
    i64,
    String,
    String,
    DateTime<Utc>,
    DateTime<Utc>,
    Option<String>,
    Option<String>,
    String,
);

/// A queue row, as taken.
#[derive(sqlx::FromRow)]
struct Queued {
    queue_id: i64,
    customer_id: String,
    meter: String,
    group_key: String,
    window_start: DateTime<Utc>,
    /// As text: a value beyond a decimal is this row's problem, not the whole pass's.
    quantity: String,
    queued_at: DateTime<Utc>,
}

/// The loop's name in `customer_errors`.
pub const STAGE: &str = "credits";

/// Why a row was set aside, by cause.
const COST_TOO_LARGE: &str = "its credit cost is beyond a 28-digit decimal";
const QUANTITY_TOO_LARGE: &str = "its quantity is beyond a 28-digit decimal";
const GRANT_TOO_LARGE: &str =
    "a grant's remaining credits are beyond a 28-digit decimal (or more digits than it keeps)";
const ENTRIES_REFUSED: &str = "Postgres refused its ledger entries";

async fn burn_queued(pool: &PgPool, rates: &RateCard) -> Result<BurnReport, sqlx::Error> {
    let mut report = BurnReport::default();
    let mut tx = pool.begin().await?;
    // Customers set aside earlier whose retry is due: their rows are burned again (and set
    // aside again if the cause is still there).
    let retry = tally_db::customer_errors::due(&mut tx, STAGE, 100).await?;
    if !retry.is_empty() {
        sqlx::query(
            "UPDATE credit_usage_queue SET stuck = NULL
             WHERE customer_id = ANY($1) AND stuck IS NOT NULL",
        )
        .bind(&retry)
        .execute(&mut *tx)
        .await?;
    }
    let rows: Vec<Queued> = sqlx::query_as(
        "DELETE FROM credit_usage_queue WHERE queue_id IN (
             SELECT queue_id FROM credit_usage_queue WHERE stuck IS NULL
             ORDER BY queue_id LIMIT $1 FOR UPDATE SKIP LOCKED)
         RETURNING queue_id, customer_id, meter, group_key, window_start,
                   trim_scale(quantity)::text AS quantity,
                   queued_at",
    )
    .bind(BATCH)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        tally_db::customer_errors::clear(&mut tx, STAGE, &retry).await?;
        tx.commit().await?;
        return Ok(report);
    }
    report.queued = rows.len();
    let oldest = rows.iter().map(|r| r.queued_at).min();
    // Per customer (in order: locks are always taken in the same order), one usage per window.
    let mut by_customer: BTreeMap<String, BTreeMap<WindowKey, (Decimal, Vec<i64>)>> =
        BTreeMap::new();
    // Rows set aside, with why; a customer any of whose rows is set aside is set aside whole
    // (its usage is burned in order, or not at all).
    let mut stuck: HashMap<i64, &'static str> = HashMap::new();
    let mut set_aside_customers: BTreeMap<String, &'static str> = BTreeMap::new();
    for row in &rows {
        let window = by_customer
            .entry(row.customer_id.clone())
            .or_default()
            .entry((row.window_start, row.meter.clone(), row.group_key.clone()))
            .or_insert((Decimal::ZERO, Vec::new()));
        window.1.push(row.queue_id);
        // Exact or not at all: `parse` would round a value with more digits than a decimal
        // keeps, and the ledger (in SQL, exact) would then disagree with what was drawn.
        let sum = Decimal::from_str_exact(&row.quantity)
            .ok()
            .and_then(|quantity| window.0.checked_add(quantity));
        match sum {
            Some(sum) => window.0 = sum,
            None => {
                stuck.insert(row.queue_id, QUANTITY_TOO_LARGE);
                set_aside_customers.insert(row.customer_id.clone(), QUANTITY_TOO_LARGE);
            }
        }
    }
    // Priced usage per customer; then the customers' locks, open grants and whether they
    // ever had one, in three queries for the whole pass (not three per customer).
    let priced: Vec<(&String, Vec<PricedUsage>)> = by_customer
        .iter()
        .map(|(customer, windows)| {
            let usage = windows
                .iter()
                .filter_map(|((window_start, meter, group_key), (quantity, _))| {
                    Some(PricedUsage {
                        credits_per_unit: rates.rate_for_window(meter, group_key)?,
                        meter: meter.clone(),
                        group_key: group_key.clone(),
                        window_start: *window_start,
                        quantity: *quantity,
                    })
                })
                .collect::<Vec<_>>();
            (customer, usage)
        })
        .filter(|(_, usage)| !usage.is_empty())
        .collect();
    let customers: Vec<&str> = priced.iter().map(|(c, _)| c.as_str()).collect();
    lock_customers(&mut tx, &customers).await?;
    let (mut open, unreadable) = open_grants(&mut tx, &customers).await?;
    for customer in unreadable {
        set_aside_customers.insert(customer, GRANT_TOO_LARGE);
    }
    let with_grants = customers_with_grants(&mut tx, &customers).await?;
    let mut entries = Entries::default();
    for (customer, usage) in priced {
        if set_aside_customers.contains_key(customer) || !with_grants.contains(customer) {
            // Set aside below; or not a credit customer: nothing to draw from or account for.
            continue;
        }
        let mut grants = open.remove(customer).unwrap_or_default();
        let Some(draws) = draw(&mut grants, &usage) else {
            // A cost beyond a decimal: this customer's rows are set aside, the rest go on.
            set_aside_customers.insert(customer.clone(), COST_TOO_LARGE);
            continue;
        };
        // The entries move the grants' remaining (credit_transactions_apply, in SQL).
        for draw in &draws {
            let item = &usage[draw.usage];
            entries.push(customer, draw.grant_id, -draw.credits, item, draw.quantity);
        }
        report.customers.push(customer.clone());
    }
    for (customer, error) in entries.write_isolating(&mut tx).await? {
        tracing::error!(%customer, %error, "Postgres refused a customer's ledger entries");
        report.customers.retain(|c| c != &customer);
        set_aside_customers.insert(customer, ENTRIES_REFUSED);
    }
    report.entries = entries.customers.len();
    let moved: Vec<&str> = report.customers.iter().map(String::as_str).collect();
    tally_db::changes::record(&mut tx, &moved).await?;
    for (customer, why) in &set_aside_customers {
        for (_, ids) in by_customer[customer].values() {
            for id in ids {
                stuck.entry(*id).or_insert(why);
            }
        }
        tracing::error!(%customer, reason = why, "a customer's committed usage cannot be burned; its queue rows are set aside (tried again later; tally status lists it), the others' are burned");
        tally_db::customer_errors::record(&mut tx, STAGE, customer, why).await?;
    }
    if !stuck.is_empty() {
        let stuck: Vec<(&Queued, &str)> = rows
            .iter()
            .filter_map(|r| stuck.get(&r.queue_id).map(|why| (r, *why)))
            .collect();
        set_aside(&mut tx, &stuck).await?;
    }
    mark_slots_changed(&mut tx, &rows, &stuck).await?;
    let burned: Vec<String> = retry
        .into_iter()
        .filter(|c| !set_aside_customers.contains_key(c))
        .collect();
    tally_db::customer_errors::clear(&mut tx, STAGE, &burned).await?;
    tx.commit().await?;
    report.oldest_wait = oldest.and_then(|at| (Utc::now() - at).to_std().ok());
    Ok(report)
}

/// The customers' open grants with credits left, locked, each customer's in draw order; and
/// the customers one of whose grants holds more than a decimal can (read as text, so that one
/// such grant is its customer's problem, not every customer's).
/// Tells the sink which billing slots hold usage burned now: what credits did not cover is
/// Stripe's to bill once burned (the sink leaves queued usage out, `usage_paid_by_credits`), so
/// each slot is accounted again. Rows set aside stay queued and change nothing yet.
async fn mark_slots_changed(
    tx: &mut PgConnection,
    rows: &[Queued],
    stuck: &HashMap<i64, &str>,
) -> Result<(), sqlx::Error> {
    let slots: BTreeSet<(&str, &str, DateTime<Utc>)> = rows
        .iter()
        .filter(|r| !stuck.contains_key(&r.queue_id))
        .map(|r| {
            (
                r.customer_id.as_str(),
                r.meter.as_str(),
                tally_core::window::slot_start(r.window_start),
            )
        })
        .collect();
    tally_db::slot_changes::record(tx, &slots).await
}

async fn open_grants(
    tx: &mut PgConnection,
    customers: &[&str],
) -> Result<(HashMap<String, Vec<OpenGrant>>, Vec<String>), sqlx::Error> {
    type Row = (String, i64, String, DateTime<Utc>, Option<DateTime<Utc>>);
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "SELECT customer_id, grant_id, trim_scale(remaining)::text, effective_at, expires_at
         FROM credit_grants
         WHERE customer_id = ANY($1) AND closed_at IS NULL AND remaining > 0
         ORDER BY customer_id, {DRAW_ORDER} FOR UPDATE"
    ))
    .bind(customers)
    .fetch_all(&mut *tx)
    .await?;
    let mut open: HashMap<String, Vec<OpenGrant>> = HashMap::new();
    let mut unreadable = Vec::new();
    for (customer, grant_id, remaining, effective_at, expires_at) in rows {
        let Some(remaining) = remaining_toward_zero(&remaining) else {
            unreadable.push(customer);
            continue;
        };
        open.entry(customer).or_default().push(OpenGrant {
            grant_id,
            remaining,
            effective_at,
            expires_at,
        });
    }
    unreadable.dedup();
    Ok((open, unreadable))
}

/// A grant's remaining as a decimal, rounded toward zero when it has more digits than a decimal
/// keeps (a 1e-9 rate on a 1e-9 quantity leaves 18 fraction digits): drawing at most that
/// never takes more than the ledger holds (`parse` rounds half up, and the grant's check then
/// refused the write). What is left below the last digit stays on the grant. `None`: the
/// integer part alone does not fit.
fn remaining_toward_zero(text: &str) -> Option<Decimal> {
    let mut text = text.trim();
    loop {
        if let Ok(exact) = Decimal::from_str_exact(text) {
            return Some(exact);
        }
        let (_, fraction) = text.split_once('.')?;
        text = if fraction.len() > 1 {
            &text[..text.len() - 1]
        } else {
            text.split_once('.')?.0
        };
    }
}

/// Those of the customers who ever had a grant: usage of a customer who never had credits is
/// not written to the ledger as uncovered (they do not use credits at all).
async fn customers_with_grants(
    tx: &mut PgConnection,
    customers: &[&str],
) -> Result<HashSet<String>, sqlx::Error> {
    let rows: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT customer_id FROM credit_grants WHERE customer_id = ANY($1)",
    )
    .bind(customers)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows.into_iter().collect())
}

/// The `consume` entries of one burn, written in one statement (which moves the grants'
/// remaining: `credit_transactions_apply`).
#[derive(Default)]
struct Entries {
    customers: Vec<String>,
    grants: Vec<Option<i64>>,
    amounts: Vec<Decimal>,
    meters: Vec<String>,
    group_keys: Vec<String>,
    windows: Vec<DateTime<Utc>>,
    quantities: Vec<Decimal>,
    rates: Vec<Decimal>,
}

impl Entries {
    fn push(
        &mut self,
        customer: &str,
        grant: Option<i64>,
        amount: Decimal,
        usage: &PricedUsage,
        quantity: Decimal,
    ) {
        self.customers.push(customer.to_owned());
        self.grants.push(grant);
        self.amounts.push(amount);
        self.meters.push(usage.meter.clone());
        self.group_keys.push(usage.group_key.clone());
        self.windows.push(usage.window_start);
        self.quantities.push(quantity);
        self.rates.push(usage.credits_per_unit);
    }

    /// The entries of one customer.
    fn of(&self, customer: &str) -> Entries {
        let mut only = Entries::default();
        for i in (0..self.customers.len()).filter(|&i| self.customers[i] == customer) {
            only.customers.push(self.customers[i].clone());
            only.grants.push(self.grants[i]);
            only.amounts.push(self.amounts[i]);
            only.meters.push(self.meters[i].clone());
            only.group_keys.push(self.group_keys[i].clone());
            only.windows.push(self.windows[i]);
            only.quantities.push(self.quantities[i]);
            only.rates.push(self.rates[i]);
        }
        only
    }

    /// Writes every entry in one statement; if Postgres refuses it for a customer's data (a
    /// grant's check, a value that does not fit), customer by customer instead, each under a
    /// savepoint. Keeps only what was written; returns the customers refused, with why.
    async fn write_isolating(
        &mut self,
        tx: &mut PgConnection,
    ) -> Result<Vec<(String, sqlx::Error)>, sqlx::Error> {
        let refused_for_data = |error: &sqlx::Error| {
            tally_db::is_data_error(error)
                || matches!(error, sqlx::Error::Database(db)
                    if db.code().is_some_and(|code| code.starts_with("P0")))
        };
        if self.customers.is_empty() {
            return Ok(Vec::new());
        }
        let mut refused = Vec::new();
        if let Err(error) = self.write_under_savepoint(tx).await? {
            if !refused_for_data(&error) {
                return Err(error);
            }
            let mut customers = self.customers.clone();
            customers.dedup();
            let mut written = Entries::default();
            for customer in customers {
                let part = self.of(&customer);
                match part.write_under_savepoint(tx).await? {
                    Ok(()) => written.extend(part),
                    Err(error) if refused_for_data(&error) => refused.push((customer, error)),
                    Err(error) => return Err(error),
                }
            }
            *self = written;
        }
        Ok(refused)
    }

    /// `write` under a savepoint: refused, the transaction is as before it and goes on. The
    /// outer `Err` is the savepoint's own failure (Postgres away).
    async fn write_under_savepoint(
        &self,
        tx: &mut PgConnection,
    ) -> Result<Result<(), sqlx::Error>, sqlx::Error> {
        let mut savepoint = sqlx::Connection::begin(&mut *tx).await?;
        let written = self.write(&mut savepoint).await;
        match written {
            Ok(()) => savepoint.commit().await?,
            Err(_) => savepoint.rollback().await?,
        }
        Ok(written)
    }

    fn extend(&mut self, other: Entries) {
        self.customers.extend(other.customers);
        self.grants.extend(other.grants);
        self.amounts.extend(other.amounts);
        self.meters.extend(other.meters);
        self.group_keys.extend(other.group_keys);
        self.windows.extend(other.windows);
        self.quantities.extend(other.quantities);
        self.rates.extend(other.rates);
    }

    async fn write(&self, tx: &mut PgConnection) -> Result<(), sqlx::Error> {
        if !self.customers.is_empty() {
            sqlx::query(
                "INSERT INTO credit_transactions (customer_id, grant_id, kind, amount, meter,
                        group_key, window_start, quantity, credits_per_unit, actor)
                 SELECT c, g, 'consume', a, m, k, w, q, r, $9
                 FROM unnest($1::text[], $2::bigint[], $3::numeric[], $4::text[], $5::text[],
                             $6::timestamptz[], $7::numeric[], $8::numeric[])
                      AS u(c, g, a, m, k, w, q, r)",
            )
            .bind(&self.customers)
            .bind(&self.grants)
            .bind(&self.amounts)
            .bind(&self.meters)
            .bind(&self.group_keys)
            .bind(&self.windows)
            .bind(&self.quantities)
            .bind(&self.rates)
            .bind(ACTOR)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }
}

/// Puts rows that cannot be burned back, marked with why, where no burn takes them until
/// their customer's retry is due (`customer_errors`; an operator looks at
/// `credit_usage_queue WHERE stuck IS NOT NULL`).
async fn set_aside(tx: &mut PgConnection, rows: &[(&Queued, &str)]) -> Result<(), sqlx::Error> {
    telemetry::stuck(rows.len());
    sqlx::query(
        "INSERT INTO credit_usage_queue (customer_id, meter, group_key, window_start, quantity,
                queued_at, stuck)
         SELECT c, m, k, w, q::numeric, t, s
         FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[],
                     $6::timestamptz[], $7::text[]) AS u(c, m, k, w, q, t, s)",
    )
    .bind(
        rows.iter()
            .map(|(r, _)| r.customer_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|(r, _)| r.meter.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|(r, _)| r.group_key.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|(r, _)| r.window_start).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|(r, _)| r.quantity.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|(r, _)| r.queued_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|(_, why)| *why).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Closes grants past their expiry with an `expire` entry of what is left, once none of the
/// customer's usage from before the expiry is still queued. Returns how many it closed.
async fn expire(pool: &PgPool, now: DateTime<Utc>) -> Result<usize, sqlx::Error> {
    let closed: Vec<(i64,)> = sqlx::query_as(
        "WITH due AS (
             SELECT grant_id, customer_id, remaining FROM credit_grants g
             WHERE closed_at IS NULL AND expires_at <= $1
               AND NOT EXISTS (SELECT 1 FROM credit_usage_queue q
                               WHERE q.customer_id = g.customer_id AND q.window_start < g.expires_at
                                 AND q.stuck IS NULL)
             ORDER BY grant_id LIMIT 1000 FOR UPDATE SKIP LOCKED
         ), closed AS (
             UPDATE credit_grants g SET closed_at = $1, closed_as = 'expired'
             FROM due WHERE g.grant_id = due.grant_id
             RETURNING g.grant_id, g.customer_id
         ), changes AS (
             INSERT INTO customer_changes (customer_id, meter) SELECT customer_id, '' FROM closed
         ), entries AS (
             INSERT INTO credit_transactions (customer_id, grant_id, kind, amount, actor, reason)
             SELECT due.customer_id, due.grant_id, 'expire', -due.remaining, $2, 'the grant expired'
             FROM due JOIN closed USING (grant_id) WHERE due.remaining > 0
         )
         SELECT grant_id FROM closed",
    )
    .bind(now)
    .bind(ACTOR)
    .fetch_all(pool)
    .await?;
    telemetry::expired(closed.len());
    Ok(closed.len())
}

/// The loop's name in `customer_errors` for plan grants that cannot be made.
pub const PLAN_GRANTS: &str = "plan_credits";

/// Subscriptions read per page when looking for due plan grants.
const PLAN_GRANTS_PAGE: i64 = 1000;

/// Grants each live subscription on a plan with `[plans.credits]` its current period's credits,
/// once (the idempotency key, `plan_grant_key` in SQL, names the subscription and the period).
/// Every due subscription is visited, oldest period first, a page at a time; one whose grant
/// cannot be made is set aside in `customer_errors` (and tried again later), never in the way
/// of the others. Returns the customers granted.
async fn grant_plan_credits(pool: &PgPool, now: DateTime<Utc>) -> Result<Vec<String>, sqlx::Error> {
    let mut customers = Vec::new();
    // Customers set aside that no longer have a grant due (canceled, moved to a plan without
    // credits, granted by hand): nothing is left to retry.
    sqlx::query(
        "DELETE FROM customer_errors e WHERE e.stage = $2 AND NOT EXISTS (
             SELECT 1 FROM subscriptions s JOIN plans p ON p.name = s.plan
             WHERE s.customer_id = e.customer_id AND s.status IN ('active', 'trialing')
               AND p.definition ? 'credits'
               AND s.current_period_start <= $1 AND s.current_period_end > $1
               AND NOT EXISTS (
                   SELECT 1 FROM credit_grants g
                   WHERE g.customer_id = s.customer_id
                     AND g.idempotency_key = plan_grant_key(s.subscription_id, s.current_period_start)))",
    )
    .bind(now)
    .bind(PLAN_GRANTS)
    .execute(pool)
    .await?;
    // The last subscription of the previous page (none before the first).
    let mut after: (Option<DateTime<Utc>>, i64) = (None, 0);
    loop {
        let due: Vec<DuePlanGrant> = sqlx::query_as(
            "SELECT s.subscription_id, s.customer_id, s.plan, s.current_period_start,
                    s.current_period_end, (p.definition->'credits'->>'amount'),
                    (p.definition->'credits'->>'priority'),
                    plan_grant_key(s.subscription_id, s.current_period_start)
             FROM subscriptions s JOIN plans p ON p.name = s.plan
             WHERE s.status IN ('active', 'trialing') AND p.definition ? 'credits'
               AND s.current_period_start <= $1 AND s.current_period_end > $1
               AND ($2::timestamptz IS NULL OR (s.current_period_start, s.subscription_id) > ($2, $3))
               AND NOT EXISTS (
                   SELECT 1 FROM credit_grants g
                   WHERE g.customer_id = s.customer_id
                     AND g.idempotency_key = plan_grant_key(s.subscription_id, s.current_period_start))
               AND NOT EXISTS (
                   SELECT 1 FROM customer_errors e
                   WHERE e.stage = $5 AND e.customer_id = s.customer_id AND e.retry_at > now())
             ORDER BY s.current_period_start, s.subscription_id
             LIMIT $4",
        )
        .bind(now)
        .bind(after.0)
        .bind(after.1)
        .bind(PLAN_GRANTS_PAGE)
        .bind(PLAN_GRANTS)
        .fetch_all(pool)
        .await?;
        let last_page = (due.len() as i64) < PLAN_GRANTS_PAGE;
        if let Some(last) = due.last() {
            after = (Some(last.3), last.0);
        }
        for plan_grant in due {
            let customer = plan_grant.1.clone();
            match grant_for_period(pool, plan_grant, now).await {
                Ok(created) => {
                    if created {
                        customers.push(customer.clone());
                    }
                    let mut conn = pool.acquire().await?;
                    tally_db::customer_errors::clear(&mut conn, PLAN_GRANTS, &[customer]).await?;
                }
                // Postgres away: the whole settle waits (the burner retries it).
                Err(CreditError::Store(error)) if tally_db::is_retryable(&error) => {
                    return Err(error)
                }
                // One subscription's grant failing (a plan amount out of range, a key an admin
                // took) must not hold up the others.
                Err(error) => {
                    tracing::error!(%customer, %error, "the plan's period credits could not be granted; set aside (tally status lists it), the others go on");
                    telemetry::burn_error();
                    let mut conn = pool.acquire().await?;
                    tally_db::customer_errors::record(
                        &mut conn,
                        PLAN_GRANTS,
                        &customer,
                        &error.to_string(),
                    )
                    .await?;
                }
            }
        }
        if last_page {
            return Ok(customers);
        }
    }
}

/// One due subscription's grant for its current period; whether it was new.
async fn grant_for_period(
    pool: &PgPool,
    due: DuePlanGrant,
    now: DateTime<Utc>,
) -> Result<bool, CreditError> {
    let (subscription_id, customer, plan, start, end, amount, priority, key) = due;
    let amount: Decimal = amount
        .as_deref()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| {
            CreditError::Invalid(format!(
                "plan {plan}'s credits amount {amount:?} is not a decimal"
            ))
        })?;
    let priority: Option<i32> = match priority.as_deref() {
        None => None,
        Some(p) => Some(p.parse().map_err(|_| {
            CreditError::Invalid(format!(
                "plan {plan}'s credits priority {p:?} is not a whole number"
            ))
        })?),
    };
    let new = NewGrant {
        customer: customer.clone(),
        kind: GrantKind::Subscription,
        amount,
        priority,
        effective_at: Some(start),
        expires_at: Some(end),
        idempotency_key: key,
        description: Some(format!("{plan} credits for the period from {start}")),
    };
    let actor = Actor {
        name: ACTOR.into(),
        reason: format!("plan {plan} grants {amount} credits each period"),
    };
    let mut tx = pool.begin().await?;
    let granted = grant_in(
        &mut tx,
        &new,
        Some(subscription_id),
        &actor,
        now,
        Issuer::System,
    )
    .await?;
    tx.commit().await?;
    Ok(granted.created)
}

/// How often the burner closes expired grants and makes plan grants.
const SETTLE_EVERY: Duration = Duration::from_secs(1);

/// Runs the burner until `stop`: a pass every `every`, at once again while more is queued;
/// expiry and plan grants about every second. Supervised: a failing pass (Postgres
/// away) is logged, counted and retried, never the end of the aggregator.
pub fn start_burner(pool: PgPool, every: Duration, stop: CancellationToken) -> JoinHandle<()> {
    let pool = Arc::new(pool);
    tally_runtime::supervise("credit_burner", stop.clone(), move || {
        let pool = pool.clone();
        let stop = stop.clone();
        async move {
            let mut rates = FreshRates::default();
            let mut settled: Option<Instant> = None;
            let failed = |what: &str, e: sqlx::Error| {
                telemetry::burn_error();
                format!("{what}: {e}")
            };
            loop {
                let rates = rates
                    .get(&pool)
                    .await
                    .map_err(|e| failed("loading the rate card", e))?;
                let (report, more) = burn_once(&pool, rates)
                    .await
                    .map_err(|e| failed("burning credits", e))?;
                telemetry::burned(report.queued, report.oldest_wait);
                if more {
                    continue;
                }
                if settled.is_none_or(|at| at.elapsed() >= SETTLE_EVERY) {
                    settle(&pool, Utc::now())
                        .await
                        .map_err(|e| failed("expiring grants and granting plan credits", e))?;
                    settled = Some(Instant::now());
                }
                if tally_runtime::sleep_unless_stopped(every, &stop).await {
                    return Ok(());
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::remaining_toward_zero;
    use rust_decimal::Decimal;

    #[test]
    fn a_remaining_with_more_digits_than_a_decimal_keeps_is_rounded_toward_zero() {
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        assert_eq!(remaining_toward_zero("99.9"), Some(d("99.9")));
        // 29 digits: `parse` would round up to 99999999999 and draw more than is left.
        assert_eq!(
            remaining_toward_zero("99999999998.999999999999999999"),
            Some(d("99999999998.99999999999999999"))
        );
        assert_eq!(
            remaining_toward_zero("0.0000000000000000000000000000001"),
            Some(Decimal::ZERO)
        );
        assert_eq!(
            remaining_toward_zero("100000000000000000000000000000000"),
            None
        );
    }
}
