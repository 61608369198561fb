//! The alerts in `tally aggregate`: the evaluator follows the changes every
//! `alerts.evaluate_every`, and wakes the sender as soon as it records a crossing; the sender
//! also wakes on its own every `evaluate_every` for retries that came due, and whenever a
//! delivery frees a slot. Both supervised: a failing round (Postgres away) is logged, counted
//! and retried.

use std::sync::Arc;

use chrono::Utc;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::AlertsConfig;
use crate::deliver::{claim, deliver, Sender};
use crate::evaluate::evaluate_once;
use crate::telemetry;
use tally_credits::rates::FreshRates;

/// Starts the evaluator and the sender; both end when `stop` is cancelled.
pub fn start_alerts(
    pool: PgPool,
    config: AlertsConfig,
    stop: CancellationToken,
) -> Vec<JoinHandle<()>> {
    let wake = Arc::new(Notify::new());
    let every = config.evaluate_every;
    let evaluator = {
        let (pool, stop, wake) = (pool.clone(), stop.clone(), wake.clone());
        tally_runtime::supervise("alert_evaluator", stop.clone(), move || {
            let (pool, stop, wake) = (pool.clone(), stop.clone(), wake.clone());
            async move {
                // The rate card prices the usage not yet burned in projected balances.
                let mut rates = FreshRates::default();
                loop {
                    let rates = rates.get(&pool).await.map_err(|e| {
                        telemetry::error();
                        format!("loading the credit rate card: {e}")
                    })?;
                    let evaluation =
                        evaluate_once(&pool, rates, Utc::now()).await.map_err(|e| {
                            telemetry::error();
                            format!("evaluating alert rules: {e}")
                        })?;
                    if !evaluation.fired.is_empty() {
                        wake.notify_one();
                    }
                    if !evaluation.more && tally_runtime::sleep_unless_stopped(every, &stop).await {
                        return Ok(());
                    }
                }
            }
        })
    };
    let sender = Sender::new(&config);
    let delivery = tally_runtime::supervise("alert_sender", stop.clone(), move || {
        let (pool, stop, wake, sender) = (pool.clone(), stop.clone(), wake.clone(), sender.clone());
        async move {
            // Each delivery is its own task holding one of the sender's slots: a slow endpoint
            // keeps a few slots busy, never the others' deliveries.
            let freed = Arc::new(Notify::new());
            loop {
                let free = sender.free_slots();
                let claimed = if free == 0 {
                    Vec::new()
                } else {
                    claim(&pool, &sender, free).await.map_err(|e| {
                        telemetry::error();
                        format!("claiming alert deliveries: {e}")
                    })?
                };
                let more = free > 0 && claimed.len() >= free;
                for delivery in claimed {
                    let Ok(slot) = sender.slots().clone().try_acquire_owned() else {
                        break; // cannot happen: only this loop takes slots
                    };
                    let (pool, sender, freed) = (pool.clone(), sender.clone(), freed.clone());
                    tokio::spawn(async move {
                        if let Err(error) = deliver(&pool, &sender, delivery).await {
                            // Its lease ends and it is sent again (receivers dedupe).
                            telemetry::error();
                            tracing::warn!(%error, "recording an alert delivery's outcome failed; it is sent again when its lease ends");
                        }
                        drop(slot);
                        freed.notify_one();
                    });
                }
                if more {
                    continue;
                }
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = wake.notified() => {}
                    _ = freed.notified(), if free == 0 => {}
                    _ = tokio::time::sleep(every) => {}
                }
            }
        }
    });
    vec![evaluator, delivery]
}
