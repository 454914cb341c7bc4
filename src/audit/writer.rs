//! The one writer of an audit directory: takes what handles queued, chains
//! it, writes it at once, and fsyncs in batches (see the module docs for
//! the cadence and the failure rules).
//!
//! [`Disk`] is everything that blocks. It sits behind a mutex only so that
//! each blocking job can own it for the job's length and a panic in one
//! does not lose it; the loop awaits one job at a time, so the lock is never
//! contended.

use std::collections::VecDeque;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::event::{AuditEvent, EventKind, Outcome, envelope};
use super::files::{HEAD_FILE, Hash, Head, LOCK_FILE, segment_name, sync_dir, write_head};
use super::recovery::{Recovered, recover};
use super::seal::{SigningKey, recovery_message};
use super::{AuditConfig, AuditError, Message, Queued, Shared, io_error};
use crate::trusted_fs;

/// How long a failed write waits before it is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// Attempts to write what is queued once cancelled, one [`RETRY`] apart.
const FINAL_ATTEMPTS: u32 = 3;
/// Longest `audit-recovered` reason: well under what would make the event
/// be cut (escaping at most sixfold), so the sealed text is the stored one.
const MAX_RECOVERY_REASON: usize = 8 * 1024;
/// Most messages taken from the queue before writing.
const BATCH_MAX: usize = 4096;

/// The writer loop: spawn [`AuditWriter::run`] once, on the daemon's
/// cancellation tree.
pub struct AuditWriter {
    rx: mpsc::Receiver<Message>,
    shared: Arc<Shared>,
    disk: Arc<Mutex<Disk>>,
    /// The last record given a seq: the next one chains to it.
    chain: Head,
    /// Records chained and not yet handed to `disk`.
    batch: Vec<Line>,
    /// Flush callers, with the seq they wait for.
    waiters: Vec<(u64, oneshot::Sender<()>)>,
    flush_interval: Duration,
    /// The seq before the first record queued through a handle: the last
    /// one on disk at open, plus the records the writer chained itself (a
    /// recovery note), which come first and are no one's to wait for.
    queued_from: u64,
}

/// One record, chained and serialized.
struct Line {
    seq: u64,
    hash: Hash,
    /// The line and its newline.
    bytes: Vec<u8>,
}

/// The audit files, as the writer holds them.
struct Disk {
    dir: PathBuf,
    _lock: Flock<File>,
    /// Seals every `HEAD` written.
    key: Arc<SigningKey>,
    max_file_bytes: u64,
    stdout: bool,
    /// The segment records are appended to; `None` until the next one is
    /// created.
    segment: Option<Segment>,
    next_number: u32,
    /// Chained, not yet written.
    pending: VecDeque<Line>,
    /// Written to `segment` since its last fsync.
    unsynced: Vec<Line>,
    /// The highest seq written to a segment (not necessarily synced). A
    /// seq, not a count: lines a failed sync puts back to be written again
    /// are not counted twice.
    written_seq: u64,
    /// The last record synced.
    synced: Head,
    /// What `HEAD` says, when it is valid.
    committed: Option<Head>,
    /// A segment was created since the directory was last synced.
    dir_dirty: bool,
    /// Writing to stdout failed once (reported once).
    stdout_failed: bool,
}

struct Segment {
    path: PathBuf,
    file: File,
    /// Bytes of whole records written.
    len: u64,
    /// Bytes known synced.
    synced_len: u64,
    /// A failed write or fsync may have left bytes past `len`.
    needs_truncate: bool,
}

// === impl AuditWriter ===

