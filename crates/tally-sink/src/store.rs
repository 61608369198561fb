//! The sink's Postgres side: account for changed slots (writing the outbox), lease outbox rows,
//! record what Stripe answered.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool};
use tally_core::reject::printable;
use tally_core::window::SLOT;
use tally_core::Aggregation;
use tally_db::ExactDecimal;

use crate::plan::{
    after_cancel, event_timestamp, identifier, plan_slot, Balance, BillingKind, SlotState,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// One customer+meter pair's data cannot be billed exactly: it is quarantined, and every
    /// other pair is billed.
    #[error("{customer:?} / {meter:?} cannot be billed: {detail}")]
    Unbillable {
        customer: String,
        meter: String,
        detail: String,
    },
}

impl StoreError {
    /// Postgres is away or busy: try the same again later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Postgres(e) if tally_db::is_retryable(e))
    }

    /// The data being processed is to blame (a value Postgres or a decimal cannot take), not
    /// Postgres: the work is split until the customer+meter pair at fault is found.
    pub fn is_data(&self) -> bool {
        match self {
            StoreError::Postgres(e) => tally_db::is_data_error(e),
            StoreError::Unbillable { .. } => true,
        }
    }
}

/// How a meter is billed, from the `meters` table.
#[derive(Debug, Clone)]
pub struct BilledMeter {
    pub aggregation: Aggregation,
    pub kind: Option<BillingKind>,
    pub event_name: String,
}

/// The meters as recorded in the `meters` table: every meter of tally.toml (each command
/// records them as it starts), and earlier meters whose usage may still be billed.
pub async fn billed_meters(pool: &PgPool) -> Result<HashMap<String, BilledMeter>, StoreError> {
    Ok(tally_db::meters::all(pool)
        .await?
        .into_iter()
        .map(|meter| {
            let billed = BilledMeter {
                aggregation: meter.aggregation,
                kind: BillingKind::of(meter.aggregation),
                event_name: meter.stripe_event_name,
            };
            (meter.name, billed)
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

/// Which changes one accounting transaction takes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Accounting<'a> {
    pub(crate) settled_before: DateTime<Utc>,
    pub(crate) limit: usize,
    /// Only this customer+meter pair's changes (when a failed transaction is split by pair).
    pub(crate) pair: Option<(&'a str, &'a str)>,
}

/// The customer+meter pairs that have settled changes waiting (mapped, not quarantined), at
/// most `limit`: what a failed accounting transaction is split into.
pub(crate) async fn pairs_with_changes(
    pool: &PgPool,
    settled_before: DateTime<Utc>,
    limit: usize,
) -> Result<Vec<(String, String)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT DISTINCT c.customer_id, c.meter
         FROM usage_slot_changes c
         JOIN stripe_customers m ON m.customer_id = c.customer_id
         WHERE c.slot_start < $1
           AND NOT EXISTS (SELECT 1 FROM billing_quarantine q
                           WHERE q.customer_id = c.customer_id AND q.meter = c.meter)
         ORDER BY 1, 2
         LIMIT $2",
    )
    .bind(settled_before)
    .bind(limit as i64)
    .fetch_all(pool)
    .await?)
}

