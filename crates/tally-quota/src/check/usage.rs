//! A limited meter's usage in its current period: which UTC days the period counts
//! ([`period_bounds`]) and the one query that reads them for a whole batch of customers
//! ([`UsageRequests`]). Usage comes from `usage_daily`, never from minute windows.

use std::collections::HashMap;

use chrono::{DateTime, Datelike, NaiveDate, TimeDelta, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;
use tally_core::Aggregation;
use tally_db::ExactDecimal;

use super::QuotaError;
use tally_billing::plan::Period;
use tally_billing::store::{BillingStoreError, Subscription};

/// Where a limit's current period starts and when it resets.
pub(super) struct PeriodBounds {
    /// The first UTC day counted.
    pub(super) first_day: NaiveDate,
    pub(super) resets_at: DateTime<Utc>,
}

/// The first UTC day counted and when the period resets.
pub(super) fn period_bounds(
    period: Period,
    subscription: &Subscription,
    now: DateTime<Utc>,
) -> PeriodBounds {
    let today = now.date_naive();
    match period {
        Period::Day => PeriodBounds {
            first_day: today,
            resets_at: (today + TimeDelta::days(1))
                .and_hms_opt(0, 0, 0)
                .expect("midnight")
                .and_utc(),
        },
        Period::Month => {
            let first = today.with_day(1).expect("day 1 exists");
            let next = first
                .checked_add_months(chrono::Months::new(1))
                .expect("a next month");
            PeriodBounds {
                first_day: first,
                resets_at: next.and_hms_opt(0, 0, 0).expect("midnight").and_utc(),
            }
        }
        Period::BillingPeriod => PeriodBounds {
            first_day: subscription.current_period_start.date_naive(),
            resets_at: subscription.current_period_end,
        },
    }
}

/// Period usage wanted for a batch of customers: each is a customer's `meter` since `start`
/// (whole UTC days), merged by the meter's aggregation.
#[derive(Default)]
pub(super) struct UsageRequests {
    customers: Vec<String>,
    meters: Vec<String>,
    starts: Vec<NaiveDate>,
    aggregations: Vec<String>,
}

impl UsageRequests {
    /// Adds one request; returns its index, the key of its usage in [`UsageRequests::fetch`].
    pub(super) fn push(
        &mut self,
        customer: &str,
        meter: &str,
        start: NaiveDate,
        aggregation: Aggregation,
    ) -> i32 {
        self.customers.push(customer.to_owned());
        self.meters.push(meter.to_owned());
        self.starts.push(start);
        self.aggregations.push(aggregation.as_str().to_owned());
        (self.customers.len() - 1) as i32
    }

    /// Usage by request index, in one query (`usage_daily`, never minute windows), isolating
    /// requests whose usage Postgres cannot give (a sum beyond a 28-digit decimal): their
    /// customers are returned apart (`tally_db::isolate`). One customer's data never fails the
    /// others'.
    pub(super) async fn fetch_isolating(
        &self,
        pool: &PgPool,
    ) -> Result<(HashMap<i32, Decimal>, Vec<(String, QuotaError)>), QuotaError> {
        let all: Vec<usize> = (0..self.customers.len()).collect();
        let (found, failed) =
            tally_db::isolate(
                &all,
                |part| async move { self.fetch_some(pool, &part).await },
            )
            .await
            .map_err(BillingStoreError::from)?;
        let failed = failed
            .into_iter()
            .map(|(index, error)| {
                let error = QuotaError::Store(BillingStoreError::Postgres(error));
                (self.customers[index].clone(), error)
            })
            .collect();
        Ok((found.into_iter().collect(), failed))
    }

    /// The usage of the requests at `indexes`, by request index, in one query.
    async fn fetch_some(
        &self,
        pool: &PgPool,
        indexes: &[usize],
    ) -> Result<Vec<(i32, Decimal)>, sqlx::Error> {
        if indexes.is_empty() {
            return Ok(Vec::new());
        }
        let pick = |column: &[String]| -> Vec<String> {
            indexes.iter().map(|&i| column[i].clone()).collect()
        };
        let starts: Vec<NaiveDate> = indexes.iter().map(|&i| self.starts[i]).collect();
        let ids: Vec<i32> = indexes.iter().map(|&i| i as i32).collect();
        let rows: Vec<(i32, Option<ExactDecimal>)> = sqlx::query_as(
            "SELECT u.i, CASE u.a
                WHEN 'max' THEN (SELECT max(d.value) FROM usage_daily d
                    WHERE d.customer_id = u.c AND d.meter = u.m AND d.day >= u.s)
                WHEN 'latest' THEN (SELECT d.value FROM usage_daily d
                    WHERE d.customer_id = u.c AND d.meter = u.m AND d.day >= u.s
                    ORDER BY d.latest_at DESC NULLS LAST, d.latest_id DESC LIMIT 1)
                ELSE (SELECT sum(d.value) FROM usage_daily d
                    WHERE d.customer_id = u.c AND d.meter = u.m AND d.day >= u.s)
                END
             FROM unnest($1::text[], $2::text[], $3::date[], $4::text[], $5::int4[])
                  AS u(c, m, s, a, i)",
        )
        .bind(pick(&self.customers))
        .bind(pick(&self.meters))
        .bind(&starts)
        .bind(pick(&self.aggregations))
        .bind(&ids)
        .fetch_all(pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(index, value)| (index, value.unwrap_or_default().0))
            .collect())
    }
}

