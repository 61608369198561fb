//! One archive file: records as an Arrow batch, written as Parquet (schema version 1,
//! docs/archive.md), and read back.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::builder::{
    BinaryBuilder, Decimal128Builder, Int16Builder, Int32Builder, Int64Builder, MapBuilder,
    StringBuilder, TimestampMicrosecondBuilder,
};
use arrow_array::cast::AsArray;
use arrow_array::types::{
    Decimal128Type, Int16Type, Int32Type, Int64Type, TimestampMicrosecondType,
};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use rust_decimal::Decimal;
use tally_core::{RejectReason, UsageEvent};

use crate::record::{ArchivedRecord, Verdict};
use crate::ArchiveError;

/// The schema version every file states in its key-value metadata under [`VERSION_KEY`].
pub const SCHEMA_VERSION: i32 = 1;
pub const VERSION_KEY: &str = "tally.archive.schema_version";

/// `quantity` is decimal(25, 9): tally's domain is up to 10^15 inclusive with at most 9
/// fraction digits (`tally_core::event::MAX_QUANTITY`, `MAX_QUANTITY_SCALE`): 10^15 at scale 9
/// takes 25 digits. Every quantity is kept exactly.
const QUANTITY_PRECISION: u8 = 25;
const QUANTITY_SCALE: i8 = 9;

/// The record's status column.
const ACCEPTED: &str = "accepted";
const REJECTED: &str = "rejected";

fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// `dimensions`: the map type Arrow's own map builder makes, so that batch and schema agree.
fn dimensions_type() -> DataType {
    MapBuilder::new(None, StringBuilder::new(), StringBuilder::new())
        .finish()
        .data_type()
        .clone()
}

/// The archive's schema, version [`SCHEMA_VERSION`].
pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, true),
        Field::new("customer", DataType::Utf8, true),
        Field::new("meter", DataType::Utf8, true),
        Field::new(
            "quantity",
            DataType::Decimal128(QUANTITY_PRECISION, QUANTITY_SCALE),
            true,
        ),
        Field::new("timestamp", timestamp_type(), true),
        // Nanoseconds past the microsecond `timestamp` holds (0-999): the event's time to the
        // nanosecond, as the aggregator saw it (its duplicate check hashes nanoseconds).
        Field::new("timestamp_ns", DataType::Int16, true),
        Field::new("dimensions", dimensions_type(), true),
        Field::new("source", DataType::Utf8, true),
        Field::new("received_at", timestamp_type(), false),
        Field::new("partition", DataType::Int32, false),
        Field::new("offset", DataType::Int64, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, true),
        Field::new("payload", DataType::Binary, true),
    ]))
}

/// Records arrive one at a time and go out as Arrow batches of this many rows, so a file
/// being written holds its encoded pages and at most one batch of records, not every record.
const BATCH_ROWS: usize = 8192;
/// About what an open file costs before its first record (its column writers and buffers),
/// so that many files of a few records each count toward the flush's size trigger.
const WRITER_BYTES: usize = 64 * 1024;

/// One file being written: records pushed, encoded a batch at a time; [`FileWriter::finish`]
/// answers the file and what it holds.
pub struct FileWriter {
    writer: ArrowWriter<Vec<u8>>,
    pending: Vec<ArchivedRecord>,
    /// About the bytes of `pending` (a rejected record's payload may be 64 KiB).
    pending_bytes: usize,
    records: usize,
    accepted: usize,
    /// Per partition: the first and last offset, and how many records.
    ranges: BTreeMap<i32, (i64, i64, i64)>,
}

/// A finished file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenFile {
    pub bytes: Vec<u8>,
    pub records: usize,
    pub accepted: usize,
    /// Per partition: the first and last offset the file holds, and how many records.
    pub ranges: BTreeMap<i32, (i64, i64, i64)>,
}

impl FileWriter {
    pub fn new() -> Result<FileWriter, ArchiveError> {
        let properties = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_key_value_metadata(Some(vec![KeyValue::new(
                VERSION_KEY.to_owned(),
                SCHEMA_VERSION.to_string(),
            )]))
            .build();
        Ok(FileWriter {
            writer: ArrowWriter::try_new(Vec::new(), schema(), Some(properties))?,
            // Grown as records come: a file of a late hour may hold a handful.
            pending: Vec::new(),
            pending_bytes: 0,
            records: 0,
            accepted: 0,
            ranges: BTreeMap::new(),
        })
    }

