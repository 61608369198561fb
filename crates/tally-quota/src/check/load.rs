//! Loading customers' cached state from Postgres for a batch of customers, in two queries
//! whatever their number: live subscriptions with entitlements (`store.rs`), then the period
//! usage of every limited meter (`usage.rs`). Used on a customer's first check and by the
//! refresher.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::Instant;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use tally_core::Aggregation;

use super::cache::{CacheState, Cached, Live, MeterUsage};
use super::usage::{period_bounds, UsageRequests};
use super::QuotaError;
use crate::store;

/// One customer of a batch: its freshly loaded state, or why it could not be loaded.
pub(super) struct LoadedCustomer {
    pub(super) customer: String,
    pub(super) cached: Result<Cached, QuotaError>,
}

/// One customer of a batch, loaded but for the usage of its limited meters.
struct AwaitingUsage {
    customer: String,
    cached: Result<Cached, QuotaError>,
    wanted: Vec<WantedUsage>,
}

/// One limited meter's usage in its current period, to be found in the batch's usage answer.
struct WantedUsage {
    meter: String,
    resets_at: DateTime<Utc>,
    /// The index of its request in the batch's [`UsageRequests`].
    request: i32,
}

impl CacheState {
    /// Loads customers' subscriptions, entitlements and period usage, in two queries whatever
    /// their number. A customer whose plan cannot be checked gets its own error.
    pub(super) async fn load(
        &self,
        customers: Vec<String>,
    ) -> Result<Vec<LoadedCustomer>, QuotaError> {
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
                results.push(AwaitingUsage {
                    customer,
                    cached: Ok(cached),
                    wanted: Vec::new(),
                });
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
                let period = period_bounds(limit.period, &subscription, now);
                let request = requests.push(&customer, meter, period.first_day, aggregation);
                wanted.push(WantedUsage {
                    meter: meter.clone(),
                    resets_at: period.resets_at,
                    request,
                });
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
            results.push(AwaitingUsage {
                customer,
                cached,
                wanted,
            });
        }
        let usage = requests.fetch(&self.pool).await?;
        Ok(results
            .into_iter()
            .map(|awaiting| {
                let cached = awaiting.cached.map(|mut cached| {
                    if let Some(live) = cached.live.as_mut() {
                        for wanted in awaiting.wanted {
                            let usage = MeterUsage {
                                committed: usage.get(&wanted.request).copied().unwrap_or_default(),
                                resets_at: Some(wanted.resets_at),
                                allowed_locally: Mutex::new(Decimal::ZERO),
                            };
                            live.meters.insert(wanted.meter, usage);
                        }
                    }
                    cached
                });
                LoadedCustomer {
                    customer: awaiting.customer,
                    cached,
                }
            })
            .collect())
    }
}
