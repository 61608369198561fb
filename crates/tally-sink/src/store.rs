//! The sink's Postgres side: account for changed slots (writing the outbox), lease outbox rows,
//! record what Stripe answered.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool};
use tally_core::window::SLOT;
use tally_core::Aggregation;

use crate::plan::{
    after_cancel, event_timestamp, identifier, plan_slot, Balance, BillingKind, SlotState,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("meter {0:?} has usage but is not in the meters table; run `tally aggregate` with it in tally.toml")]
    UnknownMeter(String),
}

/// How a meter is billed, from the `meters` table.
#[derive(Debug, Clone)]
pub struct BilledMeter {
    pub aggregation: Aggregation,
    pub kind: Option<BillingKind>,
    pub event_name: String,
}

pub async fn billed_meters(pool: &PgPool) -> Result<HashMap<String, BilledMeter>, StoreError> {
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT name, aggregation, stripe_event_name FROM meters")
            .fetch_all(pool)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(name, aggregation, event_name)| {
            let aggregation = match aggregation.as_str() {
                "sum" => Aggregation::Sum,
                "count" => Aggregation::Count,
                "max" => Aggregation::Max,
                "latest" => Aggregation::Latest,
                _ => Aggregation::UniqueCount,
            };
            (
                name,
                BilledMeter {
                    aggregation,
                    kind: BillingKind::of(aggregation),
                    event_name,
                },
            )
        })
        .collect())
}

/// What one accounting transaction did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PlanReport {
    pub changes: u64,
    pub slots: u64,
    pub submissions: u64,
    pub corrections: u64,
}

impl PlanReport {
    pub fn add(&mut self, other: PlanReport) {
        self.changes += other.changes;
        self.slots += other.slots;
        self.submissions += other.submissions;
        self.corrections += other.corrections;
    }
}

type SlotKey = (String, String, DateTime<Utc>);

