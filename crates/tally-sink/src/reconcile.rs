//! `tally reconcile`: per customer and meter over a time range, tally's windows vs what the
//! outbox sent vs what Stripe reports (meter event summaries).

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use rust_decimal::prelude::FromPrimitive;
use rust_decimal::Decimal;
use sqlx::PgPool;
use stripe_billing::billing_meter_event_summary::ListIdBillingMeterEventSummary;
use tally_core::reject::printable;
use tally_db::ExactDecimal;

use crate::limiter::RateLimiter;
use crate::owed::BillingKind;
use crate::sink::SinkError;
use crate::store::{self, SinkStoreError};
use crate::stripe::{with_retries, StripeHttp};

/// How a row compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Windows, outbox and Stripe agree (within the fraction carried forward).
    Ok,
    /// Stripe agrees with what was sent, but not all usage is sent yet (unsettled slots,
    /// pending or failed outbox rows).
    Unbilled,
    /// The customer has no Stripe customer id; its usage waits.
    Unmapped,
    /// Stripe holds something other than what the outbox sent, or has no meter for it.
    Drift,
    /// The pair is set aside in `billing_quarantine`: its usage waits for an operator.
    Quarantined,
    /// Submissions are parked as `needs_review`: an operator must check Stripe for them.
    Review,
}

