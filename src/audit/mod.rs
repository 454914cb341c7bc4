//! The tamper-evident audit trail: every identity decision, append-only,
//! hash-chained, fsynced in batches.
//!
//! Owns the audit directory. [`AuditLog`] is the cheap-to-clone handle every
//! decision point records through; [`AuditWriter`] is the one loop that
//! writes (spawned by `daemon`); [`verify`], [`read`] and [`AuditReader`]
//! read a trail, live or copied, with or without a running agent;
//! `seal` signs its end. Imports nothing from the crate but
//! `trusted_fs`.
//!
//! # On disk
//!
//! ```text
//! <dir>/                  0700 (a directory group or others may write is refused)
//!   audit-000001.jsonl    0600, append-only JSON lines; a new file once one reaches max_file_bytes
//!   audit-000002.jsonl
//!   HEAD                  0600, {"seq":N,"hash":"<hex>","time":…,"seal":…}: the last record known durable, sealed
//!   audit.lock            flock: one writer per directory
//! ```
//!
//! Each line is one record, at most [`MAX_LINE`] (64 KiB) without its
//! newline:
//!
//! ```text
//! {"seq":2,"time":"2026-05-01T10:00:00.123456Z","prev":"<64 hex>","event":"issue-jwt","decision":"allow","spiffe_id":"spiffe://…","pid":42,…}
//! ```
//!
//! - `seq` counts from 1, consecutive across files.
//! - `time` is RFC 3339 in UTC with microseconds: the moment `record` was
//!   called (so it may step back with the clock; order is `seq`'s).
//! - `prev` is the lowercase hex SHA-256 (aws-lc-rs) of the previous
//!   record's line, exactly as stored, without its newline; 64 zeros for
//!   the first. The chain continues across files.
//! - then the [`AuditEvent`] fields, `event` and `decision` always, the
//!   others only when set. Text that would make the line too long is cut
//!   with a marker (`…[cut from N bytes]`), never refused.
//!
//! Truncating the tail keeps the chain valid, so `HEAD` names the last
//! durable record and is replaced atomically (temp file, fsync, rename,
//! fsync the directory) after each fsynced batch. [`verify`] reads `HEAD`
//! first and then checks that the files reach it: records past `HEAD` are
//! a running writer's batch not yet synced (reported, not an error);
//! records missing before it are a cut.
//!
//! # Writing
//!
//! [`AuditLog::record`] bounds and serializes the event on the caller's
//! thread and queues it (bounded by `queue`): it never blocks and never
//! touches the disk. It refuses (so the caller fails closed and issues
//! nothing) when the queue is full, when the writer has failed, or when the
//! writer has stopped. The writer takes everything queued, gives each record
//! its `seq` and `prev`, and writes the batch with one `write(2)` at once
//! (a process crash loses only what is still queued); it fsyncs the
//! file, then replaces `HEAD`, once per `flush_interval` with writes
//! pending (or at once for [`AuditLog::flush`]), so a power loss costs at
//! most the last interval's records, and records are never fsynced one by
//! one. A failed write or fsync marks the log failed ([`AuditLog::problem`]
//! says why, `record` refuses) and is retried every second with the same
//! records, cut back to the last good length first (after a failed fsync
//! the kernel may have dropped the unsynced pages, so they are written
//! again); the first success clears the failure. Blocking file work runs
//! on tokio's blocking pool, one awaited call at a time.
//!
//! # Opening after a crash
//!
//! [`AuditLog::open`] never rewrites or deletes a complete record. A last
//! line without its newline (a crash mid-write, never synced) is cut, with a
//! warning naming the file and line, and the writer's first record is an
//! `audit-recovered` event saying what was cut. Other damage (a line that is
//! not a record, a broken chain, `HEAD` missing or disagreeing with the
//! files) does not stop the start: it is described in that first record,
//! and when `HEAD` is ahead of the files (a cut tail) or disagrees with the
//! last record, the chain continues from `HEAD`, so the gap stays visible
//! to [`verify`] for good. A directory that cannot be created, locked or
//! written is an [`AuditError`] naming the path.
//!
//! # What the chain proves, and what it cannot
//!
//! An edited, removed, reordered or inserted record, a removed file and a
//! cut tail are detected by anyone holding the files. `HEAD` and each
//! `audit-recovered` record are sealed with the agent's [`SigningKey`]
//! (`audit::seal`): with the published [`PublicKey`], [`verify`] also detects a
//! tail cut with `HEAD` rewritten to match, and a made-up recovery record.
//! Someone who holds the key can reseal a rewritten chain, and someone who
//! can write the directory can put back an older sealed `HEAD` with the
//! tail cut to it: to detect those, keep a copy of the records elsewhere
//! (`stdout = true` into a log pipeline) or note `HEAD`'s hash and seal
//! time off the node from time to time (`tether audit verify --json`
//! prints them).
//!
//! With `stdout = true` each record is also printed as one JSON line on
//! stdout once it is synced. This module is then the one exception to
//! `cli::output` owning stdout: the audit stream is its own stream. A
//! stalled stdout reader stalls the writer and, once the queue is full,
//! issuance: records are never dropped to keep going.

