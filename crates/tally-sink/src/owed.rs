//! What Stripe is still owed for one slot: pure arithmetic, no I/O.
//!
//! `sum` and `count` meters bill deltas (Stripe `sum`). Per customer and meter the sink keeps
//! the exact usage it has accounted for and the whole units it has submitted; a slot's new
//! usage is added to the first, and what is owed is `floor(accounted) - submitted`. So the
//! fraction Stripe cannot take is carried forward, never rounded away, and the whole units
//! submitted always equal the floor of the exact usage.
//!
//! `max` and `latest` meters bill values (Stripe `last`): when a slot's value changes, the new
//! value is sent as a new revision. A fractional value is rounded up: a started unit of
//! storage or a seat counts.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
pub use tally_core::BillingKind;

/// What the sink accounted for a slot so far (`billing_slots`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotState {
    pub accounted: Decimal,
    pub revision: i32,
}

/// Per customer and meter (`billing_balances`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Balance {
    pub accounted: Decimal,
    pub submitted: Decimal,
}

/// What a slot owes Stripe after a change, with the slot state and balance that record it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owed {
    pub slot: SlotState,
    pub balance: Balance,
    /// Whole units (delta) or the value (last) to send, under `slot.revision`.
    pub submission: Option<Decimal>,
    /// Units billed above what the windows now hold (usage went down): for finance.
    pub overbilled: Option<Decimal>,
}

/// A customer's usage of a meter went beyond what a 28-digit decimal holds: that pair cannot
/// be billed exactly and is quarantined (never a panic, never rounded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the usage is beyond what a 28-digit decimal holds")]
pub struct Overflow;

fn add(a: Decimal, b: Decimal) -> Result<Decimal, Overflow> {
    a.checked_add(b).ok_or(Overflow)
}

fn sub(a: Decimal, b: Decimal) -> Result<Decimal, Overflow> {
    a.checked_sub(b).ok_or(Overflow)
}

/// The largest whole number at most `x`, without overflowing.
fn floor(x: Decimal) -> Result<Decimal, Overflow> {
    if x.is_sign_negative() && !x.fract().is_zero() {
        sub(x.trunc(), Decimal::ONE)
    } else {
        Ok(x.trunc())
    }
}

/// The smallest whole number at least `x`, without overflowing.
fn ceil(x: Decimal) -> Result<Decimal, Overflow> {
    if x.is_sign_positive() && !x.fract().is_zero() {
        add(x.trunc(), Decimal::ONE)
    } else {
        Ok(x.trunc())
    }
}

/// What one slot whose window total is now `total` owes. `None`: nothing changed.
pub fn owed_for(
    kind: BillingKind,
    total: Decimal,
    slot: SlotState,
    balance: Balance,
) -> Result<Option<Owed>, Overflow> {
    match kind {
        BillingKind::Delta => {
            if total == slot.accounted {
                return Ok(None);
            }
            let mut balance = balance;
            balance.accounted = add(balance.accounted, sub(total, slot.accounted)?)?;
            let owed = sub(floor(balance.accounted)?, balance.submitted)?;
            let (submission, overbilled) = if owed.is_sign_positive() && !owed.is_zero() {
                (Some(owed), None)
            } else if owed.is_sign_negative() {
                (None, Some(-owed))
            } else {
                (None, None)
            };
            balance.submitted = sub(
                add(balance.submitted, submission.unwrap_or_default())?,
                overbilled.unwrap_or_default(),
            )?;
            let revision = slot.revision + i32::from(submission.is_some());
            Ok(Some(Owed {
                slot: SlotState {
                    accounted: total,
                    revision,
                },
                balance,
                submission,
                overbilled,
            }))
        }
        BillingKind::Last if slot.revision > 0 && total == slot.accounted => Ok(None),
        BillingKind::Last => Ok(Some(Owed {
            slot: SlotState {
                accounted: total,
                revision: slot.revision + 1,
            },
            balance,
            submission: Some(ceil(total)?),
            overbilled: None,
        })),
    }
}

