//! The quota check services call in their request path.
//!
//! A customer's subscription, entitlements and current-period usage are loaded once and kept
//! in a local cache, reloaded in the background every `refresh` (`serve.refresh`, 250 ms by
//! default) while checks go on answering from the cached state. One refresher task reloads every customer that became stale
//! in a batch of two queries, so a thousand active customers cost a few queries per refresh,
//! not a thousand. A check on a cached customer is a map lookup
//! and a few decimal operations. Usage this process allowed since the last refresh is added
//! locally, so a burst through one process cannot overshoot a hard limit by more than what it
//! allowed that the aggregator has not yet committed when the cache refreshes: about one
//! refresh interval plus the aggregator's lag (under 2 s at the defaults) worth of usage.
//! Several processes each add only their own; their combined overshoot is bounded the same way,
//! per process.
//!
//! Period usage comes from `usage_daily`, which the aggregator updates in the same transaction as
//! the minute windows: a check never reads minute windows. Billing periods are counted by whole
//! UTC days, from the day the period starts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Datelike, NaiveDate, TimeDelta, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;
use tally_core::Aggregation;
use tally_db::ExactDecimal;
use tokio_util::sync::CancellationToken;

use crate::plan::{Enforcement, Entitlements, LimitDefinition, Period};
use crate::store::{self, QuotaStoreError, Subscription};

/// The answer to "may this customer use `quantity` more of `meter`?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Within the limit (or no limit: `limit` is `None`).
    Allow {
        used: Decimal,
        limit: Option<Decimal>,
        remaining: Option<Decimal>,
        resets_at: Option<DateTime<Utc>>,
    },
    /// Allowed, but above the limit (`soft`), or within the grace (`grace`).
    Warn {
        used: Decimal,
        limit: Decimal,
        resets_at: Option<DateTime<Utc>>,
        enforcement: Enforcement,
    },
    /// Denied: above a `hard` limit or beyond the grace.
    Deny {
        used: Decimal,
        limit: Decimal,
        resets_at: Option<DateTime<Utc>>,
    },
}

/// Why a check has no decision. Each has a stable code for APIs.
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("customer {0:?} has no active or trialing subscription")]
    NoActiveSubscription(String),
    #[error("feature {feature:?} is not enabled for customer {customer:?}")]
    FeatureDisabled { customer: String, feature: String },
    #[error("unknown meter {0:?}; it is not in [[meters]]")]
    UnknownMeter(String),
    #[error("quota on unique_count meter {0:?} is not supported yet")]
    Unsupported(String),
    /// The quantity, or the usage plus the quantity, is beyond what a 28-digit decimal holds.
    #[error("quantity {quantity} on top of the customer's usage is beyond a 28-digit decimal; send a quantity within tally's domain (at most 10^15)")]
    OutOfRange { quantity: Decimal },
    #[error(transparent)]
    Store(#[from] QuotaStoreError),
}

impl QuotaError {
    /// A stable code for API errors.
    pub fn code(&self) -> &'static str {
        match self {
            QuotaError::NoActiveSubscription(_) => "NO_ACTIVE_SUBSCRIPTION",
            QuotaError::FeatureDisabled { .. } => "FEATURE_DISABLED",
            QuotaError::UnknownMeter(_) => "UNKNOWN_METER",
            QuotaError::Unsupported(_) => "UNSUPPORTED",
            QuotaError::OutOfRange { .. } => "INVALID_QUANTITY",
            QuotaError::Store(_) => "INTERNAL",
        }
    }
}

/// One customer's cached state.
struct Cached {
    loaded: Instant,
    /// A background reload is under way (only one per customer at a time).
    reloading: AtomicBool,
    /// `None`: no live subscription (cached too, so a flood of checks for such a customer does
    /// not reach Postgres).
    live: Option<Live>,
}