impl AuditWriter {
    /// See [`AuditLog::open`](super::AuditLog::open).
    pub(super) fn open(
        dir: &Path,
        config: &AuditConfig,
        rx: mpsc::Receiver<Message>,
        shared: Arc<Shared>,
        key: Arc<SigningKey>,
    ) -> Result<Self, AuditError> {
        let lock = prepare_dir(dir)?;
        let Recovered {
            chain,
            append_to,
            next_number,
            head,
            notes,
            crash_notes,
        } = recover(dir, &key)?;

        let segment = match append_to {
            Some((_, path, len)) => {
                let file = OpenOptions::new()
                    .write(true)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(io_error(&path))?;
                // The file records are appended to: the agent's, with one
                // name (a second name elsewhere would leak every record).
                let meta = file.metadata().map_err(io_error(&path))?;
                trusted_fs::check_file(&path, &meta, false)?;
                // Whatever a previous run left unsynced is synced before
                // HEAD can name anything after it.
                file.sync_all().map_err(io_error(&path))?;
                Some(Segment {
                    path,
                    file,
                    len,
                    synced_len: len,
                    needs_truncate: false,
                })
            }
            None => None,
        };
        let committed = if head.is_none() && segment.is_none() && next_number == 1 {
            // A new trail: HEAD exists from the start, so a trail with files
            // and no HEAD is always damage.
            write_head(dir, Head::GENESIS, &key)?;
            Some(Head::GENESIS)
        } else {
            head
        };

        let mut writer = Self {
            rx,
            shared,
            disk: Arc::new(Mutex::new(Disk {
                dir: dir.to_owned(),
                _lock: lock,
                key: Arc::clone(&key),
                max_file_bytes: config.max_file_bytes,
                stdout: config.stdout,
                segment,
                next_number,
                pending: VecDeque::new(),
                unsynced: Vec::new(),
                written_seq: chain.seq,
                synced: chain,
                committed,
                dir_dirty: false,
                stdout_failed: false,
            })),
            chain,
            batch: Vec::new(),
            waiters: Vec::new(),
            flush_interval: config.flush_interval,
            queued_from: chain.seq,
        };
        if !notes.is_empty() || !crash_notes.is_empty() {
            // Damage (anything but what a crash leaves) is a denial: the
            // trail is broken there for good (`verify`).
            let decision = if notes.is_empty() {
                Outcome::Info
            } else {
                Outcome::Deny
            };
            let all: Vec<String> = notes.into_iter().chain(crash_notes).collect();
            // Bounded so the record is never cut: the seal signs it whole.
            let reason = bounded_reason(all.join("; "));
            let seq = chain.seq + 1;
            let seal = key.seal(&recovery_message(
                seq,
                &chain.hash,
                decision.as_str(),
                &reason,
            ));
            let event = AuditEvent {
                reason: Some(reason),
                seal: Some(seal),
                ..AuditEvent::new(EventKind::AuditRecovered, decision)
            };
            writer.chain_record(Queued {
                time: humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
                body: event.to_body(),
            });
            writer.queued_from = writer.chain.seq;
        }
        Ok(writer)
    }