mod budget;
mod event;
mod files;
mod read;
mod recovery;
mod repeats;
mod seal;
mod verify;
mod writer;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};

use crate::trusted_fs::TrustedFsError;

pub use event::{AuditEvent, AuditRecord, EventKind, Outcome};
pub use files::MAX_LINE;
pub use read::{AuditReader, ReadFilter, read};
pub use seal::{PublicKey, Seal, SigningKey};
pub use verify::{Recovery, VerifyReport, verify};
pub use writer::AuditWriter;

/// Smallest `max_file_bytes`.
const MIN_FILE_BYTES: u64 = 4096;
/// Longest `flush_interval`: longer leaves acknowledged records unsynced
/// for too long.
const MAX_FLUSH_INTERVAL: Duration = Duration::from_secs(10);
/// Largest `queue`.
const MAX_QUEUE: usize = 1 << 20;

/// `[audit]` settings (config composes it; defaults in `Default`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// The audit directory. `None`: `<data_dir>/audit` (the caller
    /// resolves it).
    pub dir: Option<PathBuf>,
    /// Start a new file once one reaches this size (default 64 MiB; at
    /// least 4096).
    pub max_file_bytes: u64,
    /// How often written records are fsynced (default 50ms; more than zero,
    /// at most 10s).
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Records waiting for the writer, at most (default 16384; 1 to 2^20).
    /// When full, recording refuses and callers fail closed.
    pub queue: usize,
    /// Also print each record as a JSON line on stdout (default false).
    pub stdout: bool,
    /// Bytes of records per second the records about each uid's processes
    /// may take (default 64 KiB; see `audit::budget`). Over it, that uid's
    /// requests are refused (ResourceExhausted) until it is repaid.
    pub caller_bytes_per_second: u64,
    /// Bytes each uid may write at once before `caller_bytes_per_second`
    /// applies (default 4 MiB; at least 64 KiB, a record's largest size).
    pub caller_burst_bytes: u64,
}

/// Why the audit directory cannot be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The file system refused.
    #[error("{}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A setting is out of range.
    #[error("{key}: {problem}")]
    Config {
        /// The key (`audit.queue`).
        key: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// The directory is someone else's, a symlink, writable by others or
    /// under a directory that is: they could rewrite the trail.
    #[error(transparent)]
    Untrusted(#[from] TrustedFsError),
    /// Another writer holds the directory: two chains would interleave.
    #[error("{} is in use by another tether agent", .path.display())]
    Locked {
        /// The directory.
        path: PathBuf,
        /// Why the lock was not granted.
        #[source]
        source: nix::errno::Errno,
    },
    /// The trail is damaged here: the first broken, edited, reordered or
    /// missing record, or a line that is not a record.
    #[error("audit trail broken at {}:{line}: {problem}", .file.display())]
    Broken {
        /// The file (or `HEAD`).
        file: PathBuf,
        /// The line, from 1.
        line: u64,
        /// What is wrong.
        problem: String,
    },
    /// The audit signing key, or a public key given to check seals with,
    /// is not usable.
    #[error("audit key: {0}")]
    Key(String),
    /// A blocking write job ended without an answer (it panicked, or the
    /// runtime is shutting down).
    #[error("the audit write job failed")]
    Job(#[source] tokio::task::JoinError),
}

/// Why a record was not queued. The caller must then fail closed: issue
/// nothing it could not record.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditUnavailable {
    /// More records wait for the writer than the queue holds.
    #[error("the audit queue is full ({capacity} records wait for the writer)")]
    QueueFull {
        /// The queue's size.
        capacity: usize,
    },
    /// The writer cannot write (disk full, read-only, I/O error); it retries
    /// every second.
    #[error("the audit log cannot be written")]
    Failed {
        /// The last write error.
        #[source]
        source: Arc<AuditError>,
    },
    /// The writer has stopped (shutdown).
    #[error("the audit writer has stopped")]
    Stopped,
    /// The caller's uid has written its budget of audit bytes
    /// (`caller_bytes_per_second`): its requests wait until it refills.
    #[error("uid {uid} is over its audit budget ({rate} bytes/s of audit records): retry later")]
    OverBudget {
        /// The caller's uid.
        uid: u32,
        /// `caller_bytes_per_second`.
        rate: u64,
    },
    /// The writer took the record but has not written it in time: it is
    /// stuck (a hung disk, a stdout nobody reads).
    #[error("the audit writer is stalled (nothing written within {waited:?})")]
    Stalled {
        /// How long the caller waited.
        waited: Duration,
    },
}

/// Longest a caller waits for its record to be written before it gives
/// up (and hands out nothing): a healthy writer takes milliseconds, a slow
/// fsync of the batch before it (the writer does one thing at a time)
/// rarely a second.
pub const WRITE_WAIT: Duration = Duration::from_secs(10);

/// The handle decision points record through. Cheap to clone; recording
/// never blocks and never touches the disk on the caller's thread.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Message>,
    shared: Arc<Shared>,
    /// Records queued so far; taken with the send, so the queue holds
    /// records `1..=queued` in this order.
    queued: Arc<Mutex<u64>>,
    /// Identical denials being counted rather than recorded one by one.
    repeats: Arc<Mutex<repeats::Repeats>>,
    /// Each uid's audit bytes.
    budget: Arc<Mutex<budget::Budget>>,
    /// `caller_bytes_per_second`, for the refusal.
    caller_rate: u64,
}

