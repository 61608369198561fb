//! The background refresher: one supervised task that reloads stale customers in batches and
//! puts the fresh state in the cache, while checks go on answering from the stale one.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::cache::CacheState;
use super::load::LoadedCustomer;
use super::QuotaError;
use crate::store::QuotaStoreError;

/// Starts the refresher under `tally_runtime::supervise` (restarted if it dies, ended by
/// `stop`). It holds the cache only weakly, so it ends once the `Quota` is dropped.
pub(super) fn start(cache: &Arc<CacheState>, stop: CancellationToken) {
    let weak = Arc::downgrade(cache);
    let wake = cache.wake.clone();
    tally_runtime::supervise("quota_refresher", stop, move || {
        let (weak, wake) = (weak.clone(), wake.clone());
        async move {
            // A refresher that died mid-batch left its customers marked as reloading.
            if let Some(cache) = weak.upgrade() {
                cache.reset_reloading();
            }
            run(weak, wake).await;
            Ok(())
        }
    });
}

/// Most customers one batch loads: bounds the size of a query and of its answer when many
/// customers are due at once (after a period ended, every customer active then is).
const MAX_BATCH: usize = 5000;

/// Reloads stale customers in batches: whatever became due while the last batch loaded is
/// loaded together, in two queries, so the cost of keeping N active customers fresh grows with
/// the batches per second, not with N.
async fn run(cache: Weak<CacheState>, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        let Some(cache) = cache.upgrade() else {
            return;
        };
        let due = cache.take_due(MAX_BATCH);
        if cache.more_due() {
            wake.notify_one(); // the rest in the next batch, right after this one
        }
        if due.is_empty() {
            continue;
        }
        cache
            .counters
            .background_loads
            .fetch_add(1, Ordering::Relaxed);
        let loaded = match cache.load(due.clone()).await {
            // One customer's data failed the batch (a usage sum beyond a decimal): load each
            // on its own, so the others stay fresh.
            Err(QuotaError::Store(QuotaStoreError::Postgres(error)))
                if due.len() > 1 && tally_db::is_data_error(&error) =>
            {
                let mut one_by_one = Vec::with_capacity(due.len());
                for customer in &due {
                    match cache.load(vec![customer.clone()]).await {
                        Ok(mut loaded) => one_by_one.append(&mut loaded),
                        Err(error) => one_by_one.push(LoadedCustomer {
                            customer: customer.clone(),
                            cached: Err(error),
                        }),
                    }
                }
                Ok(one_by_one)
            }
            other => other,
        };
        match loaded {
            Ok(loaded) => {
                for LoadedCustomer { customer, cached } in loaded {
                    match cached {
                        Ok(fresh) => cache.insert(&customer, Arc::new(fresh)),
                        Err(error) => {
                            tracing::warn!(customer, %error, "quota cache reload failed; answering from the cached state");
                            cache.reload_failed(&customer);
                        }
                    }
                }
            }
            Err(error) => {
                tracing::warn!(customers = due.len(), %error, "quota cache reload failed; answering from the cached state");
                for customer in &due {
                    cache.reload_failed(customer);
                }
            }
        }
        crate::telemetry::cached_customers(cache.customers.len());
    }
}