/// Accounts for up to `limit` changed slots that ended before `settled_before`, in one
/// transaction: lock the customer+meter balances (so concurrent sinks serialize per pair), read
/// the slots' window totals, plan, write slot states, balances, outbox rows and corrections,
/// and delete the change rows it handled. Changes of unmapped customers are left waiting.
pub(crate) async fn account_slots(
    pool: &PgPool,
    meters: &HashMap<String, BilledMeter>,
    settled_before: DateTime<Utc>,
    limit: usize,
) -> Result<PlanReport, StoreError> {
    let mut tx = pool.begin().await?;
    let changes: Vec<(i64, String, String, DateTime<Utc>, String)> = sqlx::query_as(
        "SELECT c.change_id, c.customer_id, c.meter, c.slot_start, m.stripe_customer_id
         FROM usage_slot_changes c
         JOIN stripe_customers m ON m.customer_id = c.customer_id
         WHERE c.slot_start < $1
         ORDER BY c.change_id
         LIMIT $2
         FOR UPDATE OF c SKIP LOCKED",
    )
    .bind(settled_before)
    .bind(limit as i64)
    .fetch_all(&mut *tx)
    .await?;
    if changes.is_empty() {
        return Ok(PlanReport::default());
    }
    let change_ids: Vec<i64> = changes.iter().map(|c| c.0).collect();
    let mut stripe_customer: HashMap<String, String> = HashMap::new();
    let mut slots: BTreeSet<SlotKey> = BTreeSet::new();
    for (_, customer, meter, slot, stripe_id) in changes {
        stripe_customer.insert(customer.clone(), stripe_id);
        slots.insert((customer, meter, slot));
    }
    let pairs: BTreeSet<(&str, &str)> = slots
        .iter()
        .map(|(c, m, _)| (c.as_str(), m.as_str()))
        .collect();

    let mut balances = lock_balances(&mut tx, &pairs).await?;
    let totals = slot_totals(&mut tx, &slots).await?;
    let states = slot_states(&mut tx, &slots).await?;

    let now = Utc::now();
    let mut writes = Writes::default();
    for (key, totals) in &totals {
        let (customer, meter, slot_start) = key;
        let billed = meters
            .get(meter)
            .ok_or_else(|| StoreError::UnknownMeter(meter.clone()))?;
        let Some(kind) = billed.kind else { continue };
        let total = match billed.aggregation {
            Aggregation::Max => totals.max,
            Aggregation::Latest => totals.latest,
            _ => totals.sum,
        };
        let balance = balances
            .get_mut(&(customer.clone(), meter.clone()))
            .expect("balance locked above");
        let state = states.get(key).copied().unwrap_or_default();
        let Some(mut plan) = plan_slot(kind, total, state, *balance) else {
            continue;
        };
        let stripe_customer_id = &stripe_customer[customer];
        let submission = |identifier: String,
                          revision: i32,
                          kind: &'static str,
                          value: Decimal,
                          cancels: Option<String>| Submission {
            identifier,
            key: key.clone(),
            revision,
            stripe_customer_id: stripe_customer_id.clone(),
            event_name: billed.event_name.clone(),
            kind,
            value,
            cancels,
            timestamp: event_timestamp(*slot_start, now),
        };
        // Usage went down: withdraw the slot's revisions at Stripe and send what is owed again,
        // if every revision is young enough to cancel (Stripe: 24 h after receipt).
        if plan.overbilled.is_some() {
            if let Some(revisions) = cancelable_revisions(&mut tx, key).await? {
                let mut revision = plan.slot.revision;
                let mut canceled = Decimal::ZERO;
                for (target, units) in revisions {
                    revision += 1;
                    canceled += units;
                    let id = identifier(customer, meter, *slot_start, revision);
                    writes.submissions.push(submission(
                        id,
                        revision,
                        "cancel",
                        units,
                        Some(target),
                    ));
                }
                plan = after_cancel(&plan, canceled);
                plan.slot.revision = revision + i32::from(plan.submission.is_some());
            }
        }
        *balance = plan.balance;
        writes.slots.push((key.clone(), plan.slot));
        if let Some(value) = plan.submission {
            let id = identifier(customer, meter, *slot_start, plan.slot.revision);
            writes.submissions.push(submission(
                id,
                plan.slot.revision,
                kind.as_str(),
                value,
                None,
            ));
        }
        if let Some(overbilled) = plan.overbilled {
            tracing::error!(customer, meter, %slot_start, %overbilled, "usage went down after it was billed, too late to cancel at Stripe; recorded in billing_corrections for finance");
            writes.corrections.push((key.clone(), overbilled));
        }
    }
    let report = PlanReport {
        changes: change_ids.len() as u64,
        slots: slots.len() as u64,
        submissions: writes.submissions.len() as u64,
        corrections: writes.corrections.len() as u64,
    };
    writes.apply(&mut tx, &balances).await?;
    sqlx::query("DELETE FROM usage_slot_changes WHERE change_id = ANY($1)")
        .bind(&change_ids)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(report)
}

/// The slot's sent `delta` revisions not yet canceled, as (identifier, units), when all of
/// them can still be canceled: sent less than 23 hours ago (an hour's margin on Stripe's 24),
/// and nothing of the slot pending or failed. `None`: cancelling is not possible.
async fn cancelable_revisions(
    tx: &mut PgConnection,
    (customer, meter, slot_start): &SlotKey,
) -> Result<Option<Vec<(String, Decimal)>>, StoreError> {
    let rows: Vec<(String, String, Decimal, String, bool, bool)> = sqlx::query_as(
        "SELECT s.identifier, s.kind, s.value, s.status,
                coalesce(s.sent_at > now() - interval '23 hours', false),
                EXISTS (SELECT 1 FROM stripe_submissions c WHERE c.cancels = s.identifier)
         FROM stripe_submissions s
         WHERE s.customer_id = $1 AND s.meter = $2 AND s.slot_start = $3
         ORDER BY s.revision",
    )
    .bind(customer)
    .bind(meter)
    .bind(slot_start)
    .fetch_all(&mut *tx)
    .await?;
    let mut revisions = Vec::new();
    for (identifier, kind, value, status, fresh, canceled) in rows {
        if status != "sent" {
            return Ok(None);
        }
        if kind == "delta" && !canceled {
            if !fresh {
                return Ok(None);
            }
            revisions.push((identifier, value));
        }
    }
    Ok(Some(revisions).filter(|r| !r.is_empty()))
}

