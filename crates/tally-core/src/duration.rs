//! Durations in settings: read the way humantime reads them ("250ms", "5s", "35days",
//! "1h 30m"), written in days, hours, minutes, seconds and milliseconds only. (humantime writes
//! months of 30.44 days and years of 365.25: `tally config` showed 35 days as "1month 4days
//! 13h 26m 24s".) Use as `#[serde(with = "tally_core::duration")]`.

use std::time::Duration;

use serde::{Deserializer, Serializer};

/// `d` in the largest whole units that add up to it: "35days", "1h 30m", "250ms", "0s".
pub fn format(d: Duration) -> String {
    let seconds = d.as_secs();
    let nanos = d.subsec_nanos();
    let parts = [
        (seconds / 86_400, "days"),
        (seconds % 86_400 / 3_600, "h"),
        (seconds % 3_600 / 60, "m"),
        (seconds % 60, "s"),
        (u64::from(nanos / 1_000_000), "ms"),
        (u64::from(nanos / 1_000 % 1_000), "us"),
        (u64::from(nanos % 1_000), "ns"),
    ];
    let text: Vec<String> = parts
        .iter()
        .filter(|(value, _)| *value > 0)
        .map(|(value, unit)| match (*value, *unit) {
            (1, "days") => "1day".to_owned(),
            (value, unit) => format!("{value}{unit}"),
        })
        .collect();
    if text.is_empty() {
        "0s".to_owned()
    } else {
        text.join(" ")
    }
}

pub fn serialize<S: Serializer>(d: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format(*d))
}

pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    humantime_serde::deserialize(deserializer)
}

/// For `Option<Duration>` settings: `#[serde(default, with = "tally_core::duration::option")]`.
pub mod option {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        d: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => serializer.serialize_str(&super::format(*d)),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        humantime_serde::deserialize(deserializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_in_days_at_most_and_read_back_the_same() {
        let cases = [
            (Duration::from_secs(35 * 86_400), "35days"),
            (Duration::from_secs(90 * 86_400), "90days"),
            (Duration::from_secs(86_400 + 3_600), "1day 1h"),
            (Duration::from_secs(5_400), "1h 30m"),
            (Duration::from_millis(250), "250ms"),
            (Duration::from_micros(1_500), "1ms 500us"),
            (Duration::ZERO, "0s"),
        ];
        for (duration, text) in cases {
            assert_eq!(format(duration), text);
            assert_eq!(humantime::parse_duration(text).unwrap(), duration, "{text}");
        }
    }
}