    /// The writer loop: batch, write, fsync every `flush_interval`, rotate
    /// by size. On cancel (or once every handle is dropped), drains and
    /// fsyncs what is queued, then returns.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut commit_at: Option<Instant> = None;
        let mut retry_at: Option<Instant> = None;
        let mut closed = false;
        loop {
            if retry_at.is_none() {
                match self.step(&mut commit_at).await {
                    Ok(()) => self.healthy(),
                    Err(error) => {
                        self.failed(error);
                        retry_at = Some(Instant::now() + RETRY);
                    }
                }
            }
            if closed && retry_at.is_none() && self.is_idle() {
                break;
            }
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                message = self.rx.recv(), if retry_at.is_none() && !closed => match message {
                    Some(message) => {
                        self.accept(message);
                        for _ in 1..BATCH_MAX {
                            match self.rx.try_recv() {
                                Ok(message) => self.accept(message),
                                Err(_) => break,
                            }
                        }
                    }
                    None => closed = true,
                },
                () = sleep_until(commit_at), if retry_at.is_none() && commit_at.is_some() => {}
                () = sleep_until(retry_at), if retry_at.is_some() => retry_at = None,
            }
        }
        let shared = Arc::clone(&self.shared);
        self.finish().await;
        // The queue is closed: waiters for records never written learn it.
        shared.written.send_modify(|_| {});
    }

    /// Drains the queue and writes it all, a few times if need be.
    async fn finish(mut self) {
        self.rx.close();
        while let Ok(message) = self.rx.try_recv() {
            self.accept(message);
        }
        for attempt in 1..=FINAL_ATTEMPTS {
            let result = match self.hand_over_and_write().await {
                Ok(()) => self.blocking(Disk::commit).await,
                Err(error) => Err(error),
            };
            match result {
                Ok(()) => {
                    self.resolve_waiters();
                    self.healthy();
                    tracing::debug!(seq = self.chain.seq, "audit writer stopped");
                    return;
                }
                Err(error) => {
                    tracing::warn!(error = %crate::error::Chain(&error), attempt, "writing the audit records queued at shutdown failed");
                    self.shared.set_failure(Some(error));
                    if attempt < FINAL_ATTEMPTS {
                        tokio::time::sleep(RETRY).await;
                    }
                }
            }
        }
        let disk = self.lock_disk();
        tracing::error!(
            lost = disk.pending.len() + disk.unsynced.len(),
            dir = %disk.dir.display(),
            "the audit writer stopped with records it could not write"
        );
    }

    /// Writes what is chained; fsyncs and moves `HEAD` when due (the
    /// interval passed, a flush waits, or the log is recovering).
    async fn step(&mut self, commit_at: &mut Option<Instant>) -> Result<(), Arc<AuditError>> {
        self.hand_over_and_write().await?;
        if self.lock_disk().is_committed() {
            *commit_at = None;
            self.resolve_waiters();
            return Ok(());
        }
        let now = Instant::now();
        let due = *commit_at.get_or_insert(now + self.flush_interval);
        let committed = self.lock_disk().committed;
        let flush_wanted = self
            .waiters
            .iter()
            .any(|(seq, _)| committed.is_none_or(|committed| committed.seq < *seq));
        if due <= now || flush_wanted || self.shared.failure().is_some() {
            self.blocking(Disk::commit).await?;
            *commit_at = None;
            self.resolve_waiters();
        }
        Ok(())
    }

    async fn hand_over_and_write(&mut self) -> Result<(), Arc<AuditError>> {
        let has_pending = {
            let mut disk = self.disk.lock().unwrap_or_else(PoisonError::into_inner);
            disk.pending.extend(self.batch.drain(..));
            !disk.pending.is_empty()
        };
        if has_pending {
            let result = self.blocking(Disk::write).await;
            // Partial progress counts too: what was written is written.
            let written = self
                .lock_disk()
                .written_seq
                .saturating_sub(self.queued_from);
            self.shared.set_written(written);
            result?;
        }
        Ok(())
    }

    fn accept(&mut self, message: Message) {
        match message {
            Message::Record(queued) => self.chain_record(queued),
            Message::Flush(tx) => self.waiters.push((self.chain.seq, tx)),
        }
    }

    /// Gives a record its seq and prev.
    fn chain_record(&mut self, queued: Queued) {
        let seq = self.chain.seq + 1;
        let mut bytes = envelope(seq, &queued.time, self.chain.hash, &queued.body);
        let hash = Hash::of(&bytes);
        bytes.push(b'\n');
        self.chain = Head { seq, hash };
        self.batch.push(Line { seq, hash, bytes });
    }

    /// Answers the flush callers whose records `HEAD` now names.
    fn resolve_waiters(&mut self) {
        let committed = self.lock_disk().committed.map_or(0, |head| head.seq);
        let (done, waiting) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|(seq, _)| *seq <= committed);
        self.waiters = waiting;
        for (_, tx) in done {
            // A caller that stopped waiting is no one to answer.
            let _: Result<(), ()> = tx.send(());
        }
    }

    fn is_idle(&self) -> bool {
        self.batch.is_empty() && self.lock_disk().is_committed()
    }

    fn healthy(&self) {
        if self.shared.failure().is_some()
            && self.lock_disk().is_committed()
            && self.batch.is_empty()
            && self.shared.set_failure(None)
        {
            tracing::info!("the audit log is writable again");
        }
    }

    fn failed(&self, error: Arc<AuditError>) {
        if self.shared.set_failure(Some(Arc::clone(&error))) {
            tracing::error!(
                error = %crate::error::Chain(&error),
                "the audit log cannot be written: recording is refused (so nothing is issued) until it can; retrying every second"
            );
        } else {
            tracing::debug!(error = %crate::error::Chain(&error), "the audit log still cannot be written");
        }
    }

    /// Runs a blocking step of `Disk` on the blocking pool.
    async fn blocking(
        &self,
        step: fn(&mut Disk) -> Result<(), AuditError>,
    ) -> Result<(), Arc<AuditError>> {
        let disk = Arc::clone(&self.disk);
        tokio::task::spawn_blocking(move || {
            step(&mut disk.lock().unwrap_or_else(PoisonError::into_inner))
        })
        .await
        .map_err(AuditError::Job)
        .and_then(|result| result)
        .map_err(Arc::new)
    }

    fn lock_disk(&self) -> std::sync::MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for AuditWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditWriter")
            .field("dir", &self.lock_disk().dir)
            .field("seq", &self.chain.seq)
            .finish_non_exhaustive()
    }
}

// === impl Line ===

impl Line {
    fn head(&self) -> Head {
        Head {
            seq: self.seq,
            hash: self.hash,
        }
    }
}

// === impl Disk ===

impl Disk {
    /// Everything written is synced and named by `HEAD`.
    fn is_committed(&self) -> bool {
        self.pending.is_empty() && self.unsynced.is_empty() && self.committed == Some(self.synced)
    }