/// Locks (creating when new) the balances of the pairs, in key order so that two sinks
/// cannot deadlock.
async fn lock_balances(
    tx: &mut PgConnection,
    pairs: &BTreeSet<(&str, &str)>,
) -> Result<BTreeMap<(String, String), Balance>, StoreError> {
    let customers: Vec<&str> = pairs.iter().map(|p| p.0).collect();
    let meters: Vec<&str> = pairs.iter().map(|p| p.1).collect();
    sqlx::query(
        "INSERT INTO billing_balances (customer_id, meter, accounted, submitted)
         SELECT c, m, 0, 0 FROM unnest($1::text[], $2::text[]) AS p(c, m)
         ON CONFLICT DO NOTHING",
    )
    .bind(&customers)
    .bind(&meters)
    .execute(&mut *tx)
    .await?;
    let rows: Vec<(String, String, Decimal, Decimal)> = sqlx::query_as(
        "SELECT b.customer_id, b.meter, b.accounted, b.submitted
         FROM billing_balances b
         JOIN unnest($1::text[], $2::text[]) AS p(c, m) ON b.customer_id = p.c AND b.meter = p.m
         ORDER BY b.customer_id, b.meter
         FOR UPDATE OF b",
    )
    .bind(&customers)
    .bind(&meters)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(c, m, accounted, submitted)| {
            (
                (c, m),
                Balance {
                    accounted,
                    submitted,
                },
            )
        })
        .collect())
}

/// A slot's window totals under each merge rule; the meter's kind picks one.
#[derive(Debug, Default)]
struct SlotTotals {
    sum: Decimal,
    max: Decimal,
    latest: Decimal,
}

#[derive(sqlx::FromRow)]
struct SlotTotalsRow {
    customer_id: String,
    meter: String,
    slot_start: DateTime<Utc>,
    sum: Decimal,
    max: Option<Decimal>,
    latest: Option<Decimal>,
}

async fn slot_totals(
    tx: &mut PgConnection,
    slots: &BTreeSet<SlotKey>,
) -> Result<BTreeMap<SlotKey, SlotTotals>, StoreError> {
    let customers: Vec<&str> = slots.iter().map(|s| s.0.as_str()).collect();
    let meters: Vec<&str> = slots.iter().map(|s| s.1.as_str()).collect();
    let starts: Vec<DateTime<Utc>> = slots.iter().map(|s| s.2).collect();
    let rows: Vec<SlotTotalsRow> = sqlx::query_as(
        "SELECT s.c AS customer_id, s.m AS meter, s.s AS slot_start,
                coalesce(sum(u.value), 0) AS sum,
                max(u.value) AS max,
                (array_agg(u.value ORDER BY u.latest_at DESC NULLS LAST, u.latest_id DESC))[1] AS latest
         FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS s(c, m, s)
         LEFT JOIN usage_minute u
           ON u.customer_id = s.c AND u.meter = s.m
          AND u.window_start >= s.s AND u.window_start < s.s + $4::interval
         GROUP BY s.c, s.m, s.s",
    )
    .bind(&customers)
    .bind(&meters)
    .bind(&starts)
    .bind(SLOT.to_std().expect("slot is positive"))
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let totals = SlotTotals {
                sum: row.sum,
                max: row.max.unwrap_or_default(),
                latest: row.latest.unwrap_or_default(),
            };
            ((row.customer_id, row.meter, row.slot_start), totals)
        })
        .collect())
}

