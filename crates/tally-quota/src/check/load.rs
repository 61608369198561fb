//! Loading customers' cached state from Postgres for a batch of customers, in two queries
//! whatever their number: live subscriptions with entitlements (`store.rs`), then the period
//! usage of every limited meter (`usage.rs`). Used by the loads a check waits for
//! (`single_flight.rs`, one customer) and by the refresher (a batch).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::{DateTime, Utc};
use tally_core::Aggregation;

use super::cache::{CacheState, Cached, CreditCounts, CustomerState, Live, MeterUsage};
use super::usage::{period_bounds, UsageRequests};
use super::QuotaError;
use crate::plan::Entitlements;
use crate::store::{self, QuotaStoreError, Subscription};
use rust_decimal::Decimal;

/// One customer of a batch: its freshly loaded state, or why it could not be loaded.
pub(super) struct LoadedCustomer {
    pub(super) customer: String,
    pub(super) cached: Result<Cached, QuotaError>,
}

/// One customer of a batch, loaded but for the usage of its limited meters.
struct AwaitingUsage {
    customer: String,
    found: Result<Found, QuotaError>,
    wanted: Vec<WantedUsage>,
}

/// What the subscription query found for a customer.
enum Found {
    NoSubscription,
    Live(Subscription, Arc<Entitlements>),
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
    /// their number. A customer whose plan cannot be checked, whose override does not fit its
    /// plan or whose usage cannot be read gets its own error; the others load.
    pub(super) async fn load(
        &self,
        customers: Vec<String>,
    ) -> Result<Vec<LoadedCustomer>, QuotaError> {
        let loaded = Instant::now();
        let tick = self.tick(loaded);
        let now = Utc::now();
        let mut live = store::live_customers(&self.pool, &customers).await?;
        // One usage request per (customer, limited meter): the period's first day and merge.
        let mut requests = UsageRequests::default();
        let mut results = Vec::with_capacity(customers.len());
        for customer in customers {
            let (subscription, entitlements, overridden) = match live.remove(&customer) {
                Some(Ok(store::LiveCustomer {
                    subscription,
                    entitlements,
                    overridden,
                })) => (subscription, entitlements, overridden),
                // This customer alone: the others of the batch load as usual.
                Some(Err(error)) => {
                    results.push(AwaitingUsage {
                        customer,
                        found: Err(error.into()),
                        wanted: Vec::new(),
                    });
                    continue;
                }
                None => {
                    results.push(AwaitingUsage {
                        customer,
                        found: Ok(Found::NoSubscription),
                        wanted: Vec::new(),
                    });
                    continue;
                }
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
            let found = match unsupported {
                Some(meter) => Err(QuotaError::Unsupported(meter)),
                None => Ok(Found::Live(
                    subscription,
                    self.share(entitlements, overridden),
                )),
            };
            results.push(AwaitingUsage {
                customer,
                found,
                wanted,
            });
        }
        // A customer whose usage Postgres cannot give (a sum beyond a decimal) gets its own
        // error; the others load as usual.
        let (usage, unreadable) = requests.fetch_isolating(&self.pool).await?;
        let mut unreadable: std::collections::HashMap<String, QuotaError> =
            unreadable.into_iter().collect();
        for awaiting in &mut results {
            if let Some(error) = unreadable.remove(&awaiting.customer) {
                awaiting.found = Err(error);
            }
        }
        // Credit balances, in one more query pair, for the customers with a `credits` meter.
        let credit_customers: Vec<&str> = results
            .iter()
            .filter(|r| matches!(&r.found, Ok(Found::Live(_, e)) if Live::uses_credits(e)))
            .map(|r| r.customer.as_str())
            .collect();
        let (mut balances, unreadable) = if credit_customers.is_empty() {
            Default::default()
        } else {
            let rates = self.rate_card().await?;
            tally_credits::projected_balances_isolating(&self.pool, &credit_customers, &rates, now)
                .await
                .map_err(QuotaStoreError::from)?
        };
        for (customer, error) in unreadable {
            if let Some(awaiting) = results.iter_mut().find(|r| r.customer == customer) {
                awaiting.found = Err(QuotaStoreError::from(error).into());
            }
        }
        Ok(results
            .into_iter()
            .map(|awaiting| {
                let state = awaiting.found.map(|found| match found {
                    Found::NoSubscription => CustomerState::NoSubscription,
                    Found::Live(subscription, entitlements) => {
                        let meters = awaiting
                            .wanted
                            .into_iter()
                            .map(|wanted| {
                                let committed =
                                    usage.get(&wanted.request).copied().unwrap_or_default();
                                MeterUsage::new(wanted.meter, committed, wanted.resets_at)
                            })
                            .collect();
                        let uses_credits = Live::uses_credits(&entitlements);
                        let mut live = Live::new(subscription, entitlements, meters, now);
                        if uses_credits {
                            let projected = balances.remove(&awaiting.customer).unwrap_or_default();
                            live.credits = Some(Mutex::new(CreditCounts {
                                projected,
                                spent_locally: Decimal::ZERO,
                            }));
                        }
                        CustomerState::Live(live)
                    }
                });
                LoadedCustomer {
                    customer: awaiting.customer,
                    cached: state.map(|state| Cached::new(state, loaded, tick)),
                }
            })
            .collect())
    }
}
