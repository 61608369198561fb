//! The disk spool: where events wait while Kafka is unreachable or slower than the application.
//!
//! A directory of append-only segment files `spool-<seq>.seg`, replayed oldest first. Each record
//! is `[u32 body length][u32 crc32c of body][body]`, body = `[u16 key length][key][payload]`,
//! little-endian.
//!
//! A record is written whole or not at all: it goes to the file in one write, and a write that
//! fails part way (a full disk, a file size limit) is cut back off the file before the error is
//! returned, so the records after it are never hidden behind a torn one. What the spool counts
//! ([`Spool::bytes`]) is exactly the records it holds. [`Spool::sync`] fsyncs; a caller is told
//! an event is spooled only after a sync that succeeded. A crash can still leave a torn last
//! record (the process died mid-write); the reader detects it by length or checksum, counts it
//! and skips the rest of that segment.
//!
//! The directory is private to the emitter's user (0700, files 0600): it holds usage data. A
//! `LOCK` file, held with an OS lock for the spool's lifetime, keeps two emitters from sharing
//! one directory.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
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
    /// Bytes of whole records in segment files not yet deleted; zero means nothing waits.
    bytes: AtomicU64,
    writer: Mutex<Writer>,
    #[cfg(test)]
    faults: Mutex<Faults>,
    _lock: File,
}

/// Injected failures, for the tests of what a full disk or a failing fsync does.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct Faults {
    /// Bytes that can still be written; a write beyond it writes what fits, then fails.
    pub(crate) write_budget: Option<usize>,
    pub(crate) fail_sync: bool,
}

struct Writer {
    next_seq: u64,
    active: Option<Active>,
    /// Sealed segments not yet handed to the replayer, oldest first, with their record bytes.
    sealed: VecDeque<(u64, u64)>,
    /// Sealed segments whose fsync failed: the next [`Spool::sync`] must fsync them too.
    unsynced: Vec<File>,
    dirty: bool,
}

struct Active {
    seq: u64,
    file: File,
    /// Bytes of whole records written: the file's length, but for a tail a failed write left
    /// behind when it could not even be cut off.
    bytes: u64,
}

