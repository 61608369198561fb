//! Event files `tally backfill` reads: JSON lines, CSV with a header, and Parquet (the archive's
//! own files, or any with the contract's columns). Every record comes out as the wire's JSON,
//! so the event contract decides it exactly as it decides a live event.
//!
//! Records are numbered from 0 in file order (a JSON-lines file's blank lines and a CSV
//! header are not records but keep their place): a backfill resumes at a record's number.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{
    TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType,
    TimestampSecondType,
};
use arrow_array::{Array, ArrayRef};
use arrow_schema::{DataType, TimeUnit};
use chrono::{DateTime, SecondsFormat, Utc};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::{Map, Value};
use tally_core::{wire, MAX_EVENT_BYTES};

use crate::file::{read_each, VERSION_KEY};
use crate::Verdict;

/// The contract's fields a CSV or Parquet file may have, as columns.
const FIELDS: [&str; 6] = ["id", "customer", "meter", "quantity", "timestamp", "source"];

/// What a reader hands each record to: its number and its JSON. An `Err` stops the reading.
pub type EachRecord<'a> = dyn FnMut(u64, &[u8]) -> Result<(), String> + 'a;

/// A file a backfill cannot read; `why` says what to change.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {why}")]
pub struct InputError {
    pub path: String,
    pub why: String,
}

/// How a file holds its events, by its name's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    JsonLines,
    Csv,
    Parquet,
}

impl Format {
    pub fn of(path: &Path) -> Option<Format> {
        let extension = path.extension()?.to_str()?.to_ascii_lowercase();
        match extension.as_str() {
            "jsonl" | "ndjson" | "json" => Some(Format::JsonLines),
            "csv" => Some(Format::Csv),
            "parquet" => Some(Format::Parquet),
            _ => None,
        }
    }
}

