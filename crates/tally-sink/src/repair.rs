//! `tally reconcile --repair`: drift tally can prove, made good through the outbox.
//!
//! Over a reconciled range, a customer+meter pair's drift is proven when
//! - the range ended at least [`SETTLE`] ago and every outbox row in it was sent at least that
//!   long ago, so Stripe's summaries have had time to show them;
//! - every row in the range was sent (none pending, failed, under review, nor the pair
//!   quarantined), all to the customer's current Stripe customer;
//! - and Stripe's summary holds fewer units (a delta meter) or another value (a last meter)
//!   than the rows Stripe accepted.
//!
//! Then Stripe accepted events it does not bill (dropped after its asynchronous validation, or
//! withdrawn outside tally), and sending the difference once more bills each unit once.
//! Stripe holding *more* than tally sent is never repaired: tally cannot tell which events are
//! extra, and Stripe takes no negative usage.
//!
//! A repair is one new outbox row (`repair_id` set, recorded in `billing_repairs`) in the
//! range's latest sent slot and at its timestamp, under a negative revision: its identifier is
//! new, derived like every other, and never one the sink makes. The sink sends it like any
//! row. It is written in one transaction that takes a per-pair lock and checks the proof again,
//! so two repairs running at once, or one run twice, queue it once.

use chrono::{DateTime, TimeDelta, Utc};
use rust_decimal::Decimal;
use sqlx::PgConnection;
use sqlx::PgPool;
use tally_db::ExactDecimal;

use crate::owed::{identifier, BillingKind};
use crate::reconcile::{ReconcileRow, Verdict};
use crate::sink::SinkError;
use crate::store::{BilledMeter, SinkStoreError};

/// How long Stripe is given to show accepted events in its summaries before a shortfall counts
/// as proven. Stripe aggregates meter events asynchronously, usually within minutes.
pub const SETTLE: TimeDelta = TimeDelta::hours(1);
const SETTLE_TEXT: &str = "an hour";

/// Stripe takes meter events at most 35 days old; this keeps an hour's margin.
const OLDEST_TIMESTAMP: TimeDelta = TimeDelta::hours(35 * 24 - 1);

/// What `--repair` would do (or did) for one drifting pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairPlan {
    pub customer: String,
    pub meter: String,
    pub kind: BillingKind,
    /// What Stripe's summary reported for the range.
    pub stripe: Decimal,
    /// What the outbox sent for the range (repairs left out).
    pub sent: Decimal,
    pub action: RepairAction,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepairAction {
    /// Proven: send `units` (delta) or the value (last) to `stripe_customer_id` once more.
    Send {
        units: Decimal,
        stripe_customer_id: String,
        slot_start: DateTime<Utc>,
        event_timestamp: DateTime<Utc>,
    },
    /// Not proven, or not something a new meter event can make good: why, and what to do.
    Skip(String),
}

/// What applying one plan came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The repair row is in the outbox under this identifier.
    Queued { identifier: String },
    /// The proof no longer held when the repair was about to be written.
    Skipped(String),
}

/// The outbox's figures for one pair over the range, as the proof needs them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PairFacts {
    /// Rows (repairs included) not sent: pending, failed or needs_review.
    unsent: i64,
    /// When the latest row (repairs included) was sent.
    last_sent_at: Option<DateTime<Utc>>,
    /// The Stripe customers the rows went to.
    stripe_customers: Vec<String>,
    /// Delta: units sent less units canceled; last: the last value sent. Repairs left out.
    sent: Decimal,
    /// The latest sent row that bills usage (not a cancel): where a repair goes.
    latest: Option<(DateTime<Utc>, DateTime<Utc>)>,
}

