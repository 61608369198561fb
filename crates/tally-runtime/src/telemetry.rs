//! Metric names of `tally-runtime`, in one place.

/// Gauge per dependency (`postgres`, `kafka`, `stripe`): 1 reachable, 0 not.
pub const DEPENDENCY_UP: &str = "tally_dependency_up";
/// Failed attempts to reach a dependency.
pub const DEPENDENCY_ERRORS: &str = "tally_dependency_errors_total";
/// Background tasks restarted after they failed or panicked, by task.
pub const TASK_RESTARTS: &str = "tally_task_restarts_total";