/// State the writer publishes to every handle.
#[derive(Debug)]
struct Shared {
    /// Fast path for `record`: set while `failure` is `Some`.
    failed: AtomicBool,
    failure: Mutex<Option<Arc<AuditError>>>,
    /// How many queued records have been written to the trail (handed to
    /// the kernel: they survive the agent's crash). Also pinged when the
    /// writer fails or stops, so waiters look again.
    written: watch::Sender<u64>,
    /// Set when a caller gave up waiting for its record ([`WRITE_WAIT`]),
    /// cleared when the writer writes again: health's "stalled".
    stalled: AtomicBool,
}

/// What handles send the writer.
#[derive(Debug)]
enum Message {
    /// One event, bounded and serialized, with its time.
    Record(Queued),
    /// Answer once everything queued before is durable.
    Flush(oneshot::Sender<()>),
}

/// An event on its way to the writer.
#[derive(Debug)]
struct Queued {
    /// RFC 3339, UTC, microseconds.
    time: String,
    /// The event's JSON object, at most `event::MAX_BODY` bytes.
    body: Vec<u8>,
}

// === impl AuditConfig ===

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            dir: None,
            max_file_bytes: 64 * 1024 * 1024,
            flush_interval: Duration::from_millis(50),
            queue: 16384,
            stdout: false,
            caller_bytes_per_second: 64 * 1024,
            caller_burst_bytes: 4 * 1024 * 1024,
        }
    }
}

impl AuditConfig {
    /// Checks each setting; on failure names the key.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(dir) = &self.dir
            && !dir.is_absolute()
        {
            return Err(("audit.dir", "must be an absolute path".into()));
        }
        if self.max_file_bytes < MIN_FILE_BYTES {
            return Err((
                "audit.max_file_bytes",
                format!("must be at least {MIN_FILE_BYTES}"),
            ));
        }
        if self.flush_interval.is_zero() {
            return Err(("audit.flush_interval", "must be greater than zero".into()));
        }
        if self.flush_interval > MAX_FLUSH_INTERVAL {
            return Err((
                "audit.flush_interval",
                format!(
                    "must be at most {}: records stay unsynced that long",
                    humantime::format_duration(MAX_FLUSH_INTERVAL)
                ),
            ));
        }
        if self.queue == 0 || self.queue > MAX_QUEUE {
            return Err(("audit.queue", format!("must be between 1 and {MAX_QUEUE}")));
        }
        if self.caller_bytes_per_second == 0 {
            return Err((
                "audit.caller_bytes_per_second",
                "must be greater than zero".into(),
            ));
        }
        if self.caller_burst_bytes < MAX_LINE as u64 {
            return Err((
                "audit.caller_burst_bytes",
                format!("must be at least {MAX_LINE} (the largest record)"),
            ));
        }
        Ok(())
    }
}