async fn slot_states(
    tx: &mut PgConnection,
    slots: &BTreeSet<SlotKey>,
) -> Result<HashMap<SlotKey, SlotState>, StoreError> {
    let customers: Vec<&str> = slots.iter().map(|s| s.0.as_str()).collect();
    let meters: Vec<&str> = slots.iter().map(|s| s.1.as_str()).collect();
    let starts: Vec<DateTime<Utc>> = slots.iter().map(|s| s.2).collect();
    let rows: Vec<(String, String, DateTime<Utc>, Decimal, i32)> = sqlx::query_as(
        "SELECT b.customer_id, b.meter, b.slot_start, b.accounted, b.revision
         FROM billing_slots b
         JOIN unnest($1::text[], $2::text[], $3::timestamptz[]) AS s(c, m, s)
           ON b.customer_id = s.c AND b.meter = s.m AND b.slot_start = s.s",
    )
    .bind(&customers)
    .bind(&meters)
    .bind(&starts)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(c, m, s, accounted, revision)| {
            (
                (c, m, s),
                SlotState {
                    accounted,
                    revision,
                },
            )
        })
        .collect())
}

struct Submission {
    identifier: String,
    key: SlotKey,
    revision: i32,
    stripe_customer_id: String,
    event_name: String,
    kind: &'static str,
    value: Decimal,
    cancels: Option<String>,
    timestamp: DateTime<Utc>,
}

#[derive(Default)]
struct Writes {
    slots: Vec<(SlotKey, SlotState)>,
    submissions: Vec<Submission>,
    corrections: Vec<(SlotKey, Decimal)>,
}

impl Writes {
    async fn apply(
        self,
        tx: &mut PgConnection,
        balances: &BTreeMap<(String, String), Balance>,
    ) -> Result<(), StoreError> {
        let (customers, meters): (Vec<&str>, Vec<&str>) = balances
            .keys()
            .map(|(c, m)| (c.as_str(), m.as_str()))
            .unzip();
        let accounted: Vec<Decimal> = balances.values().map(|b| b.accounted).collect();
        let submitted: Vec<Decimal> = balances.values().map(|b| b.submitted).collect();
        sqlx::query(
            "UPDATE billing_balances b SET accounted = u.a, submitted = u.s
             FROM unnest($1::text[], $2::text[], $3::numeric[], $4::numeric[]) AS u(c, m, a, s)
             WHERE b.customer_id = u.c AND b.meter = u.m",
        )
        .bind(&customers)
        .bind(&meters)
        .bind(&accounted)
        .bind(&submitted)
        .execute(&mut *tx)
        .await?;

        if !self.slots.is_empty() {
            let customers: Vec<&str> = self.slots.iter().map(|(k, _)| k.0.as_str()).collect();
            let meters: Vec<&str> = self.slots.iter().map(|(k, _)| k.1.as_str()).collect();
            let starts: Vec<DateTime<Utc>> = self.slots.iter().map(|(k, _)| k.2).collect();
            let accounted: Vec<Decimal> = self.slots.iter().map(|(_, s)| s.accounted).collect();
            let revisions: Vec<i32> = self.slots.iter().map(|(_, s)| s.revision).collect();
            sqlx::query(
                "INSERT INTO billing_slots (customer_id, meter, slot_start, accounted, revision)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::numeric[], $5::int[])
                 ON CONFLICT (customer_id, meter, slot_start) DO UPDATE
                    SET accounted = excluded.accounted, revision = excluded.revision, updated_at = now()",
            )
            .bind(&customers)
            .bind(&meters)
            .bind(&starts)
            .bind(&accounted)
            .bind(&revisions)
            .execute(&mut *tx)
            .await?;
        }

        if !self.submissions.is_empty() {
            let s = &self.submissions;
            let identifiers: Vec<&str> = s.iter().map(|x| x.identifier.as_str()).collect();
            let customers: Vec<&str> = s.iter().map(|x| x.key.0.as_str()).collect();
            let meters: Vec<&str> = s.iter().map(|x| x.key.1.as_str()).collect();
            let starts: Vec<DateTime<Utc>> = s.iter().map(|x| x.key.2).collect();
            let revisions: Vec<i32> = s.iter().map(|x| x.revision).collect();
            let stripe_customers: Vec<&str> =
                s.iter().map(|x| x.stripe_customer_id.as_str()).collect();
            let event_names: Vec<&str> = s.iter().map(|x| x.event_name.as_str()).collect();
            let kinds: Vec<&str> = s.iter().map(|x| x.kind).collect();
            let cancels: Vec<Option<&str>> = s.iter().map(|x| x.cancels.as_deref()).collect();
            let values: Vec<Decimal> = s.iter().map(|x| x.value).collect();
            let timestamps: Vec<DateTime<Utc>> = s.iter().map(|x| x.timestamp).collect();
            sqlx::query(
                "INSERT INTO stripe_submissions
                    (identifier, customer_id, meter, slot_start, revision, stripe_customer_id,
                     event_name, kind, value, event_timestamp, cancels)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::int[],
                                      $6::text[], $7::text[], $8::text[], $9::numeric[], $10::timestamptz[],
                                      $11::text[])",
            )
            .bind(&identifiers)
            .bind(&customers)
            .bind(&meters)
            .bind(&starts)
            .bind(&revisions)
            .bind(&stripe_customers)
            .bind(&event_names)
            .bind(&kinds)
            .bind(&values)
            .bind(&timestamps)
            .bind(&cancels)
            .execute(&mut *tx)
            .await?;
        }