    pub fn push(&mut self, record: ArchivedRecord) -> Result<(), ArchiveError> {
        self.records += 1;
        self.accepted += usize::from(record.event().is_some());
        let range =
            self.ranges
                .entry(record.partition)
                .or_insert((record.offset, record.offset, 0));
        range.0 = range.0.min(record.offset);
        range.1 = range.1.max(record.offset);
        range.2 += 1;
        self.pending_bytes += record_bytes(&record);
        self.pending.push(record);
        if self.pending.len() >= BATCH_ROWS {
            self.write_pending()?;
        }
        Ok(())
    }

    pub fn records(&self) -> usize {
        self.records
    }

    /// About the bytes this file holds in memory (what a flush's size trigger counts): its
    /// encoded pages and the records not yet encoded.
    pub fn memory_bytes(&self) -> usize {
        WRITER_BYTES
            + self.writer.bytes_written()
            + self.writer.memory_size()
            + self.pending_bytes
            + self.pending.capacity() * size_of::<ArchivedRecord>()
    }

    fn write_pending(&mut self) -> Result<(), ArchiveError> {
        if !self.pending.is_empty() {
            let batch = batch(&self.pending)?;
            self.writer.write(&batch)?;
            self.pending.clear();
            self.pending_bytes = 0;
        }
        Ok(())
    }

    pub fn finish(mut self) -> Result<WrittenFile, ArchiveError> {
        self.write_pending()?;
        self.writer.finish()?;
        Ok(WrittenFile {
            bytes: std::mem::take(self.writer.inner_mut()),
            records: self.records,
            accepted: self.accepted,
            ranges: self.ranges,
        })
    }
}

/// About the memory a record takes before it is encoded.
fn record_bytes(record: &ArchivedRecord) -> usize {
    const FIXED: usize = 96;
    FIXED
        + match &record.verdict {
            Verdict::Accepted(event) => {
                event.id.len()
                    + event.customer.len()
                    + event.meter.len()
                    + event.source.as_ref().map_or(0, String::len)
                    + event
                        .dimensions
                        .iter()
                        .map(|(k, v)| k.len() + v.len() + 48)
                        .sum::<usize>()
            }
            Verdict::Rejected { payload, .. } => payload.len(),
        }
}

/// Writes `records` as one Parquet file (Snappy pages), in the order given.
pub fn encode(records: &[ArchivedRecord]) -> Result<Vec<u8>, ArchiveError> {
    let mut writer = FileWriter::new()?;
    for record in records {
        writer.push(record.clone())?;
    }
    Ok(writer.finish()?.bytes)
}

/// `records` as one Arrow batch of the archive's schema.
fn batch(records: &[ArchivedRecord]) -> Result<RecordBatch, ArchiveError> {
    let n = records.len();
    let mut id = StringBuilder::new();
    let mut customer = StringBuilder::new();
    let mut meter = StringBuilder::new();
    let mut quantity = Decimal128Builder::with_capacity(n)
        .with_precision_and_scale(QUANTITY_PRECISION, QUANTITY_SCALE)?;
    let mut timestamp = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut timestamp_ns = Int16Builder::with_capacity(n);
    let mut dimensions = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
    let mut source = StringBuilder::new();
    let mut received_at = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut partition = Int32Builder::with_capacity(n);
    let mut offset = Int64Builder::with_capacity(n);
    let mut status = StringBuilder::new();
    let mut reason = StringBuilder::new();
    let mut payload = BinaryBuilder::new();
    for record in records {
        match &record.verdict {
            Verdict::Accepted(event) => {
                id.append_value(&event.id);
                customer.append_value(&event.customer);
                meter.append_value(&event.meter);
                let units =
                    quantity_units(event.quantity).map_err(|why| ArchiveError::Unencodable {
                        partition: record.partition,
                        offset: record.offset,
                        why,
                    })?;
                quantity.append_value(units);
                let (micros, nanos) = micros_and_nanos(event.timestamp);
                timestamp.append_value(micros);
                timestamp_ns.append_value(nanos);
                for (key, value) in &event.dimensions {
                    dimensions.keys().append_value(key);
                    dimensions.values().append_value(value);
                }
                dimensions.append(true)?;
                source.append_option(event.source.as_deref());
                status.append_value(ACCEPTED);
                reason.append_null();
                payload.append_null();
            }
            Verdict::Rejected {
                reason: why,
                payload: bytes,
            } => {
                id.append_null();
                customer.append_null();
                meter.append_null();
                quantity.append_null();
                timestamp.append_null();
                timestamp_ns.append_null();
                dimensions.append(false)?;
                source.append_null();
                status.append_value(REJECTED);
                reason.append_value(why.code());
                payload.append_value(bytes);
            }
        }
        received_at.append_value(micros_and_nanos(record.received_at).0);
        partition.append_value(record.partition);
        offset.append_value(record.offset);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(id.finish()),
        Arc::new(customer.finish()),
        Arc::new(meter.finish()),
        Arc::new(quantity.finish()),
        Arc::new(timestamp.finish()),
        Arc::new(timestamp_ns.finish()),
        Arc::new(dimensions.finish()),
        Arc::new(source.finish()),
        Arc::new(received_at.finish()),
        Arc::new(partition.finish()),
        Arc::new(offset.finish()),
        Arc::new(status.finish()),
        Arc::new(reason.finish()),
        Arc::new(payload.finish()),
    ];
    Ok(RecordBatch::try_new(schema(), columns)?)
}