struct Live {
    subscription: Subscription,
    entitlements: Entitlements,
    /// Per limited meter: usage in its current period, when that period ends, and what this
    /// process has allowed since loading.
    meters: HashMap<String, MeterUsage>,
}

struct MeterUsage {
    committed: Decimal,
    resets_at: Option<DateTime<Utc>>,
    allowed_locally: Mutex<Decimal>,
}

/// How often the meter list may be reloaded because a check named an unknown meter.
const METERS_RELOAD: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Aggregations {
    by_meter: HashMap<String, Aggregation>,
    loaded: Option<Instant>,
}

/// Quota checks with a local cache. Cheap to share (`Arc`).
pub struct Quota {
    shared: Arc<Shared>,
    refresh: Duration,
    /// Ends the supervised refresher when the `Quota` is dropped.
    stop: CancellationToken,
}

/// What the background refresher shares with the checks.
struct Shared {
    pool: PgPool,
    /// Meter → aggregation, from the `meters` table (every command records tally.toml's
    /// meters there as it starts). Loaded on first use and again when a check names a meter
    /// it does not hold, at most every [`METERS_RELOAD`].
    aggregations: RwLock<Aggregations>,
    cache: RwLock<HashMap<String, Arc<Cached>>>,
    /// Customers whose cached state is stale, for the refresher's next batch.
    due: Mutex<Vec<String>>,
    /// Wakes the refresher (also on drop, to let it end).
    wake: Arc<tokio::sync::Notify>,
}

impl Quota {
    /// Starts the background refresher. Touches no database: meters, entitlements and usage
    /// are loaded on first use, so a server can start while Postgres is away.
    pub async fn new(pool: PgPool, refresh: Duration) -> Result<Quota, QuotaError> {
        let wake = Arc::new(tokio::sync::Notify::new());
        let shared = Arc::new(Shared {
            pool,
            aggregations: RwLock::default(),
            cache: RwLock::new(HashMap::new()),
            due: Mutex::new(Vec::new()),
            wake: wake.clone(),
        });
        let stop = CancellationToken::new();
        let weak = Arc::downgrade(&shared);
        tally_runtime::supervise("quota_refresher", stop.clone(), move || {
            let (weak, wake) = (weak.clone(), wake.clone());
            async move {
                // A refresher that died mid-batch left its customers marked as reloading.
                if let Some(shared) = weak.upgrade() {
                    shared.reset_reloading();
                }
                refresher(weak, wake).await;
                Ok(())
            }
        });
        Ok(Quota {
            shared,
            refresh,
            stop,
        })
    }

    /// The aggregation of `meter`, reloading the meter list when it is not known (yet).
    async fn aggregation(&self, meter: &str) -> Result<Aggregation, QuotaError> {
        let known = |aggregations: &Aggregations| aggregations.by_meter.get(meter).copied();
        let (found, loaded) = {
            let aggregations = self
                .shared
                .aggregations
                .read()
                .unwrap_or_else(|e| e.into_inner());
            (known(&aggregations), aggregations.loaded)
        };
        if let Some(aggregation) = found {
            return Ok(aggregation);
        }
        if loaded.is_some_and(|at| at.elapsed() < METERS_RELOAD) {
            return Err(QuotaError::UnknownMeter(meter.to_owned()));
        }
        let recorded = tally_db::meters::all(&self.shared.pool)
            .await
            .map_err(QuotaStoreError::from)?;
        let mut aggregations = self
            .shared
            .aggregations
            .write()
            .unwrap_or_else(|e| e.into_inner());
        aggregations.by_meter = recorded
            .into_iter()
            .map(|meter| (meter.name, meter.aggregation))
            .collect();
        aggregations.loaded = Some(Instant::now());
        known(&aggregations).ok_or_else(|| QuotaError::UnknownMeter(meter.to_owned()))
    }

