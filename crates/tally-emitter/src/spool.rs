//! The disk spool: where events wait while Kafka is unreachable or slower than the application.
//!
//! A directory of append-only segment files `spool-<seq>.seg`, replayed oldest first. Each record
//! is `[u32 body length][u32 crc32c of body][body]`, body = `[u16 key length][key][payload]`,
//! little-endian. A crash can leave a torn last record; the reader detects it by length or
//! checksum, counts it and skips the rest of that segment. Appends go through a buffer that is
//! written and fsynced by [`Spool::sync`], which the publisher calls every `fsync_interval`.
//!
//! A `LOCK` file, held with an OS lock for the spool's lifetime, keeps two emitters from
//! sharing one directory.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Header bytes in front of every record body.
const HEADER: usize = 8;
/// A body larger than this can only be corruption (events are at most 64 KiB).
const MAX_BODY: usize = 1 << 20;

/// Why an append did not happen.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AppendError {
    #[error("the spool is full ({max_bytes} bytes)")]
    Full { max_bytes: u64 },
    #[error("spool I/O failed: {0}")]
    Io(#[from] io::Error),
}

pub(crate) struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    /// Bytes of records in segment files not yet deleted; zero means nothing waits.
    bytes: AtomicU64,
    writer: Mutex<Writer>,
    _lock: File,
}

struct Writer {
    next_seq: u64,
    active: Option<Active>,
    /// Sealed segments not yet handed to the replayer, oldest first.
    sealed: VecDeque<u64>,
    dirty: bool,
}

struct Active {
    seq: u64,
    file: BufWriter<File>,
    bytes: u64,
}