/// Accounts for up to `limit` changed slots that ended before `settled_before`, in one
/// transaction: lock the customer+meter balances (so concurrent sinks serialize per pair), read
/// the slots' window totals, plan, write slot states, balances, outbox rows and corrections,
/// and delete the change rows it handled. Changes of unmapped customers wait; those of
/// quarantined pairs are left alone.
pub(crate) async fn account_slots(
    pool: &PgPool,
    meters: &HashMap<String, BilledMeter>,
    what: Accounting<'_>,
) -> Result<PlanReport, StoreError> {
    let mut tx = pool.begin().await?;
    let (pair_customer, pair_meter) = what.pair.unzip();
    let changes: Vec<(i64, String, String, DateTime<Utc>, String)> = sqlx::query_as(
        "SELECT c.change_id, c.customer_id, c.meter, c.slot_start, m.stripe_customer_id
         FROM usage_slot_changes c
         JOIN stripe_customers m ON m.customer_id = c.customer_id
         WHERE c.slot_start < $1
           AND ($3::text IS NULL OR (c.customer_id = $3 AND c.meter = $4))
           AND NOT EXISTS (SELECT 1 FROM billing_quarantine q
                           WHERE q.customer_id = c.customer_id AND q.meter = c.meter)
         ORDER BY c.change_id
         LIMIT $2
         FOR UPDATE OF c SKIP LOCKED",
    )
    .bind(what.settled_before)
    .bind(what.limit as i64)
    .bind(pair_customer)
    .bind(pair_meter)
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
        let unbillable = |detail: String| StoreError::Unbillable {
            customer: customer.clone(),
            meter: meter.clone(),
            detail,
        };
        let billed = meters.get(meter).ok_or_else(|| {
            unbillable(format!("meter {meter:?} has usage but is in neither tally.toml's [[meters]] nor the meters table; add it to [[meters]]"))
        })?;
        let Some(kind) = billed.kind else { continue };
        let total = match billed.aggregation {
            Aggregation::Max => totals.max,
            Aggregation::Latest => totals.latest,
            _ => totals.sum,
        };
        let balance = balances
            .get_mut(&(customer.clone(), meter.clone()))
            .ok_or_else(|| unbillable("its balance row could not be locked".into()))?;
        let state = states.get(key).copied().unwrap_or_default();
        let planned = plan_slot(kind, total, state, *balance)
            .map_err(|overflow| unbillable(format!("{overflow} (slot {slot_start})")))?;
        let Some(mut plan) = planned else {
            continue;
        };
        let stripe_customer_id = stripe_customer
            .get(customer)
            .ok_or_else(|| unbillable("its Stripe customer id went missing".into()))?;
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
                    canceled = canceled
                        .checked_add(units)
                        .ok_or_else(|| unbillable("canceled units overflow a decimal".into()))?;
                    let id = identifier(customer, meter, *slot_start, revision);
                    writes.submissions.push(submission(
                        id,
                        revision,
                        "cancel",
                        units,
                        Some(target),
                    ));
                }
                plan = after_cancel(&plan, canceled)
                    .map_err(|overflow| unbillable(overflow.to_string()))?;
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
/// them can still be canceled: first attempted less than 23 hours ago (an hour's margin on
/// Stripe's 24; an attempt with a lost answer may have reached Stripe before `sent_at`), and
/// nothing of the slot pending or failed. `None`: cancelling is not possible.
async fn cancelable_revisions(
    tx: &mut PgConnection,
    (customer, meter, slot_start): &SlotKey,
) -> Result<Option<Vec<(String, Decimal)>>, StoreError> {
    let rows: Vec<(String, String, ExactDecimal, String, bool, bool)> = sqlx::query_as(
        "SELECT s.identifier, s.kind, s.value, s.status,
                coalesce(least(s.first_uncertain_at, s.sent_at) > now() - interval '23 hours', false),
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
            revisions.push((identifier, value.0));
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
    let rows: Vec<(String, String, ExactDecimal, ExactDecimal)> = sqlx::query_as(
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
                    accounted: accounted.0,
                    submitted: submitted.0,
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
    sum: ExactDecimal,
    max: Option<ExactDecimal>,
    latest: Option<ExactDecimal>,
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
                sum: row.sum.0,
                max: row.max.unwrap_or_default().0,
                latest: row.latest.unwrap_or_default().0,
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
    let rows: Vec<(String, String, DateTime<Utc>, ExactDecimal, i32)> = sqlx::query_as(
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
                    accounted: accounted.0,
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
    #[sqlx(try_from = "ExactDecimal")]
    pub value: Decimal,
    pub event_timestamp: DateTime<Utc>,
    pub attempts: i32,
    /// For a `cancel` row: the identifier of the event to withdraw.
    pub cancels: Option<String>,
    /// When an attempt whose outcome is unknown (no answer, a 5xx) was first made: Stripe may
    /// hold the event, and remembers its identifier only for about 24 hours after that.
    pub first_uncertain_at: Option<DateTime<Utc>>,
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
             FROM stripe_submissions p
             WHERE status = 'pending'
               AND NOT EXISTS (SELECT 1 FROM billing_quarantine q
                               WHERE q.customer_id = p.customer_id AND q.meter = p.meter)
             ORDER BY customer_id, meter, submission_id),
         due AS (
             SELECT customer_id, meter FROM heads
             WHERE next_attempt_at <= now() AND (leased_until IS NULL OR leased_until < now())
             ORDER BY submission_id
             LIMIT $1)
         UPDATE stripe_submissions s
            SET leased_until = now() + $2::interval,
                leased_at = now(),
                -- An earlier lease that expired unrecorded: its sink died, perhaps mid-call.
                first_uncertain_at = CASE WHEN s.leased_until IS NOT NULL
                                          THEN coalesce(s.first_uncertain_at, s.leased_at)
                                          ELSE s.first_uncertain_at END
         WHERE s.submission_id IN (
             SELECT p.submission_id FROM stripe_submissions p
             JOIN due ON due.customer_id = p.customer_id AND due.meter = p.meter
             WHERE p.status = 'pending' AND (p.leased_until IS NULL OR p.leased_until < now())
             FOR UPDATE OF p SKIP LOCKED)
         RETURNING s.submission_id, s.identifier, s.customer_id, s.meter, s.stripe_customer_id,
                   s.event_name, s.kind, s.value, s.event_timestamp, s.attempts, s.cancels,
                   s.first_uncertain_at",
    )
    .bind(limit as i64)
    .bind(lease)
    .fetch_all(pool)
    .await?;
    let mut rows = rows;
    rows.sort_by_key(|row| row.submission_id);
    Ok(rows)
}

/// Extends the leases of rows this process is still sending, so that a slow pair (retries,
/// timeouts) is not leased by another sink meanwhile. Rows already recorded are not touched.
pub(crate) async fn renew_leases(
    pool: &PgPool,
    submission_ids: &[i64],
    lease: Duration,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE stripe_submissions SET leased_until = now() + $2::interval
         WHERE submission_id = ANY($1) AND status = 'pending'",
    )
    .bind(submission_ids)
    .bind(lease)
    .execute(pool)
    .await?;
    Ok(())
}

