//! Loading customers' cached state from Postgres for a batch of customers, in two queries
//! whatever their number: live subscriptions with entitlements (`store.rs`), then the period
//! usage of every limited meter (`usage.rs`). Used by the loads a check waits for
//! (one customer, shared by every check waiting for it, see `single_flight.rs`) and by the refresher (a batch).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::{DateTime, Utc};
use tally_core::Aggregation;

use super::cache::CacheState;
use super::entry::{Cached, CreditCounts, CustomerState, Live, MeterUsage};
use super::single_flight::Flight;
use super::usage::{period_bounds, UsageRequests};
use super::QuotaError;
use rust_decimal::Decimal;
use tally_billing::plan::Entitlements;
use tally_billing::store::{self, BillingStoreError, Subscription};

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
                .map_err(BillingStoreError::from)?
        };
        // A grant that starts or expires changes a balance with no write to notify of it.
        let balance_changes = if credit_customers.is_empty() {
            Default::default()
        } else {
            tally_credits::next_balance_changes(&self.pool, &credit_customers, now)
                .await
                .map_err(BillingStoreError::from)?
        };
        for (customer, error) in unreadable {
            if let Some(awaiting) = results.iter_mut().find(|r| r.customer == customer) {
                awaiting.found = Err(BillingStoreError::from(error).into());
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
                            if let Some(&at) = balance_changes.get(&awaiting.customer) {
                                live.reload_at = Some(live.reload_at.map_or(at, |r| r.min(at)));
                            }
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

impl CacheState {
    /// Loads the customer (or joins the load under way), caches the outcome, failed or not,
    /// and returns it. `seen` is the entry the check found unusable (`None`: none): an entry
    /// cached since then is answered from without loading again.
    pub(super) async fn load_for_check(
        &self,
        customer: &str,
        seen: Option<&Arc<Cached>>,
    ) -> Arc<Cached> {
        let flight = {
            let mut flights = self.single_flight.flights();
            // A load that landed between the check's look-up and here: use it. (A load
            // caches its outcome before it leaves `flights`, so one of the two is found.)
            if let Some(current) = self.get(customer) {
                if !seen.is_some_and(|seen| Arc::ptr_eq(seen, &current)) {
                    return current;
                }
            }
            flights.entry(customer.to_owned()).or_default().clone()
        };
        flight
            .get_or_init(|| self.load_one(customer, &flight))
            .await
            .clone()
    }

    /// The load itself, run by one of the checks waiting. Should that check go away (its
    /// request cancelled), another waiting check runs it again.
    async fn load_one(&self, customer: &str, flight: &Flight) -> Arc<Cached> {
        let _leave = Leave {
            cache: self,
            customer,
            flight,
        };
        let _permit = self
            .single_flight
            .permits
            .acquire()
            .await
            .expect("the load semaphore is never closed");
        let running = self.options.max_concurrent_loads.max(1)
            - self.single_flight.permits.available_permits();
        let counters = &self.counters;
        counters.waited_loads.fetch_add(1, Ordering::Relaxed);
        crate::telemetry::load("waited");
        counters
            .peak_running_loads
            .fetch_max(running as u64, Ordering::Relaxed);
        // A change notified while this load runs names a customer not cached yet, so the feed
        // passes it by: had any arrived, the customer is reloaded once more right after.
        let notifications = self.feed.notifications();
        let loaded = match self.load(vec![customer.to_owned()]).await {
            Ok(mut batch) => batch.pop().expect("one result per customer").cached,
            Err(error) => Err(error),
        };
        let cached = Arc::new(loaded.unwrap_or_else(|error| {
            // Debug only: during an outage this is one line per customer per TTL, and the
            // API logs every answer's error under its request id already.
            tracing::debug!(customer, %error, "quota load failed; cached for failed_load_ttl");
            // The TTL runs from the failure, not from the start of a load that may have
            // waited long for a connection.
            let failed = Instant::now();
            Cached::new(CustomerState::LoadFailed(error), failed, self.tick(failed))
        }));
        self.insert(customer, cached.clone());
        if self.feed.notifications() != notifications {
            self.feed.mark_changed(customer);
            self.wake.notify_one();
        }
        cached
    }
}

/// Takes the load out of `flights` when it ends, landed or cancelled: after a landed load
/// has been cached, so a check finds one or the other.
struct Leave<'a> {
    cache: &'a CacheState,
    customer: &'a str,
    flight: &'a Flight,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        let mut flights = self.cache.single_flight.flights();
        if flights
            .get(self.customer)
            .is_some_and(|flight| Arc::ptr_eq(flight, self.flight))
        {
            flights.remove(self.customer);
        }
    }
}