impl Verdict {
    pub const ALL: [Verdict; 6] = [
        Verdict::Ok,
        Verdict::Unbilled,
        Verdict::Unmapped,
        Verdict::Drift,
        Verdict::Quarantined,
        Verdict::Review,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Unbilled => "UNBILLED",
            Verdict::Unmapped => "UNMAPPED",
            Verdict::Drift => "DRIFT",
            Verdict::Quarantined => "QUARANTINED",
            Verdict::Review => "REVIEW",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconcileRow {
    pub customer: String,
    pub meter: String,
    pub kind: BillingKind,
    /// Sum of the windows that is Stripe's to bill (delta meters: the usage prepaid credits
    /// did not pay for), or the value of the last slot (last meters).
    pub windows: Decimal,
    /// Usage of the windows prepaid credits paid for: not billed to Stripe
    /// (`usage_covered_by_credits`). Delta meters only.
    pub credited: Decimal,
    /// Usage the credit burner has yet to burn: not billed yet, credits may still pay for it
    /// (`usage_waiting_for_burner`). Delta meters only.
    pub waiting: Decimal,
    /// Units Stripe accepted per the outbox, less the units of canceled events (delta), or the
    /// last value sent (last).
    pub sent: Decimal,
    pub pending: Decimal,
    pub failed: Decimal,
    /// Units parked as `needs_review`.
    pub review: Decimal,
    /// Units (delta) or the value (last) of repairs queued by `--repair --apply` and not sent
    /// yet. Sent repairs count nowhere here: each stands in for an event Stripe dropped.
    pub repairing: Decimal,
    /// The Stripe customer the pair bills now; `None` when unmapped.
    pub stripe_customer: Option<String>,
    /// Why the pair is quarantined, when it is.
    pub quarantined: Option<String>,
    /// What Stripe's event summary reports; `None` when unmapped or Stripe has no such meter.
    pub stripe: Option<Decimal>,
    pub verdict: Verdict,
}

/// Compares windows, outbox and Stripe over `[from, to)` (minute-aligned, as Stripe requires).
pub async fn reconcile(
    pool: &PgPool,
    stripe: &StripeHttp,
    requests_per_second: u32,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<ReconcileRow>, SinkError> {
    if from.timestamp() % 60 != 0 || to.timestamp() % 60 != 0 || to <= from {
        return Err(SinkError::Config(format!(
            "--from {from} and --to {to} must be whole minutes with --from before --to (Stripe summarizes minute-aligned ranges)"
        )));
    }
    let meters = store::billed_meters(pool).await?;
    let mut rows: BTreeMap<(String, String), ReconcileRow> = BTreeMap::new();
    // As text, so that one customer's sum beyond a decimal spoils only its own row.
    let windows: Vec<(String, String, String, String, String, String)> = sqlx::query_as(
        "WITH billed AS (SELECT name, aggregation FROM meters WHERE aggregation <> 'unique_count'),
              usage AS (
                SELECT u.customer_id, u.meter, sum(u.value) AS value,
                       usage_covered_by_credits(u.customer_id, u.meter, $1, $2) AS credited,
                       usage_waiting_for_burner(u.customer_id, u.meter, $1, $2) AS waiting
                FROM usage_minute u JOIN billed b ON b.name = u.meter AND b.aggregation IN ('sum', 'count')
                WHERE u.window_start >= $1 AND u.window_start < $2
                GROUP BY u.customer_id, u.meter),
              sums AS (
                SELECT customer_id, meter, 'delta' AS kind,
                       greatest(value - credited - waiting, 0) AS value, credited, waiting
                FROM usage),
              last_slot AS (
                SELECT u.customer_id, u.meter, b.aggregation,
                       date_bin('5 minutes', max(u.window_start), timestamptz 'epoch') AS slot
                FROM usage_minute u JOIN billed b ON b.name = u.meter AND b.aggregation IN ('max', 'latest')
                WHERE u.window_start >= $1 AND u.window_start < $2
                GROUP BY u.customer_id, u.meter, b.aggregation),
              lasts AS (
                SELECT u.customer_id, u.meter, 'last' AS kind,
                       ceil(CASE WHEN min(l.aggregation) = 'max' THEN max(u.value)
                            ELSE (array_agg(u.value ORDER BY u.latest_at DESC NULLS LAST, u.latest_id DESC))[1] END) AS value
                FROM usage_minute u
                JOIN last_slot l ON l.customer_id = u.customer_id AND l.meter = u.meter
                 AND u.window_start >= l.slot AND u.window_start < l.slot + interval '5 minutes'
                GROUP BY u.customer_id, u.meter)
         SELECT customer_id, meter, kind, value::text, credited::text, waiting::text FROM sums
         UNION ALL SELECT customer_id, meter, kind, value::text, '0', '0' FROM lasts",
    )
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await
    .map_err(SinkStoreError::from)?;
    for (customer, meter, kind, value, credited, waiting) in windows {
        let entry = row(&mut rows, customer, meter, kind_of(&kind));
        match (
            Decimal::from_str_exact(&value),
            Decimal::from_str_exact(&credited),
            Decimal::from_str_exact(&waiting),
        ) {
            (Ok(value), Ok(credited), Ok(waiting)) => {
                entry.windows = value;
                entry.credited = credited;
                entry.waiting = waiting;
            }
            _ => {
                entry.quarantined = Some(format!(
                    "the windows sum to {value} ({credited} paid by credits), beyond what a 28-digit decimal holds"
                ))
            }
        }
    }

    // Repair rows (`repair_id`) are left out of sent, pending, failed and review: a sent
    // repair stands in for an event Stripe dropped, so Stripe then holds what the rest say.
    let submitted: Vec<SubmittedRow> = sqlx::query_as(
        "SELECT customer_id, meter, CASE kind WHEN 'cancel' THEN 'delta' ELSE kind END AS kind,
                sum(CASE kind WHEN 'cancel' THEN -value ELSE value END) FILTER (WHERE status = 'sent' AND repair_id IS NULL) AS sent,
                sum(CASE kind WHEN 'cancel' THEN -value ELSE value END) FILTER (WHERE status = 'pending' AND repair_id IS NULL) AS pending,
                sum(CASE kind WHEN 'cancel' THEN -value ELSE value END) FILTER (WHERE status = 'failed' AND repair_id IS NULL) AS failed,
                sum(CASE kind WHEN 'cancel' THEN -value ELSE value END) FILTER (WHERE status = 'needs_review' AND repair_id IS NULL) AS review,
                (array_agg(value ORDER BY event_timestamp DESC, submission_id DESC)
                    FILTER (WHERE status = 'sent' AND kind = 'last' AND repair_id IS NULL))[1] AS last_sent,
                CASE WHEN bool_or(kind = 'last')
                     THEN (array_agg(value ORDER BY submission_id DESC)
                              FILTER (WHERE status <> 'sent' AND repair_id IS NOT NULL))[1]
                     ELSE sum(value) FILTER (WHERE status <> 'sent' AND repair_id IS NOT NULL)
                END AS repairing
         FROM stripe_submissions
         WHERE event_timestamp >= $1 AND event_timestamp < $2
         GROUP BY 1, 2, 3",
    )
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await
    .map_err(SinkStoreError::from)?;
    for submitted in submitted {
        let kind = kind_of(&submitted.kind);
        let entry = row(&mut rows, submitted.customer_id, submitted.meter, kind);
        entry.sent = match kind {
            BillingKind::Delta => submitted.sent.unwrap_or_default().0,
            BillingKind::Last => submitted.last_sent.unwrap_or_default().0,
        };
        entry.pending = submitted.pending.unwrap_or_default().0;
        entry.failed = submitted.failed.unwrap_or_default().0;
        entry.review = submitted.review.unwrap_or_default().0;
        entry.repairing = submitted.repairing.unwrap_or_default().0;
    }
    for pair in store::quarantined_pairs(pool).await? {
        let kind = meters
            .get(&pair.meter)
            .and_then(|m| m.kind)
            .unwrap_or(BillingKind::Delta);
        row(&mut rows, pair.customer_id, pair.meter, kind).quarantined =
            Some(format!("{}: {}", pair.reason, pair.detail));
    }

    let mapping: HashMap<String, String> =
        sqlx::query_as("SELECT customer_id, stripe_customer_id FROM stripe_customers")
            .fetch_all(pool)
            .await
            .map_err(SinkStoreError::from)?
            .into_iter()
            .collect();
    let limiter = RateLimiter::new(requests_per_second);
    let stripe_meters = crate::stripe_meters::stripe_meter_ids(stripe, &limiter).await?;

    for row in rows.values_mut() {
        let Some(stripe_customer) = mapping.get(&row.customer) else {
            row.verdict = Verdict::Unmapped;
            continue;
        };
        row.stripe_customer = Some(stripe_customer.clone());
        let event_name = meters
            .get(&row.meter)
            .map_or(row.meter.as_str(), |m| m.event_name.as_str());
        let Some(meter_id) = stripe_meters.get(event_name) else {
            row.verdict = Verdict::Drift;
            continue;
        };
        let request = ListIdBillingMeterEventSummary::new(
            meter_id.as_str(),
            stripe_customer.as_str(),
            to.timestamp(),
            from.timestamp(),
        );
        let summaries = with_retries(&limiter, || request.send(stripe)).await?;
        let total: f64 = summaries.data.iter().map(|s| s.aggregated_value).sum();
        let stripe_value = Decimal::from_f64(total).unwrap_or_default();
        row.stripe = Some(stripe_value);
        // Submissions under review may or may not be in Stripe: either agrees.
        let agrees = stripe_value == row.sent
            || (!row.review.is_zero() && row.sent.checked_add(row.review) == Some(stripe_value));
        // A queued repair that makes the difference good: billed once the sink sends it.
        let repair_queued = !row.repairing.is_zero()
            && match row.kind {
                BillingKind::Delta => stripe_value.checked_add(row.repairing) == Some(row.sent),
                BillingKind::Last => row.repairing == row.sent,
            };
        row.verdict = if repair_queued {
            Verdict::Unbilled
        } else if !agrees {
            Verdict::Drift
        } else if row.quarantined.is_some() {
            Verdict::Quarantined
        } else if !row.review.is_zero() {
            Verdict::Review
        } else if (row.windows - row.sent).abs() >= Decimal::ONE
            || !row.pending.is_zero()
            || !row.failed.is_zero()
            // Usage still waiting for the credit burner is not sent yet either.
            || row.waiting >= Decimal::ONE
        {
            Verdict::Unbilled
        } else {
            Verdict::Ok
        };
    }
    Ok(rows.into_values().collect())
}

/// The outbox's figures for one customer and meter.
#[derive(sqlx::FromRow)]
struct SubmittedRow {
    customer_id: String,
    meter: String,
    kind: String,
    sent: Option<ExactDecimal>,
    pending: Option<ExactDecimal>,
    failed: Option<ExactDecimal>,
    review: Option<ExactDecimal>,
    last_sent: Option<ExactDecimal>,
    repairing: Option<ExactDecimal>,
}

fn row(
    rows: &mut BTreeMap<(String, String), ReconcileRow>,
    customer: String,
    meter: String,
    kind: BillingKind,
) -> &mut ReconcileRow {
    rows.entry((customer.clone(), meter.clone()))
        .or_insert(ReconcileRow {
            customer,
            meter,
            kind,
            windows: Decimal::ZERO,
            credited: Decimal::ZERO,
            waiting: Decimal::ZERO,
            sent: Decimal::ZERO,
            pending: Decimal::ZERO,
            failed: Decimal::ZERO,
            review: Decimal::ZERO,
            repairing: Decimal::ZERO,
            stripe_customer: None,
            quarantined: None,
            stripe: None,
            verdict: Verdict::Ok,
        })
}

fn kind_of(text: &str) -> BillingKind {
    if text == "last" {
        BillingKind::Last
    } else {
        BillingKind::Delta
    }
}

/// The comparison as a plain-text table, one row per customer and meter.
pub fn render_table(rows: &[ReconcileRow]) -> String {
    let mut out = format!(
        "{:<24} {:<16} {:>5} {:>14} {:>14} {:>10} {:>8} {:>8} {:>14}  {}\n",
        "customer",
        "meter",
        "kind",
        "windows",
        "sent",
        "pending",
        "failed",
        "review",
        "stripe",
        "verdict"
    );
    for row in rows {
        let stripe = row
            .stripe
            .map_or("-".to_owned(), |s| s.normalize().to_string());
        out.push_str(&format!(
            "{:<24} {:<16} {:>5} {:>14} {:>14} {:>10} {:>8} {:>8} {:>14}  {}\n",
            printable(row.customer.clone()),
            row.meter,
            row.kind.as_str(),
            row.windows.normalize().to_string(),
            row.sent.normalize().to_string(),
            row.pending.normalize().to_string(),
            row.failed.normalize().to_string(),
            row.review.normalize().to_string(),
            stripe,
            row.verdict.as_str()
        ));
        if let Some(why) = &row.quarantined {
            out.push_str(&format!("    quarantined: {why}\n"));
        }
        if !row.credited.is_zero() {
            out.push_str(&format!(
                "    paid by credits: {} units (not billed to Stripe; windows shows the rest)\n",
                row.credited.normalize()
            ));
        }
        if !row.waiting.is_zero() {
            out.push_str(&format!(
                "    waiting for the credit burner: {} units (billed once burned, less what credits pay)\n",
                row.waiting.normalize()
            ));
        }
        if !row.repairing.is_zero() {
            out.push_str(&format!(
                "    repair queued: {} {} (the sink sends it)\n",
                row.repairing.normalize(),
                if row.kind == BillingKind::Delta {
                    "units"
                } else {
                    "as the value"
                }
            ));
        }
    }
    out
}

/// A meter event error report Stripe sent (a thin event recorded by the webhook endpoint),
/// with the details fetched from Stripe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterErrorReport {
    pub event_id: String,
    pub event_type: String,
    pub created: DateTime<Utc>,
    /// Stripe's summary, or why the details could not be fetched.
    pub summary: String,
    /// `(code, error count)` per kind of error.
    pub errors: Vec<(String, i64)>,
    /// Identifiers of sample meter events Stripe refused.
    pub identifiers: Vec<String>,
}

/// The meter event error reports Stripe sent about `[from, to)`, with their details.
pub async fn meter_error_reports(
    pool: &PgPool,
    stripe: &StripeHttp,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<MeterErrorReport>, SinkError> {
    let recorded: Vec<(String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT event_id, type, created FROM stripe_meter_error_reports
         WHERE created >= $1 AND created < $2 ORDER BY created, event_id",
    )
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await
    .map_err(SinkStoreError::from)?;
    let mut reports = Vec::with_capacity(recorded.len());
    for (event_id, event_type, created) in recorded {
        let mut report = MeterErrorReport {
            event_id,
            event_type,
            created,
            summary: String::new(),
            errors: Vec::new(),
            identifiers: Vec::new(),
        };
        match stripe
            .get_json(&format!("v2/core/events/{}", report.event_id))
            .await
        {
            Ok(event) => {
                let data = &event["data"];
                report.summary = data["developer_message_summary"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                for kind in data["reason"]["error_types"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    let code = kind["code"].as_str().unwrap_or("unknown").to_owned();
                    report
                        .errors
                        .push((code, kind["error_count"].as_i64().unwrap_or(0)));
                    for sample in kind["sample_errors"].as_array().into_iter().flatten() {
                        if let Some(identifier) = sample["request"]["identifier"].as_str() {
                            report.identifiers.push(identifier.to_owned());
                        }
                    }
                }
            }
            Err(error) => report.summary = format!("(details not available from Stripe: {error})"),
        }
        reports.push(report);
    }
    Ok(reports)
}
