//! The audit files as one writer holds them: the chain's end, the segment
//! records are appended to, and what is written but not yet synced.
//!
//! [`Disk`] sits behind one mutex shared by every [`AuditLog`] handle and
//! the writer loop. A caller appends its record itself, under the lock:
//! it is chained and handed to the kernel with one `pwrite(2)` before
//! `record` returns, so an acknowledged record survives a crash of the
//! agent with no thread hop and no wake-up. The writer loop syncs in
//! batches and moves `HEAD`; its `fsync` runs outside the lock
//! ([`Disk::begin_sync`], then [`Disk::end_sync`]), so callers keep
//! appending while the disk syncs.
//!
//! Invariants, all under the lock:
//! - the records in `unsynced` are exactly those between the segment's
//!   `synced_len` and its `len`, in order; everything before is synced;
//! - every record before the current segment is synced (a new segment is
//!   started only after the full one is synced, [`Disk::append`]), so a
//!   sync of the current segment makes everything written durable;
//! - while `failure` is set nothing is appended: the writer loop owns the
//!   segment until [`Disk::rewrite`] has put back what a failed write or
//!   sync may have lost;
//! - `pending` (chained, not written) is empty unless `failure` is set.
//!
//! [`AuditLog`]: super::AuditLog

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use nix::fcntl::Flock;
use tokio::sync::oneshot;

use super::event::envelope;
use super::files::{Hash, Head, segment_name};
use super::{AuditError, AuditUnavailable, WRITE_WAIT, io_error};

/// The audit files, as the writer holds them.
pub(super) struct Disk {
    pub dir: PathBuf,
    pub _lock: Flock<File>,
    pub max_file_bytes: u64,
    /// Records written and not yet synced, at most (`queue`): past it,
    /// appending refuses until the writer loop catches up.
    pub capacity: usize,
    /// Synced records are kept in `to_print` for stdout.
    pub stdout: bool,
    /// The last record chained: the next one chains to it.
    pub chain: Head,
    /// The segment records are appended to; `None` until the next one is
    /// created.
    pub segment: Option<Segment>,
    pub next_number: u32,
    /// Chained, not yet written: only after a failure, until
    /// [`Disk::rewrite`].
    pub pending: VecDeque<Line>,
    /// Written to `segment` since its last sync, and when the first of
    /// them was.
    pub unsynced: Vec<Line>,
    pub unsynced_since: Option<Instant>,
    /// The last record synced.
    pub synced: Head,
    /// What `HEAD` says, when it is valid.
    pub committed: Option<Head>,
    /// A segment was created since the directory was last synced.
    pub dir_dirty: bool,
    /// Synced and not yet printed (`stdout = true` only).
    pub to_print: Vec<Line>,
    /// Why appending refuses until the writer loop has recovered.
    pub failure: Option<Arc<AuditError>>,
    /// The writer loop has stopped: nothing more is appended.
    pub stopped: bool,
    /// A sync of this segment number runs outside the lock.
    pub syncing: Option<u32>,
    /// Flush callers, with the seq `HEAD` must name before they are
    /// answered. Here, under the lock, so the writer stopping and a flush
    /// arriving are ordered.
    pub flushes: Vec<(u64, oneshot::Sender<()>)>,
}

/// An open segment.
pub(super) struct Segment {
    pub path: PathBuf,
    /// Shared with a sync running outside the lock.
    pub file: Arc<File>,
    pub number: u32,
    /// Bytes of whole records written.
    pub len: u64,
    /// Bytes known synced.
    pub synced_len: u64,
    /// A failed write or sync may have left bytes past `len`.
    pub needs_truncate: bool,
}

/// One record, chained and serialized.
pub(super) struct Line {
    pub seq: u64,
    pub hash: Hash,
    /// The line and its newline.
    pub bytes: Vec<u8>,
}

