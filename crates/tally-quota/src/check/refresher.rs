//! The background refresher: one supervised task that reloads stale customers in batches and
//! puts the fresh state in the cache, while checks go on answering from the stale one.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::cache::CacheState;
use super::load::LoadedCustomer;

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

/// How long the refresher waits after a batch failed (Postgres away) before the next.
const RETRY_AFTER_FAILURE: std::time::Duration = std::time::Duration::from_millis(500);

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
        crate::telemetry::load("background");
        // One customer's bad data (an override that no longer fits, a usage sum beyond a
        // decimal) is that customer's error alone: `load` isolates it.
        let mut failed = false;
        match cache.load(due.clone()).await {
            Ok(loaded) => {
                for LoadedCustomer { customer, cached } in loaded {
                    match cached {
                        // Only if still cached: one evicted meanwhile may have missed a change.
                        Ok(fresh) => {
                            cache.customers.replace(&customer, Arc::new(fresh));
                        }
                        // This customer's own data (its override no longer fits its plan, its
                        // usage is beyond a decimal): what was cached is no longer true, and
                        // its checks get the error until the data is fixed.
                        Err(error) => {
                            tracing::warn!(customer, %error, "a customer's quota state cannot be loaded; its checks answer with the error");
                            crate::telemetry::customer_failure();
                            cache.insert_failure(&customer, error);
                        }
                    }
                }
            }
            Err(error) => {
                tracing::warn!(customers = due.len(), %error, "quota cache reload failed; answering from the cached state");
                for customer in &due {
                    cache.reload_failed(customer);
                }
                // Their change marks were taken with the batch: without them the feed would
                // go on trusting what was cached before the change.
                cache.feed.changed_again(&due);
                cache.wake.notify_one();
                failed = true;
            }
        }
        crate::telemetry::cached_customers(cache.customers.len());
        drop(cache);
        if failed {
            tokio::time::sleep(RETRY_AFTER_FAILURE).await;
        }
    }
}