    /// May `customer` use `quantity` more of `meter`? An allowed quantity counts against the
    /// customer's quota in this process until the next refresh.
    pub async fn check(
        &self,
        customer: &str,
        meter: &str,
        quantity: Decimal,
    ) -> Result<Decision, QuotaError> {
        self.aggregation(meter).await?;
        let cached = self.cached(customer).await?;
        let live = cached
            .live
            .as_ref()
            .ok_or_else(|| QuotaError::NoActiveSubscription(customer.to_owned()))?;
        let (Some(limit), Some(usage)) =
            (live.entitlements.limits.get(meter), live.meters.get(meter))
        else {
            return Ok(Decision::Allow {
                used: Decimal::ZERO,
                limit: None,
                remaining: None,
                resets_at: None,
            });
        };
        let out_of_range = || QuotaError::OutOfRange { quantity };
        let mut allowed = usage
            .allowed_locally
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let used = usage
            .committed
            .checked_add(*allowed)
            .ok_or_else(out_of_range)?;
        let decision = decide(limit, used, quantity, usage.resets_at).ok_or_else(out_of_range)?;
        if !matches!(decision, Decision::Deny { .. }) {
            *allowed = allowed.checked_add(quantity).ok_or_else(out_of_range)?;
        }
        Ok(decision)
    }

    /// `Ok` when `feature` is enabled for the customer's plan (with overrides).
    pub async fn require_feature(&self, customer: &str, feature: &str) -> Result<(), QuotaError> {
        let cached = self.cached(customer).await?;
        let live = cached
            .live
            .as_ref()
            .ok_or_else(|| QuotaError::NoActiveSubscription(customer.to_owned()))?;
        if live.entitlements.feature(feature) {
            Ok(())
        } else {
            Err(QuotaError::FeatureDisabled {
                customer: customer.to_owned(),
                feature: feature.to_owned(),
            })
        }
    }

    /// The customer's subscription and entitlements, as the checks see them.
    pub async fn entitlements(
        &self,
        customer: &str,
    ) -> Result<(Subscription, Entitlements), QuotaError> {
        let cached = self.cached(customer).await?;
        let live = cached
            .live
            .as_ref()
            .ok_or_else(|| QuotaError::NoActiveSubscription(customer.to_owned()))?;
        Ok((live.subscription.clone(), live.entitlements.clone()))
    }

    /// Drops a customer's cached state (after a subscription or override change).
    pub fn invalidate(&self, customer: &str) {
        self.shared
            .cache
            .write()
            .expect("quota cache poisoned")
            .remove(customer);
    }

    /// The customer's cached state. A stale entry is still answered from while one background
    /// task reloads it, so a check waits for Postgres only on a customer's first use or when a
    /// period has ended (the usage must then be reloaded before answering).
    async fn cached(&self, customer: &str) -> Result<Arc<Cached>, QuotaError> {
        let current = self
            .shared
            .cache
            .read()
            .expect("quota cache poisoned")
            .get(customer)
            .cloned();
        if let Some(cached) = current {
            let period_ended = cached
                .live
                .as_ref()
                .is_some_and(|live| live.period_ended(Utc::now()));
            if !period_ended {
                let stale = cached.loaded.elapsed() >= self.refresh;
                if stale && !cached.reloading.swap(true, Ordering::AcqRel) {
                    self.shared
                        .due
                        .lock()
                        .expect("quota due list poisoned")
                        .push(customer.to_owned());
                    self.shared.wake.notify_one();
                }
                return Ok(cached);
            }
        }
        let (_, loaded) = self
            .shared
            .load(vec![customer.to_owned()])
            .await?
            .pop()
            .expect("one result per customer");
        let loaded = Arc::new(loaded?);
        self.shared.store(customer, loaded.clone());
        Ok(loaded)
    }
}

impl Drop for Quota {
    fn drop(&mut self) {
        // The refresher holds only a weak reference: woken now, it finds the cache gone.
        self.stop.cancel();
        self.shared.wake.notify_one();
    }
}