/// The files `path` names: itself, or a directory's files of a known format (not in its
/// subdirectories), in name order. Anything else in the directory is an error, so that a
/// typo'd extension is not silently skipped.
pub fn files(path: &Path) -> Result<Vec<PathBuf>, InputError> {
    let error = |why: String| InputError {
        path: path.display().to_string(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| error(e.to_string()))?;
    let candidates = if meta.is_dir() {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(path).map_err(|e| error(e.to_string()))? {
            let entry = entry.map_err(|e| error(e.to_string()))?;
            if !entry
                .file_type()
                .map_err(|e| error(e.to_string()))?
                .is_file()
            {
                // A partitioned export (date=…/part.parquet) or a link is not skipped quietly.
                return Err(InputError {
                    path: entry.path().display().to_string(),
                    why: "not a plain file: backfill reads the files of one directory, not its subdirectories or links; name each directory, or the files".into(),
                });
            }
            found.push(entry.path());
        }
        found.sort();
        if found.is_empty() {
            return Err(error("the directory holds no file".into()));
        }
        found
    } else {
        vec![path.to_owned()]
    };
    for file in &candidates {
        if Format::of(file).is_none() {
            return Err(InputError {
                path: file.display().to_string(),
                why: "not a file backfill reads: name it .jsonl (or .ndjson), .csv or .parquet"
                    .into(),
            });
        }
    }
    Ok(candidates)
}

/// Calls `each(number, json)` for every record of `path` from record `skip` on, in order.
/// `each` may stop the reading with an error of its own.
pub fn read(path: &Path, skip: u64, each: &mut EachRecord<'_>) -> Result<(), InputError> {
    let error = |why: String| InputError {
        path: path.display().to_string(),
        why,
    };
    // A record longer than the contract's bound goes on cut just past it: the contract refuses
    // it as oversize (and Kafka is never asked to carry more than that).
    let mut bounded =
        |number: u64, json: &[u8]| each(number, &json[..json.len().min(MAX_EVENT_BYTES + 1)]);
    match Format::of(path) {
        Some(Format::JsonLines) => json_lines(path, skip, &mut bounded).map_err(error),
        Some(Format::Csv) => csv_rows(path, skip, &mut bounded).map_err(error),
        Some(Format::Parquet) => parquet_rows(path, skip, &mut bounded).map_err(error),
        None => Err(error("not .jsonl, .ndjson, .csv or .parquet".into())),
    }
}

/// A line longer than the contract's bound is passed on cut just past it (the contract refuses
/// it as oversize); the rest of it is read past, never held.
fn json_lines(path: &Path, skip: u64, each: &mut EachRecord<'_>) -> Result<(), String> {
    let mut reader =
        BufReader::with_capacity(1 << 20, File::open(path).map_err(|e| e.to_string())?);
    let mut line = Vec::with_capacity(1024);
    let mut number = 0u64;
    loop {
        line.clear();
        let mut ended = false;
        let mut read_any = false;
        while !ended {
            let buffer = reader.fill_buf().map_err(|e| e.to_string())?;
            if buffer.is_empty() {
                break;
            }
            read_any = true;
            let (chunk, used) = match buffer.iter().position(|&b| b == b'\n') {
                Some(at) => {
                    ended = true;
                    (&buffer[..at], at + 1)
                }
                None => (buffer, buffer.len()),
            };
            let room = (MAX_EVENT_BYTES + 1).saturating_sub(line.len());
            line.extend_from_slice(&chunk[..chunk.len().min(room)]);
            reader.consume(used);
        }
        if !read_any {
            return Ok(());
        }
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if number == 0 && line.starts_with(b"\xEF\xBB\xBF") {
            line.drain(..3); // a byte-order mark
        }
        if number >= skip && !line.iter().all(u8::is_ascii_whitespace) {
            each(number, &line)?;
        }
        number += 1;
    }
}

/// CSV with a header naming the contract's fields (`id`, `customer`, `meter`, `quantity`,
/// `timestamp`, `source`) and dimensions, either as one `dimensions` column holding a JSON
/// object or as `dimensions.NAME` columns. An empty cell is a field left out.
fn csv_rows(path: &Path, skip: u64, each: &mut EachRecord<'_>) -> Result<(), String> {
    // Flexible: a row with too few or too many cells is one bad record, not a bad file.
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(path)
        .map_err(|e| e.to_string())?;
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| e.to_string())?
        .iter()
        .map(|h| h.trim().to_owned())
        .collect();
    for header in &headers {
        let known = FIELDS.contains(&header.as_str())
            || header == "dimensions"
            || header
                .strip_prefix("dimensions.")
                .is_some_and(|d| !d.is_empty());
        if !known {
            return Err(format!(
                "column {header:?} is not an event field: the header names id, customer, meter, quantity, timestamp, source, and dimensions (a JSON object) or dimensions.NAME columns"
            ));
        }
    }
    if headers.iter().any(|h| h == "dimensions")
        && headers.iter().any(|h| h.starts_with("dimensions."))
    {
        return Err("the header has both a dimensions column and dimensions.NAME columns: use one or the other".into());
    }
    let mut record = csv::ByteRecord::new();
    let mut json = Vec::with_capacity(256);
    for number in 0u64.. {
        if !reader
            .read_byte_record(&mut record)
            .map_err(|e| format!("record {number}: {e}"))?
        {
            return Ok(());
        }
        if number < skip {
            continue;
        }
        // A ragged row, or one that is not UTF-8, goes on as its own bytes: the contract
        // refuses it as malformed, and `rejected_events` keeps it as it was.
        let text_cells: Option<Vec<&str>> = record
            .iter()
            .map(|cell| std::str::from_utf8(cell).ok())
            .collect();
        let (Some(cells), true) = (text_cells, record.len() == headers.len()) else {
            let raw: Vec<&[u8]> = record.iter().collect();
            each(number, &raw.join(&b","[..]))?;
            continue;
        };
        let mut object = Map::new();
        let mut dimensions = Map::new();
        for (header, cell) in headers.iter().zip(cells) {
            if cell.is_empty() {
                continue;
            }
            let text = cell.to_owned();
            if header == "dimensions" {
                // Passed as written: the contract says what is wrong with it.
                let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
                object.insert("dimensions".into(), value);
            } else if let Some(name) = header.strip_prefix("dimensions.") {
                dimensions.insert(name.to_owned(), Value::String(text));
            } else {
                object.insert(header.clone(), Value::String(text));
            }
        }
        if !dimensions.is_empty() {
            object.insert("dimensions".into(), Value::Object(dimensions));
        }
        json.clear();
        serde_json::to_writer(&mut json, &object).map_err(|e| e.to_string())?;
        each(number, &json)?;
    }
    Ok(())
}