/// What became of a leased row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Sent,
    /// Try again at `retry_at`. `uncertain_at`: an attempt whose outcome is unknown (Stripe
    /// may have recorded it) was made then.
    Retry {
        error: String,
        retry_at: DateTime<Utc>,
        uncertain_at: Option<DateTime<Utc>>,
    },
    /// Stripe refused it for good; an operator must look.
    Failed {
        error: String,
    },
    /// Stripe may hold the event from an attempt more than 23 hours ago, and no longer promises
    /// to recognise its identifier: sending it again could bill twice. An operator checks
    /// Stripe and resolves it (`tally submissions resolve`).
    NeedsReview {
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
    let mut errors: Vec<Option<String>> = Vec::new();
    let mut retry_at: Vec<Option<DateTime<Utc>>> = Vec::new();
    let mut uncertain_at: Vec<Option<DateTime<Utc>>> = Vec::new();
    for (id, tries, outcome) in outcomes {
        ids.push(*id);
        attempts.push(*tries as i32);
        let (status, error, at, uncertain) = match outcome {
            Outcome::Sent => ("sent", None, None, None),
            Outcome::Retry {
                error,
                retry_at,
                uncertain_at,
            } => ("pending", Some(error), Some(*retry_at), *uncertain_at),
            Outcome::Failed { error } => ("failed", Some(error), None, None),
            Outcome::NeedsReview { error } => ("needs_review", Some(error), None, None),
            Outcome::Released => ("pending", None, None, None),
        };
        statuses.push(status);
        // Stripe's messages (and ours quoting them) go into `text`: made printable.
        errors.push(error.map(|e| printable(e.clone())));
        retry_at.push(at);
        uncertain_at.push(uncertain);
    }
    sqlx::query(
        "UPDATE stripe_submissions s
            SET status = u.status,
                attempts = s.attempts + u.attempts,
                last_error = coalesce(u.error, s.last_error),
                next_attempt_at = coalesce(u.retry_at, s.next_attempt_at),
                first_uncertain_at = coalesce(s.first_uncertain_at, u.uncertain),
                sent_at = CASE WHEN u.status = 'sent' THEN now() ELSE s.sent_at END,
                leased_until = NULL
         FROM unnest($1::bigint[], $2::int[], $3::text[], $4::text[], $5::timestamptz[],
                     $6::timestamptz[])
              AS u(id, attempts, status, error, retry_at, uncertain)
         WHERE s.submission_id = u.id AND s.status = 'pending'",
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(&statuses)
    .bind(&errors)
    .bind(&retry_at)
    .bind(&uncertain_at)
    .execute(pool)
    .await?;
    Ok(())
}

/// Backlog figures for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(crate) struct Backlog {
    pub(crate) pending: i64,
    pub(crate) oldest_pending_seconds: f64,
    pub(crate) needs_review: i64,
    pub(crate) unmapped_slots: i64,
    pub(crate) quarantined_pairs: i64,
}

pub(crate) async fn backlog(pool: &PgPool) -> Result<Backlog, StoreError> {
    let (pending, oldest, needs_review): (i64, Option<f64>, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'pending'),
                extract(epoch FROM now() - min(created_at) FILTER (WHERE status = 'pending'))::float8,
                count(*) FILTER (WHERE status = 'needs_review')
         FROM stripe_submissions WHERE status IN ('pending', 'needs_review')",
    )
    .fetch_one(pool)
    .await?;
    let unmapped: Option<i64> =
        sqlx::query_scalar("SELECT sum(slots)::bigint FROM stripe_unmapped_usage")
            .fetch_one(pool)
            .await?;
    let quarantined: i64 = sqlx::query_scalar("SELECT count(*) FROM billing_quarantine")
        .fetch_one(pool)
        .await?;
    Ok(Backlog {
        pending,
        oldest_pending_seconds: oldest.unwrap_or(0.0),
        needs_review,
        unmapped_slots: unmapped.unwrap_or(0),
        quarantined_pairs: quarantined,
    })
}