/// Reloads stale customers in batches: whatever became due while the last batch loaded is
/// loaded together, in two queries, so the cost of keeping N active customers fresh grows with
/// the batches per second, not with N.
async fn refresher(shared: std::sync::Weak<Shared>, wake: Arc<tokio::sync::Notify>) {
    loop {
        wake.notified().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let due = std::mem::take(&mut *shared.due.lock().expect("quota due list poisoned"));
        if due.is_empty() {
            continue;
        }
        let loaded = match shared.load(due.clone()).await {
            // One customer's data failed the batch (a usage sum beyond a decimal): load each
            // on its own, so the others stay fresh.
            Err(QuotaError::Store(QuotaStoreError::Postgres(error)))
                if due.len() > 1 && tally_db::is_data_error(&error) =>
            {
                let mut one_by_one = Vec::with_capacity(due.len());
                for customer in &due {
                    match shared.load(vec![customer.clone()]).await {
                        Ok(mut loaded) => one_by_one.append(&mut loaded),
                        Err(error) => one_by_one.push((customer.clone(), Err(error))),
                    }
                }
                Ok(one_by_one)
            }
            other => other,
        };
        match loaded {
            Ok(loaded) => {
                for (customer, result) in loaded {
                    match result {
                        Ok(fresh) => shared.store(&customer, Arc::new(fresh)),
                        Err(error) => {
                            tracing::warn!(customer, %error, "quota cache reload failed; answering from the cached state");
                            shared.reloading_done(&customer);
                        }
                    }
                }
            }
            Err(error) => {
                tracing::warn!(customers = due.len(), %error, "quota cache reload failed; answering from the cached state");
                for customer in &due {
                    shared.reloading_done(customer);
                }
            }
        }
    }
}

impl Shared {
    /// Clears every "reload under way" mark, so stale customers are queued again.
    fn reset_reloading(&self) {
        for cached in self
            .cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            cached.reloading.store(false, Ordering::Release);
        }
    }

    fn store(&self, customer: &str, cached: Arc<Cached>) {
        self.cache
            .write()
            .expect("quota cache poisoned")
            .insert(customer.to_owned(), cached);
    }

    /// A failed reload: the next stale check queues the customer again.
    fn reloading_done(&self, customer: &str) {
        if let Some(cached) = self
            .cache
            .read()
            .expect("quota cache poisoned")
            .get(customer)
        {
            cached.reloading.store(false, Ordering::Release);
        }
    }

    /// Loads customers' subscriptions, entitlements and period usage, in two queries whatever
    /// their number. A customer whose plan cannot be checked gets its own error.
    async fn load(
        &self,
        customers: Vec<String>,
    ) -> Result<Vec<(String, Result<Cached, QuotaError>)>, QuotaError> {
        let loaded = Instant::now();
        let now = Utc::now();
        let mut live = store::live_entitlements(&self.pool, &customers).await?;
        // One usage request per (customer, limited meter): the period's first day and merge.
        let mut requests = UsageRequests::default();
        let mut results = Vec::with_capacity(customers.len());
        for customer in customers {
            let Some((subscription, entitlements)) = live.remove(&customer) else {
                let cached = Cached {
                    loaded,
                    reloading: AtomicBool::new(false),
                    live: None,
                };
                results.push((customer, Ok(cached), Vec::new()));
                continue;
            };
            let mut wanted = Vec::new();
            let mut unsupported = None;
            for (meter, limit) in &entitlements.limits {
                let aggregation = self
                    .aggregations
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .by_meter
                    .get(meter)
                    .copied()
                    // A meter the catalog does not know (yet) has no windows: every merge of
                    // no rows is zero usage.
                    .unwrap_or(Aggregation::Sum);
                if aggregation == Aggregation::UniqueCount {
                    unsupported = Some(meter.clone());
                    break;
                }
                let (start, resets_at) = period_bounds(limit.period, &subscription, now);
                let index = requests.push(&customer, meter, start, aggregation);
                wanted.push((meter.clone(), resets_at, index));
            }
            let cached = match unsupported {
                Some(meter) => Err(QuotaError::Unsupported(meter)),
                None => Ok(Cached {
                    loaded,
                    reloading: AtomicBool::new(false),
                    live: Some(Live {
                        subscription,
                        entitlements,
                        meters: HashMap::new(),
                    }),
                }),
            };
            results.push((customer, cached, wanted));
        }
        let usage = requests.fetch(&self.pool).await?;
        Ok(results
            .into_iter()
            .map(|(customer, cached, wanted)| {
                let cached = cached.map(|mut cached| {
                    if let Some(live) = cached.live.as_mut() {
                        for (meter, resets_at, index) in wanted {
                            let usage = MeterUsage {
                                committed: usage.get(&index).copied().unwrap_or_default(),
                                resets_at: Some(resets_at),
                                allowed_locally: Mutex::new(Decimal::ZERO),
                            };
                            live.meters.insert(meter, usage);
                        }
                    }
                    cached
                });
                (customer, cached)
            })
            .collect())
    }
}