/// Parquet: the archive's own files record by record (an accepted event as the wire encodes
/// it, a refused record's bytes as received); any other file by the contract's columns
/// (strings, or numbers and decimals for `quantity`, timestamps for `timestamp`, a
/// map<string, string> for `dimensions`).
fn parquet_rows(path: &Path, skip: u64, each: &mut EachRecord<'_>) -> Result<(), String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| e.to_string())?;
    let archived = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .is_some_and(|kv| kv.iter().any(|kv| kv.key == VERSION_KEY));
    if archived {
        drop(builder);
        let bytes = bytes::Bytes::from(std::fs::read(path).map_err(|e| e.to_string())?);
        let mut number = 0u64;
        let mut stopped = None;
        read_each(&path.display().to_string(), bytes, |record| {
            if stopped.is_none() && number >= skip {
                let json = match &record.verdict {
                    Verdict::Accepted(event) => wire::encode(event),
                    Verdict::Rejected { payload, .. } => payload.clone(),
                };
                stopped = each(number, &json).err();
            }
            number += 1;
        })
        .map_err(|e| e.to_string())?;
        return stopped.map_or(Ok(()), Err);
    }
    let schema = builder.schema().clone();
    for field in schema.fields() {
        let name = field.name().as_str();
        match field.data_type() {
            DataType::Timestamp(_, None) => {
                return Err(format!(
                    "column {name:?} is a timestamp without a time zone: tally cannot tell which instant it means; write it as a timestamp with a time zone (UTC), or as RFC 3339 text"
                ))
            }
            DataType::Float16 | DataType::Float32 | DataType::Float64 => {
                return Err(format!(
                    "column {name:?} holds binary floating-point numbers, which are not exact: write quantities as decimals, integers or text"
                ))
            }
            _ => {}
        }
        if !FIELDS.contains(&name) && name != "dimensions" {
            return Err(format!(
                "column {name:?} is not an event field: a Parquet file to backfill has the columns id, customer, meter, quantity, timestamp, and optionally source and dimensions"
            ));
        }
    }
    let mut number = 0u64;
    let mut json = Vec::with_capacity(256);
    for batch in builder
        .with_batch_size(8192)
        .build()
        .map_err(|e| e.to_string())?
    {
        let batch = batch.map_err(|e| e.to_string())?;
        let rows = batch.num_rows() as u64;
        if number + rows <= skip {
            number += rows;
            continue;
        }
        let mut columns: Vec<(&str, Column)> = Vec::new();
        for (field, array) in schema.fields().iter().zip(batch.columns()) {
            columns.push((field.name().as_str(), Column::of(array)?));
        }
        for row in 0..batch.num_rows() {
            if number >= skip {
                let mut object = Map::new();
                for (name, column) in &columns {
                    if let Some(value) = column.value(row) {
                        object.insert((*name).to_owned(), value);
                    }
                }
                json.clear();
                serde_json::to_writer(&mut json, &object).map_err(|e| e.to_string())?;
                each(number, &json)?;
            }
            number += 1;
        }
    }
    Ok(())
}

/// One Parquet column, as the wire's JSON wants its values.
enum Column {
    Text(ArrayRef),
    Time(Vec<Option<DateTime<Utc>>>),
    Map(ArrayRef),
}

impl Column {
    fn of(array: &ArrayRef) -> Result<Column, String> {
        let time = |value: Option<i64>, unit: &TimeUnit| {
            value.and_then(|v| match unit {
                TimeUnit::Second => DateTime::from_timestamp(v, 0),
                TimeUnit::Millisecond => DateTime::from_timestamp_millis(v),
                TimeUnit::Microsecond => DateTime::from_timestamp_micros(v),
                TimeUnit::Nanosecond => Some(DateTime::from_timestamp_nanos(v)),
            })
        };
        Ok(match array.data_type() {
            DataType::Timestamp(unit, _) => {
                let values: Vec<Option<i64>> = match unit {
                    TimeUnit::Second => {
                        array.as_primitive::<TimestampSecondType>().iter().collect()
                    }
                    TimeUnit::Millisecond => array
                        .as_primitive::<TimestampMillisecondType>()
                        .iter()
                        .collect(),
                    TimeUnit::Microsecond => array
                        .as_primitive::<TimestampMicrosecondType>()
                        .iter()
                        .collect(),
                    TimeUnit::Nanosecond => array
                        .as_primitive::<TimestampNanosecondType>()
                        .iter()
                        .collect(),
                };
                Column::Time(values.into_iter().map(|v| time(v, unit)).collect())
            }
            DataType::Map(..) => Column::Map(array.clone()),
            _ => Column::Text(arrow_cast::cast(array, &DataType::Utf8).map_err(|e| e.to_string())?),
        })
    }

    fn value(&self, row: usize) -> Option<Value> {
        match self {
            Column::Text(array) => (!array.is_null(row))
                .then(|| Value::String(array.as_string::<i32>().value(row).to_owned())),
            Column::Time(values) => {
                values[row].map(|at| Value::String(at.to_rfc3339_opts(SecondsFormat::AutoSi, true)))
            }
            Column::Map(array) => {
                if array.is_null(row) {
                    return None;
                }
                let entries = array.as_map().value(row);
                let cast = |column: &ArrayRef| arrow_cast::cast(column, &DataType::Utf8).ok();
                let (Some(keys), Some(values)) = (cast(entries.column(0)), cast(entries.column(1)))
                else {
                    // Passed on so that the contract refuses the record (invalid_dimensions).
                    return Some(Value::String("unreadable map".into()));
                };
                let (keys, values) = (keys.as_string::<i32>(), values.as_string::<i32>());
                let map: BTreeMap<String, Value> = (0..entries.len())
                    .map(|i| {
                        let value = if values.is_null(i) {
                            Value::Null
                        } else {
                            Value::String(values.value(i).to_owned())
                        };
                        (keys.value(i).to_owned(), value)
                    })
                    .collect();
                Some(Value::Object(map.into_iter().collect()))
            }
        }
    }
}