async fn pair_facts(
    connection: &mut PgConnection,
    customer: &str,
    meter: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<PairFacts, SinkStoreError> {
    #[allow(clippy::type_complexity)]
    let (unsent, last_sent_at, stripe_customers, delta_sent, last_sent, slot, timestamp): (
        i64,
        Option<DateTime<Utc>>,
        Vec<String>,
        Option<ExactDecimal>,
        Option<ExactDecimal>,
        Option<DateTime<Utc>>,
        Option<DateTime<Utc>>,
    ) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status <> 'sent'),
                max(sent_at),
                coalesce(array_agg(DISTINCT stripe_customer_id), '{}'),
                sum(CASE kind WHEN 'cancel' THEN -value ELSE value END)
                    FILTER (WHERE status = 'sent' AND repair_id IS NULL),
                (array_agg(value ORDER BY event_timestamp DESC, submission_id DESC)
                    FILTER (WHERE status = 'sent' AND kind = 'last' AND repair_id IS NULL))[1],
                (array_agg(slot_start ORDER BY event_timestamp DESC, submission_id DESC)
                    FILTER (WHERE status = 'sent' AND kind <> 'cancel'))[1],
                (array_agg(event_timestamp ORDER BY event_timestamp DESC, submission_id DESC)
                    FILTER (WHERE status = 'sent' AND kind <> 'cancel'))[1]
         FROM stripe_submissions
         WHERE customer_id = $1 AND meter = $2 AND event_timestamp >= $3 AND event_timestamp < $4",
    )
    .bind(customer)
    .bind(meter)
    .bind(from)
    .bind(to)
    .fetch_one(&mut *connection)
    .await?;
    Ok(PairFacts {
        unsent,
        last_sent_at,
        stripe_customers,
        sent: last_sent.or(delta_sent).unwrap_or_default().0,
        latest: slot.zip(timestamp),
    })
}