impl Live {
    fn period_ended(&self, now: DateTime<Utc>) -> bool {
        self.meters
            .values()
            .any(|m| m.resets_at.is_some_and(|at| now >= at))
    }
}

/// The decision for `quantity` more on top of `used`; `None` when `used + quantity` is beyond
/// a decimal's range.
pub fn decide(
    limit: &LimitDefinition,
    used: Decimal,
    quantity: Decimal,
    resets_at: Option<DateTime<Utc>>,
) -> Option<Decision> {
    if limit.is_unlimited() {
        return Some(Decision::Allow {
            used,
            limit: None,
            remaining: None,
            resets_at,
        });
    }
    let projected = used.checked_add(quantity)?;
    if projected <= limit.limit {
        return Some(Decision::Allow {
            used,
            limit: Some(limit.limit),
            remaining: Some(limit.limit.checked_sub(projected)?),
            resets_at,
        });
    }
    Some(match limit.deny_above() {
        Some(ceiling) if projected > ceiling => Decision::Deny {
            used,
            limit: limit.limit,
            resets_at,
        },
        _ => Decision::Warn {
            used,
            limit: limit.limit,
            resets_at,
            enforcement: limit.enforcement,
        },
    })
}

/// The first UTC day counted and when the period resets.
fn period_bounds(
    period: Period,
    subscription: &Subscription,
    now: DateTime<Utc>,
) -> (NaiveDate, DateTime<Utc>) {
    let today = now.date_naive();
    match period {
        Period::Day => (
            today,
            (today + TimeDelta::days(1))
                .and_hms_opt(0, 0, 0)
                .expect("midnight")
                .and_utc(),
        ),
        Period::Month => {
            let first = today.with_day(1).expect("day 1 exists");
            let next = first
                .checked_add_months(chrono::Months::new(1))
                .expect("a next month");
            (
                first,
                next.and_hms_opt(0, 0, 0).expect("midnight").and_utc(),
            )
        }
        Period::BillingPeriod => (
            subscription.current_period_start.date_naive(),
            subscription.current_period_end,
        ),
    }
}

/// Period usage wanted for a batch of customers: each is a customer's `meter` since `start`
/// (whole UTC days), merged by the meter's aggregation.
#[derive(Default)]
struct UsageRequests {
    customers: Vec<String>,
    meters: Vec<String>,
    starts: Vec<NaiveDate>,
    aggregations: Vec<String>,
}