// === impl AuditLog ===

impl AuditLog {
    /// Opens (creating, mode 0700) the directory, locks it, recovers from a
    /// crash (see the module docs), and returns the handle and the writer
    /// loop to spawn. Blocks on file I/O (it may read the newest file
    /// whole): call it before serving, or from a blocking context.
    ///
    /// `key` seals every `HEAD` the writer writes and its `audit-recovered`
    /// records (see [`SigningKey`]).
    pub fn open(
        dir: &Path,
        config: &AuditConfig,
        key: Arc<SigningKey>,
    ) -> Result<(AuditLog, AuditWriter), AuditError> {
        config
            .validate()
            .map_err(|(key, problem)| AuditError::Config { key, problem })?;
        let (tx, rx) = mpsc::channel(config.queue);
        let shared = Arc::new(Shared {
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            written: watch::Sender::new(0),
            stalled: AtomicBool::new(false),
        });
        let writer = AuditWriter::open(dir, config, rx, Arc::clone(&shared), key)?;
        let queued = Arc::default();
        let repeats = Arc::default();
        let budget = Arc::new(Mutex::new(budget::Budget::new(
            config.caller_bytes_per_second,
            config.caller_burst_bytes,
        )));
        Ok((
            AuditLog {
                tx,
                shared,
                queued,
                repeats,
                budget,
                caller_rate: config.caller_bytes_per_second,
            },
            writer,
        ))
    }

    /// Queues one record. `Err` when the queue is full, the writer has
    /// failed or stopped: the caller then fails closed (refuses to issue),
    /// so no credential is ever issued unaudited. `Ok` means queued: it is
    /// written at once and durable within `flush_interval`. An edge hands
    /// out what was recorded only after [`Self::written`].
    ///
    /// A denial identical to one the same process had recorded less than
    /// 10 s ago is counted instead; the count is recorded (`repeated`)
    /// with the first record made after those 10 s.
    ///
    /// A record about a caller's process (one with a uid) is charged to
    /// that uid's audit budget, never refused for it: see [`Self::admit`].
    pub fn record(&self, event: AuditEvent) -> Result<(), AuditUnavailable> {
        if let Some(source) = self.shared.failure() {
            return Err(AuditUnavailable::Failed { source });
        }
        let now = tokio::time::Instant::now();
        let (due, verdict) = {
            let mut repeats = self.repeats.lock().unwrap_or_else(PoisonError::into_inner);
            (repeats.due(now), repeats.observe(&event, now))
        };
        for counted in due {
            self.charged(counted, now)?;
        }
        if verdict == repeats::Verdict::Counted {
            return Ok(());
        }
        self.charged(event, now)
    }

    /// Queues `event`, charged to the uid it is about.
    fn charged(
        &self,
        event: AuditEvent,
        now: tokio::time::Instant,
    ) -> Result<(), AuditUnavailable> {
        let body = event.to_body();
        self.budget
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .charge(&event, body.len() + event::ENVELOPE_MAX, now);
        self.enqueue(body)
    }

    /// Whether a request of a process of `uid` may go on: refused
    /// ([`AuditUnavailable::OverBudget`]) while the audit records about
    /// that uid's processes have spent its budget (`audit::budget`). Edges
    /// ask before doing any work, so a refused request creates, decides
    /// and records nothing (one record per 10 s says the uid is refused).
    pub fn admit(
        &self,
        uid: u32,
        pid: i32,
        executable: Option<&Path>,
    ) -> Result<(), AuditUnavailable> {
        let admission = self
            .budget
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admit(uid, pid, executable, tokio::time::Instant::now());
        match admission {
            budget::Admission::Admitted => Ok(()),
            budget::Admission::Refused { note } => {
                if let Some(note) = note {
                    // Best effort: the refusal stands either way.
                    let _ = self.enqueue(note.to_body());
                }
                Err(AuditUnavailable::OverBudget {
                    uid,
                    rate: self.caller_rate,
                })
            }
        }
    }