/// A sync to run outside the lock: [`Disk::begin_sync`] hands it out,
/// [`Disk::end_sync`] takes its result.
pub(super) struct SyncJob {
    pub file: Arc<File>,
    pub path: PathBuf,
    number: u32,
    len: u64,
    /// The last record it makes durable.
    upto: Head,
}

// === impl Disk ===

impl Disk {
    /// Everything written is synced and named by `HEAD`.
    pub fn is_committed(&self) -> bool {
        self.pending.is_empty() && self.unsynced.is_empty() && self.committed == Some(self.synced)
    }

    /// Chains one record and writes it at the end of the current segment
    /// (starting a new one, after syncing the full one, when it would pass
    /// `max_file_bytes`). Refuses, appending nothing, when the writer has
    /// stopped or failed, or when the unsynced records are at capacity or
    /// have waited [`WRITE_WAIT`] for a sync.
    ///
    /// A write that fails keeps the record (chained, in `pending`) and
    /// fails the log: the writer loop writes it once the disk takes it,
    /// and the caller is refused meanwhile.
    pub fn append(&mut self, time: &str, body: &[u8]) -> Result<(), AuditUnavailable> {
        if self.stopped {
            return Err(AuditUnavailable::Stopped);
        }
        if let Some(source) = &self.failure {
            return Err(AuditUnavailable::Failed {
                source: Arc::clone(source),
            });
        }
        // Synced records waiting to be printed count too: a writer loop
        // stuck printing must not let them pile up past `queue`.
        if self.unsynced.len() + self.to_print.len() >= self.capacity {
            return Err(AuditUnavailable::QueueFull {
                capacity: self.capacity,
            });
        }
        if let Some(since) = self.unsynced_since
            && since.elapsed() >= WRITE_WAIT
        {
            return Err(AuditUnavailable::Stalled { waited: WRITE_WAIT });
        }
        let line = self.chain_line(time, body);
        match self.write_one(&line) {
            Ok(()) => {
                self.mark_written(line);
                Ok(())
            }
            Err(error) => {
                let source = Arc::new(error);
                self.pending.push_back(line);
                self.failure = Some(Arc::clone(&source));
                Err(AuditUnavailable::Failed { source })
            }
        }
    }

    /// Gives a record its seq and prev.
    pub fn chain_line(&mut self, time: &str, body: &[u8]) -> Line {
        let seq = self.chain.seq + 1;
        let mut bytes = envelope(seq, time, self.chain.hash, body);
        let hash = Hash::of(&bytes);
        bytes.push(b'\n');
        self.chain = Head { seq, hash };
        Line { seq, hash, bytes }
    }

    /// Writes one line at the segment's end, rotating first if it would
    /// not fit. On error the segment is left to [`Disk::rewrite`].
    fn write_one(&mut self, line: &Line) -> Result<(), AuditError> {
        let segment = self.segment_for(line.bytes.len() as u64)?;
        if let Err(source) = segment.file.write_all_at(&line.bytes, segment.len) {
            segment.needs_truncate = true;
            return Err(AuditError::Io {
                path: segment.path.clone(),
                source,
            });
        }
        segment.len += line.bytes.len() as u64;
        Ok(())
    }

    fn mark_written(&mut self, line: Line) {
        if self.unsynced.is_empty() {
            self.unsynced_since = Some(Instant::now());
        }
        self.unsynced.push(line);
    }

    /// The segment a line of `len` bytes goes to: the current one, or,
    /// when that would pass `max_file_bytes`, a new one once the full one
    /// is synced (so every record before the current segment is synced).
    /// A sync of the full segment running outside the lock is waited for
    /// by the caller ([`Disk::must_wait_for_sync`]) before it gets here.
    fn segment_for(&mut self, len: u64) -> Result<&mut Segment, AuditError> {
        let full = self
            .segment
            .as_ref()
            .is_some_and(|s| s.len > 0 && s.len + len > self.max_file_bytes);
        if full {
            self.sync_current()?;
            self.segment = None;
        }
        if self.segment.is_none() {
            self.segment = Some(self.create_segment()?);
        }
        match self.segment.as_mut() {
            Some(segment) => {
                if segment.needs_truncate {
                    segment
                        .file
                        .set_len(segment.len)
                        .map_err(io_error(&segment.path))?;
                    segment.needs_truncate = false;
                }
                Ok(segment)
            }
            None => Err(AuditError::Io {
                path: self.dir.clone(),
                source: io::Error::other("no segment to write to"),
            }),
        }
    }

