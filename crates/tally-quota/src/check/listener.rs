//! The change feed's listener: one supervised task on Postgres's `tally_changes` channel that
//! records what it hears in the cache's `Feed` and wakes the refresher (see `feed.rs` for what
//! the feed promises), and its heartbeat.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Instant;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::cache::CacheState;
use super::feed::{parse, Notice, CHANNEL, HEARTBEAT, SILENCE};

/// Starts the listener under `tally_runtime::supervise` (restarted with backoff if its
/// connection cannot be had). It holds the cache weakly and ends once the `Quota` is dropped.
pub(super) fn start(cache: &Arc<CacheState>, stop: CancellationToken) {
    let weak = Arc::downgrade(cache);
    let pool = cache.pool.clone();
    tally_runtime::supervise("quota_change_feed", stop.clone(), move || {
        let (weak, pool, stop) = (weak.clone(), pool.clone(), stop.clone());
        async move {
            let result = tokio::select! {
                result = listen(&weak, &pool) => result,
                () = heartbeat(&pool) => Ok(()),
                () = stop.cancelled() => Ok(()),
            };
            if let Some(cache) = weak.upgrade() {
                cache.feed.listening(None);
            }
            if let Err(error) = &result {
                tracing::warn!(%error, "the quota cache's change feed stopped; until it listens again, checks reload customers on the refresh timer");
            }
            result.map_err(|error| format!("the quota cache's change feed: {error}"))
        }
    });
}

async fn listen(cache: &Weak<CacheState>, pool: &PgPool) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    let Some(state) = cache.upgrade() else {
        return Ok(());
    };
    began_listening(&state);
    drop(state);
    loop {
        // The heartbeat arrives every second: a connection silent for this long is dead or
        // half-open (a failover, a dropped NAT entry) and would never say so.
        let Ok(notification) = tokio::time::timeout(SILENCE * 3, listener.try_recv()).await else {
            return Err(sqlx::Error::Protocol(
                "nothing, not even the heartbeat, arrived for 9 s".into(),
            ));
        };
        let notification = notification?;
        let Some(cache) = cache.upgrade() else {
            return Ok(());
        };
        let Some(notification) = notification else {
            // The connection was lost and a new one listens: what was sent in between is lost.
            tracing::info!(
                "the quota cache's change feed reconnected; reloading every cached customer"
            );
            began_listening(&cache);
            continue;
        };
        cache.feed.heard_now();
        match parse(notification.payload()) {
            Notice::Heartbeat => continue,
            Notice::Customers(customers) => {
                cache.feed.notifications.fetch_add(1, Ordering::AcqRel);
                for customer in customers {
                    if cache.get(customer).is_some() {
                        cache.feed.mark_changed(customer);
                    }
                }
            }
            Notice::Everyone | Notice::Unknown => {
                cache.feed.notifications.fetch_add(1, Ordering::AcqRel);
                cache.mark_all_changed();
            }
        }
        crate::telemetry::change_notification();
        cache.wake.notify_one();
    }
}

/// A new connection listens: entries loaded before it may have missed changes, so every cached
/// customer is reloaded, and entries are trusted only once loaded from now on.
fn began_listening(cache: &CacheState) {
    let now = Instant::now();
    cache.feed.listening(Some(now));
    cache.feed.heard_now();
    cache.mark_all_changed();
    cache.wake.notify_one();
}

/// Sends an empty notification every [`HEARTBEAT`], so a listener that hears nothing knows its
/// connection no longer delivers (within [`SILENCE`]) even when nothing changes.
async fn heartbeat(pool: &PgPool) {
    let mut every = tokio::time::interval(HEARTBEAT);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let sent = tokio::time::timeout(
            HEARTBEAT,
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(CHANNEL)
                .execute(pool),
        )
        .await;
        if let Ok(Err(error)) = sent {
            tracing::debug!(%error, "the quota cache's change feed heartbeat failed");
        }
    }
}
