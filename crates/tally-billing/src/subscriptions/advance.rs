//! What happens when a tally-managed subscription's period ends. Pure: the scheduler applies
//! [`step`] until the subscription's period contains now, auditing each step, so a scheduler
//! that was down for three months renews three times, each at the moment it was due.

use chrono::{DateTime, Utc};

use super::period::{period_containing, Interval};
use super::{Status, SubscriptionRecord};

/// One thing that happened at a period's end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// A new period began; `plan_changed_from` when a pending plan change took effect.
    Renewed { plan_changed_from: Option<String> },
    /// The trial ended and the subscription is active (a pending plan change took effect too).
    TrialConverted { plan_changed_from: Option<String> },
    /// The trial ended on a plan that requires a payment method, and none is on record.
    TrialExpired,
    /// `cancel_at_period_end` took effect.
    Canceled,
    /// A fixed term reached its end.
    TermEnded,
}

impl Transition {
    /// The `entitlement_audit.action` it is recorded as.
    pub fn action(&self) -> &'static str {
        match self {
            Transition::Renewed { .. } => "renew",
            Transition::TrialConverted { .. } => "trial_converted",
            Transition::TrialExpired => "trial_expired",
            Transition::Canceled => "cancel",
            Transition::TermEnded => "term_ended",
        }
    }

    /// The reason written beside it.
    pub fn reason(&self) -> String {
        match self {
            Transition::Renewed {
                plan_changed_from: Some(from),
            } => format!("period ended; the plan change from {from} scheduled for it took effect"),
            Transition::Renewed { .. } => "period ended; renewed".into(),
            Transition::TrialConverted {
                plan_changed_from: Some(from),
            } => format!("trial ended; active, with the plan change from {from} scheduled for it"),
            Transition::TrialConverted { .. } => "trial ended; active".into(),
            Transition::TrialExpired => {
                "trial ended without a payment method on record; the plan requires one".into()
            }
            Transition::Canceled => "canceled at period end, as scheduled".into(),
            Transition::TermEnded => "the fixed term ended".into(),
        }
    }

    /// Whether the subscription ended (the customer may move to the fallback plan).
    pub fn ends(&self) -> bool {
        matches!(
            self,
            Transition::TrialExpired | Transition::Canceled | Transition::TermEnded
        )
    }
}