/// A limited meter's usage in its current period, from Postgres alone (no process's local
/// count): what alert rules are evaluated against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterPeriodUsage {
    pub meter: String,
    pub limit: tally_billing::plan::LimitDefinition,
    pub used: Decimal,
    /// The period's start: a UTC midnight, or the billing period's start.
    pub period_start: DateTime<Utc>,
    pub resets_at: DateTime<Utc>,
}

/// A customer with a live subscription, and the usage of each of its limited meters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerUsage {
    pub customer: String,
    pub subscription: Subscription,
    pub entitlements: tally_billing::plan::Entitlements,
    pub meters: Vec<MeterPeriodUsage>,
}

/// What [`usage_against_limits`] found for a batch of customers.
#[derive(Debug, Default)]
pub struct UsageAgainstLimits {
    /// Those with a live subscription, their entitlements and usage.
    pub customers: Vec<CustomerUsage>,
    /// Those whose entitlements or usage cannot be known (an override that does not fit the
    /// plan, a usage sum beyond a decimal), each with why: the others are unaffected.
    pub failed: Vec<(String, QuotaError)>,
}

/// For a batch of customers (in three queries whatever their number): those with a live
/// subscription, their entitlements and the current-period usage of every limited meter that
/// adds up, is a maximum or a latest value (`unique_count` limits are not supported). A
/// customer whose entitlements or usage cannot be read is returned apart, with why.
pub async fn usage_against_limits(
    pool: &PgPool,
    customers: &[String],
    now: DateTime<Utc>,
) -> Result<UsageAgainstLimits, QuotaError> {
    let aggregations: HashMap<String, Aggregation> = tally_db::meters::all(pool)
        .await
        .map_err(BillingStoreError::from)?
        .into_iter()
        .map(|m| (m.name, m.aggregation))
        .collect();
    let mut live = tally_billing::store::live_customers(pool, customers).await?;
    let mut requests = UsageRequests::default();
    let mut found = Vec::new();
    let mut failed = Vec::new();
    for customer in customers {
        let customer_live = match live.remove(customer) {
            Some(Ok(live)) => live,
            Some(Err(error)) => {
                failed.push((customer.clone(), error.into()));
                continue;
            }
            None => continue,
        };
        let mut wanted = Vec::new();
        for (meter, limit) in &customer_live.entitlements.limits {
            let aggregation = aggregations.get(meter).copied().unwrap_or(Aggregation::Sum);
            if aggregation == Aggregation::UniqueCount {
                continue;
            }
            let bounds = period_bounds(limit.period, &customer_live.subscription, now);
            let period_start = match limit.period {
                Period::BillingPeriod => customer_live.subscription.current_period_start,
                _ => bounds
                    .first_day
                    .and_hms_opt(0, 0, 0)
                    .expect("midnight")
                    .and_utc(),
            };
            let request = requests.push(customer, meter, bounds.first_day, aggregation);
            wanted.push((
                request,
                meter.clone(),
                limit.clone(),
                period_start,
                bounds.resets_at,
            ));
        }
        found.push((customer.clone(), customer_live, wanted));
    }
    let (usage, unreadable) = requests.fetch_isolating(pool).await?;
    let unreadable_customers: std::collections::HashSet<String> =
        unreadable.iter().map(|(c, _)| c.clone()).collect();
    failed.extend(unreadable);
    let customers = found
        .into_iter()
        .filter(|(customer, _, _)| !unreadable_customers.contains(customer))
        .map(|(customer, live, wanted)| CustomerUsage {
            customer,
            meters: wanted
                .into_iter()
                .map(
                    |(request, meter, limit, period_start, resets_at)| MeterPeriodUsage {
                        meter,
                        limit,
                        used: usage.get(&request).copied().unwrap_or_default(),
                        period_start,
                        resets_at,
                    },
                )
                .collect(),
            subscription: live.subscription,
            entitlements: live.entitlements,
        })
        .collect();
    Ok(UsageAgainstLimits { customers, failed })
}