/// A sealed segment handed to the replayer.
pub(crate) struct Segment {
    pub(crate) path: PathBuf,
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir`; segments left by a previous process
    /// become the replay backlog.
    pub(crate) fn open(dir: &Path, max_bytes: u64, segment_bytes: u64) -> io::Result<Spool> {
        fs::create_dir_all(dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))?;
        lock.try_lock().map_err(|_| {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "spool directory {} is in use by another emitter; give each process its own emitter.spool.dir",
                    dir.display()
                ),
            )
        })?;
        let mut existing = Vec::new();
        let mut bytes = 0;
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if let Some(seq) = segment_seq(&entry.file_name().to_string_lossy()) {
                bytes += entry.metadata()?.len();
                existing.push(seq);
            }
        }
        existing.sort_unstable();
        let next_seq = existing.last().map_or(0, |s| s + 1);
        Ok(Spool {
            dir: dir.to_owned(),
            max_bytes,
            segment_bytes,
            bytes: AtomicU64::new(bytes),
            writer: Mutex::new(Writer {
                next_seq,
                active: None,
                sealed: existing.into(),
                dirty: false,
            }),
            _lock: lock,
        })
    }

    /// Bytes waiting on disk (or in the write buffer) to be replayed.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Acquire)
    }

    /// Appends one record to the active segment (buffered; durable after [`Spool::sync`]).
    pub(crate) fn append(&self, key: &[u8], payload: &[u8]) -> Result<(), AppendError> {
        let body_len = 2 + key.len() + payload.len();
        let record_len = (HEADER + body_len) as u64;
        let mut writer = self.lock();
        if self.bytes() + record_len > self.max_bytes {
            return Err(AppendError::Full {
                max_bytes: self.max_bytes,
            });
        }
        if writer.active.is_none() {
            let seq = writer.next_seq;
            writer.next_seq += 1;
            let file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(self.segment_path(seq))?;
            writer.active = Some(Active {
                seq,
                file: BufWriter::with_capacity(64 * 1024, file),
                bytes: 0,
            });
        }
        let key_len = u16::try_from(key.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "key over 64 KiB"))?;
        let mut crc = crc32c::crc32c(&key_len.to_le_bytes());
        crc = crc32c::crc32c_append(crc, key);
        crc = crc32c::crc32c_append(crc, payload);
        let active = writer
            .active
            .as_mut()
            .expect("active segment was just ensured");
        active.file.write_all(&(body_len as u32).to_le_bytes())?;
        active.file.write_all(&crc.to_le_bytes())?;
        active.file.write_all(&key_len.to_le_bytes())?;
        active.file.write_all(key)?;
        active.file.write_all(payload)?;
        active.bytes += record_len;
        let full = active.bytes >= self.segment_bytes;
        writer.dirty = true;
        self.bytes.fetch_add(record_len, Ordering::AcqRel);
        if full {
            self.seal(&mut writer)?;
        }
        Ok(())
    }

    /// Writes buffered records and fsyncs them; after this they survive a crash.
    pub(crate) fn sync(&self) -> io::Result<()> {
        let mut writer = self.lock();
        if writer.dirty {
            if let Some(active) = writer.active.as_mut() {
                active.file.flush()?;
                active.file.get_ref().sync_data()?;
            }
            writer.dirty = false;
        }
        Ok(())
    }

    /// The oldest segment to replay. Seals the active segment when nothing older waits, so the
    /// replayer can drain the spool completely.
    pub(crate) fn take_oldest(&self) -> io::Result<Option<Segment>> {
        let mut writer = self.lock();
        if writer.sealed.is_empty() && writer.active.as_ref().is_some_and(|a| a.bytes > 0) {
            self.seal(&mut writer)?;
        }
        Ok(writer.sealed.pop_front().map(|seq| Segment {
            path: self.segment_path(seq),
        }))
    }

    /// Deletes a segment whose every record is in Kafka or spooled again (and synced).
    pub(crate) fn remove(&self, segment: &Segment) -> io::Result<()> {
        let len = fs::metadata(&segment.path)?.len();
        fs::remove_file(&segment.path)?;
        self.bytes.fetch_sub(len, Ordering::AcqRel);
        Ok(())
    }

    fn seal(&self, writer: &mut Writer) -> io::Result<()> {
        if let Some(mut active) = writer.active.take() {
            active.file.flush()?;
            active.file.get_ref().sync_data()?;
            writer.sealed.push_back(active.seq);
        }
        Ok(())
    }

    fn segment_path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("spool-{seq:020}.seg"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Writer> {
        // A panic while holding the lock cannot leave the writer half-updated in a way that
        // matters more than losing the spool, so keep going with the inner value.
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn segment_seq(name: &str) -> Option<u64> {
    name.strip_prefix("spool-")?
        .strip_suffix(".seg")?
        .parse()
        .ok()
}

/// Reads the records of one segment, in order.
pub(crate) struct SegmentReader {
    data: Vec<u8>,
    pos: usize,
}

/// One record read back from the spool.
pub(crate) struct SpooledRecord<'a> {
    pub(crate) key: &'a [u8],
    pub(crate) payload: &'a [u8],
}

/// What the reader found at its position.
pub(crate) enum Read<'a> {
    Record(SpooledRecord<'a>),
    End,
    /// A torn or corrupt record; the rest of the segment is skipped.
    Torn,
}

impl SegmentReader {
    pub(crate) fn open(path: &Path) -> io::Result<SegmentReader> {
        Ok(SegmentReader {
            data: fs::read(path)?,
            pos: 0,
        })
    }

    /// Where the next record starts, to come back to with [`SegmentReader::seek`].
    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    pub(crate) fn seek(&mut self, position: usize) {
        self.pos = position.min(self.data.len());
    }

    pub(crate) fn next_record(&mut self) -> Read<'_> {
        let rest = &self.data[self.pos..];
        if rest.is_empty() {
            return Read::End;
        }
        if rest.len() < HEADER {
            self.pos = self.data.len();
            return Read::Torn;
        }
        let body_len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if !(2..=MAX_BODY).contains(&body_len) || rest.len() < HEADER + body_len {
            self.pos = self.data.len();
            return Read::Torn;
        }
        let body = &rest[HEADER..HEADER + body_len];
        let key_len = u16::from_le_bytes([body[0], body[1]]) as usize;
        if crc32c::crc32c(body) != crc || 2 + key_len > body_len {
            self.pos = self.data.len();
            return Read::Torn;
        }
        self.pos += HEADER + body_len;
        Read::Record(SpooledRecord {
            key: &body[2..2 + key_len],
            payload: &body[2 + key_len..],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (key, payload) pairs in order.
    type Records = Vec<(Vec<u8>, Vec<u8>)>;

    fn read_all(path: &Path) -> (Records, usize) {
        let mut reader = SegmentReader::open(path).unwrap();
        let (mut records, mut torn) = (Vec::new(), 0);
        loop {
            match reader.next_record() {
                Read::Record(r) => records.push((r.key.to_vec(), r.payload.to_vec())),
                Read::Torn => torn += 1,
                Read::End => return (records, torn),
            }
        }
    }

    #[test]
    fn records_come_back_in_order_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20, 100).unwrap();
        for i in 0..10u8 {
            spool.append(b"acme", &[i; 30]).unwrap();
        }
        let mut seen = Vec::new();
        while let Some(segment) = spool.take_oldest().unwrap() {
            let (records, torn) = read_all(&segment.path);
            assert_eq!(torn, 0);
            seen.extend(records.into_iter().map(|(k, p)| {
                assert_eq!(k, b"acme");
                p[0]
            }));
            spool.remove(&segment).unwrap();
        }
        assert_eq!(seen, (0..10).collect::<Vec<u8>>());
        assert_eq!(spool.bytes(), 0);
    }

    #[test]
    fn full_spool_refuses_appends() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 100, 1 << 20).unwrap();
        spool.append(b"k", &[0; 50]).unwrap();
        assert!(matches!(
            spool.append(b"k", &[0; 50]),
            Err(AppendError::Full { .. })
        ));
    }

    #[test]
    fn torn_tail_is_detected_and_earlier_records_survive() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path(), 1 << 20, 1 << 20).unwrap();
            for i in 0..3u8 {
                spool.append(b"k", &[i; 10]).unwrap();
            }
            spool.sync().unwrap();
        }
        let path = dir.path().join("spool-00000000000000000000.seg");
        let len = fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 4)
            .unwrap();
        let spool = Spool::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        assert_eq!(spool.bytes(), len - 4);
        let segment = spool.take_oldest().unwrap().unwrap();
        let (records, torn) = read_all(&segment.path);
        assert_eq!(records.len(), 2);
        assert_eq!(torn, 1);
    }

    #[test]
    fn flipped_bit_fails_the_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        spool.append(b"k", b"payload").unwrap();
        let segment = spool.take_oldest().unwrap().unwrap();
        let mut data = fs::read(&segment.path).unwrap();
        let last = data.len() - 1;
        data[last] ^= 1;
        fs::write(&segment.path, data).unwrap();
        assert_eq!(read_all(&segment.path), (vec![], 1));
    }

    #[test]
    fn a_second_spool_on_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Spool::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        let err = Spool::open(dir.path(), 1 << 20, 1 << 20).err().unwrap();
        assert!(err.to_string().contains("in use by another emitter"));
    }

    #[test]
    fn reopening_resumes_sequence_after_existing_segments() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path(), 1 << 20, 1 << 20).unwrap();
            spool.append(b"k", b"first").unwrap();
            spool.sync().unwrap();
        }
        let spool = Spool::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        spool.append(b"k", b"second").unwrap();
        let first = spool.take_oldest().unwrap().unwrap();
        assert_eq!(read_all(&first.path).0[0].1, b"first");
        let second = spool.take_oldest().unwrap().unwrap();
        assert_eq!(read_all(&second.path).0[0].1, b"second");
    }
}