        for ((customer, meter, slot_start), overbilled) in &self.corrections {
            sqlx::query(
                "INSERT INTO billing_corrections (customer_id, meter, slot_start, overbilled, detail)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(customer)
            .bind(meter)
            .bind(slot_start)
            .bind(overbilled)
            .bind("the slot's usage went below what was already billed; Stripe cannot take negative usage, so credit the customer")
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }
}

/// An outbox row leased for sending.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Leased {
    pub submission_id: i64,
    pub identifier: String,
    pub customer_id: String,
    pub meter: String,
    pub stripe_customer_id: String,
    pub event_name: String,
    pub kind: String,
    pub value: Decimal,
    pub event_timestamp: DateTime<Utc>,
    pub attempts: i32,
    /// For a `cancel` row: the identifier of the event to withdraw.
    pub cancels: Option<String>,
}

/// Leases the pending rows of up to `limit` customer+meter pairs whose oldest pending row is
/// due and free. Taking whole pairs, head first, keeps a pair's revisions in order (a later
/// `last` value must not overtake an earlier one, even when the earlier waits for a retry) and
/// one sink per pair at a time (Stripe allows one call per customer and meter).
pub(crate) async fn lease_pending(
    pool: &PgPool,
    limit: usize,
    lease: Duration,
) -> Result<Vec<Leased>, StoreError> {
    let rows = sqlx::query_as::<_, Leased>(
        "WITH heads AS (
             SELECT DISTINCT ON (customer_id, meter)
                    submission_id, customer_id, meter, next_attempt_at, leased_until
             FROM stripe_submissions
             WHERE status = 'pending'
             ORDER BY customer_id, meter, submission_id),
         due AS (
             SELECT customer_id, meter FROM heads
             WHERE next_attempt_at <= now() AND (leased_until IS NULL OR leased_until < now())
             ORDER BY submission_id
             LIMIT $1)
         UPDATE stripe_submissions s
            SET leased_until = now() + $2::interval
         WHERE s.submission_id IN (
             SELECT p.submission_id FROM stripe_submissions p
             JOIN due ON due.customer_id = p.customer_id AND due.meter = p.meter
             WHERE p.status = 'pending' AND (p.leased_until IS NULL OR p.leased_until < now())
             FOR UPDATE OF p SKIP LOCKED)
         RETURNING s.submission_id, s.identifier, s.customer_id, s.meter, s.stripe_customer_id,
                   s.event_name, s.kind, s.value, s.event_timestamp, s.attempts, s.cancels",
    )
    .bind(limit as i64)
    .bind(lease)
    .fetch_all(pool)
    .await?;
    let mut rows = rows;
    rows.sort_by_key(|row| row.submission_id);
    Ok(rows)
}

