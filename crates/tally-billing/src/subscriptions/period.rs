//! Billing periods: how a subscription's periods follow each other. Pure arithmetic.
//!
//! Period n ends at `anchor + n intervals`, always counted from the anchor: a subscription
//! anchored on January 31 has periods ending February 28 (29 in a leap year), March 31, April
//! 30; one anchored on February 29 renews on February 28 in the years between leap years and
//! on February 29 again in a leap year. This is what Stripe does, and chaining from the
//! previous end instead would drift (Jan 31 → Feb 28 → Mar 28).

use chrono::{DateTime, Months, Utc};
use serde::{Deserialize, Serialize};

/// How periods follow each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum Interval {
    Month,
    Year,
    /// One term with a given end; the subscription ends with it.
    Fixed,
}

impl Interval {
    pub fn as_str(self) -> &'static str {
        match self {
            Interval::Month => "month",
            Interval::Year => "year",
            Interval::Fixed => "fixed",
        }
    }

    fn months(self) -> Option<u32> {
        match self {
            Interval::Month => Some(1),
            Interval::Year => Some(12),
            Interval::Fixed => None,
        }
    }
}

/// The end of period `n` (1 is the first) of a subscription anchored at `anchor`; `None` for a
/// fixed term or beyond the calendar chrono knows.
pub fn period_end(anchor: DateTime<Utc>, interval: Interval, n: u32) -> Option<DateTime<Utc>> {
    let months = interval.months()?.checked_mul(n)?;
    anchor.checked_add_months(Months::new(months))
}

/// The period that contains `at` (its start and end), for a subscription anchored at `anchor`
/// with `at >= anchor`; `None` for a fixed term, or a time beyond chrono's calendar.
pub fn period_containing(
    anchor: DateTime<Utc>,
    interval: Interval,
    at: DateTime<Utc>,
) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let months = interval.months()?;
    // A first guess from whole months between the two, then a step or two to land exactly
    // (month lengths differ, and clamping moves an end by up to three days).
    let elapsed = months_between(anchor, at) / months;
    let mut n = elapsed.saturating_sub(1);
    loop {
        let start = if n == 0 {
            anchor
        } else {
            period_end(anchor, interval, n)?
        };
        let end = period_end(anchor, interval, n + 1)?;
        if at < end {
            return Some((start, end));
        }
        n += 1;
    }
}

/// Whole calendar months from `from` to `to` (by year and month alone; 0 when `to` is before).
fn months_between(from: DateTime<Utc>, to: DateTime<Utc>) -> u32 {
    use chrono::Datelike;
    let months = (i64::from(to.year()) - i64::from(from.year())) * 12 + i64::from(to.month())
        - i64::from(from.month());
    u32::try_from(months.max(0)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn at(y: i32, m: u32, d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, 12, 0, 0).unwrap()
    }

    #[test]
    fn month_ends_clamp_to_the_month_and_come_back() {
        let anchor = at(2027, 1, 31);
        let ends: Vec<_> = (1..=4)
            .map(|n| period_end(anchor, Interval::Month, n).unwrap())
            .collect();
        assert_eq!(
            ends,
            [
                at(2027, 2, 28),
                at(2027, 3, 31),
                at(2027, 4, 30),
                at(2027, 5, 31)
            ]
        );
        let leap = period_end(at(2028, 1, 31), Interval::Month, 1).unwrap();
        assert_eq!(leap, at(2028, 2, 29));
    }

    #[test]
    fn a_leap_day_anchor_renews_on_the_28th_and_then_the_29th() {
        let anchor = at(2028, 2, 29);
        assert_eq!(
            period_end(anchor, Interval::Year, 1).unwrap(),
            at(2029, 2, 28)
        );
        assert_eq!(
            period_end(anchor, Interval::Year, 4).unwrap(),
            at(2032, 2, 29)
        );
        assert_eq!(period_end(anchor, Interval::Fixed, 1), None);
    }

    #[test]
    fn the_period_containing_a_time() {
        let anchor = at(2027, 1, 31);
        assert_eq!(
            period_containing(anchor, Interval::Month, anchor).unwrap(),
            (anchor, at(2027, 2, 28))
        );
        assert_eq!(
            period_containing(anchor, Interval::Month, at(2027, 2, 28)).unwrap(),
            (at(2027, 2, 28), at(2027, 3, 31)),
            "an end belongs to the next period"
        );
        assert_eq!(
            period_containing(anchor, Interval::Month, at(2027, 3, 30)).unwrap(),
            (at(2027, 2, 28), at(2027, 3, 31))
        );
        assert_eq!(
            period_containing(anchor, Interval::Year, at(2031, 6, 1)).unwrap(),
            (at(2031, 1, 31), at(2032, 1, 31))
        );
    }

    proptest! {
        #[test]
        fn the_period_containing_a_time_contains_it_and_is_one_of_the_periods(
            anchor_days in 0i64..3_000, offset_hours in 0i64..200_000, yearly: bool,
        ) {
            let anchor = at(2024, 1, 1) + chrono::TimeDelta::days(anchor_days);
            let moment = anchor + chrono::TimeDelta::hours(offset_hours);
            let interval = if yearly { Interval::Year } else { Interval::Month };
            let (start, end) = period_containing(anchor, interval, moment).unwrap();
            prop_assert!(start <= moment && moment < end);
            let n = (0..2_000).find(|n| period_end(anchor, interval, *n + 1) == Some(end));
            prop_assert!(n.is_some(), "the end is one of the anchor's period ends");
            let n = n.unwrap();
            let expected_start = if n == 0 { anchor } else { period_end(anchor, interval, n).unwrap() };
            prop_assert_eq!(start, expected_start);
        }
    }
}
