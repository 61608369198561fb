//! Background tasks that are restarted when they fail.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::telemetry::TASK_RESTARTS;
use crate::{sleep_unless_stopped, Backoff};

/// Runs the task `start()` returns until `stop` is cancelled. When the task returns an error
/// or panics, it is counted (`tally_task_restarts_total{task}`), logged at ERROR, and started
/// again after a capped backoff; a task that returns `Ok` is done. The backoff starts over
/// once a run has lasted a minute.
pub fn supervise<F, Fut>(
    name: &'static str,
    stop: CancellationToken,
    mut start: F,
) -> JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    metrics::counter!(TASK_RESTARTS, "task" => name).increment(0);
    tokio::spawn(async move {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        loop {
            let started = tokio::time::Instant::now();
            let mut run = tokio::spawn(start());
            let outcome = tokio::select! {
                outcome = &mut run => outcome,
                _ = stop.cancelled() => {
                    run.abort();
                    return;
                }
            };
            let failure = match outcome {
                Ok(Ok(())) => return,
                Ok(Err(error)) => error,
                Err(join) if join.is_panic() => format!("panicked: {}", panic_message(join)),
                Err(_) => return, // aborted from outside
            };
            if started.elapsed() > Duration::from_secs(60) {
                backoff.reset();
            }
            let wait = backoff.next_wait();
            metrics::counter!(TASK_RESTARTS, "task" => name).increment(1);
            tracing::error!(task = name, error = %failure, restart_in_seconds = wait.as_secs_f64(), "background task failed; restarting it");
            if sleep_unless_stopped(wait, &stop).await {
                return;
            }
        }
    })
}

fn panic_message(join: tokio::task::JoinError) -> String {
    let payload = join.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn a_failing_or_panicking_task_is_restarted_until_it_succeeds() {
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        let handle = supervise("test", CancellationToken::new(), move || {
            let run = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                match run {
                    0 => Err("first run fails".to_owned()),
                    1 => panic!("second run panics"),
                    _ => Ok(()),
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(5), handle)
            .await
            .expect("the task succeeds on its third run")
            .unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn stop_ends_a_running_task() {
        let stop = CancellationToken::new();
        let handle = supervise("forever", stop.clone(), || async {
            std::future::pending::<()>().await;
            Ok(())
        });
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(1), handle)
            .await
            .unwrap()
            .unwrap();
    }
}