impl UsageRequests {
    fn push(
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

    /// Usage by request index, in one query (`usage_daily`, never minute windows).
    async fn fetch(&self, pool: &PgPool) -> Result<HashMap<i32, Decimal>, QuotaError> {
        if self.customers.is_empty() {
            return Ok(HashMap::new());
        }
        let rows: Vec<(i32, Option<ExactDecimal>)> = sqlx::query_as(
            "SELECT (u.i - 1)::int4, CASE u.a
                WHEN 'max' THEN (SELECT max(d.value) FROM usage_daily d
                    WHERE d.customer_id = u.c AND d.meter = u.m AND d.day >= u.s)
                WHEN 'latest' THEN (SELECT d.value FROM usage_daily d
                    WHERE d.customer_id = u.c AND d.meter = u.m AND d.day >= u.s
                    ORDER BY d.latest_at DESC NULLS LAST, d.latest_id DESC LIMIT 1)
                ELSE (SELECT sum(d.value) FROM usage_daily d
                    WHERE d.customer_id = u.c AND d.meter = u.m AND d.day >= u.s)
                END
             FROM unnest($1::text[], $2::text[], $3::date[], $4::text[])
                  WITH ORDINALITY AS u(c, m, s, a, i)",
        )
        .bind(&self.customers)
        .bind(&self.meters)
        .bind(&self.starts)
        .bind(&self.aggregations)
        .fetch_all(pool)
        .await
        .map_err(QuotaStoreError::from)?;
        Ok(rows
            .into_iter()
            .map(|(index, value)| (index, value.unwrap_or_default().0))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(value: i64, enforcement: Enforcement, grace: i64) -> LimitDefinition {
        LimitDefinition {
            limit: Decimal::from(value),
            period: Period::Day,
            enforcement,
            grace_percent: Decimal::from(grace),
            unit_price: None,
        }
    }

    fn kind(decision: &Decision) -> &'static str {
        match decision {
            Decision::Allow { .. } => "allow",
            Decision::Warn { .. } => "warn",
            Decision::Deny { .. } => "deny",
        }
    }

    #[test]
    fn every_mode_below_at_and_above_its_limit() {
        let n = Decimal::from;
        let cases = [
            (
                limit(100, Enforcement::Hard, 0),
                [("allow", 98), ("allow", 99), ("deny", 100)],
            ),
            (
                limit(100, Enforcement::Soft, 0),
                [("allow", 98), ("allow", 99), ("warn", 100)],
            ),
            (
                limit(100, Enforcement::Grace, 10),
                [("allow", 99), ("warn", 105), ("deny", 110)],
            ),
        ];
        for (limit, checks) in cases {
            for (expected, used) in checks {
                let decision = decide(&limit, n(used), n(1), None).unwrap();
                assert_eq!(
                    kind(&decision),
                    expected,
                    "{:?} used {used}",
                    limit.enforcement
                );
            }
        }
        let at_limit = decide(&limit(100, Enforcement::Hard, 0), n(99), n(1), None).unwrap();
        assert_eq!(
            at_limit,
            Decision::Allow {
                used: n(99),
                limit: Some(n(100)),
                remaining: Some(n(0)),
                resets_at: None
            }
        );
        let grace_edge = decide(&limit(100, Enforcement::Grace, 10), n(109), n(1), None).unwrap();
        assert_eq!(
            kind(&grace_edge),
            "warn",
            "exactly limit × 1.1 is still within the grace"
        );
        assert_eq!(
            kind(&decide(&limit(-1, Enforcement::Hard, 0), n(1_000_000), n(1), None).unwrap()),
            "allow"
        );
    }

    #[test]
    fn usage_beyond_a_decimal_is_no_decision_not_a_panic() {
        let hard = limit(100, Enforcement::Hard, 0);
        assert_eq!(decide(&hard, Decimal::MAX, Decimal::ONE, None), None);
        let huge_grace = LimitDefinition {
            limit: Decimal::MAX,
            grace_percent: Decimal::from(50),
            ..limit(0, Enforcement::Grace, 0)
        };
        assert_eq!(huge_grace.deny_above(), None);
    }
}