/// What `--repair` would do for each drifting row of a reconcile over `[from, to)`.
pub async fn plan_repairs(
    pool: &PgPool,
    rows: &[ReconcileRow],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<Vec<RepairPlan>, SinkError> {
    let mut connection = pool.acquire().await.map_err(SinkStoreError::from)?;
    let mut plans = Vec::new();
    for row in rows.iter().filter(|row| row.verdict == Verdict::Drift) {
        let facts = pair_facts(&mut connection, &row.customer, &row.meter, from, to).await?;
        plans.push(RepairPlan {
            customer: row.customer.clone(),
            meter: row.meter.clone(),
            kind: row.kind,
            stripe: row.stripe.unwrap_or_default(),
            sent: row.sent,
            action: decide(row, &facts, to, now),
        });
    }
    Ok(plans)
}

/// The proof, step by step; the first condition that fails says why and what to do.
fn decide(
    row: &ReconcileRow,
    facts: &PairFacts,
    to: DateTime<Utc>,
    now: DateTime<Utc>,
) -> RepairAction {
    use RepairAction::Skip;
    let (Some(stripe), Some(stripe_customer)) = (row.stripe, row.stripe_customer.as_ref()) else {
        return Skip("Stripe has no meter for this meter's event name: create it (`tally sink --create-stripe-meters`), then reconcile again".into());
    };
    if row.kind == BillingKind::Delta && stripe > row.sent {
        return Skip(format!(
            "Stripe holds {} more units than tally sent: tally cannot tell which events are extra; cancel them in Stripe (within 24 h of receipt) or credit the customer",
            (stripe - row.sent).normalize()
        ));
    }
    if let Some(why) = &row.quarantined {
        return Skip(format!(
            "the pair is quarantined ({why}): fix the cause and `tally quarantine release` it first"
        ));
    }
    if facts.unsent > 0 {
        return Skip(format!(
            "{} outbox row(s) in the range are not sent (pending, failed, under review, or an earlier repair): let the sink finish, or resolve them with `tally submissions`",
            facts.unsent
        ));
    }
    if to > now - SETTLE {
        return Skip(format!(
            "the range ends less than {SETTLE_TEXT} ago, and Stripe may not show its latest events yet: repair a range that ended at least {SETTLE_TEXT} ago"
        ));
    }
    if facts.last_sent_at.is_some_and(|at| at > now - SETTLE) {
        return Skip(format!(
            "a row in the range was sent less than {SETTLE_TEXT} ago, and Stripe may not show it yet: run the repair again later"
        ));
    }
    if let Some(other) = facts
        .stripe_customers
        .iter()
        .find(|id| *id != stripe_customer)
    {
        return Skip(format!(
            "usage in the range was sent to {other}, and the customer now maps to {stripe_customer}: tally cannot tell whether Stripe billed it there; settle it in Stripe by hand"
        ));
    }
    if !stripe.fract().is_zero() {
        return Skip(format!(
            "Stripe reports {stripe}, not a whole number: tally sends whole units only; look at the meter in Stripe"
        ));
    }
    let units = match row.kind {
        BillingKind::Delta => row.sent - stripe,
        BillingKind::Last => row.sent,
    };
    let Some((slot_start, event_timestamp)) = facts.latest else {
        return Skip("no sent row in the range to place a repair in".into());
    };
    if event_timestamp < now - OLDEST_TIMESTAMP {
        return Skip(format!(
            "the range's latest billed slot ({event_timestamp}) is older than Stripe accepts meter events (35 days): settle it in Stripe by hand"
        ));
    }
    RepairAction::Send {
        units,
        stripe_customer_id: stripe_customer.clone(),
        slot_start,
        event_timestamp,
    }
}

/// Queues one proven repair, in one transaction that checks the proof again under a per-pair
/// lock: the outbox still holds what was compared with Stripe (read at `stripe_read_at`), the
/// customer still maps to the same Stripe customer, and no repair was queued since.
pub async fn apply_repair(
    pool: &PgPool,
    plan: &RepairPlan,
    meter: &BilledMeter,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    stripe_read_at: DateTime<Utc>,
) -> Result<Applied, SinkError> {
    let RepairAction::Send {
        units,
        stripe_customer_id,
        slot_start,
        event_timestamp,
    } = &plan.action
    else {
        return Ok(Applied::Skipped("not proven".into()));
    };
    let store = |error: sqlx::Error| SinkError::from(SinkStoreError::from(error));
    let mut tx = pool.begin().await.map_err(store)?;
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtextextended('tally repair ' || $1 || ' ' || $2, 0))",
    )
    .bind(&plan.customer)
    .bind(&plan.meter)
    .execute(&mut *tx)
    .await
    .map_err(store)?;
    let repaired_since: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM billing_repairs
                        WHERE customer_id = $1 AND meter = $2 AND created_at >= $3)",
    )
    .bind(&plan.customer)
    .bind(&plan.meter)
    .bind(stripe_read_at)
    .fetch_one(&mut *tx)
    .await
    .map_err(store)?;
    if repaired_since {
        return Ok(Applied::Skipped(
            "another repair of this pair was queued since Stripe was read".into(),
        ));
    }
    let mapped: Option<String> = sqlx::query_scalar(
        "SELECT stripe_customer_id FROM stripe_customers WHERE customer_id = $1",
    )
    .bind(&plan.customer)
    .fetch_optional(&mut *tx)
    .await
    .map_err(store)?;
    if mapped.as_ref() != Some(stripe_customer_id) {
        return Ok(Applied::Skipped(
            "the customer's Stripe mapping changed since Stripe was read".into(),
        ));
    }
    let facts = pair_facts(&mut tx, &plan.customer, &plan.meter, from, to).await?;
    if facts.unsent > 0
        || facts.sent != plan.sent
        || facts.latest != Some((*slot_start, *event_timestamp))
    {
        return Ok(Applied::Skipped(
            "the outbox changed since Stripe was read: reconcile again".into(),
        ));
    }
    let repair_id: i64 = sqlx::query_scalar(
        "INSERT INTO billing_repairs (customer_id, meter, range_from, range_to, stripe_customer_id,
                                      kind, stripe_value, sent_value, units)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         RETURNING repair_id",
    )
    .bind(&plan.customer)
    .bind(&plan.meter)
    .bind(from)
    .bind(to)
    .bind(stripe_customer_id)
    .bind(plan.kind.as_str())
    .bind(plan.stripe)
    .bind(plan.sent)
    .bind(units)
    .fetch_one(&mut *tx)
    .await
    .map_err(store)?;
    // Repairs count down from -1 per slot: the sink's revisions count up from 1.
    let revision: i32 = sqlx::query_scalar(
        "SELECT least(coalesce(min(revision), 0), 0) - 1 FROM stripe_submissions
         WHERE customer_id = $1 AND meter = $2 AND slot_start = $3",
    )
    .bind(&plan.customer)
    .bind(&plan.meter)
    .bind(slot_start)
    .fetch_one(&mut *tx)
    .await
    .map_err(store)?;
    let identifier = identifier(&plan.customer, &plan.meter, *slot_start, revision);
    sqlx::query(
        "INSERT INTO stripe_submissions (identifier, customer_id, meter, slot_start, revision,
             stripe_customer_id, event_name, kind, value, event_timestamp, repair_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(&identifier)
    .bind(&plan.customer)
    .bind(&plan.meter)
    .bind(slot_start)
    .bind(revision)
    .bind(stripe_customer_id)
    .bind(&meter.event_name)
    .bind(plan.kind.as_str())
    .bind(units)
    .bind(event_timestamp)
    .bind(repair_id)
    .execute(&mut *tx)
    .await
    .map_err(store)?;
    tx.commit().await.map_err(store)?;
    Ok(Applied::Queued { identifier })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        "2026-12-02T12:00:00Z".parse().unwrap()
    }

    fn drift(kind: BillingKind, sent: i64, stripe: i64) -> ReconcileRow {
        ReconcileRow {
            customer: "acme".into(),
            meter: "api_calls".into(),
            kind,
            windows: Decimal::from(sent),
            credited: Decimal::ZERO,
            waiting: Decimal::ZERO,
            sent: Decimal::from(sent),
            pending: Decimal::ZERO,
            failed: Decimal::ZERO,
            review: Decimal::ZERO,
            repairing: Decimal::ZERO,
            stripe_customer: Some("cus_acme".into()),
            quarantined: None,
            stripe: Some(Decimal::from(stripe)),
            verdict: Verdict::Drift,
        }
    }

    fn settled(sent: i64) -> PairFacts {
        PairFacts {
            unsent: 0,
            last_sent_at: Some(now() - TimeDelta::hours(3)),
            stripe_customers: vec!["cus_acme".into()],
            sent: Decimal::from(sent),
            latest: Some((now() - TimeDelta::hours(4), now() - TimeDelta::hours(4))),
        }
    }

    fn skipped(action: RepairAction, containing: &str) {
        match action {
            RepairAction::Skip(why) => assert!(why.contains(containing), "{why}"),
            other => panic!("expected a skip ({containing}), got {other:?}"),
        }
    }

    #[test]
    fn a_settled_shortfall_is_sent_again() {
        let to = now() - TimeDelta::hours(2);
        let action = decide(&drift(BillingKind::Delta, 50, 40), &settled(50), to, now());
        assert_eq!(
            action,
            RepairAction::Send {
                units: Decimal::from(10),
                stripe_customer_id: "cus_acme".into(),
                slot_start: now() - TimeDelta::hours(4),
                event_timestamp: now() - TimeDelta::hours(4),
            }
        );
        let last = decide(&drift(BillingKind::Last, 7, 3), &settled(7), to, now());
        assert!(matches!(last, RepairAction::Send { units, .. } if units == Decimal::from(7)));
    }

    #[test]
    fn nothing_unproven_is_sent() {
        let to = now() - TimeDelta::hours(2);
        let row = drift(BillingKind::Delta, 50, 40);
        skipped(
            decide(&drift(BillingKind::Delta, 40, 50), &settled(40), to, now()),
            "more units",
        );
        skipped(decide(&row, &settled(50), now(), now()), "range ends");
        let fresh = PairFacts {
            last_sent_at: Some(now() - TimeDelta::minutes(5)),
            ..settled(50)
        };
        skipped(decide(&row, &fresh, to, now()), "sent less than");
        let unsent = PairFacts {
            unsent: 1,
            ..settled(50)
        };
        skipped(decide(&row, &unsent, to, now()), "not sent");
        let elsewhere = PairFacts {
            stripe_customers: vec!["cus_acme".into(), "cus_old".into()],
            ..settled(50)
        };
        skipped(decide(&row, &elsewhere, to, now()), "cus_old");
        let quarantined = ReconcileRow {
            quarantined: Some("overflow".into()),
            ..row.clone()
        };
        skipped(decide(&quarantined, &settled(50), to, now()), "quarantined");
        let no_meter = ReconcileRow {
            stripe: None,
            ..row.clone()
        };
        skipped(decide(&no_meter, &settled(50), to, now()), "no meter");
        let old = PairFacts {
            latest: Some((now() - TimeDelta::days(40), now() - TimeDelta::days(40))),
            ..settled(50)
        };
        skipped(decide(&row, &old, to, now()), "35 days");
    }
}