/// A sealed segment handed to the replayer.
pub(crate) struct Segment {
    pub(crate) path: PathBuf,
    /// Bytes of whole records in it (what [`Spool::bytes`] counts for it).
    bytes: u64,
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir`; segments left by a previous process
    /// become the replay backlog.
    pub(crate) fn open(dir: &Path, max_bytes: u64, segment_bytes: u64) -> io::Result<Spool> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let permissions = fs::metadata(dir)?.permissions();
        if permissions.mode() & 0o077 != 0 {
            // Created by hand or by an older version: usage data is not for other users.
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        }
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(dir.join("LOCK"))?;
        lock.try_lock().map_err(|_| {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                "another emitter (a `tally emit`, `tally serve` or service) is using it",
            )
        })?;
        let mut existing = Vec::new();
        let mut bytes = 0;
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if let Some(seq) = segment_seq(&entry.file_name().to_string_lossy()) {
                let len = entry.metadata()?.len();
                bytes += len;
                existing.push((seq, len));
            }
        }
        existing.sort_unstable();
        let next_seq = existing.last().map_or(0, |(s, _)| s + 1);
        Ok(Spool {
            dir: dir.to_owned(),
            max_bytes,
            segment_bytes,
            bytes: AtomicU64::new(bytes),
            writer: Mutex::new(Writer {
                next_seq,
                active: None,
                sealed: existing.into(),
                unsynced: Vec::new(),
                dirty: false,
            }),
            #[cfg(test)]
            faults: Mutex::default(),
            _lock: lock,
        })
    }

    /// Bytes of records waiting on disk to be replayed.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Acquire)
    }

    /// Appends one record to the active segment, whole or not at all. Durable after the next
    /// successful [`Spool::sync`].
    pub(crate) fn append(&self, key: &[u8], payload: &[u8]) -> Result<(), AppendError> {
        self.append_record(key, payload, true)
    }

    /// Appends a replayed record whose delivery failed, over `max_bytes` if need be: its
    /// bytes are counted twice only until its old segment is deleted, and refusing it would
    /// keep that segment (and the spool's count) from ever going down.
    pub(crate) fn append_again(&self, key: &[u8], payload: &[u8]) -> Result<(), AppendError> {
        self.append_record(key, payload, false)
    }

    fn append_record(
        &self,
        key: &[u8],
        payload: &[u8],
        within_limit: bool,
    ) -> Result<(), AppendError> {
        let key_len = u16::try_from(key.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "key over 64 KiB"))?;
        let body_len = 2 + key.len() + payload.len();
        let mut record = Vec::with_capacity(HEADER + body_len);
        record.extend_from_slice(&(body_len as u32).to_le_bytes());
        record.extend_from_slice(&[0; 4]); // the checksum, filled in below
        record.extend_from_slice(&key_len.to_le_bytes());
        record.extend_from_slice(key);
        record.extend_from_slice(payload);
        let crc = crc32c::crc32c(&record[HEADER..]);
        record[4..8].copy_from_slice(&crc.to_le_bytes());
        let record_len = record.len() as u64;

        let mut writer = self.lock();
        if within_limit && self.bytes() + record_len > self.max_bytes {
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
                .mode(0o600)
                .open(self.segment_path(seq))?;
            writer.active = Some(Active {
                seq,
                file,
                bytes: 0,
            });
        }
        let active = writer
            .active
            .as_mut()
            .expect("active segment was just ensured");
        if let Err(error) = self.write(&mut active.file, &record) {
            // Cut the partial record off, so the next one follows the last whole one. If even
            // that fails, start a new segment: the tail left here is torn and ends this
            // segment's replay, after every record that was acknowledged.
            if active.file.set_len(active.bytes).is_err() {
                self.seal(&mut writer)?;
            }
            return Err(error.into());
        }
        active.bytes += record_len;
        let full = active.bytes >= self.segment_bytes;
        writer.dirty = true;
        self.bytes.fetch_add(record_len, Ordering::AcqRel);
        if full {
            // The record is written; a failed fsync of the sealed segment is owed to the next
            // sync, which reports it.
            let _ = self.seal(&mut writer);
        }
        Ok(())
    }

    fn write(&self, file: &mut File, record: &[u8]) -> io::Result<()> {
        #[cfg(test)]
        {
            let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(budget) = faults.write_budget.as_mut() {
                if record.len() > *budget {
                    let fits = *budget;
                    *budget = 0;
                    file.write_all(&record[..fits])?;
                    return Err(io::Error::new(
                        io::ErrorKind::StorageFull,
                        "no space left on device (injected)",
                    ));
                }
                *budget -= record.len();
            }
        }
        file.write_all(record)
    }

    /// Fsyncs what was appended; after this it survives a crash. An error means the records
    /// appended since the last successful sync may not.
    pub(crate) fn sync(&self) -> io::Result<()> {
        let mut writer = self.lock();
        if writer.dirty {
            for sealed in &writer.unsynced {
                self.fsync(sealed)?;
            }
            writer.unsynced.clear();
            if let Some(active) = writer.active.as_mut() {
                self.fsync(&active.file)?;
            }
            writer.dirty = false;
        }
        Ok(())
    }

    fn fsync(&self, file: &File) -> io::Result<()> {
        #[cfg(test)]
        if self
            .faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .fail_sync
        {
            return Err(io::Error::other("fsync failed (injected)"));
        }
        file.sync_data()
    }

    #[cfg(test)]
    pub(crate) fn inject(&self, faults: Faults) {
        *self.faults.lock().unwrap_or_else(|e| e.into_inner()) = faults;
    }

    /// The oldest segment to replay. Seals the active segment when nothing older waits, so the
    /// replayer can drain the spool completely.
    pub(crate) fn take_oldest(&self) -> io::Result<Option<Segment>> {
        let mut writer = self.lock();
        if writer.sealed.is_empty() && writer.active.as_ref().is_some_and(|a| a.bytes > 0) {
            self.seal(&mut writer)?;
        }
        Ok(writer.sealed.pop_front().map(|(seq, bytes)| Segment {
            path: self.segment_path(seq),
            bytes,
        }))
    }

    /// Deletes a segment whose every record is in Kafka or spooled again (and synced).
    pub(crate) fn remove(&self, segment: &Segment) -> io::Result<()> {
        fs::remove_file(&segment.path)?;
        // Exactly what was counted for it; never below zero.
        let _ = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |bytes| {
                Some(bytes.saturating_sub(segment.bytes))
            });
        Ok(())
    }

    /// Closes the active segment for appends and hands it to the replayer. Its fsync is done
    /// here; if that fails, the next [`Spool::sync`] tries again (and fails until it works),
    /// so nobody is told its event is spooled while the segment is not durable.
    fn seal(&self, writer: &mut Writer) -> io::Result<()> {
        if let Some(active) = writer.active.take() {
            let synced = self.fsync(&active.file);
            writer.sealed.push_back((active.seq, active.bytes));
            if synced.is_err() {
                writer.unsynced.push(active.file);
                writer.dirty = true;
            }
            synced?;
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

    /// A full disk mid-record: the partial record is cut off, the caller gets the error, and
    /// the records before and after it read back whole, with the count exact.
    #[test]
    fn a_failed_write_leaves_no_torn_record_behind() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        spool.append(b"k", &[1; 20]).unwrap();
        let before = spool.bytes();
        spool.inject(Faults {
            write_budget: Some(10),
            fail_sync: false,
        });
        assert!(matches!(
            spool.append(b"k", &[2; 20]),
            Err(AppendError::Io(e)) if e.kind() == io::ErrorKind::StorageFull
        ));
        assert_eq!(
            spool.bytes(),
            before,
            "nothing counted for the refused record"
        );
        spool.inject(Faults::default());
        spool.append(b"k", &[3; 20]).unwrap();
        spool.sync().unwrap();
        let segment = spool.take_oldest().unwrap().unwrap();
        let (records, torn) = read_all(&segment.path);
        assert_eq!(torn, 0, "no torn record hides the one after it");
        let firsts: Vec<u8> = records.iter().map(|(_, p)| p[0]).collect();
        assert_eq!(firsts, [1, 3]);
        assert_eq!(fs::metadata(&segment.path).unwrap().len(), spool.bytes());
        spool.remove(&segment).unwrap();
        assert_eq!(spool.bytes(), 0);
    }

    #[test]
    fn a_failed_fsync_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        spool.append(b"k", b"event").unwrap();
        spool.inject(Faults {
            write_budget: None,
            fail_sync: true,
        });
        assert!(spool.sync().is_err());
        spool.inject(Faults::default());
        spool.sync().expect("the next sync makes it durable");
    }

    /// A segment sealed while fsync fails stays owed an fsync: the next sync does not report
    /// success until it has made it durable.
    #[test]
    fn a_segment_sealed_without_fsync_is_fsynced_before_any_success() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20, 40).unwrap();
        spool.inject(Faults {
            write_budget: None,
            fail_sync: true,
        });
        // 49 bytes fill the 40-byte segment: it is sealed, and its fsync fails.
        spool.append(b"k", &[1; 38]).unwrap();
        assert!(
            spool.sync().is_err(),
            "the sealed segment is still owed an fsync"
        );
        spool.inject(Faults::default());
        spool.sync().unwrap();
        let segment = spool.take_oldest().unwrap().unwrap();
        assert_eq!(
            read_all(&segment.path).0.len(),
            1,
            "the record is there, whole"
        );
    }

    #[test]
    fn the_directory_and_files_are_private() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("spool");
        let spool = Spool::open(&dir, 1 << 20, 1 << 20).unwrap();
        spool.append(b"k", b"event").unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        let segment = spool.take_oldest().unwrap().unwrap();
        assert_eq!(mode(&segment.path), 0o600);
        assert_eq!(mode(&dir.join("LOCK")), 0o600);
        drop(spool);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let _reopened = Spool::open(&dir, 1 << 20, 1 << 20).unwrap();
        assert_eq!(mode(&dir), 0o700, "an existing directory is made private");
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
        // A replayed record that failed again still goes back in.
        spool.append_again(b"k", &[0; 50]).unwrap();
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
        assert!(err.to_string().contains("another emitter"));
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
