//! The update log: an append-only file of checksummed records, and the
//! group-commit writer that makes them durable.
//!
//! # File layout (little-endian)
//!
//! ```text
//!  header v1, 32 bytes  "NANNLOG\0" │ 1 u32 │ dim u32 │ generation u64 │ CRC32C(bytes 0..24) u32 │ 0 u32
//!  header v2, 32 bytes  "NANNLOG\0" │ 2 u32 │ dim u32 │ generation u64 │ payload_len u32 │ CRC32C(bytes 0..28) u32
//!  record               body length u32 │ CRC32C(body) u32 │ body
//!  body                 lsn u64 │ op u8 │ key u64 │ dim x f32 (ops 1, 2, 4, 5) │ payload_len bytes (ops 4, 5)
//!  op                   1 insert, 2 update (keeps the payload), 3 remove,
//!                       4 insert with payload, 5 update with payload (4 and 5: version 2 only)
//! ```
//!
//! An index without payloads writes version 1, byte for byte as before; an
//! index with payloads writes version 2, whose header names the payload
//! length (it must match the snapshot's) and whose records may carry a
//! payload. This build reads both.
//!
//! A reader stops at the first record that is short, has an impossible
//! length, a wrong checksum or a sequence number that does not grow: that
//! is the torn tail a crash leaves, and nothing after it was acknowledged
//! (an fsync covers every byte written before it, so no later record can
//! be durable while an earlier one is torn).
//!
//! # Group commit
//!
//! ```text
//!   op thread:  append(record) ──► lsn ──► wait_durable(lsn) ──► Ok / Err
//!                    │                          ▲
//!                    ▼                          │ notify_all
//!   shared:     buffer ── the first waiter to find no flush running becomes
//!                         the leader: (GroupCommit: waits the interval to
//!                         gather more) takes the buffer, writes, fsyncs,
//!                         publishes durable_lsn
//! ```
//!
//! With [`Durability::PerOp`] the leader flushes at once, so a lone writer
//! pays one fsync per operation and concurrent writers still share fsyncs.
//! A failed write or fsync fails every operation of its batch (and only
//! those: every failed batch's range is kept, so a later batch's success
//! never reports an earlier failed record durable); the file is cut back
//! to its last durable length (never below its header, which is fsynced
//! when the file is created) and the cut fsynced. If that fails the log is
//! closed and every later operation fails until the index is reopened. A
//! failed fsync leaves the batch's fate on disk unknown until the cut is
//! durable: its operations are reported failed and were not applied.

use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::io::error as io_error;
use super::storage::{Storage, StorageFile};
use super::FormatError;
use crate::error::{Error, Result};

const MAGIC: [u8; 8] = *b"NANNLOG\0";
/// The log version of an index without payloads.
const VERSION_PLAIN: u32 = 1;
/// The log version of an index with payloads: `payload_len` in the header,
/// ops 4 and 5.
const VERSION_PAYLOADS: u32 = 2;
/// Bytes of the log file header.
pub(crate) const HEADER_LEN: usize = 32;
/// Bytes of a record's length and checksum fields.
const FRAME_LEN: usize = 8;
/// Bytes of a body without its vector.
const BODY_FIXED: usize = 8 + 1 + 8;

/// Call site of the fsync of update-log records.
pub const SYNC_LOG_FILE: &str = "log file";
/// Call site of the directory fsync after a new log file is created.
pub const SYNC_LOG_DIR: &str = "log directory";

