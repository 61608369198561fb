//! The health of what a process depends on, as it sees it.
//!
//! Code that talks to Postgres, Kafka or Stripe reports each outcome to that dependency's
//! [`Dependency`]: [`Dependency::up`] after a success, [`Dependency::down`] after a failure
//! that means "not reachable". Only changes are logged: one WARN when it goes away (with the
//! error), one INFO when it is back (with how long it was away), however many retries happen
//! in between. `tally_dependency_up{dependency}` follows the state, and [`readiness`] is what
//! `/readyz` reports.
//!
//! A [`check`] is readiness of the process's own making rather than a dependency's (the
//! aggregator's `consumption`: consuming, or stalled): it is in `/readyz` alike, but its owner
//! logs and measures it, so it adds no log lines and no `tally_dependency_up` series.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::telemetry::{DEPENDENCY_ERRORS, DEPENDENCY_UP};

/// One dependency (`postgres`, `kafka`, `stripe`) as this process sees it.
#[derive(Debug)]
pub struct Dependency {
    name: &'static str,
    state: Mutex<State>,
}

#[derive(Debug, Clone)]
enum State {
    /// Not tried yet.
    Unknown,
    Up,
    Down {
        since: Instant,
        error: String,
    },
}

/// What `/readyz` shows of one dependency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DependencyStatus {
    pub name: &'static str,
    /// Reached at least once and reachable at the last attempt.
    pub up: bool,
    /// How long it has been unreachable, when it is.
    pub down_for: Option<Duration>,
    /// The last error, when it is unreachable.
    pub error: Option<String>,
}

fn registry() -> &'static Mutex<Vec<&'static Dependency>> {
    static REGISTRY: OnceLock<Mutex<Vec<&'static Dependency>>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(Vec::new()))
}

/// The process-wide handle of dependency `name`, created on first use.
pub fn dependency(name: &'static str) -> &'static Dependency {
    registered(name, false)
}

/// The process-wide handle of check `name` (see the module doc), created on first use.
pub fn check(name: &'static str) -> &'static Dependency {
    registered(name, true)
}

fn registered(name: &'static str, check: bool) -> &'static Dependency {
    let mut registry = registry().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(found) = registry.iter().find(|d| d.name == name) {
        return found;
    }
    // A handful per process, for its lifetime: leaking gives the `'static` every caller wants.
    let created: &'static Dependency = Box::leak(Box::new(Dependency {
        name,
        state: Mutex::new(State::Unknown),
    }));
    if !check {
        metrics::gauge!(DEPENDENCY_UP, "dependency" => name).set(0.0);
    }
    registry.push(created);
    created
}

/// Every dependency this process uses, in the order first used.
pub fn readiness() -> Vec<DependencyStatus> {
    let registry = registry().lock().unwrap_or_else(|e| e.into_inner());
    registry.iter().map(|d| d.status()).collect()
}

/// True when every dependency this process uses is reachable.
pub fn ready() -> bool {
    readiness().iter().all(|d| d.up)
}

impl Dependency {
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// A call succeeded.
    pub fn up(&self) {
        let mut state = self.lock();
        if let State::Down { since, .. } = &*state {
            tracing::info!(
                dependency = self.name,
                down_seconds = since.elapsed().as_secs_f64(),
                "{} is reachable again; resuming",
                self.name
            );
        }
        if !matches!(*state, State::Up) {
            metrics::gauge!(DEPENDENCY_UP, "dependency" => self.name).set(1.0);
        }
        *state = State::Up;
    }

    /// A call failed because the dependency is unreachable (or refusing for now).
    pub fn down(&self, error: &dyn std::fmt::Display) {
        metrics::counter!(DEPENDENCY_ERRORS, "dependency" => self.name).increment(1);
        let mut state = self.lock();
        match &mut *state {
            State::Down { error: last, .. } => *last = error.to_string(),
            _ => {
                tracing::warn!(
                    dependency = self.name,
                    %error,
                    "{} is unreachable; waiting for it (retrying with backoff)",
                    self.name
                );
                metrics::gauge!(DEPENDENCY_UP, "dependency" => self.name).set(0.0);
                *state = State::Down {
                    since: Instant::now(),
                    error: error.to_string(),
                };
            }
        }
    }

    /// A check passes (silently).
    pub fn ok(&self) {
        *self.lock() = State::Up;
    }

    /// A check fails, for this reason (silently: its owner logs).
    pub fn failing(&self, reason: &str) {
        let mut state = self.lock();
        match &mut *state {
            State::Down { error, .. } => *error = reason.to_owned(),
            _ => {
                *state = State::Down {
                    since: Instant::now(),
                    error: reason.to_owned(),
                }
            }
        }
    }

    pub fn is_up(&self) -> bool {
        matches!(*self.lock(), State::Up)
    }

    pub fn status(&self) -> DependencyStatus {
        let state = self.lock().clone();
        match state {
            State::Unknown => DependencyStatus {
                name: self.name,
                up: false,
                down_for: None,
                error: Some("not reached yet".into()),
            },
            State::Up => DependencyStatus {
                name: self.name,
                up: true,
                down_for: None,
                error: None,
            },
            State::Down { since, error } => DependencyStatus {
                name: self.name,
                up: false,
                down_for: Some(since.elapsed()),
                error: Some(error),
            },
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_the_state_and_reports_readiness() {
        let db = dependency("test-db");
        assert!(std::ptr::eq(db, dependency("test-db")), "one per name");
        assert!(!db.status().up, "not ready before it was reached");
        db.up();
        assert!(db.is_up());
        db.down(&"connection refused");
        db.down(&"connection refused again");
        let status = db.status();
        assert!(!status.up);
        assert_eq!(status.error.as_deref(), Some("connection refused again"));
        assert!(readiness().iter().any(|d| d.name == "test-db" && !d.up));
        db.up();
        assert!(db.status().up && db.status().down_for.is_none());
    }
}