/// The first transition due by `now`, and the subscription after it; `None` when the current
/// period has not ended (or the subscription is not live, or its next period is beyond the
/// calendar). `requires_payment_method` tells whether a plan's trial needs one.
pub fn step(
    subscription: &SubscriptionRecord,
    requires_payment_method: impl Fn(&str) -> bool,
    now: DateTime<Utc>,
) -> Option<(Transition, SubscriptionRecord)> {
    let end = subscription.current_period_end;
    if !subscription.status.is_live() || end > now {
        return None;
    }
    let mut next = subscription.clone();
    let end_it = |next: &mut SubscriptionRecord| {
        next.status = Status::Canceled;
        next.ended_at = Some(end);
        next.status_since = end;
        next.cancel_at_period_end = false;
        next.pending_plan = None;
    };
    if subscription.cancel_at_period_end {
        end_it(&mut next);
        return Some((Transition::Canceled, next));
    }
    if subscription.billing_interval == Interval::Fixed {
        end_it(&mut next);
        return Some((Transition::TermEnded, next));
    }
    // A plan change scheduled for this period's end takes effect with it (a trial's end too).
    let plan_changed_from = next
        .pending_plan
        .take()
        .map(|plan| std::mem::replace(&mut next.plan, plan));
    if plan_changed_from.is_some() {
        next.status_since = end;
    }
    let transition = if subscription.status == Status::Trialing {
        if requires_payment_method(&next.plan) && !subscription.payment_method {
            let mut expired = subscription.clone();
            end_it(&mut expired);
            return Some((Transition::TrialExpired, expired));
        }
        // Paid periods start when the trial ends, as Stripe anchors them.
        next.status = Status::Active;
        next.status_since = end;
        next.billing_anchor = end;
        Transition::TrialConverted { plan_changed_from }
    } else {
        Transition::Renewed { plan_changed_from }
    };
    let (start, period_end) = period_containing(next.billing_anchor, next.billing_interval, end)?;
    next.current_period_start = start;
    next.current_period_end = period_end;
    Some((transition, next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subscriptions::Source;
    use chrono::TimeZone;

    fn at(y: i32, m: u32, d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap()
    }

    fn monthly(anchor: DateTime<Utc>) -> SubscriptionRecord {
        let (start, end) = period_containing(anchor, Interval::Month, anchor).unwrap();
        SubscriptionRecord {
            id: 1,
            customer: "acme".into(),
            plan: "PRO".into(),
            status: Status::Active,
            source: Source::Tally,
            billing_interval: Interval::Month,
            billing_anchor: anchor,
            started_at: anchor,
            trial_end: None,
            current_period_start: start,
            current_period_end: end,
            cancel_at_period_end: false,
            pending_plan: None,
            payment_method: false,
            ended_at: None,
            status_since: anchor,
            stripe_subscription_id: None,
            stripe_status: None,
            created_at: anchor,
            updated_at: anchor,
        }
    }

    /// Every step due by `now`, as the scheduler applies them.
    fn catch_up(
        mut subscription: SubscriptionRecord,
        requires: bool,
        now: DateTime<Utc>,
    ) -> (Vec<Transition>, SubscriptionRecord) {
        let mut transitions = Vec::new();
        while let Some((transition, next)) = step(&subscription, |_| requires, now) {
            transitions.push(transition);
            subscription = next;
        }
        (transitions, subscription)
    }

    #[test]
    fn nothing_happens_before_the_period_ends() {
        let subscription = monthly(at(2027, 1, 31));
        assert!(step(&subscription, |_| false, at(2027, 2, 27)).is_none());
    }

    #[test]
    fn a_scheduler_down_for_months_renews_once_per_missed_period_across_month_ends() {
        let subscription = monthly(at(2027, 1, 31));
        let (transitions, after) = catch_up(subscription, false, at(2027, 5, 15));
        assert_eq!(transitions.len(), 3, "Feb 28, Mar 31, Apr 30");
        assert!(transitions.iter().all(|t| *t
            == Transition::Renewed {
                plan_changed_from: None
            }));
        assert_eq!(
            (after.current_period_start, after.current_period_end),
            (at(2027, 4, 30), at(2027, 5, 31))
        );
        assert_eq!(
            after.status_since,
            at(2027, 1, 31),
            "no plan or status change"
        );
    }

    #[test]
    fn a_pending_plan_change_takes_effect_at_the_period_end_once() {
        let mut subscription = monthly(at(2028, 1, 31));
        subscription.pending_plan = Some("ENTERPRISE".into());
        let (transitions, after) = catch_up(subscription, false, at(2028, 4, 1));
        assert_eq!(
            transitions,
            [
                Transition::Renewed {
                    plan_changed_from: Some("PRO".into())
                },
                Transition::Renewed {
                    plan_changed_from: None
                }
            ]
        );
        assert_eq!(after.plan, "ENTERPRISE");
        assert_eq!(after.status_since, at(2028, 2, 29), "leap day");
        assert_eq!(after.current_period_end, at(2028, 4, 30));
    }

    #[test]
    fn a_trial_converts_or_expires_at_its_end() {
        let start = at(2027, 2, 10);
        let mut trial = monthly(start);
        trial.status = Status::Trialing;
        trial.trial_end = Some(at(2027, 2, 24));
        trial.current_period_end = at(2027, 2, 24);
        let (transitions, converted) = catch_up(trial.clone(), false, at(2027, 3, 1));
        assert_eq!(
            transitions,
            [Transition::TrialConverted {
                plan_changed_from: None
            }]
        );
        assert_eq!(converted.status, Status::Active);
        assert_eq!(converted.billing_anchor, at(2027, 2, 24));
        assert_eq!(converted.current_period_end, at(2027, 3, 24));
        assert_eq!(converted.status_since, at(2027, 2, 24));

        let (transitions, expired) = catch_up(trial.clone(), true, at(2027, 3, 1));
        assert_eq!(transitions, [Transition::TrialExpired]);
        assert_eq!(
            (expired.status, expired.ended_at),
            (Status::Canceled, Some(at(2027, 2, 24)))
        );

        trial.payment_method = true;
        let (transitions, _) = catch_up(trial, true, at(2027, 3, 1));
        assert!(matches!(
            transitions[..],
            [Transition::TrialConverted { .. }]
        ));
    }

    #[test]
    fn a_cancellation_at_period_end_ends_it_at_that_end_even_when_caught_up_late() {
        let mut subscription = monthly(at(2027, 1, 15));
        subscription.cancel_at_period_end = true;
        subscription.pending_plan = Some("ENTERPRISE".into());
        let (transitions, after) = catch_up(subscription, false, at(2027, 6, 1));
        assert_eq!(transitions, [Transition::Canceled]);
        assert_eq!(after.ended_at, Some(at(2027, 2, 15)));
        assert_eq!(
            after.plan, "PRO",
            "a canceled subscription takes no new plan"
        );
        assert_eq!(after.pending_plan, None);
    }

    #[test]
    fn a_fixed_term_ends() {
        let mut subscription = monthly(at(2027, 1, 1));
        subscription.billing_interval = Interval::Fixed;
        subscription.current_period_end = at(2027, 4, 1);
        assert!(step(&subscription, |_| false, at(2027, 3, 31)).is_none());
        let (transitions, after) = catch_up(subscription, false, at(2027, 4, 1));
        assert_eq!(transitions, [Transition::TermEnded]);
        assert_eq!(after.ended_at, Some(at(2027, 4, 1)));
    }
}
