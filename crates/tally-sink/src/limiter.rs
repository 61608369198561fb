//! A token bucket that keeps the sink under Stripe's per-account rate.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `rate` tokens a second, with a burst of 20 ms worth, so that any one-second window holds at
/// most `rate * 1.02` calls: with the default live rate (950/s) that is 969, under Stripe's
/// 1,000. A token is a call (v1), or one event of a v2 stream request, whose burst is at least
/// a whole request (100): at the default 9,500 events/s a window holds at most 9,690.
pub(crate) struct RateLimiter {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    pub(crate) fn new(rate_per_second: u32) -> RateLimiter {
        RateLimiter::with_burst(rate_per_second, 1)
    }

    /// A bucket that can hand out `least_burst` tokens at once (a stream request's events).
    pub(crate) fn with_burst(rate_per_second: u32, least_burst: u32) -> RateLimiter {
        let rate = f64::from(rate_per_second.max(1));
        let burst = (rate / 50.0).max(f64::from(least_burst.max(1)));
        RateLimiter {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Waits until a call may go out.
    pub(crate) async fn acquire(&self) {
        self.acquire_many(1).await
    }

    /// Waits until `count` tokens are there, and takes them (at most the burst).
    pub(crate) async fn acquire_many(&self, count: u32) {
        let need = f64::from(count.max(1)).min(self.burst);
        loop {
            let wait = {
                let mut state = self.state.lock().expect("limiter lock poisoned");
                let (tokens, last) = &mut *state;
                let now = Instant::now();
                *tokens =
                    (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
                *last = now;
                if *tokens >= need {
                    *tokens -= need;
                    return;
                }
                Duration::from_secs_f64((need - *tokens) / self.rate)
            };
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn holds_the_rate() {
        let limiter = RateLimiter::new(200);
        let start = Instant::now();
        for _ in 0..120 {
            limiter.acquire().await;
        }
        // 20 from the burst, then 100 at 200/s: at least 0.5 s.
        assert!(
            start.elapsed() >= Duration::from_millis(480),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn hands_out_whole_requests_of_events() {
        let limiter = RateLimiter::with_burst(1_000, 100);
        let start = Instant::now();
        for _ in 0..4 {
            limiter.acquire_many(100).await;
        }
        // 100 from the burst, then 300 at 1,000/s: at least 0.3 s.
        assert!(
            start.elapsed() >= Duration::from_millis(290),
            "{:?}",
            start.elapsed()
        );
    }
}
