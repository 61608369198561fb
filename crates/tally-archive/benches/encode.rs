//! What the archive's format costs one core: Kafka records decoded by the contract and written
//! as one Parquet file (the archiver's work per record, without Kafka or the store), and the
//! file read back (a rebuild's work per record). `TALLY_BENCH_EVENTS` (default 1,000,000)
//! events of 10,000 customers, 3 meters and a dimension. Baseline in the same run: the
//! contract's decode alone. Run: `scripts/bench.sh archive`. Prints one figure a line.

use std::time::Instant;

use bytes::Bytes;
use chrono::{DateTime, TimeDelta, Utc};
use tally_archive::{file, ArchivedRecord};

fn main() {
    let events: usize = std::env::var("TALLY_BENCH_EVENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let start: DateTime<Utc> = "2026-12-07T11:00:00Z".parse().unwrap();
    let meters = ["api_calls", "tokens", "storage_gb"];
    let payloads: Vec<(Vec<u8>, DateTime<Utc>)> = (0..events)
        .map(|i| {
            let at = start + TimeDelta::milliseconds(i as i64 % 3_600_000);
            let payload = format!(
                r#"{{"id":"0193a0a0-0000-7000-8000-{i:012}","customer":"customer-{}","meter":"{}","quantity":"{}.{:03}","timestamp":"{}","dimensions":{{"model":"m{}"}}}}"#,
                i % 10_000,
                meters[i % 3],
                i % 97,
                i % 1000,
                at.to_rfc3339(),
                i % 4
            );
            (payload.into_bytes(), at)
        })
        .collect();
    let payload_bytes: usize = payloads.iter().map(|(p, _)| p.len()).sum();

    let began = Instant::now();
    let decoded = payloads
        .iter()
        .filter(|(p, at)| tally_core::wire::decode(p, *at).is_ok())
        .count();
    let decode_only = began.elapsed();
    assert_eq!(decoded, events);

    // As the archiver writes: each record decoded and pushed into the file being written.
    let began = Instant::now();
    let mut writer = file::FileWriter::new().unwrap();
    let mut peak_memory = 0;
    for (i, (p, at)) in payloads.iter().enumerate() {
        writer
            .push(ArchivedRecord::decode(p, (i % 16) as i32, i as i64, *at))
            .unwrap();
        if i % 65_536 == 0 {
            peak_memory = peak_memory.max(writer.memory_bytes());
        }
    }
    let written = writer.finish().unwrap().bytes;
    let archive = began.elapsed();

    let began = Instant::now();
    let back = file::decode("bench.parquet", Bytes::from(written.clone())).unwrap();
    let read = began.elapsed();
    assert_eq!(back.len(), events);

    let per_second = |d: std::time::Duration| (events as f64 / d.as_secs_f64()).round();
    println!("events {events}");
    println!(
        "contract_decode_only_events_per_s {}",
        per_second(decode_only)
    );
    println!(
        "archive_decode_and_write_events_per_s {}",
        per_second(archive)
    );
    println!("archive_read_back_events_per_s {}", per_second(read));
    println!("payload_mib {:.1}", payload_bytes as f64 / 1048576.0);
    println!(
        "writer_memory_mib_at_most {:.1}",
        peak_memory as f64 / 1048576.0
    );
    println!("parquet_mib {:.1}", written.len() as f64 / 1048576.0);
    println!(
        "compression_ratio {:.1}",
        payload_bytes as f64 / written.len() as f64
    );
}
