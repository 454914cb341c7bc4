//! The one writer loop of an audit directory: it syncs what callers
//! appended, in batches, and moves `HEAD` (see the module docs for the
//! cadence and the failure rules, and `audit::disk` for who writes what).
//!
//! [`Trail`] is what every handle and the loop share: the [`Disk`] under
//! one mutex, a condition variable for the rare caller that waits for a
//! sync to end before starting a new segment, and the loop's wake-up. The
//! loop is woken once per batch (when a record lands on a synced trail, or
//! a flush is asked for), never per record.

use std::collections::VecDeque;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::disk::{self, Disk, Line, Segment};
use super::event::{AuditEvent, EventKind, Outcome};
use super::files::{HEAD_FILE, Head, LOCK_FILE, sync_dir, write_head};
use super::recovery::{Recovered, recover};
use super::seal::{SigningKey, recovery_message};
use super::{AuditConfig, AuditError, io_error};
use crate::trusted_fs;

/// How long a failed write waits before it is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// Attempts to sync what is written once cancelled, one [`RETRY`] apart.
const FINAL_ATTEMPTS: u32 = 3;
/// Longest `audit-recovered` reason: well under what would make the event
/// be cut (escaping at most sixfold), so the sealed text is the stored one.
const MAX_RECOVERY_REASON: usize = 8 * 1024;

/// What the handles and the writer loop share.
pub(super) struct Trail {
    disk: Mutex<Disk>,
    /// Signalled when a sync running outside the lock ends.
    pub sync_done: Condvar,
    /// Wakes the writer loop: a record landed on a synced trail, or a
    /// flush waits.
    pub wake: Notify,
}

/// The writer loop: spawn [`AuditWriter::run`] once, on the daemon's
/// cancellation tree.
pub struct AuditWriter {
    trail: Arc<Trail>,
    /// Seals every `HEAD` written.
    key: Arc<SigningKey>,
    flush_interval: Duration,
    /// Writing to stdout failed once (reported once).
    stdout_failed: bool,
    /// The current failure has been reported (as an error, once): the
    /// failure itself may have been set by a caller's write or by
    /// [`Disk::end_sync`], before this loop saw it.
    failure_reported: bool,
}

// === impl Trail ===