/// A customer+meter pair set aside (`billing_quarantine`).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct QuarantinedPair {
    pub customer_id: String,
    pub meter: String,
    pub reason: String,
    pub detail: String,
    pub since: DateTime<Utc>,
}

/// Sets a pair aside: its changes wait (and its outbox rows are not sent) until an operator
/// releases it. Returns false when it already was.
pub(crate) async fn quarantine(
    pool: &PgPool,
    customer: &str,
    meter: &str,
    reason: &str,
    detail: &str,
) -> Result<bool, StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO billing_quarantine (customer_id, meter, reason, detail)
         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
    )
    .bind(customer)
    .bind(meter)
    .bind(reason)
    .bind(printable(detail.to_owned()))
    .execute(pool)
    .await?
    .rows_affected();
    Ok(inserted > 0)
}

/// Every quarantined pair, oldest first.
pub async fn quarantined_pairs(pool: &PgPool) -> Result<Vec<QuarantinedPair>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT customer_id, meter, reason, detail, since FROM billing_quarantine ORDER BY since",
    )
    .fetch_all(pool)
    .await?)
}

/// `tally quarantine release`: bills the pair again from the next pass. Returns false when it
/// was not quarantined.
pub async fn release_quarantine(
    pool: &PgPool,
    customer: &str,
    meter: &str,
) -> Result<bool, StoreError> {
    let deleted =
        sqlx::query("DELETE FROM billing_quarantine WHERE customer_id = $1 AND meter = $2")
            .bind(customer)
            .bind(meter)
            .execute(pool)
            .await?
            .rows_affected();
    Ok(deleted > 0)
}

/// A submission parked as `needs_review`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ReviewRow {
    pub identifier: String,
    pub customer_id: String,
    pub meter: String,
    pub slot_start: DateTime<Utc>,
    pub kind: String,
    #[sqlx(try_from = "ExactDecimal")]
    pub value: Decimal,
    pub first_uncertain_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

/// Submissions waiting for an operator's decision.
pub async fn needs_review(pool: &PgPool) -> Result<Vec<ReviewRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT identifier, customer_id, meter, slot_start, kind, value, first_uncertain_at,
                last_error
         FROM stripe_submissions WHERE status = 'needs_review' ORDER BY submission_id",
    )
    .fetch_all(pool)
    .await?)
}

/// How an operator resolves a `needs_review` submission after looking at Stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Stripe has the event: record it as sent.
    Sent,
    /// Stripe does not have it: send it again (a new attempt with the same identifier).
    Resend,
}

/// Resolves one `needs_review` submission. Returns false when there is none by that identifier.
pub async fn resolve_review(
    pool: &PgPool,
    identifier: &str,
    resolution: Resolution,
) -> Result<bool, StoreError> {
    let sql = match resolution {
        Resolution::Sent => {
            "UPDATE stripe_submissions SET status = 'sent', sent_at = now(),
                    last_error = 'resolved by an operator: Stripe has it'
             WHERE identifier = $1 AND status = 'needs_review'"
        }
        Resolution::Resend => {
            "UPDATE stripe_submissions SET status = 'pending', next_attempt_at = now(),
                    first_uncertain_at = NULL,
                    last_error = 'resolved by an operator: Stripe does not have it; resending'
             WHERE identifier = $1 AND status = 'needs_review'"
        }
    };
    let updated = sqlx::query(sql)
        .bind(identifier)
        .execute(pool)
        .await?
        .rows_affected();
    Ok(updated > 0)
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

/// A tally customer and the Stripe customer its usage is billed to.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CustomerMapping {
    pub customer_id: String,
    pub stripe_customer_id: String,
}

/// Every mapping, by customer.
pub async fn customer_mappings(pool: &PgPool) -> Result<Vec<CustomerMapping>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT customer_id, stripe_customer_id FROM stripe_customers ORDER BY customer_id",
    )
    .fetch_all(pool)
    .await?)
}

/// Usage of a customer with no Stripe mapping yet: it waits, unbilled, until one is added.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct UnmappedUsage {
    pub customer_id: String,
    pub meter: String,
    /// Slots waiting.
    pub slots: i64,
}

/// Every customer and meter whose usage waits for a mapping.
pub async fn unmapped_usage(pool: &PgPool) -> Result<Vec<UnmappedUsage>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT customer_id, meter, slots FROM stripe_unmapped_usage ORDER BY customer_id, meter",
    )
    .fetch_all(pool)
    .await?)
}