/// What an overbilled `Delta` slot owes once its sent revisions, `canceled` units in all, are
/// withdrawn at Stripe: what is owed is then sent again as one new revision, and only what
/// cancelling cannot undo (units carried in from other slots) is left over for finance.
/// The balance needs no change: submitted stays `floor(accounted)` either way.
pub fn after_cancel(before: &Owed, canceled: Decimal) -> Result<Owed, Overflow> {
    let owed = sub(canceled, before.overbilled.unwrap_or_default())?;
    let (submission, overbilled) = if owed.is_sign_negative() && !owed.is_zero() {
        (None, Some(-owed))
    } else {
        (Some(owed).filter(|o| !o.is_zero()), None)
    };
    Ok(Owed {
        slot: before.slot,
        balance: before.balance,
        submission,
        overbilled,
    })
}

/// The meter event identifier of a slot's revision: the same on every retry, unique per
/// (customer, meter, slot, revision), at most 100 characters (Stripe's limit). Readable when it
/// fits: meter names hold no ':', and the slot and revision are the last two fields, so the
/// parts cannot be confused; long customer ids are hashed.
pub fn identifier(customer: &str, meter: &str, slot_start: DateTime<Utc>, revision: i32) -> String {
    let slot = slot_start.timestamp();
    let readable = format!("tally:{meter}:{customer}:{slot}:{revision}");
    if readable.len() <= 100 {
        return readable;
    }
    let hash = xxhash_rust::xxh3::xxh3_128(format!("{meter}\u{0}{customer}").as_bytes());
    format!("tally:h:{hash:032x}:{slot}:{revision}")
}