impl Trail {
    pub fn lock(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

// === impl AuditWriter ===

impl AuditWriter {
    /// See [`AuditLog::open`](super::AuditLog::open).
    pub(super) fn open(
        dir: &Path,
        config: &AuditConfig,
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
            Some((number, path, len)) => {
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
                    file: Arc::new(file),
                    number,
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

        let mut disk = Disk {
            dir: dir.to_owned(),
            _lock: lock,
            max_file_bytes: config.max_file_bytes,
            capacity: config.queue,
            stdout: config.stdout,
            chain,
            segment,
            next_number,
            pending: VecDeque::new(),
            unsynced: Vec::new(),
            unsynced_since: None,
            synced: chain,
            committed,
            dir_dirty: false,
            to_print: Vec::new(),
            failure: None,
            stopped: false,
            syncing: None,
            flushes: Vec::new(),
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
            let time = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
            let line = disk.chain_line(&time, &event.to_body());
            disk.write_now(line)?;
        }
        Ok(Self {
            trail: Arc::new(Trail {
                disk: Mutex::new(disk),
                sync_done: Condvar::new(),
                wake: Notify::new(),
            }),
            key,
            flush_interval: config.flush_interval,
            stdout_failed: false,
            failure_reported: false,
        })
    }

    /// The state the handles share with this loop.
    pub(super) fn trail(&self) -> Arc<Trail> {
        Arc::clone(&self.trail)
    }

    /// The writer loop: sync once per `flush_interval` with records
    /// unsynced (at once for a flush), and after a failure every second
    /// until the trail is whole again. On cancel, syncs what is written
    /// and stops: appending then refuses.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut due: Option<Instant> = None;
        let mut retry_at: Option<Instant> = None;
        loop {
            let (idle, flush_wanted, failed) = {
                let disk = self.trail.lock();
                (
                    disk.is_committed(),
                    !disk.flushes.is_empty(),
                    disk.failure.is_some(),
                )
            };
            let now = Instant::now();
            let sync_now = if failed {
                retry_at.is_none_or(|at| at <= now)
            } else if idle {
                // A flush of what is already committed is answered at once.
                due = None;
                flush_wanted
            } else {
                let at = *due.get_or_insert(now + self.flush_interval);
                flush_wanted || at <= now
            };
            if sync_now {
                due = None;
                match self.commit().await {
                    Ok(()) => retry_at = None,
                    Err(error) => {
                        self.failed(&error);
                        retry_at = Some(Instant::now() + RETRY);
                    }
                }
                continue;
            }
            let wait_until = if failed { retry_at } else { due };
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                () = self.trail.wake.notified() => {}
                () = sleep_until(wait_until) => {}
            }
        }
        self.finish().await;
    }

    /// Stops appending, then syncs what is written, a few times if need be.
    async fn finish(mut self) {
        self.trail.lock().stopped = true;
        for attempt in 1..=FINAL_ATTEMPTS {
            match self.commit().await {
                Ok(()) => {
                    self.trail.lock().resolve_flushes();
                    tracing::debug!(seq = self.trail.lock().chain.seq, "audit writer stopped");
                    return;
                }
                Err(error) => {
                    tracing::warn!(error = %crate::error::Chain(&error), attempt, "syncing the audit records written before shutdown failed");
                    self.trail.lock().failure = Some(error);
                    if attempt < FINAL_ATTEMPTS {
                        tokio::time::sleep(RETRY).await;
                    }
                }
            }
        }
        let mut disk = self.trail.lock();
        disk.resolve_flushes();
        tracing::error!(
            lost = disk.pending.len() + disk.unsynced.len(),
            dir = %disk.dir.display(),
            "the audit writer stopped with records it could not sync"
        );
    }

    /// One batch, on the blocking pool: write again what a failure left,
    /// sync, sync the directory for a new segment, move `HEAD`, print;
    /// then answer flushes; clears a failure once the trail is whole.
    async fn commit(&mut self) -> Result<(), Arc<AuditError>> {
        let trail = Arc::clone(&self.trail);
        let key = Arc::clone(&self.key);
        let mut stdout_failed = self.stdout_failed;
        let (result, stdout_failed) = tokio::task::spawn_blocking(move || {
            let (result, printed) = commit(&trail, &key);
            // Here too, not on a runtime thread: a stdout nobody reads
            // blocks the write.
            disk::print(&printed, &mut stdout_failed);
            (result, stdout_failed)
        })
        .await
        .map_err(|error| Arc::new(AuditError::Job(error)))?;
        self.stdout_failed = stdout_failed;
        result.map_err(Arc::new)?;
        let mut disk = self.trail.lock();
        disk.resolve_flushes();
        if disk.failure.is_some() && disk.is_committed() {
            disk.failure = None;
            self.failure_reported = false;
            tracing::info!("the audit log is writable again");
        }
        Ok(())
    }

    fn failed(&mut self, error: &Arc<AuditError>) {
        self.trail.lock().failure = Some(Arc::clone(error));
        if !std::mem::replace(&mut self.failure_reported, true) {
            tracing::error!(
                error = %crate::error::Chain(error),
                "the audit log cannot be written: recording is refused (so nothing is issued) until it can; retrying every second"
            );
        } else {
            tracing::debug!(error = %crate::error::Chain(error), "the audit log still cannot be written");
        }
    }
}

/// The blocking part of [`AuditWriter::commit`]: the result, and the lines
/// synced for stdout (printed by the caller, on the blocking pool too,
/// whatever the result).
fn commit(trail: &Trail, key: &SigningKey) -> (Result<(), AuditError>, Vec<Line>) {
    let result = sync_and_move_head(trail, key);
    let printed = std::mem::take(&mut trail.lock().to_print);
    (result, printed)
}

fn sync_and_move_head(trail: &Trail, key: &SigningKey) -> Result<(), AuditError> {
    let job = {
        let mut disk = trail.lock();
        disk.rewrite()?;
        disk.begin_sync()
    };
    if let Some(job) = job {
        // Outside the lock: callers keep appending while the disk syncs.
        let result = job.file.sync_data();
        let ended = trail.lock().end_sync(&job, result);
        trail.sync_done.notify_all();
        ended?;
    }
    let (dir, dir_dirty, target) = {
        let mut disk = trail.lock();
        let dirty = std::mem::take(&mut disk.dir_dirty);
        let target = (disk.committed != Some(disk.synced)).then_some(disk.synced);
        (disk.dir.clone(), dirty, target)
    };
    if dir_dirty && let Err(source) = sync_dir(&dir) {
        trail.lock().dir_dirty = true;
        return Err(io_error(&dir)(source));
    }
    if let Some(target) = target {
        write_head(&dir, target, key)?;
        trail.lock().committed = Some(target);
    }
    Ok(())
}

impl fmt::Debug for AuditWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let disk = self.trail.lock();
        f.debug_struct("AuditWriter")
            .field("dir", &disk.dir)
            .field("seq", &disk.chain.seq)
            .finish_non_exhaustive()
    }
}

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

/// Creates the directory (0700) if missing, refuses one that is not
/// trusted (someone else's, a symlink, writable by others, or under such a
/// directory), and takes the writer's lock.
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