/// When an operation's log record must be durable.
///
/// Both return from a write only once it is durable; they differ in how
/// many writes share an fsync. `PerOp` flushes at once (writers that arrive
/// together still share one); `GroupCommit` waits up to its window for
/// more, trading each write's latency for fewer fsyncs under load.
///
/// ```
/// use std::time::Duration;
/// use nann::{Durability, DurableIndex, DurableOptions, IndexParams, Metric};
/// let dir = std::env::temp_dir().join(format!("nann-doc-group-{}", std::process::id()));
/// # let _ = std::fs::remove_dir_all(&dir);
/// let options = DurableOptions::new(Durability::GroupCommit(Duration::from_millis(2)));
/// let index = DurableIndex::create(&dir, IndexParams::new(2, Metric::L2), options)?;
/// std::thread::scope(|s| {
///     for t in 0..4u64 {
///         let index = &index;
///         // The four writers' records share fsyncs.
///         s.spawn(move || index.insert(t, &[t as f32, 0.0]).unwrap());
///     }
/// });
/// assert_eq!(index.index().len(), 4);
/// # drop(index);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), nann::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Flush and fsync as soon as the operation is logged (concurrent
    /// operations still share one fsync).
    PerOp,
    /// Gather records for up to this long, then flush and fsync them
    /// together; each operation still returns only once it is durable.
    GroupCommit(Duration),
}

/// One logged operation.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum LogOp {
    Insert(u64, Vec<f32>),
    Update(u64, Vec<f32>),
    Remove(u64),
    InsertWithPayload(u64, Vec<f32>, Vec<u8>),
    UpdateWithPayload(u64, Vec<f32>, Vec<u8>),
}

/// A borrowed [`LogOp`], for encoding without a copy.
#[derive(Debug, Clone, Copy)]
pub(crate) enum LogOpRef<'a> {
    Insert(u64, &'a [f32]),
    Update(u64, &'a [f32]),
    Remove(u64),
    InsertWithPayload(u64, &'a [f32], &'a [u8]),
    UpdateWithPayload(u64, &'a [f32], &'a [u8]),
}

/// A decoded record.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LogRecord {
    pub(crate) lsn: u64,
    pub(crate) op: LogOp,
}

/// The header of a log file: version 1 without payloads (`payload_len`
/// 0), version 2 with them.
pub(crate) fn encode_header(dim: u32, payload_len: u32, generation: u64) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[..8].copy_from_slice(&MAGIC);
    out[12..16].copy_from_slice(&dim.to_le_bytes());
    out[16..24].copy_from_slice(&generation.to_le_bytes());
    if payload_len == 0 {
        out[8..12].copy_from_slice(&VERSION_PLAIN.to_le_bytes());
        let crc = crc32c::crc32c(&out[..24]);
        out[24..28].copy_from_slice(&crc.to_le_bytes());
    } else {
        out[8..12].copy_from_slice(&VERSION_PAYLOADS.to_le_bytes());
        out[24..28].copy_from_slice(&payload_len.to_le_bytes());
        let crc = crc32c::crc32c(&out[..28]);
        out[28..32].copy_from_slice(&crc.to_le_bytes());
    }
    out
}

/// What a log file's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogHeader {
    /// Valid: the generation it names.
    Valid { generation: u64 },
    /// Short or failing its checksum: a file a crash caught right after its
    /// creation (it holds no acknowledged record).
    Torn,
}

/// Decodes a log header; a valid header for another dimension, payload
/// length or version is an error (the file belongs to another index or a
/// newer nann).
pub(crate) fn decode_header(
    bytes: &[u8],
    dim: u32,
    payload_len: u32,
) -> Result<LogHeader, FormatError> {
    let Some(head) = bytes.get(..HEADER_LEN) else {
        return Ok(LogHeader::Torn);
    };
    let le32 = |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
    // Each version has its checksum in its own place; a header that
    // passes neither is torn.
    let v1 = crc32c::crc32c(&head[..24]) == le32(24);
    let v2 = crc32c::crc32c(&head[..28]) == le32(28);
    if !v1 && !v2 {
        return Ok(LogHeader::Torn);
    }
    if head[..8] != MAGIC {
        return Err(FormatError::NotAnIndex);
    }
    let logged_payload_len = match le32(8) {
        VERSION_PLAIN if v1 => 0,
        VERSION_PAYLOADS if v2 => {
            if le32(24) == 0 {
                return Err(FormatError::Corrupt(
                    "update log of format version 2 with a payload length of 0".into(),
                ));
            }
            le32(24)
        }
        // A known version under the other version's checksum: torn.
        VERSION_PLAIN | VERSION_PAYLOADS => return Ok(LogHeader::Torn),
        found => return Err(FormatError::UnsupportedVersion { found }),
    };
    if le32(12) != dim {
        return Err(FormatError::Corrupt(format!(
            "update log for dimension {}, the snapshot has {dim}",
            le32(12)
        )));
    }
    if logged_payload_len != payload_len {
        return Err(FormatError::Corrupt(format!(
            "update log for {logged_payload_len}-byte payloads, the snapshot has \
             {payload_len}-byte payloads (the log belongs to another index)"
        )));
    }
    let mut generation = [0u8; 8];
    generation.copy_from_slice(&head[16..24]);
    Ok(LogHeader::Valid {
        generation: u64::from_le_bytes(generation),
    })
}