/// What became of a leased row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Sent,
    /// Try again at `retry_at`.
    Retry {
        error: String,
        retry_at: DateTime<Utc>,
    },
    /// Stripe refused it for good; an operator must look.
    Failed {
        error: String,
    },
    /// Not attempted (shutdown, or an earlier revision of its pair is not sent yet).
    Released,
}

/// Records outcomes: one statement per batch of rows, and frees their leases.
pub(crate) async fn record_outcomes(
    pool: &PgPool,
    outcomes: &[(i64, u32, Outcome)],
) -> Result<(), StoreError> {
    if outcomes.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::new();
    let mut attempts = Vec::new();
    let mut statuses = Vec::new();
    let mut errors: Vec<Option<&str>> = Vec::new();
    let mut retry_at: Vec<Option<DateTime<Utc>>> = Vec::new();
    for (id, tries, outcome) in outcomes {
        ids.push(*id);
        attempts.push(*tries as i32);
        let (status, error, at) = match outcome {
            Outcome::Sent => ("sent", None, None),
            Outcome::Retry { error, retry_at } => {
                ("pending", Some(error.as_str()), Some(*retry_at))
            }
            Outcome::Failed { error } => ("failed", Some(error.as_str()), None),
            Outcome::Released => ("pending", None, None),
        };
        statuses.push(status);
        errors.push(error);
        retry_at.push(at);
    }
    sqlx::query(
        "UPDATE stripe_submissions s
            SET status = u.status,
                attempts = s.attempts + u.attempts,
                last_error = coalesce(u.error, s.last_error),
                next_attempt_at = coalesce(u.retry_at, s.next_attempt_at),
                sent_at = CASE WHEN u.status = 'sent' THEN now() ELSE s.sent_at END,
                leased_until = NULL
         FROM unnest($1::bigint[], $2::int[], $3::text[], $4::text[], $5::timestamptz[])
              AS u(id, attempts, status, error, retry_at)
         WHERE s.submission_id = u.id AND s.status = 'pending'",
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(&statuses)
    .bind(&errors)
    .bind(&retry_at)
    .execute(pool)
    .await?;
    Ok(())
}

/// Backlog figures for the metrics: pending rows and the age of the oldest, and slots waiting
/// for a customer mapping.
pub(crate) async fn backlog(pool: &PgPool) -> Result<(i64, f64, i64), StoreError> {
    let (pending, oldest): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*), extract(epoch FROM now() - min(created_at))::float8
         FROM stripe_submissions WHERE status = 'pending'",
    )
    .fetch_one(pool)
    .await?;
    let unmapped: (Option<i64>,) =
        sqlx::query_as("SELECT sum(slots)::bigint FROM stripe_unmapped_usage")
            .fetch_one(pool)
            .await?;
    Ok((pending, oldest.unwrap_or(0.0), unmapped.0.unwrap_or(0)))
}

/// `tally customers map`: sets (or changes) a customer's Stripe customer id.
pub async fn map_customer(
    pool: &PgPool,
    customer: &str,
    stripe_customer_id: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO stripe_customers (customer_id, stripe_customer_id) VALUES ($1, $2)
         ON CONFLICT (customer_id) DO UPDATE SET stripe_customer_id = excluded.stripe_customer_id, mapped_at = now()",
    )
    .bind(customer)
    .bind(stripe_customer_id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Many mappings at once (the demo maps hundreds of customers).
pub async fn map_customers(pool: &PgPool, mappings: &[(String, String)]) -> Result<(), StoreError> {
    let customers: Vec<&str> = mappings.iter().map(|m| m.0.as_str()).collect();
    let stripe_ids: Vec<&str> = mappings.iter().map(|m| m.1.as_str()).collect();
    sqlx::query(
        "INSERT INTO stripe_customers (customer_id, stripe_customer_id)
         SELECT * FROM unnest($1::text[], $2::text[])
         ON CONFLICT (customer_id) DO UPDATE SET stripe_customer_id = excluded.stripe_customer_id, mapped_at = now()",
    )
    .bind(&customers)
    .bind(&stripe_ids)
    .execute(pool)
    .await?;
    Ok(())
}