/// Microseconds since the epoch and the nanoseconds past them. A leap second (chrono counts it
/// as a second 59 longer than a second) stays in its second 59, as the aggregator's windows,
/// which floor whole seconds, keep it: the last microsecond of that second.
fn micros_and_nanos(t: DateTime<Utc>) -> (i64, i16) {
    let nanos = t.timestamp_subsec_nanos().min(999_999_999);
    (
        t.timestamp() * 1_000_000 + i64::from(nanos / 1000),
        (nanos % 1000) as i16,
    )
}

/// A quantity in units of 10^-9, exactly (the contract bounds its scale to 9).
fn quantity_units(quantity: Decimal) -> Result<i128, String> {
    let mut scaled = quantity.normalize();
    if scaled.scale() > QUANTITY_SCALE as u32 {
        return Err(format!(
            "quantity {quantity} has more than {QUANTITY_SCALE} fraction digits"
        ));
    }
    scaled.rescale(QUANTITY_SCALE as u32);
    Ok(scaled.mantissa())
}

/// Reads a file [`encode`] wrote (or any file of schema version 1) back into records.
/// `path` names it in errors.
pub fn decode(path: &str, bytes: Bytes) -> Result<Vec<ArchivedRecord>, ArchiveError> {
    let mut records = Vec::new();
    read_each(path, bytes, |record| records.push(record))?;
    Ok(records)
}

