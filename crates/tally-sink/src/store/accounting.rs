//! The accounting transaction: settled slot changes become slot states, balances, outbox rows
//! (`stripe_submissions`) and corrections, in one Postgres transaction.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool};
use tally_core::window::SLOT;
use tally_core::Aggregation;
use tally_db::ExactDecimal;

use super::{BilledMeter, SinkStoreError};
use crate::owed::{after_cancel, event_timestamp, identifier, owed_for, Balance, SlotState};

/// What one accounting transaction did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AccountingReport {
    pub changes: u64,
    pub slots: u64,
    pub submissions: u64,
    pub corrections: u64,
}

impl AccountingReport {
    pub fn add(&mut self, other: AccountingReport) {
        self.changes += other.changes;
        self.slots += other.slots;
        self.submissions += other.submissions;
        self.corrections += other.corrections;
    }
}

/// One five-minute slot of a customer's usage of a meter.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct SlotKey {
    customer: String,
    meter: String,
    slot_start: DateTime<Utc>,
}

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
) -> Result<Vec<(String, String)>, SinkStoreError> {
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
/// the slots' window totals, work out what each owes, write slot states, balances, outbox rows and corrections,
/// and delete the change rows it handled. Changes of unmapped customers wait; those of
/// quarantined pairs are left alone.
pub(crate) async fn account_slots(
    pool: &PgPool,
    meters: &HashMap<String, BilledMeter>,
    what: Accounting<'_>,
) -> Result<AccountingReport, SinkStoreError> {
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
        return Ok(AccountingReport::default());
    }
    let change_ids: Vec<i64> = changes.iter().map(|c| c.0).collect();
    let mut stripe_customer: HashMap<String, String> = HashMap::new();
    let mut slots: BTreeSet<SlotKey> = BTreeSet::new();
    for (_, customer, meter, slot, stripe_id) in changes {
        stripe_customer.insert(customer.clone(), stripe_id);
        slots.insert(SlotKey {
            customer,
            meter,
            slot_start: slot,
        });
    }
    let pairs: BTreeSet<(&str, &str)> = slots
        .iter()
        .map(|key| (key.customer.as_str(), key.meter.as_str()))
        .collect();

    let mut balances = lock_balances(&mut tx, &pairs).await?;
    let totals = slot_totals(&mut tx, &slots).await?;
    let states = slot_states(&mut tx, &slots).await?;

    let now = Utc::now();
    let mut writes = Writes::default();
    for (key, totals) in &totals {
        let SlotKey {
            customer,
            meter,
            slot_start,
        } = key;
        let unbillable = |detail: String| SinkStoreError::Unbillable {
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
        let owed = owed_for(kind, total, state, *balance)
            .map_err(|overflow| unbillable(format!("{overflow} (slot {slot_start})")))?;
        let Some(mut owed) = owed else {
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
        if owed.overbilled.is_some() {
            if let Some(revisions) = cancelable_revisions(&mut tx, key).await? {
                let mut revision = owed.slot.revision;
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
                owed = after_cancel(&owed, canceled)
                    .map_err(|overflow| unbillable(overflow.to_string()))?;
                owed.slot.revision = revision + i32::from(owed.submission.is_some());
            }
        }
        *balance = owed.balance;
        writes.slots.push((key.clone(), owed.slot));
        if let Some(value) = owed.submission {
            let id = identifier(customer, meter, *slot_start, owed.slot.revision);
            writes.submissions.push(submission(
                id,
                owed.slot.revision,
                kind.as_str(),
                value,
                None,
            ));
        }
        if let Some(overbilled) = owed.overbilled {
            tracing::error!(customer, meter, %slot_start, %overbilled, "usage went down after it was billed, too late to cancel at Stripe; recorded in billing_corrections for finance");
            writes.corrections.push((key.clone(), overbilled));
        }
    }
    let report = AccountingReport {
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
    SlotKey {
        customer,
        meter,
        slot_start,
    }: &SlotKey,
) -> Result<Option<Vec<(String, Decimal)>>, SinkStoreError> {
    let rows: Vec<(String, String, ExactDecimal, String, bool, bool)> = sqlx::query_as(
        "SELECT s.identifier, s.kind, s.value, s.status,
                coalesce(least(s.first_uncertain_at, s.sent_at) > now() - interval '23 hours', false),
                EXISTS (SELECT 1 FROM stripe_submissions c WHERE c.cancels = s.identifier)
         FROM stripe_submissions s
         WHERE s.customer_id = $1 AND s.meter = $2 AND s.slot_start = $3
           -- A repair (tally reconcile --repair) stands in for an event Stripe dropped: it is
           -- not the slot's usage, so usage going down never withdraws it.
           AND s.repair_id IS NULL
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
) -> Result<BTreeMap<(String, String), Balance>, SinkStoreError> {
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
) -> Result<BTreeMap<SlotKey, SlotTotals>, SinkStoreError> {
    let customers: Vec<&str> = slots.iter().map(|s| s.customer.as_str()).collect();
    let meters: Vec<&str> = slots.iter().map(|s| s.meter.as_str()).collect();
    let starts: Vec<DateTime<Utc>> = slots.iter().map(|s| s.slot_start).collect();
    let rows: Vec<SlotTotalsRow> = sqlx::query_as(
        // A sum meter bills the usage prepaid credits did not pay for (usage_paid_by_credits,
        // in SQL, read in this statement's snapshot with the windows).
        "SELECT s.c AS customer_id, s.m AS meter, s.s AS slot_start,
                greatest(coalesce(sum(u.value), 0)
                         - usage_paid_by_credits(s.c, s.m, s.s, s.s + $4::interval), 0) AS sum,
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
            let key = SlotKey {
                customer: row.customer_id,
                meter: row.meter,
                slot_start: row.slot_start,
            };
            (key, totals)
        })
        .collect())
}

async fn slot_states(
    tx: &mut PgConnection,
    slots: &BTreeSet<SlotKey>,
) -> Result<HashMap<SlotKey, SlotState>, SinkStoreError> {
    let customers: Vec<&str> = slots.iter().map(|s| s.customer.as_str()).collect();
    let meters: Vec<&str> = slots.iter().map(|s| s.meter.as_str()).collect();
    let starts: Vec<DateTime<Utc>> = slots.iter().map(|s| s.slot_start).collect();
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
                SlotKey {
                    customer: c,
                    meter: m,
                    slot_start: s,
                },
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
    ) -> Result<(), SinkStoreError> {
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
            let customers: Vec<&str> = self
                .slots
                .iter()
                .map(|(k, _)| k.customer.as_str())
                .collect();
            let meters: Vec<&str> = self.slots.iter().map(|(k, _)| k.meter.as_str()).collect();
            let starts: Vec<DateTime<Utc>> = self.slots.iter().map(|(k, _)| k.slot_start).collect();
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
            let customers: Vec<&str> = s.iter().map(|x| x.key.customer.as_str()).collect();
            let meters: Vec<&str> = s.iter().map(|x| x.key.meter.as_str()).collect();
            let starts: Vec<DateTime<Utc>> = s.iter().map(|x| x.key.slot_start).collect();
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

        for (
            SlotKey {
                customer,
                meter,
                slot_start,
            },
            overbilled,
        ) in &self.corrections
        {
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
