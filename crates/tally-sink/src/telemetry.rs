//! Metric names of the sink, in one place.

/// Meter events Stripe accepted (including "already exists" on a retry: ours).
pub const SUBMISSIONS_SENT: &str = "tally_sink_submissions_sent_total";
/// Attempts that failed and will be retried, by `reason`.
pub const SUBMISSIONS_RETRIED: &str = "tally_sink_submissions_retried_total";
/// Submissions Stripe refused for good, by `reason`: an operator must look.
pub const SUBMISSIONS_FAILED: &str = "tally_sink_submissions_failed_total";
/// 429 answers (account rate or one-call-per-customer-and-meter).
pub const STRIPE_RATE_LIMITED: &str = "tally_sink_stripe_rate_limited_total";
/// Time of one Stripe call.
pub const STRIPE_REQUEST_SECONDS: &str = "tally_sink_stripe_request_seconds";
/// Slots accounted for, and outbox rows written.
pub const SLOTS_ACCOUNTED: &str = "tally_sink_slots_accounted_total";
pub const SUBMISSIONS_PLANNED: &str = "tally_sink_submissions_planned_total";
/// Usage that went down after it was billed (rows in `billing_corrections`).
pub const CORRECTIONS: &str = "tally_sink_corrections_total";
/// Outbox rows waiting to be sent, and the age of the oldest.
pub const OUTBOX_PENDING: &str = "tally_sink_outbox_pending";
pub const OUTBOX_OLDEST_SECONDS: &str = "tally_sink_outbox_oldest_pending_seconds";
/// Changed slots waiting because their customer has no Stripe customer id.
pub const UNMAPPED_SLOTS: &str = "tally_sink_unmapped_slots";
/// Outbox rows parked for an operator (an uncertain attempt over 23 hours ago).
pub const OUTBOX_NEEDS_REVIEW: &str = "tally_sink_outbox_needs_review";
pub const SUBMISSIONS_NEEDS_REVIEW: &str = "tally_sink_submissions_needs_review_total";
/// Customer+meter pairs set aside, now and in all (by reason).
pub const QUARANTINED_PAIRS: &str = "tally_sink_quarantined_pairs";
pub const PAIRS_QUARANTINED: &str = "tally_sink_pairs_quarantined_total";
/// Written by `tally reconcile --metrics-file` for node_exporter's textfile collector: pairs by
/// verdict, Stripe's meter event error reports, and when it last ran.
pub const RECONCILE_PAIRS: &str = "tally_reconcile_pairs";
pub const RECONCILE_METER_ERROR_REPORTS: &str = "tally_reconcile_meter_error_reports";
pub const RECONCILE_LAST_RUN: &str = "tally_reconcile_last_run_timestamp_seconds";
/// Duration of one billing pass.
pub const PASS_SECONDS: &str = "tally_sink_pass_seconds";
/// 1 while the sink bills through Stripe's v2 meter event stream, 0 on v1.
pub const METER_EVENTS_V2: &str = "tally_sink_meter_events_v2";

pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(SUBMISSIONS_SENT, "Meter events Stripe accepted");
    describe_counter!(
        SUBMISSIONS_RETRIED,
        "Stripe requests (a call, or a stream request of up to 100 events) that failed and will be retried, by reason"
    );
    describe_counter!(
        SUBMISSIONS_FAILED,
        "Submissions Stripe refused for good, by reason"
    );
    describe_counter!(STRIPE_RATE_LIMITED, "Stripe 429 answers");
    describe_histogram!(
        STRIPE_REQUEST_SECONDS,
        Unit::Seconds,
        "Time of one Stripe call"
    );
    describe_counter!(SLOTS_ACCOUNTED, "Changed slots accounted for");
    describe_counter!(SUBMISSIONS_PLANNED, "Outbox rows written");
    describe_counter!(CORRECTIONS, "Usage that went down after it was billed");
    describe_gauge!(OUTBOX_PENDING, "Outbox rows waiting to be sent");
    describe_gauge!(
        OUTBOX_OLDEST_SECONDS,
        Unit::Seconds,
        "Age of the oldest pending outbox row"
    );
    describe_gauge!(
        UNMAPPED_SLOTS,
        "Changed slots waiting for a Stripe customer mapping"
    );
    describe_histogram!(PASS_SECONDS, Unit::Seconds, "Duration of one billing pass");
    describe_gauge!(
        OUTBOX_NEEDS_REVIEW,
        "Outbox rows parked for an operator: an attempt that may have reached Stripe is over 23 hours old"
    );
    describe_counter!(
        SUBMISSIONS_NEEDS_REVIEW,
        "Outbox rows parked for an operator"
    );
    describe_gauge!(
        QUARANTINED_PAIRS,
        "Customer+meter pairs set aside in billing_quarantine"
    );
    describe_counter!(
        PAIRS_QUARANTINED,
        "Customer+meter pairs quarantined, by reason"
    );
    describe_gauge!(
        METER_EVENTS_V2,
        "1 while meter events go through Stripe's v2 stream, 0 through v1"
    );
}
