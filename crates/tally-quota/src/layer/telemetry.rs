//! The middleware's metrics and their Prometheus names. Label values are bounded: the meter
//! is one of the layers a service builds, never a customer.

use metrics::Counter;
use tally_emitter::EmitError;

/// Requests the middleware answered, by `meter` and `decision`: `allow`, `warn` (let through
/// above a soft limit or within the grace), `deny` (429 `LIMIT_EXCEEDED`), `refused` (no
/// customer, no subscription, feature off, quota store unavailable: the handler did not run).
pub const DECISIONS: &str = "tally_quota_layer_decisions_total";

/// Usage events of successful requests that `emit` refused, by `meter` and `reason`
/// (`invalid`: the event breaks the contract, e.g. a quantity from the response out of range;
/// `overloaded`: queue and spool are full; `closed`: the emitter was shut down). That usage is
/// not counted: each is also logged at ERROR.
pub const EMIT_FAILURES: &str = "tally_quota_layer_emit_failures_total";

/// Successful responses of a `quantity_from_response` route without a `UsageQuantity`: the
/// route's own quantity was emitted instead. A handler that forgets it is a bug to fix.
pub const MISSING_QUANTITY: &str = "tally_quota_layer_missing_quantity_total";

/// One layer's counters, registered once when it is built: a request pays an atomic add, not
/// a registry lookup. (Install the metrics recorder before building the layers.)
#[derive(Clone)]
pub(super) struct Counters {
    pub(super) allow: Counter,
    pub(super) warn: Counter,
    pub(super) deny: Counter,
    pub(super) refused: Counter,
    emit_invalid: Counter,
    emit_overloaded: Counter,
    emit_closed: Counter,
    pub(super) missing_quantity: Counter,
}

impl Counters {
    pub(super) fn register(meter: &str) -> Counters {
        metrics::describe_counter!(DECISIONS, "Requests answered by the quota middleware");
        metrics::describe_counter!(
            EMIT_FAILURES,
            "Usage of successful requests the quota middleware could not emit (not counted)"
        );
        metrics::describe_counter!(
            MISSING_QUANTITY,
            "Successful responses without a UsageQuantity on a quantity_from_response route"
        );
        let meter = meter.to_owned();
        let decision = |decision: &'static str| metrics::counter!(DECISIONS, "meter" => meter.clone(), "decision" => decision);
        let failure = |reason: &'static str| metrics::counter!(EMIT_FAILURES, "meter" => meter.clone(), "reason" => reason);
        Counters {
            allow: decision("allow"),
            warn: decision("warn"),
            deny: decision("deny"),
            refused: decision("refused"),
            emit_invalid: failure("invalid"),
            emit_overloaded: failure("overloaded"),
            emit_closed: failure("closed"),
            missing_quantity: metrics::counter!(MISSING_QUANTITY, "meter" => meter.clone()),
        }
    }

    pub(super) fn emit_failed(&self, error: &EmitError) {
        match error {
            EmitError::Invalid(_) => &self.emit_invalid,
            EmitError::Overloaded => &self.emit_overloaded,
            // `NotDurable` and `Timeout` come only from `emit_durable`, which is not used.
            EmitError::Closed | EmitError::NotDurable(_) | EmitError::Timeout(_) => {
                &self.emit_closed
            }
        }
        .increment(1);
    }
}
