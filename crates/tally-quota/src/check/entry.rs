//! One customer's entry in the cache ([`Cached`]): its live subscription and entitlements, the
//! usage of each limited meter in its period with what this process allowed since, and its
//! credits; or why it has none (no subscription, a failed load, an invalidation).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use tally_billing::plan::{Enforcement, Entitlements, Period};
use tally_billing::store::{BillingStoreError, Subscription};

use super::usage::period_bounds;
use super::QuotaError;

/// One customer's cached state.
pub(super) struct Cached {
    pub(super) loaded: Instant,
    /// A background reload is under way (only one per customer at a time).
    pub(super) reloading: AtomicBool,
    /// When a check last used this entry, in whole seconds of the cache's clock
    /// (`CacheState::tick`): eviction drops the least recently used. Coarse on purpose: a
    /// hot customer's entry is written at most once a second, not by every check.
    pub(super) last_used: AtomicU32,
    pub(super) state: CustomerState,
}

/// What a load found for a customer.
pub(super) enum CustomerState {
    Live(Live),
    /// No active or trialing subscription. Cached too, so a flood of checks for such a customer
    /// does not reach Postgres; evicted first when the cache is full.
    NoSubscription,
    /// The load failed. Checks get this error again, without asking Postgres, until
    /// `failed_load_ttl` has passed; evicted first when the cache is full.
    LoadFailed(QuotaError),
    /// Invalidated (its subscription or override changed) at `loaded`: the next check loads
    /// it, and no load that started before replaces this mark.
    Invalidated,
}

impl Cached {
    pub(super) fn new(state: CustomerState, loaded: Instant, tick: u32) -> Cached {
        Cached {
            loaded,
            reloading: AtomicBool::new(false),
            last_used: AtomicU32::new(tick),
            state,
        }
    }

    /// The customer's live subscription, or the error a check answers instead.
    pub(super) fn live(&self, customer: &str) -> Result<&Live, QuotaError> {
        match &self.state {
            CustomerState::Live(live) => Ok(live),
            CustomerState::NoSubscription => {
                Err(QuotaError::NoActiveSubscription(customer.to_owned()))
            }
            CustomerState::LoadFailed(error) => Err(error.again()),
            // `Quota::cached` loads an invalidated customer before answering; a check that
            // gets here raced another invalidation: it answers as Postgres would be away.
            CustomerState::Invalidated => {
                Err(QuotaError::Store(BillingStoreError::RecentlyFailed(
                    "the customer's state changed while it was loaded; check again".into(),
                )))
            }
        }
    }

    /// Eviction order, lowest first: entries without a live subscription (no subscription, a
    /// failed load: one query to get back, and all a flood of made-up ids ever creates), then
    /// live ones, least recently used first.
    pub(super) fn eviction_rank(&self) -> u64 {
        let live = matches!(self.state, CustomerState::Live(_));
        (u64::from(live) << 32) | u64::from(self.last_used.load(Ordering::Relaxed))
    }
}

pub(super) struct Live {
    pub(super) subscription: Subscription,
    /// Shared by the customers of a plan who have no override (`CacheState::share`).
    pub(super) entitlements: Arc<Entitlements>,
    /// One per limited meter: usage in its current period, and what this process allowed.
    pub(super) meters: Box<[MeterUsage]>,
    /// For a customer with a meter under `credits` enforcement: the projected credit balance
    /// when loaded, and what this process's checks allowed since.
    pub(super) credits: Option<Mutex<CreditCounts>>,
    /// When the billing period ends, if a limit counts usage by it and it had not ended when
    /// loaded, or when a credit grant of the customer's next starts or expires, whichever is
    /// first. From then on a check reloads the customer before answering: whether the
    /// subscription renewed, and until when, is only known to Postgres (Stripe's webhook), and
    /// a balance that changes by the clock has no write that notifies.
    pub(super) reload_at: Option<DateTime<Utc>>,
}

impl Live {
    pub(super) fn new(
        subscription: Subscription,
        entitlements: Arc<Entitlements>,
        meters: Box<[MeterUsage]>,
        now: DateTime<Utc>,
    ) -> Live {
        let by_billing_period = entitlements
            .limits
            .values()
            .any(|limit| limit.period == Period::BillingPeriod);
        let reload_at =
            Some(subscription.current_period_end).filter(|end| by_billing_period && *end > now);
        Live {
            subscription,
            entitlements,
            meters,
            credits: None,
            reload_at,
        }
    }

    /// Whether a meter of the customer's is under `credits` enforcement.
    pub(super) fn uses_credits(entitlements: &Entitlements) -> bool {
        entitlements
            .limits
            .values()
            .any(|limit| limit.enforcement == Enforcement::Credits)
    }

    pub(super) fn credits(&self) -> Option<MutexGuard<'_, CreditCounts>> {
        self.credits
            .as_ref()
            .map(|c| c.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The usage of a limited meter (a plan limits a few meters: a scan beats a hash).
    pub(super) fn meter(&self, meter: &str) -> Option<&MeterUsage> {
        self.meters.iter().find(|usage| usage.meter == meter)
    }
}

pub(super) struct MeterUsage {
    pub(super) meter: String,
    pub(super) counts: Mutex<Counts>,
}

impl MeterUsage {
    pub(super) fn new(meter: String, committed: Decimal, resets_at: DateTime<Utc>) -> MeterUsage {
        MeterUsage {
            meter,
            counts: Mutex::new(Counts {
                committed,
                allowed_locally: Decimal::ZERO,
                resets_at,
            }),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A customer's credits, as a check sees them.
pub(super) struct CreditCounts {
    /// Open grants in effect less committed usage not yet burned, when loaded.
    pub(super) projected: Decimal,
    /// Credits this process's checks allowed since (peeks add nothing).
    pub(super) spent_locally: Decimal,
}

/// A limited meter's usage in its current period, as a check sees it.
pub(super) struct Counts {
    /// Usage Postgres had when loaded (zero after a rollover, see [`Counts::roll_over`]).
    pub(super) committed: Decimal,
    /// What this process's checks allowed since (peeks add nothing).
    pub(super) allowed_locally: Decimal,
    pub(super) resets_at: DateTime<Utc>,
}

impl Counts {
    /// Starts the next period in place once the current one has ended, for a day or month
    /// limit; returns whether it did. The checks then answer from usage zero in the new period
    /// while one background reload fetches the real figure, instead of every customer whose
    /// period ended loading synchronously at once (a storm at midnight and on the 1st, when
    /// every day and month period ends together).
    ///
    /// Exact, and as safe for a hard limit as any answer from the cache: a day or month
    /// period starts at a UTC midnight, and `usage_daily` counts whole UTC days, so at
    /// `resets_at` the new period's usage is exactly zero. From then on, what this process
    /// allows is counted locally, as always; what other processes allowed since `resets_at`
    /// is missing until the reload lands, just as a stale entry misses what they allowed since
    /// it was loaded, which is earlier. A billing period is not rolled over here: when it ends
    /// the subscription may not have renewed (`Quota::cached` reloads it first).
    pub(super) fn roll_over(
        &mut self,
        period: Period,
        subscription: &Subscription,
        now: DateTime<Utc>,
    ) -> bool {
        if now < self.resets_at || period == Period::BillingPeriod {
            return false;
        }
        self.committed = Decimal::ZERO;
        self.allowed_locally = Decimal::ZERO;
        self.resets_at = period_bounds(period, subscription, now).resets_at;
        true
    }
}
