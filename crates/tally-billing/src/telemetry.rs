//! The subscription scheduler's metrics and their Prometheus names.

/// Transitions the subscription scheduler applied, by `transition` (renew, trial_converted,
/// trial_expired, cancel, term_ended, fallback).
pub const SUBSCRIPTION_TRANSITIONS: &str = "tally_subscription_transitions_total";

/// Subscriptions the scheduler could not advance in a run (each is retried in the next run;
/// the others go on).
pub const SUBSCRIPTION_SCHEDULER_ERRORS: &str = "tally_subscription_scheduler_errors_total";

pub(crate) fn describe_scheduler() {
    metrics::describe_counter!(
        SUBSCRIPTION_TRANSITIONS,
        "Subscription transitions the scheduler applied, by transition"
    );
    metrics::describe_counter!(
        SUBSCRIPTION_SCHEDULER_ERRORS,
        "Subscriptions the scheduler could not advance (retried next run)"
    );
    metrics::counter!(SUBSCRIPTION_SCHEDULER_ERRORS).increment(0);
}

pub(crate) fn subscription_transition(transition: &'static str) {
    metrics::counter!(SUBSCRIPTION_TRANSITIONS, "transition" => transition).increment(1);
}

pub(crate) fn subscription_scheduler_error() {
    metrics::counter!(SUBSCRIPTION_SCHEDULER_ERRORS).increment(1);
}