/// The meter event timestamp of a slot: its start, unless that is older than Stripe accepts
/// (35 days); then the oldest time Stripe accepts, with an hour's margin.
pub fn event_timestamp(slot_start: DateTime<Utc>, now: DateTime<Utc>) -> DateTime<Utc> {
    slot_start.max(tally_core::window::oldest_stripe_timestamp(now))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(text: &str) -> Decimal {
        text.parse().unwrap()
    }

    #[test]
    fn fractions_carry_forward() {
        let first = first_owed(BillingKind::Delta, d("2.6"));
        assert_eq!(first.submission, Some(d("2")));
        assert_eq!(
            first.balance,
            Balance {
                accounted: d("2.6"),
                submitted: d("2")
            }
        );
        let second = owed_for(
            BillingKind::Delta,
            d("0.5"),
            SlotState::default(),
            first.balance,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            second.submission,
            Some(d("1")),
            "0.6 + 0.5 makes a whole unit"
        );
        let third = owed_for(
            BillingKind::Delta,
            d("0.2"),
            SlotState::default(),
            second.balance,
        )
        .unwrap()
        .unwrap();
        assert_eq!(third.submission, None);
        assert_eq!(
            third.slot,
            SlotState {
                accounted: d("0.2"),
                revision: 0
            }
        );
    }

    #[test]
    fn a_late_event_makes_a_new_revision_with_the_delta() {
        let first = first_owed(BillingKind::Delta, d("10"));
        assert_eq!((first.submission, first.slot.revision), (Some(d("10")), 1));
        assert_eq!(
            owed_for(BillingKind::Delta, d("10"), first.slot, first.balance),
            Ok(None)
        );
        let late = owed_for(BillingKind::Delta, d("13"), first.slot, first.balance)
            .unwrap()
            .unwrap();
        assert_eq!((late.submission, late.slot.revision), (Some(d("3")), 2));
    }

    /// What a slot seen for the first time owes, with nothing billed before.
    fn first_owed(kind: BillingKind, total: Decimal) -> Owed {
        owed_for(kind, total, SlotState::default(), Balance::default())
            .unwrap()
            .unwrap()
    }

    fn billed_10_then_lowered_to(total: Decimal) -> Owed {
        let first = first_owed(BillingKind::Delta, d("10"));
        owed_for(BillingKind::Delta, total, first.slot, first.balance)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn usage_that_goes_down_is_recorded_not_dropped() {
        let lower = billed_10_then_lowered_to(d("7"));
        assert_eq!((lower.submission, lower.overbilled), (None, Some(d("3"))));
        assert_eq!(
            lower.balance,
            Balance {
                accounted: d("7"),
                submitted: d("7")
            }
        );
    }

    #[test]
    fn cancelling_the_slot_resends_what_is_owed() {
        let lower = billed_10_then_lowered_to(d("7"));
        let resent = after_cancel(&lower, d("10")).unwrap();
        assert_eq!((resent.submission, resent.overbilled), (Some(d("7")), None));
        assert_eq!(
            resent.balance,
            Balance {
                accounted: d("7"),
                submitted: d("7")
            }
        );
        let to_zero = after_cancel(&billed_10_then_lowered_to(d("0")), d("10")).unwrap();
        assert_eq!((to_zero.submission, to_zero.overbilled), (None, None));
    }

    #[test]
    fn last_meters_send_the_value_rounded_up() {
        let first = first_owed(BillingKind::Last, d("4.2"));
        assert_eq!((first.submission, first.slot.revision), (Some(d("5")), 1));
        let lower = owed_for(BillingKind::Last, d("3"), first.slot, first.balance)
            .unwrap()
            .unwrap();
        assert_eq!((lower.submission, lower.slot.revision), (Some(d("3")), 2));
        let zero = owed_for(
            BillingKind::Last,
            d("0"),
            SlotState::default(),
            Balance::default(),
        );
        assert!(zero.unwrap().is_some(), "a first value of 0 is still sent");
    }

    #[test]
    fn sums_beyond_a_decimal_are_an_error_not_a_panic() {
        let huge = Decimal::MAX;
        let first = first_owed(BillingKind::Delta, huge);
        assert_eq!(first.submission, Some(huge));
        let more = owed_for(
            BillingKind::Delta,
            d("1"),
            SlotState::default(),
            first.balance,
        );
        assert_eq!(more, Err(Overflow));
    }

    #[test]
    fn identifiers_are_deterministic_short_and_distinct() {
        let slot = DateTime::from_timestamp(1_700_000_100, 0).unwrap();
        assert_eq!(
            identifier("acme", "api_calls", slot, 1),
            "tally:api_calls:acme:1700000100:1"
        );
        let long = "c".repeat(200);
        let hashed = identifier(&long, "api_calls", slot, 1);
        assert!(hashed.len() <= 100);
        assert_eq!(hashed, identifier(&long, "api_calls", slot, 1));
        assert_ne!(hashed, identifier(&long, "api_calls", slot, 2));
        assert_ne!(
            identifier("a:1", "m", slot, 1),
            identifier("a", "m", slot, 1)
        );
    }

    proptest! {
        /// Whatever order and size the slot updates come in, the units submitted equal the
        /// floor of the exact usage, and no submission is negative.
        #[test]
        fn submitted_is_the_floor_of_usage(updates in prop::collection::vec((0usize..4, 0u32..5000), 1..40)) {
            let mut slots = [SlotState::default(); 4];
            let mut balance = Balance::default();
            let mut totals = [Decimal::ZERO; 4];
            let mut sent = Decimal::ZERO;
            for (slot, hundredths) in updates {
                totals[slot] += Decimal::new(i64::from(hundredths), 2);
                if let Some(owed) = owed_for(BillingKind::Delta, totals[slot], slots[slot], balance).unwrap() {
                    if let Some(units) = owed.submission {
                        prop_assert!(units > Decimal::ZERO);
                        sent += units;
                    }
                    prop_assert!(owed.overbilled.is_none());
                    slots[slot] = owed.slot;
                    balance = owed.balance;
                }
            }
            let usage: Decimal = totals.iter().sum();
            prop_assert_eq!(sent, usage.floor());
            prop_assert_eq!(balance.submitted, sent);
        }
    }
}