    /// True when appending `len` bytes starts a new segment while a sync
    /// of the current one runs outside the lock: the caller waits for it
    /// to end first, so a segment is never left with records unsynced.
    pub fn must_wait_for_sync(&self, len: usize) -> bool {
        self.segment.as_ref().is_some_and(|s| {
            self.syncing == Some(s.number) && s.len > 0 && s.len + len as u64 > self.max_file_bytes
        })
    }

    /// Syncs the current segment under the lock (before a new one is
    /// started); a failure is the caller's to report.
    fn sync_current(&mut self) -> Result<(), AuditError> {
        if self.unsynced.is_empty() {
            return Ok(());
        }
        let Some(segment) = self.segment.as_ref() else {
            return Ok(());
        };
        let len = segment.len;
        if let Err(source) = segment.file.sync_data() {
            let error = self.io_error_for_current(source);
            self.lost_unsynced();
            return Err(error);
        }
        self.synced_through(len, self.unsynced.len());
        Ok(())
    }

    /// A sync for the writer loop to run outside the lock, when anything
    /// is unsynced and nothing waits to be written again.
    pub fn begin_sync(&mut self) -> Option<SyncJob> {
        if !self.pending.is_empty() || self.unsynced.is_empty() {
            return None;
        }
        let segment = self.segment.as_ref()?;
        let upto = self.unsynced.last().map(Line::head)?;
        self.syncing = Some(segment.number);
        Some(SyncJob {
            file: Arc::clone(&segment.file),
            path: segment.path.clone(),
            number: segment.number,
            len: segment.len,
            upto,
        })
    }

    /// Takes the result of `job`'s sync. A failed sync may have lost every
    /// page written since the last good one: they are cut and written
    /// again ([`Disk::rewrite`]), and the log fails until then.
    pub fn end_sync(&mut self, job: &SyncJob, result: io::Result<()>) -> Result<(), AuditError> {
        self.syncing = None;
        let current = self
            .segment
            .as_ref()
            .is_some_and(|s| s.number == job.number);
        match result {
            Ok(()) if current => {
                let count = self
                    .unsynced
                    .iter()
                    .take_while(|line| line.seq <= job.upto.seq)
                    .count();
                self.synced_through(job.len, count);
                Ok(())
            }
            // The segment was synced whole and left since (a rotation
            // waits for this sync, so this is a segment the writer loop
            // itself replaced after a failure): nothing to mark.
            Ok(()) => Ok(()),
            Err(source) => {
                if current {
                    self.lost_unsynced();
                    // Refuse appending from now, not from when the writer
                    // loop reports it: a record appended meanwhile would
                    // take the place of the records cut, and `written`
                    // would vouch for records no longer in the file.
                    self.failure = Some(Arc::new(AuditError::Io {
                        path: job.path.clone(),
                        source: copy_io_error(&source),
                    }));
                }
                Err(AuditError::Io {
                    path: job.path.clone(),
                    source,
                })
            }
        }
    }

    /// The first `count` unsynced records, ending at byte `len`, are synced.
    fn synced_through(&mut self, len: u64, count: usize) {
        if count == 0 {
            return;
        }
        if let Some(segment) = self.segment.as_mut() {
            segment.synced_len = segment.synced_len.max(len);
        }
        let done: Vec<Line> = self.unsynced.drain(..count).collect();
        if let Some(last) = done.last() {
            self.synced = last.head();
        }
        self.unsynced_since = (!self.unsynced.is_empty()).then(Instant::now);
        if self.stdout {
            self.to_print.extend(done);
        }
    }

