//! Capped exponential backoff with jitter.

use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

/// Waits that double from `initial` up to `max`, each a random point between half and all of
/// the current step (so that processes waiting out the same outage do not retry in step).
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            step: initial,
        }
    }

    /// The next wait; each call doubles the step, up to the cap.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.step.mul_f64(rand::rng().random_range(0.5..=1.0));
        self.step = (self.step * 2).min(self.max);
        wait
    }

    /// After a success: the next wait starts small again.
    pub fn reset(&mut self) {
        self.step = self.initial;
    }
}

/// Sleeps for `wait` unless `stop` comes first; true when it did (the caller should stop).
pub async fn sleep_unless_stopped(wait: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(wait) => false,
        _ = stop.cancelled() => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let waits: Vec<Duration> = (0..8).map(|_| backoff.next_wait()).collect();
        let steps = [100, 200, 400, 800, 1000, 1000, 1000, 1000];
        for (wait, step) in waits.iter().zip(steps) {
            let step = Duration::from_millis(step);
            assert!(
                *wait <= step && *wait >= step / 2,
                "{wait:?} for step {step:?}"
            );
        }
        backoff.reset();
        assert!(backoff.next_wait() <= Duration::from_millis(100));
    }
}
