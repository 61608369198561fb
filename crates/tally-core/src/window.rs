//! Window arithmetic. Usage is counted in one-minute windows and billed in five-minute slots,
//! both aligned to the Unix epoch in UTC (no DST, no leap seconds: Unix time has neither).

use chrono::{DateTime, TimeDelta, Utc};

/// Length of an aggregation window.
pub const MINUTE: TimeDelta = TimeDelta::minutes(1);
/// Length of a billing slot.
pub const SLOT: TimeDelta = TimeDelta::minutes(5);

/// Start of the one-minute window holding `t`.
pub fn minute_start(t: DateTime<Utc>) -> DateTime<Utc> {
    floor(t, 60)
}

/// Start of the hour holding `t` (UTC), for any representable time.
pub fn hour_start(t: DateTime<Utc>) -> DateTime<Utc> {
    floor(t, 3600)
}

/// Start of the five-minute billing slot holding `t`.
pub fn slot_start(t: DateTime<Utc>) -> DateTime<Utc> {
    floor(t, 300)
}

/// End (exclusive) of the five-minute billing slot holding `t`.
pub fn slot_end(t: DateTime<Utc>) -> DateTime<Utc> {
    slot_start(t) + SLOT
}

/// The oldest meter event timestamp Stripe takes when sent at `now`: 35 days back, with an
/// hour's margin (a submission may wait in the outbox a while). A slot older than this is
/// billed with this timestamp by the sink (after a late event or a rebuild alike), and listed
/// by `tally rebuild`.
pub fn oldest_stripe_timestamp(now: DateTime<Utc>) -> DateTime<Utc> {
    now - TimeDelta::days(35) + TimeDelta::hours(1)
}

fn floor(t: DateTime<Utc>, seconds: i64) -> DateTime<Utc> {
    let start = t.timestamp().div_euclid(seconds) * seconds;
    // `start` lies between t - seconds and t, which chrono can always represent for any
    // timestamp further than `seconds` from its range limits; fall back to `t` at the very edge.
    DateTime::from_timestamp(start, 0).unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, TimeZone, Timelike};
    use proptest::prelude::*;

    #[test]
    fn edges() {
        let t =
            Utc.with_ymd_and_hms(2024, 2, 29, 23, 59, 59).unwrap() + TimeDelta::milliseconds(999);
        assert_eq!(
            minute_start(t),
            Utc.with_ymd_and_hms(2024, 2, 29, 23, 59, 0).unwrap()
        );
        assert_eq!(
            slot_start(t),
            Utc.with_ymd_and_hms(2024, 2, 29, 23, 55, 0).unwrap()
        );
        assert_eq!(
            slot_end(t),
            Utc.with_ymd_and_hms(2024, 3, 1, 0, 0, 0).unwrap()
        );
        let before_epoch = Utc.with_ymd_and_hms(1969, 12, 31, 23, 59, 30).unwrap();
        assert_eq!(
            minute_start(before_epoch),
            Utc.with_ymd_and_hms(1969, 12, 31, 23, 59, 0).unwrap()
        );
        let new_year = Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(slot_start(new_year), new_year);
    }

    proptest! {
        #[test]
        fn minute_window_contains_t(secs in -5_000_000_000i64..5_000_000_000, nanos in 0u32..1_000_000_000) {
            let t = DateTime::from_timestamp(secs, nanos).unwrap();
            let m = minute_start(t);
            prop_assert!(m <= t && t < m + MINUTE);
            prop_assert_eq!(m.second(), 0);
            prop_assert_eq!(m.nanosecond(), 0);
            prop_assert_eq!(minute_start(m), m);
        }

        #[test]
        fn slot_holds_its_minutes(secs in -5_000_000_000i64..5_000_000_000, nanos in 0u32..1_000_000_000) {
            let t = DateTime::from_timestamp(secs, nanos).unwrap();
            let s = slot_start(t);
            prop_assert!(s <= minute_start(t) && minute_start(t) < slot_end(t));
            prop_assert_eq!(s.minute() % 5, 0);
            prop_assert_eq!(slot_start(minute_start(t)), s);
            prop_assert_eq!(slot_end(t) - s, SLOT);
        }

        #[test]
        fn leap_days_are_ordinary_days(year in 1972i32..2400, second in 0u32..86_400) {
            prop_assume!((year % 4 == 0 && year % 100 != 0) || year % 400 == 0);
            let day = Utc.with_ymd_and_hms(year, 2, 29, 0, 0, 0).unwrap();
            let t = day + TimeDelta::seconds(i64::from(second));
            let m = minute_start(t);
            prop_assert_eq!((m.month(), m.day()), (2, 29));
            prop_assert_eq!(i64::from(m.num_seconds_from_midnight()), i64::from(second) / 60 * 60);
        }
    }
}
