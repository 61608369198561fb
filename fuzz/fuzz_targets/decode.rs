//! Any bytes from Kafka or HTTP: `decode` returns an event or a rejection, never panics, and a
//! decoded event re-encodes to something that decodes to the same event.
#![no_main]

use chrono::{TimeZone, Utc};
use libfuzzer_sys::fuzz_target;
use tally_core::wire;

fuzz_target!(|data: &[u8]| {
    let now = Utc.with_ymd_and_hms(2026, 11, 22, 12, 0, 0).unwrap();
    if let Ok(event) = wire::decode(data, now) {
        let again = wire::decode(&wire::encode(&event), now).expect("re-encoded event decodes");
        assert_eq!(again, event);
    }
});