    /// Appends every pending record, one `write(2)` per segment touched,
    /// starting a new segment (after syncing the full one) when the next
    /// record would pass `max_file_bytes`.
    fn write(&mut self) -> Result<(), AuditError> {
        while let Some(next_len) = self.pending.front().map(|line| line.bytes.len() as u64) {
            if let Some(segment) = &self.segment
                && segment.len > 0
                && segment.len + next_len > self.max_file_bytes
            {
                self.commit()?;
                self.segment = None;
            }
            if self.segment.is_none() {
                self.segment = Some(self.create_segment()?);
            }
            let Some(segment) = self.segment.as_mut() else {
                continue;
            };
            if segment.needs_truncate {
                segment
                    .file
                    .set_len(segment.len)
                    .map_err(io_error(&segment.path))?;
                segment.needs_truncate = false;
            }
            let mut buf = Vec::new();
            let mut count: usize = 0;
            for line in &self.pending {
                if count > 0
                    && segment.len + (buf.len() + line.bytes.len()) as u64 > self.max_file_bytes
                {
                    break;
                }
                buf.extend_from_slice(&line.bytes);
                count += 1;
            }
            if let Err(source) = segment.file.write_all_at(&buf, segment.len) {
                segment.needs_truncate = true;
                return Err(AuditError::Io {
                    path: segment.path.clone(),
                    source,
                });
            }
            segment.len += buf.len() as u64;
            if let Some(last) = count.checked_sub(1).and_then(|i| self.pending.get(i)) {
                self.written_seq = self.written_seq.max(last.seq);
            }
            self.unsynced.extend(self.pending.drain(..count));
        }
        Ok(())
    }

    /// Syncs the segment, the directory (for a new segment) and then
    /// replaces `HEAD`.
    fn commit(&mut self) -> Result<(), AuditError> {
        if let Some(last) = self.unsynced.last().map(Line::head) {
            let Some(segment) = self.segment.as_mut() else {
                return Err(AuditError::Io {
                    path: self.dir.clone(),
                    source: io::Error::other("records written without a segment"),
                });
            };
            if let Err(source) = segment.file.sync_data() {
                // After a failed fsync the kernel may have dropped the
                // unsynced pages and will not say so again: cut them and
                // write those records once more.
                segment.len = segment.synced_len;
                segment.needs_truncate = true;
                for line in self.unsynced.drain(..).rev() {
                    self.pending.push_front(line);
                }
                return Err(AuditError::Io {
                    path: segment.path.clone(),
                    source,
                });
            }
            segment.synced_len = segment.len;
            self.synced = last;
            let unsynced = std::mem::take(&mut self.unsynced);
            self.print(&unsynced);
        }
        if self.dir_dirty {
            sync_dir(&self.dir).map_err(io_error(&self.dir))?;
            self.dir_dirty = false;
        }
        if self.committed != Some(self.synced) {
            write_head(&self.dir, self.synced, &self.key)?;
            self.committed = Some(self.synced);
        }
        Ok(())
    }

    fn create_segment(&mut self) -> Result<Segment, AuditError> {
        let path = self.dir.join(segment_name(self.next_number));
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
            file,
            len: 0,
            synced_len: 0,
            needs_truncate: false,
        })
    }

    /// `stdout = true`: each synced record as a JSON line. The file is the
    /// record; a failing stdout is reported once and does not fail it.
    fn print(&mut self, lines: &[Line]) {
        if !self.stdout || lines.is_empty() {
            return;
        }
        let mut out = io::stdout().lock();
        let result = lines
            .iter()
            .try_for_each(|line| out.write_all(&line.bytes))
            .and_then(|()| out.flush());
        if let Err(error) = result
            && !std::mem::replace(&mut self.stdout_failed, true)
        {
            tracing::warn!(error = %crate::error::Chain(&error), "printing audit records to stdout failed; the audit files keep them");
        }
    }
}

/// Creates the directory (0700) if missing, refuses one that is not
/// trusted (someone else's, a symlink, writable by others, or under such a
/// directory), and takes the writer's lock.
/// An `audit-recovered` reason cut (on a character boundary, marked) to
/// [`MAX_RECOVERY_REASON`] bytes.
fn bounded_reason(mut reason: String) -> String {
    if reason.len() > MAX_RECOVERY_REASON {
        let total = reason.len();
        let mut end = MAX_RECOVERY_REASON;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        reason.push_str(&format!("…[cut from {total} bytes]"));
    }
    reason
}

fn prepare_dir(dir: &Path) -> Result<Flock<File>, AuditError> {
    trusted_fs::dir(dir, 0o700)?;
    // Refuse to start rather than fail at the first write: a read-only
    // mount (which stops root too) or a directory this user cannot write.
    nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK)
        .map_err(|errno| io_error(dir)(io::Error::from(errno)))?;
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&path)
        .map_err(io_error(&path))?;
    let meta = file.metadata().map_err(io_error(&path))?;
    trusted_fs::check_file(&path, &meta, false)?;
    // HEAD, which the writer replaces and trusts at start, is the agent's
    // too (a copy checked by `verify` may be anyone's).
    let head = dir.join(HEAD_FILE);
    match std::fs::symlink_metadata(&head) {
        Ok(meta) => trusted_fs::check_file(&head, &meta, false)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(&head)(e)),
    }
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, source)| AuditError::Locked {
        path: dir.to_owned(),
        source,
    })
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