    /// After a failed sync: cut the segment back to what is known synced,
    /// and queue every record after it to be written again.
    fn lost_unsynced(&mut self) {
        if let Some(segment) = self.segment.as_mut() {
            segment.len = segment.synced_len;
            segment.needs_truncate = true;
        }
        for line in self.unsynced.drain(..).rev() {
            self.pending.push_front(line);
        }
        self.unsynced_since = None;
    }

    fn io_error_for_current(&self, source: io::Error) -> AuditError {
        AuditError::Io {
            path: self
                .segment
                .as_ref()
                .map_or_else(|| self.dir.clone(), |s| s.path.clone()),
            source,
        }
    }

    /// Writes a record the writer itself chained (at open, a recovery
    /// note), past every check `append` makes.
    pub fn write_now(&mut self, line: Line) -> Result<(), AuditError> {
        self.write_one(&line)?;
        self.mark_written(line);
        Ok(())
    }

    /// The writer loop's recovery: writes every pending record (cutting
    /// the segment back first, starting segments as needed). Until it
    /// succeeds appending refuses; success alone does not clear the
    /// failure (the writer loop clears it once the records are synced and
    /// `HEAD` names them).
    pub fn rewrite(&mut self) -> Result<(), AuditError> {
        while let Some(line) = self.pending.pop_front() {
            if let Err(error) = self.write_one(&line) {
                // A failed sync of a full segment has put the records it
                // cut back in front: this one goes after them.
                let at = self.pending.partition_point(|l| l.seq < line.seq);
                self.pending.insert(at, line);
                return Err(error);
            }
            self.mark_written(line);
        }
        Ok(())
    }

    fn create_segment(&mut self) -> Result<Segment, AuditError> {
        let number = self.next_number;
        let path = self.dir.join(segment_name(number));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io_error(&path))?;
        self.next_number = self.next_number.saturating_add(1);
        self.dir_dirty = true;
        Ok(Segment {
            path,
            file: Arc::new(file),
            number,
            len: 0,
            synced_len: 0,
            needs_truncate: false,
        })
    }
}

impl Disk {
    /// Answers the flush callers whose records `HEAD` now names (all of
    /// them once the writer has stopped: nothing more will be synced).
    pub fn resolve_flushes(&mut self) {
        let committed = self.committed.map_or(0, |head| head.seq);
        let stopped = self.stopped;
        let (done, waiting) = std::mem::take(&mut self.flushes)
            .into_iter()
            .partition(|(seq, _)| stopped || *seq <= committed);
        self.flushes = waiting;
        for (_, tx) in done {
            // A caller that stopped waiting is no one to answer.
            let _: Result<(), ()> = tx.send(());
        }
    }
}

/// The same error again (`io::Error` is not `Clone`).
fn copy_io_error(error: &io::Error) -> io::Error {
    match error.raw_os_error() {
        Some(errno) => io::Error::from_raw_os_error(errno),
        None => io::Error::new(error.kind(), error.to_string()),
    }
}

// === impl Line ===

impl Line {
    pub fn head(&self) -> Head {
        Head {
            seq: self.seq,
            hash: self.hash,
        }
    }
}

/// `stdout = true`: each synced record as a JSON line. The file is the
/// record; a failing stdout is reported once (`failed` remembers) and does
/// not fail it.
pub(super) fn print(lines: &[Line], failed: &mut bool) {
    if lines.is_empty() {
        return;
    }
    let mut out = io::stdout().lock();
    let result = lines
        .iter()
        .try_for_each(|line| out.write_all(&line.bytes))
        .and_then(|()| out.flush());
    if let Err(error) = result
        && !std::mem::replace(failed, true)
    {
        tracing::warn!(error = %crate::error::Chain(&error), "printing audit records to stdout failed; the audit files keep them");
    }
}