    fn enqueue(&self, body: Vec<u8>) -> Result<(), AuditUnavailable> {
        let queued = Queued {
            time: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
            body,
        };
        let mut count = self.queued.lock().unwrap_or_else(PoisonError::into_inner);
        self.tx
            .try_send(Message::Record(queued))
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => AuditUnavailable::QueueFull {
                    capacity: self.tx.max_capacity(),
                },
                mpsc::error::TrySendError::Closed(_) => AuditUnavailable::Stopped,
            })?;
        *count += 1;
        Ok(())
    }

    /// Records the counts of repeated denials still being counted, their
    /// intervals over or not: the agent is stopping, and a count waits
    /// otherwise for the next record (see `audit::repeats`). Best effort,
    /// like the counting itself.
    pub fn record_counts(&self) {
        let counts = self
            .repeats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain();
        for counted in counts {
            if let Err(error) = self.enqueue(counted.to_body()) {
                tracing::warn!(error = %crate::error::Chain(&error), "could not record a count of repeated denials");
            }
        }
    }

    /// Resolves once every record queued so far (the caller's own among
    /// them) is written to the trail, so it survives a crash of the agent
    /// (a crash of the machine: within `flush_interval`, see [`Self::flush`]).
    /// `Err` when the writer fails or stops first: the caller then hands
    /// out nothing, as if recording had been refused.
    pub async fn written(&self) -> Result<(), AuditUnavailable> {
        let waited = tokio::time::timeout(WRITE_WAIT, self.written_unbounded()).await;
        waited.unwrap_or_else(|_| {
            self.shared.stalled.store(true, Ordering::Release);
            Err(AuditUnavailable::Stalled { waited: WRITE_WAIT })
        })
    }

    async fn written_unbounded(&self) -> Result<(), AuditUnavailable> {
        let target = *self.queued.lock().unwrap_or_else(PoisonError::into_inner);
        let mut written = self.shared.written.subscribe();
        loop {
            if *written.borrow_and_update() >= target {
                return Ok(());
            }
            if let Some(source) = self.shared.failure() {
                return Err(AuditUnavailable::Failed { source });
            }
            if self.tx.is_closed() {
                return Err(AuditUnavailable::Stopped);
            }
            // The sender lives in `Shared`, as long as this handle.
            let _ = written.changed().await;
        }
    }

    /// Why the log is not healthy right now (the writer failed, and why;
    /// the queue is full; the writer stopped or is stalled), or `None` when
    /// healthy. For health checks.
    pub fn problem(&self) -> Option<String> {
        if self.shared.stalled.load(Ordering::Acquire) && self.shared.failure().is_none() {
            let waiting = self
                .queued
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .saturating_sub(*self.shared.written.borrow());
            return Some(format!(
                "the audit writer is stalled: {waiting} records wait to be written \
                 (a hung disk, or a stdout nobody reads); issuance is refused"
            ));
        }
        if let Some(source) = self.shared.failure() {
            return Some(
                crate::error::chain(&AuditUnavailable::Failed { source })
                    + " (retrying every second)",
            );
        }
        if self.tx.is_closed() {
            return Some(AuditUnavailable::Stopped.to_string());
        }
        if self.tx.capacity() == 0 {
            return Some(
                AuditUnavailable::QueueFull {
                    capacity: self.tx.max_capacity(),
                }
                .to_string(),
            );
        }
        None
    }

    /// Resolves when every record queued before the call is written,
    /// fsynced and named by `HEAD` (tests, shutdown). It syncs at once
    /// rather than at the next `flush_interval`, so a caller that must not
    /// hand out a credential before its record is durable can record, then
    /// flush. Waits while the writer is failing; returns at once if the
    /// writer has stopped.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Message::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("queued", &(self.tx.max_capacity() - self.tx.capacity()))
            .field("problem", &self.problem())
            .finish()
    }
}

// === impl Shared ===

impl Shared {
    fn failure(&self) -> Option<Arc<AuditError>> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Sets (`Some`) or clears (`None`) the failure; true when that changed
    /// whether the log is failed.
    fn set_failure(&self, failure: Option<Arc<AuditError>>) -> bool {
        let failed = failure.is_some();
        *self.failure.lock().unwrap_or_else(PoisonError::into_inner) = failure;
        let changed = self.failed.swap(failed, Ordering::AcqRel) != failed;
        if failed {
            // Whoever waits for a write learns it may not come.
            self.written.send_modify(|_| {});
        }
        changed
    }

    /// Publishes how many queued records are written.
    fn set_written(&self, count: u64) {
        let newer = self.written.send_if_modified(|written| {
            let newer = count > *written;
            if newer {
                *written = count;
            }
            newer
        });
        if newer {
            self.stalled.store(false, Ordering::Release);
        }
    }
}

/// `AuditError::Io` for `path`.
fn io_error(path: &Path) -> impl FnOnce(io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests;