/// Appends one framed record to `out`. A payload is written as given: the
/// caller checked its length against the index's (and so the log's). An
/// empty payload (an index without payloads) is logged as the plain
/// operation, which it is, so version-1 logs never hold ops 4 and 5.
pub(crate) fn encode_record(out: &mut Vec<u8>, lsn: u64, op: LogOpRef<'_>) {
    let (code, key, vector, payload): (u8, u64, &[f32], &[u8]) = match op {
        LogOpRef::Insert(k, v) | LogOpRef::InsertWithPayload(k, v, []) => (1, k, v, &[]),
        LogOpRef::Update(k, v) | LogOpRef::UpdateWithPayload(k, v, []) => (2, k, v, &[]),
        LogOpRef::Remove(k) => (3, k, &[], &[]),
        LogOpRef::InsertWithPayload(k, v, p) => (4, k, v, p),
        LogOpRef::UpdateWithPayload(k, v, p) => (5, k, v, p),
    };
    let body_len = BODY_FIXED + 4 * vector.len() + payload.len();
    let start = out.len();
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&lsn.to_le_bytes());
    out.push(code);
    out.extend_from_slice(&key.to_le_bytes());
    for x in vector {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out[start + FRAME_LEN..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes the records after the header, in order, up to the torn tail.
/// Returns them and the byte length of the valid prefix (header included).
/// `payload_len` is the header's (0 for a version-1 log, which has no
/// records with payloads).
pub(crate) fn decode_records(
    bytes: &[u8],
    dim: usize,
    payload_len: usize,
) -> (Vec<LogRecord>, usize) {
    /// What a body holds after its fixed fields, from its length.
    #[derive(PartialEq)]
    enum Shape {
        Bare,
        Vector,
        VectorAndPayload,
    }
    let mut records = Vec::new();
    let mut at = HEADER_LEN.min(bytes.len());
    let mut last_lsn = 0u64;
    let with_vector = BODY_FIXED + 4 * dim;
    // dim >= 1 and payload_len >= 1 (when present) keep the shapes apart.
    let with_payload = (payload_len > 0).then_some(with_vector + payload_len);
    while let Some(frame) = bytes.get(at..at + FRAME_LEN) {
        let body_len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
        let crc = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
        let shape = if body_len == BODY_FIXED {
            Shape::Bare
        } else if body_len == with_vector {
            Shape::Vector
        } else if Some(body_len) == with_payload {
            Shape::VectorAndPayload
        } else {
            break;
        };
        let Some(body) = bytes.get(at + FRAME_LEN..at + FRAME_LEN + body_len) else {
            break;
        };
        if crc32c::crc32c(body) != crc {
            break;
        }
        let mut lsn = [0u8; 8];
        lsn.copy_from_slice(&body[..8]);
        let lsn = u64::from_le_bytes(lsn);
        let mut key = [0u8; 8];
        key.copy_from_slice(&body[9..17]);
        let key = u64::from_le_bytes(key);
        let vector = || -> Vec<f32> {
            body[BODY_FIXED..with_vector]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let payload = || body[with_vector..].to_vec();
        let op = match (body[8], shape) {
            (1, Shape::Vector) => LogOp::Insert(key, vector()),
            (2, Shape::Vector) => LogOp::Update(key, vector()),
            (3, Shape::Bare) => LogOp::Remove(key),
            (4, Shape::VectorAndPayload) => LogOp::InsertWithPayload(key, vector(), payload()),
            (5, Shape::VectorAndPayload) => LogOp::UpdateWithPayload(key, vector(), payload()),
            _ => break,
        };
        if lsn <= last_lsn {
            break;
        }
        last_lsn = lsn;
        records.push(LogRecord { lsn, op });
        at += FRAME_LEN + body_len;
    }
    (records, at)
}

/// The group-commit writer of one log file at a time.
pub(crate) struct LogWriter {
    state: Mutex<WriterState>,
    durable: Condvar,
    mode: Durability,
}

impl std::fmt::Debug for LogWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("LogWriter")
            .field("path", &state.path)
            .field("next_lsn", &state.next_lsn)
            .field("durable_lsn", &state.durable_lsn)
            .field("mode", &self.mode)
            .finish()
    }
}

struct WriterState {
    /// `None` while a flush has it (the flushing thread works without the
    /// lock, so operations keep appending to the buffer meanwhile).
    file: Option<Box<dyn StorageFile>>,
    path: PathBuf,
    /// Encoded records not yet handed to a flush.
    buffer: Vec<u8>,
    next_lsn: u64,
    /// Every record with a smaller or equal lsn is durable.
    durable_lsn: u64,
    /// Bytes of the file known durable.
    file_len: u64,
    flushing: bool,
    /// Every failed batch since the file was opened: its lsn range and the
    /// error its waiters get. Checked before `durable_lsn`: a later batch
    /// that succeeded moves `durable_lsn` past a failed one's records.
    failed: Vec<(u64, u64, Error)>,
    /// Set when the file could not be restored after a failure.
    closed: Option<Error>,
}

impl LogWriter {
    /// A writer appending to `file` (whose durable length is `file_len`),
    /// handing out sequence numbers from `next_lsn`.
    pub(crate) fn new(
        file: Box<dyn StorageFile>,
        path: PathBuf,
        file_len: u64,
        next_lsn: u64,
        mode: Durability,
    ) -> Self {
        Self {
            state: Mutex::new(WriterState {
                file: Some(file),
                path,
                buffer: Vec::new(),
                next_lsn,
                durable_lsn: next_lsn - 1,
                file_len,
                flushing: false,
                failed: Vec::new(),
                closed: None,
            }),
            durable: Condvar::new(),
            mode,
        }
    }

    fn lock(&self) -> MutexGuard<'_, WriterState> {
        // The state stays consistent across a panicking holder (every
        // update below is a few plain assignments).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Buffers a record and returns its sequence number.
    pub(crate) fn append(&self, op: LogOpRef<'_>) -> Result<u64> {
        let mut state = self.lock();
        if let Some(e) = &state.closed {
            return Err(e.clone());
        }
        let lsn = state.next_lsn;
        state.next_lsn += 1;
        encode_record(&mut state.buffer, lsn, op);
        Ok(lsn)
    }

    /// The largest sequence number handed out so far.
    pub(crate) fn last_lsn(&self) -> u64 {
        self.lock().next_lsn - 1
    }

    /// Returns once record `lsn` is durable, or with the error that lost it.
    pub(crate) fn wait_durable(&self, lsn: u64) -> Result<()> {
        let mut state = self.lock();
        loop {
            if let Some((_, _, e)) = state
                .failed
                .iter()
                .find(|(from, to, _)| (*from..=*to).contains(&lsn))
            {
                return Err(e.clone());
            }
            if state.durable_lsn >= lsn {
                return Ok(());
            }
            if let Some(e) = &state.closed {
                return Err(e.clone());
            }
            if state.flushing {
                state = self.durable.wait(state).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            // Lead a flush.
            state.flushing = true;
            if let Durability::GroupCommit(interval) = self.mode {
                drop(state);
                std::thread::sleep(interval);
                state = self.lock();
            }
            let batch = std::mem::take(&mut state.buffer);
            let from = state.durable_lsn + 1;
            let to = state.next_lsn - 1;
            let path = state.path.clone();
            let Some(mut file) = state.file.take() else {
                // Unreachable: only the flushing thread takes the file.
                state.flushing = false;
                return Err(Error::InvalidParameter {
                    name: "update log",
                    reason: "no file to flush to".into(),
                });
            };
            drop(state);
            let outcome = file
                .append(&batch)
                .map_err(|e| io_error("append to update log", &path, e))
                .and_then(|()| sync_log(file.as_mut(), &path));
            state = self.lock();
            match outcome {
                Ok(()) => {
                    state.file_len += batch.len() as u64;
                    state.durable_lsn = to;
                }
                Err(e) => {
                    // Cut the failed batch off so no later record follows
                    // garbage, and make the cut durable so the batch cannot
                    // come back after a crash; if either fails, close the
                    // log.
                    let cut = file
                        .truncate(state.file_len)
                        .map_err(|t| io_error("truncate update log", &path, t))
                        .and_then(|()| sync_log(file.as_mut(), &path));
                    if let Err(t) = cut {
                        state.closed = Some(t);
                    }
                    state.failed.push((from, to, e));
                }
            }
            state.file = Some(file);
            state.flushing = false;
            self.durable.notify_all();
        }
    }

    /// Switches to a new file. The caller guarantees no operation is in
    /// flight (so the buffer is empty and no flush runs).
    pub(crate) fn rotate(&self, file: Box<dyn StorageFile>, path: PathBuf, file_len: u64) {
        let mut state = self.lock();
        state.file = Some(file);
        state.path = path;
        state.file_len = file_len;
        // Records still buffered belong to operations that were told the
        // old log failed or closed: they must not reach the new one.
        // Their lsns are settled (failed): the next batch starts after them.
        state.buffer.clear();
        state.durable_lsn = state.next_lsn - 1;
        state.failed.clear();
        state.closed = None;
    }
}

/// Creates log file `generation` in `dir`: header written, name durable.
pub(crate) fn create_log_file(
    storage: &dyn Storage,
    dir: &Path,
    dim: u32,
    payload_len: u32,
    generation: u64,
) -> Result<(Box<dyn StorageFile>, PathBuf, u64)> {
    let path = dir.join(log_file_name(generation));
    let mut file = storage
        .create(&path)
        .map_err(|e| io_error("create update log", &path, e))?;
    // The header is made durable now, so a failed first batch is cut back
    // to it, not past it (which would lose the whole generation), and the
    // name with the directory fsync.
    let header = encode_header(dim, payload_len, generation);
    let written = file
        .append(&header)
        .map_err(|e| io_error("write update log header", &path, e))
        .and_then(|()| sync_log(file.as_mut(), &path))
        .and_then(|()| {
            storage
                .sync_dir(dir, SYNC_LOG_DIR)
                .map_err(|e| io_error("fsync directory", dir, e))
        });
    if let Err(e) = written {
        // Best effort: a half-made log left behind would make the next try
        // at this generation fail on its name.
        drop(file);
        let _ = storage.remove(&path);
        return Err(e);
    }
    Ok((file, path, HEADER_LEN as u64))
}

/// Fsyncs a log file (call site [`SYNC_LOG_FILE`]), the error naming it.
fn sync_log(file: &mut dyn StorageFile, path: &Path) -> Result<()> {
    file.sync(SYNC_LOG_FILE)
        .map_err(|e| io_error("fsync update log", path, e))
}

/// `log-<generation, 16 hex digits>.wal`.
pub(crate) fn log_file_name(generation: u64) -> String {
    format!("log-{generation:016x}.wal")
}

/// The generation a file name denotes, if it is a log file's name.
pub(crate) fn parse_log_file_name(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("log-")?.strip_suffix(".wal")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log file whose appends fail while `fail` is set.
    struct Flaky {
        fail: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    impl StorageFile for Flaky {
        fn append(&mut self, _bytes: &[u8]) -> std::io::Result<()> {
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                Err(std::io::Error::other("injected"))
            } else {
                Ok(())
            }
        }
        fn sync(&mut self, _what: &'static str) -> std::io::Result<()> {
            Ok(())
        }
        fn truncate(&mut self, _len: u64) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failed_batch_stays_failed_after_a_later_batch_succeeds() {
        // Records 1 and 2 go out in a batch that fails; record 3 in a later
        // one that succeeds. Asked afterwards, record 2 is still lost: the
        // later success must not report it durable.
        let fail = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let file = Box::new(Flaky { fail: fail.clone() });
        let log = LogWriter::new(file, PathBuf::from("log"), 32, 1, Durability::PerOp);
        let v = [1.0f32, 2.0];
        let one = log.append(LogOpRef::Insert(1, &v)).unwrap();
        let two = log.append(LogOpRef::Insert(2, &v)).unwrap();
        assert!(log.wait_durable(one).is_err());
        fail.store(false, std::sync::atomic::Ordering::SeqCst);
        let three = log.append(LogOpRef::Insert(3, &v)).unwrap();
        log.wait_durable(three).unwrap();
        assert!(
            log.wait_durable(two).is_err(),
            "a lost record reported durable"
        );
        assert!(log.wait_durable(one).is_err());
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_ends_the_log() {
        let mut bytes = encode_header(3, 0, 7).to_vec();
        encode_record(&mut bytes, 1, LogOpRef::Insert(10, &[1.0, 2.0, 3.0]));
        encode_record(&mut bytes, 2, LogOpRef::Remove(10));
        encode_record(&mut bytes, 5, LogOpRef::Update(11, &[4.0, 5.0, 6.0]));
        assert_eq!(
            decode_header(&bytes, 3, 0),
            Ok(LogHeader::Valid { generation: 7 })
        );
        let (records, valid) = decode_records(&bytes, 3, 0);
        assert_eq!(valid, bytes.len());
        assert_eq!(
            records,
            vec![
                LogRecord {
                    lsn: 1,
                    op: LogOp::Insert(10, vec![1.0, 2.0, 3.0])
                },
                LogRecord {
                    lsn: 2,
                    op: LogOp::Remove(10)
                },
                LogRecord {
                    lsn: 5,
                    op: LogOp::Update(11, vec![4.0, 5.0, 6.0])
                },
            ]
        );
        // Every truncation keeps exactly the records that fit whole.
        for cut in HEADER_LEN..bytes.len() {
            let (kept, valid) = decode_records(&bytes[..cut], 3, 0);
            assert!(valid <= cut);
            assert!(records.starts_with(&kept));
        }
        // A flipped bit in the middle record ends the log before it.
        let mut flipped = bytes.clone();
        flipped[HEADER_LEN + 8 + 29 + 8 + 3] ^= 1;
        assert_eq!(decode_records(&flipped, 3, 0).0.len(), 1);
        // A non-growing sequence number ends it too.
        let mut repeated = encode_header(3, 0, 7).to_vec();
        encode_record(&mut repeated, 4, LogOpRef::Remove(1));
        encode_record(&mut repeated, 4, LogOpRef::Remove(2));
        assert_eq!(decode_records(&repeated, 3, 0).0.len(), 1);
    }

    #[test]
    fn a_short_or_damaged_header_reads_as_torn_and_another_dim_is_an_error() {
        let header = encode_header(3, 0, 1);
        assert_eq!(decode_header(&header[..10], 3, 0), Ok(LogHeader::Torn));
        let mut bad = header;
        bad[17] ^= 1;
        assert_eq!(decode_header(&bad, 3, 0), Ok(LogHeader::Torn));
        assert!(decode_header(&header, 4, 0).is_err());
        assert_eq!(parse_log_file_name(&log_file_name(42)), Some(42));
        assert_eq!(parse_log_file_name("log-12.wal"), None);
    }

    #[test]
    fn payload_records_round_trip_in_a_version_2_log_only() {
        let plain = encode_header(2, 0, 9);
        let with = encode_header(2, 3, 9);
        assert_eq!(u32::from_le_bytes(plain[8..12].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(with[8..12].try_into().unwrap()), 2);
        assert_eq!(
            decode_header(&with, 2, 3),
            Ok(LogHeader::Valid { generation: 9 })
        );
        // The payload length must match the snapshot's, both ways.
        assert!(matches!(
            decode_header(&with, 2, 4),
            Err(FormatError::Corrupt(m)) if m.contains("3-byte payloads")
        ));
        assert!(matches!(
            decode_header(&plain, 2, 3),
            Err(FormatError::Corrupt(_))
        ));
        assert!(matches!(
            decode_header(&with, 2, 0),
            Err(FormatError::Corrupt(_))
        ));
        // An empty payload (an index without them) is the plain operation.
        let mut empty = plain.to_vec();
        encode_record(
            &mut empty,
            1,
            LogOpRef::InsertWithPayload(1, &[1.0, 2.0], &[]),
        );
        encode_record(
            &mut empty,
            2,
            LogOpRef::UpdateWithPayload(1, &[3.0, 4.0], &[]),
        );
        assert_eq!(
            decode_records(&empty, 2, 0)
                .0
                .into_iter()
                .map(|r| r.op)
                .collect::<Vec<_>>(),
            vec![
                LogOp::Insert(1, vec![1.0, 2.0]),
                LogOp::Update(1, vec![3.0, 4.0])
            ]
        );
        // A damaged version-2 header reads as torn, like a version-1 one.
        for at in [9, 13, 20, 25, 29] {
            let mut bad = with;
            bad[at] ^= 1;
            assert_eq!(decode_header(&bad, 2, 3), Ok(LogHeader::Torn), "byte {at}");
        }

        let mut bytes = with.to_vec();
        encode_record(
            &mut bytes,
            1,
            LogOpRef::InsertWithPayload(10, &[1.0, 2.0], b"abc"),
        );
        encode_record(&mut bytes, 2, LogOpRef::Insert(11, &[3.0, 4.0]));
        encode_record(&mut bytes, 3, LogOpRef::Update(10, &[5.0, 6.0]));
        encode_record(
            &mut bytes,
            4,
            LogOpRef::UpdateWithPayload(11, &[7.0, 8.0], b"xyz"),
        );
        encode_record(&mut bytes, 5, LogOpRef::Remove(10));
        let want = vec![
            LogOp::InsertWithPayload(10, vec![1.0, 2.0], b"abc".to_vec()),
            LogOp::Insert(11, vec![3.0, 4.0]),
            LogOp::Update(10, vec![5.0, 6.0]),
            LogOp::UpdateWithPayload(11, vec![7.0, 8.0], b"xyz".to_vec()),
            LogOp::Remove(10),
        ];
        let (records, valid) = decode_records(&bytes, 2, 3);
        assert_eq!(valid, bytes.len());
        assert_eq!(
            records.iter().map(|r| r.op.clone()).collect::<Vec<_>>(),
            want
        );
        assert_eq!(
            records.iter().map(|r| r.lsn).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        // Every truncation keeps exactly the records that fit whole.
        for cut in HEADER_LEN..bytes.len() {
            let (kept, valid) = decode_records(&bytes[..cut], 2, 3);
            assert!(valid <= cut);
            assert!(records.starts_with(&kept));
        }
        // Read with another payload length (or none), a payload record has
        // an impossible length: the log ends before it.
        assert!(decode_records(&bytes, 2, 0).0.is_empty());
        assert!(decode_records(&bytes, 2, 4).0.is_empty());
        // An op code that does not match the body's shape ends the log.
        let mut wrong = with.to_vec();
        encode_record(
            &mut wrong,
            1,
            LogOpRef::InsertWithPayload(1, &[1.0, 2.0], b"abc"),
        );
        wrong[HEADER_LEN + FRAME_LEN + 8] = 1; // insert code on a payload body
        let crc = crc32c::crc32c(&wrong[HEADER_LEN + FRAME_LEN..]);
        wrong[HEADER_LEN + 4..HEADER_LEN + 8].copy_from_slice(&crc.to_le_bytes());
        assert!(decode_records(&wrong, 2, 3).0.is_empty());
    }
}