/// Reads a file record by record, a batch of rows decoded at a time, so memory holds one
/// batch rather than the whole file (a 128 MiB file holds millions of records).
pub fn read_each(
    path: &str,
    bytes: Bytes,
    mut each: impl FnMut(ArchivedRecord),
) -> Result<(), ArchiveError> {
    let bad = |why: String| ArchiveError::File {
        path: path.to_owned(),
        why,
    };
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)?;
    let version = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|kv| kv.key == VERSION_KEY))
        .and_then(|kv| kv.value.clone());
    if version.as_deref() != Some(SCHEMA_VERSION.to_string().as_str()) {
        return Err(bad(format!(
            "schema version {version:?}; this tally reads version {SCHEMA_VERSION}"
        )));
    }
    // Every column of version 1, of its type, so that reading a value cannot fail.
    let actual = builder.schema().clone();
    for field in schema().fields() {
        match actual.field_with_name(field.name()) {
            Ok(found) if found.data_type() == field.data_type() => {}
            Ok(found) => {
                return Err(bad(format!(
                    "column {} is {}, not {}",
                    field.name(),
                    found.data_type(),
                    field.data_type()
                )))
            }
            Err(_) => return Err(bad(format!("no column {}", field.name()))),
        }
    }
    for batch in builder.build()? {
        let batch = batch?;
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .cloned()
                .ok_or_else(|| bad(format!("no column {name}")))
        };
        let id = column("id")?;
        let id = id.as_string::<i32>();
        let customer = column("customer")?;
        let customer = customer.as_string::<i32>();
        let meter = column("meter")?;
        let meter = meter.as_string::<i32>();
        let quantity = column("quantity")?;
        let quantity = quantity.as_primitive::<Decimal128Type>();
        let timestamp = column("timestamp")?;
        let timestamp = timestamp.as_primitive::<TimestampMicrosecondType>();
        let timestamp_ns = column("timestamp_ns")?;
        let timestamp_ns = timestamp_ns.as_primitive::<Int16Type>();
        let dimensions = column("dimensions")?;
        let dimensions = dimensions.as_map();
        let source = column("source")?;
        let source = source.as_string::<i32>();
        let received_at = column("received_at")?;
        let received_at = received_at.as_primitive::<TimestampMicrosecondType>();
        let partition = column("partition")?;
        let partition = partition.as_primitive::<Int32Type>();
        let offset = column("offset")?;
        let offset = offset.as_primitive::<Int64Type>();
        let status = column("status")?;
        let status = status.as_string::<i32>();
        let reason = column("reason")?;
        let reason = reason.as_string::<i32>();
        let payload = column("payload")?;
        let payload = payload.as_binary::<i32>();
        let time = |micros: i64| {
            DateTime::<Utc>::from_timestamp_micros(micros)
                .ok_or_else(|| bad(format!("timestamp {micros} µs is out of range")))
        };
        for row in 0..batch.num_rows() {
            let verdict = match status.value(row) {
                ACCEPTED => {
                    let entries = dimensions.value(row);
                    let keys = entries.column(0).as_string::<i32>();
                    let values = entries.column(1).as_string::<i32>();
                    let dimensions: BTreeMap<String, String> = (0..entries.len())
                        .map(|i| (keys.value(i).to_owned(), values.value(i).to_owned()))
                        .collect();
                    Verdict::Accepted(UsageEvent {
                        id: id.value(row).to_owned(),
                        customer: customer.value(row).to_owned(),
                        meter: meter.value(row).to_owned(),
                        quantity: Decimal::from_i128_with_scale(
                            quantity.value(row),
                            QUANTITY_SCALE as u32,
                        )
                        .normalize(),
                        timestamp: time(timestamp.value(row))?
                            + chrono::TimeDelta::nanoseconds(i64::from(timestamp_ns.value(row))),
                        source: (!source.is_null(row)).then(|| source.value(row).to_owned()),
                        dimensions,
                    })
                }
                REJECTED => {
                    let code = reason.value(row);
                    let reason = RejectReason::ALL
                        .into_iter()
                        .find(|r| r.code() == code)
                        .ok_or_else(|| bad(format!("unknown reject reason {code:?}")))?;
                    Verdict::Rejected {
                        reason,
                        payload: payload.value(row).to_vec(),
                    }
                }
                other => return Err(bad(format!("unknown status {other:?}"))),
            };
            each(ArchivedRecord {
                partition: partition.value(row),
                offset: offset.value(row),
                received_at: time(received_at.value(row))?,
                verdict,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    #[test]
    fn records_come_back_exactly_from_a_file() {
        let received = at("2026-12-07T11:05:00.123456Z");
        let records = vec![
            ArchivedRecord::decode(
                br#"{"id":"e1","customer":"acme","meter":"tokens","quantity":"999999999999999.999999999","timestamp":"2026-12-07T11:00:00.5Z","source":"svc","dimensions":{"model":"large","region":"eu"}}"#,
                2,
                40,
                received,
            ),
            ArchivedRecord::decode(
                br#"{"id":"e2","customer":"globex","meter":"api_calls","quantity":"0.000000001","timestamp":"2026-12-07T11:01:00Z"}"#,
                2,
                41,
                received,
            ),
            ArchivedRecord::decode(b"{\"id\": 7", 0, 9, received),
        ];
        assert!(records[0].event().is_some() && records[1].event().is_some());
        let bytes = encode(&records).unwrap();
        let back = decode("test.parquet", Bytes::from(bytes)).unwrap();
        assert_eq!(back, records);
        let quantity = back[0].event().unwrap().quantity;
        assert_eq!(quantity.to_string(), "999999999999999.999999999");
    }

    #[test]
    fn the_largest_quantity_and_a_nanosecond_come_back_and_a_leap_second_keeps_its_minute() {
        let received = at("2026-12-07T11:05:00Z");
        let decode_one = |quantity: &str, timestamp: &str| {
            let event = format!(
                r#"{{"id":"e","customer":"acme","meter":"api_calls","quantity":"{quantity}","timestamp":"{timestamp}"}}"#
            );
            let record = ArchivedRecord::decode(event.as_bytes(), 0, 0, received);
            assert!(record.event().is_some(), "{event}");
            let bytes = encode(std::slice::from_ref(&record)).unwrap();
            (
                record,
                decode("x.parquet", Bytes::from(bytes)).unwrap().remove(0),
            )
        };
        let (sent, back) = decode_one("1000000000000000", "2026-12-07T11:00:00.123456789Z");
        assert_eq!(
            back, sent,
            "the domain's largest quantity, to the nanosecond"
        );
        let (sent, back) = decode_one("1", "2016-12-31T23:59:60.5Z");
        let minute =
            |r: &ArchivedRecord| tally_core::window::minute_start(r.event().unwrap().timestamp);
        assert_eq!(minute(&back), minute(&sent));
        assert_eq!(
            back.event().unwrap().timestamp,
            at("2016-12-31T23:59:59.999999999Z")
        );
    }

    #[test]
    fn rejected_payloads_count_toward_the_memory_a_file_holds() {
        let mut writer = FileWriter::new().unwrap();
        let payload = vec![b'x'; 64 * 1024];
        for offset in 0..100 {
            writer
                .push(ArchivedRecord::decode(
                    &payload,
                    0,
                    offset,
                    at("2026-12-07T11:05:00Z"),
                ))
                .unwrap();
        }
        assert!(
            writer.memory_bytes() >= 100 * 64 * 1024,
            "{}",
            writer.memory_bytes()
        );
    }

    #[test]
    fn a_file_written_a_batch_at_a_time_holds_every_record_in_order() {
        let received = at("2026-12-07T11:05:00Z");
        let records: Vec<ArchivedRecord> = (0..(2 * BATCH_ROWS + 17) as i64)
            .map(|offset| {
                let event = format!(
                    r#"{{"id":"e{offset}","customer":"c{}","meter":"api_calls","quantity":"{offset}.5","timestamp":"2026-12-07T11:00:00Z"}}"#,
                    offset % 7
                );
                ArchivedRecord::decode(event.as_bytes(), (offset % 3) as i32, offset, received)
            })
            .collect();
        let mut writer = FileWriter::new().unwrap();
        for record in &records {
            writer.push(record.clone()).unwrap();
        }
        assert!(writer.memory_bytes() > 0);
        let written = writer.finish().unwrap();
        assert_eq!(
            (written.records, written.accepted),
            (records.len(), records.len())
        );
        assert_eq!(written.ranges[&1], (1, records.len() as i64 - 2, 5467));
        let back = decode("big.parquet", Bytes::from(written.bytes)).unwrap();
        assert_eq!(back, records);
    }

    #[test]
    fn a_file_claiming_version_1_with_a_column_of_another_type_is_refused_not_a_panic() {
        let batch = RecordBatch::try_from_iter([(
            "id",
            Arc::new(arrow_array::Int64Array::from(vec![1])) as ArrayRef,
        )])
        .unwrap();
        let properties = WriterProperties::builder()
            .set_key_value_metadata(Some(vec![KeyValue::new(
                VERSION_KEY.to_owned(),
                SCHEMA_VERSION.to_string(),
            )]))
            .build();
        let mut out = Vec::new();
        let mut writer = ArrowWriter::try_new(&mut out, batch.schema(), Some(properties)).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let error = decode("events/y.parquet", Bytes::from(out)).unwrap_err();
        assert!(error.to_string().contains("column id is Int64"), "{error}");
    }

    #[test]
    fn a_file_of_another_schema_version_is_refused_by_name() {
        let batch = RecordBatch::try_from_iter([(
            "id",
            Arc::new(arrow_array::StringArray::from(vec!["x"])) as ArrayRef,
        )])
        .unwrap();
        let mut out = Vec::new();
        let mut writer = ArrowWriter::try_new(&mut out, batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let error = decode("events/x.parquet", Bytes::from(out)).unwrap_err();
        assert!(
            error.to_string().contains("events/x.parquet")
                && error.to_string().contains("schema version"),
            "{error}"
        );
    }
}
