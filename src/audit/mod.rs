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
//! [`AuditLog::record`] bounds and serializes the event, then writes it on
//! the caller's thread: under one short lock it is given its `seq` and
//! `prev` and handed to the kernel with one `pwrite(2)` (`audit::disk`).
//! So a record is in the file, and survives a crash of the agent, before
//! `record` returns, with no hop to another thread. It refuses (so the
//! caller fails closed and issues nothing) when the writer has failed or
//! stopped, when `queue` records wait for a sync, or when records have
//! waited [`WRITE_WAIT`] for one (the writer is stalled).
//!
//! The writer loop ([`AuditWriter`]) never sees records one by one: it is
//! woken when a record lands on a synced trail, waits `flush_interval`
//! (or not at all for [`AuditLog::flush`]), fsyncs the file on tokio's
//! blocking pool *outside* the lock (callers keep writing meanwhile), and
//! replaces `HEAD`. So a power loss costs at most the last interval's
//! records, and records are never fsynced one by one. A file is started
//! only after the full one is synced (a caller that would start it while
//! a sync runs waits for that sync, once per `max_file_bytes`), so
//! syncing the current file makes every record written durable.
//!
//! A failed write or fsync marks the log failed ([`AuditLog::problem`]
//! says why, `record` refuses). The records a failed fsync may have lost
//! (the kernel may have dropped the unsynced pages) are cut and written
//! again by the writer, and so is the record whose write failed (its
//! caller was refused, but what it records may have happened); it retries
//! every second and the first whole sync clears the failure.
//!
//! A `write(2)` to the page cache does not wait for the disk, but on a
//! frozen file system (`fsfreeze`) it blocks: the caller's runtime thread
//! waits with it, and so does every other caller that records, so the
//! agent may stop answering until the file system thaws. Before, such a
//! caller was refused after [`WRITE_WAIT`]; an operator freezing the
//! agent's data disk is the price of the unhopped write.
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
mod disk;
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
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::oneshot;

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
    /// More records wait for the writer to sync them than the queue holds.
    #[error("the audit queue is full ({capacity} records wait for the writer to sync them)")]
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
    /// The writer has not synced what is written for this long: it is
    /// stuck (a hung disk, a stdout nobody reads).
    #[error("the audit writer is stalled (nothing synced within {waited:?})")]
    Stalled {
        /// How long the caller waited.
        waited: Duration,
    },
}

/// Longest records stay written and unsynced before recording refuses
/// (the writer is stalled: a hung disk, a stdout nobody reads), and
/// longest a caller waits for a sync to end before it starts a new file:
/// a healthy writer syncs every `flush_interval`, a slow fsync rarely
/// takes a second.
pub const WRITE_WAIT: Duration = Duration::from_secs(10);

/// The handle decision points record through. Cheap to clone; recording
/// writes the record on the caller's thread (one `pwrite(2)` under a
/// short lock) and never waits for a sync.
#[derive(Clone)]
pub struct AuditLog {
    trail: Arc<writer::Trail>,
    /// Identical denials being counted rather than recorded one by one.
    repeats: Arc<Mutex<repeats::Repeats>>,
    /// Each uid's audit bytes.
    budget: Arc<Mutex<budget::Budget>>,
    /// `caller_bytes_per_second`, for the refusal.
    caller_rate: u64,
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
        let writer = AuditWriter::open(dir, config, key)?;
        let repeats = Arc::default();
        let budget = Arc::new(Mutex::new(budget::Budget::new(
            config.caller_bytes_per_second,
            config.caller_burst_bytes,
        )));
        Ok((
            AuditLog {
                trail: writer.trail(),
                repeats,
                budget,
                caller_rate: config.caller_bytes_per_second,
            },
            writer,
        ))
    }

    /// Writes one record to the trail. `Err` when the writer has failed
    /// or stopped, or too many records wait for a sync: the caller then
    /// fails closed (refuses to issue), so no credential is ever issued
    /// unaudited. `Ok` means written (handed to the kernel: it survives a
    /// crash of the agent) and durable within `flush_interval`. An edge
    /// hands out what was recorded only after [`Self::written`] too.
    ///
    /// A denial identical to one the same process had recorded less than
    /// 10 s ago is counted instead; the count is recorded (`repeated`)
    /// with the first record made after those 10 s.
    ///
    /// A record about a caller's process (one with a uid) is charged to
    /// that uid's audit budget, never refused for it: see [`Self::admit`].
    pub fn record(&self, event: AuditEvent) -> Result<(), AuditUnavailable> {
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

    /// Writes `event`, charged to the uid it is about.
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
        self.append(body)
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
                    let _ = self.append(note.to_body());
                }
                Err(AuditUnavailable::OverBudget {
                    uid,
                    rate: self.caller_rate,
                })
            }
        }
    }

    /// Chains and writes one record under the trail's lock; wakes the
    /// writer when it is the first one left to sync, or when its write
    /// failed the log (the writer must write it again).
    fn append(&self, body: Vec<u8>) -> Result<(), AuditUnavailable> {
        let time = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
        let longest = body.len() + event::ENVELOPE_MAX + 1;
        let (wake, appended) = {
            let mut disk = self.trail.lock();
            if disk.must_wait_for_sync(longest) {
                // A new file is due while the current one syncs: rare
                // (once per `max_file_bytes`), and one fsync long.
                let (guard, waited) = self
                    .trail
                    .sync_done
                    .wait_timeout_while(disk, WRITE_WAIT, |disk| disk.must_wait_for_sync(longest))
                    .unwrap_or_else(PoisonError::into_inner);
                disk = guard;
                if waited.timed_out() {
                    return Err(AuditUnavailable::Stalled { waited: WRITE_WAIT });
                }
            }
            let was_failed = disk.failure.is_some();
            let appended = disk.append(&time, &body);
            // The writer loop is woken by the first record left to sync,
            // and by the write that failed the log: asleep on a synced
            // trail, nothing else would wake it to write that record
            // again, and the log would stay failed.
            let wake = match appended {
                Ok(()) => disk.unsynced.len() == 1,
                Err(_) => !was_failed && disk.failure.is_some(),
            };
            (wake, appended)
        };
        if wake {
            self.trail.wake.notify_one();
        }
        appended
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
            if let Err(error) = self.append(counted.to_body()) {
                tracing::warn!(error = %crate::error::Chain(&error), "could not record a count of repeated denials");
            }
        }
    }

    /// Whether what this handle's callers recorded is still in the
    /// trail: `record` wrote it before returning `Ok`, so this is `Ok`
    /// unless the log has failed since (a failed sync may have lost it
    /// until the writer writes it again). The caller then hands out
    /// nothing, as if recording had been refused.
    pub async fn written(&self) -> Result<(), AuditUnavailable> {
        match &self.trail.lock().failure {
            Some(source) => Err(AuditUnavailable::Failed {
                source: Arc::clone(source),
            }),
            None => Ok(()),
        }
    }

    /// Why the log is not healthy right now (the writer failed, and why;
    /// the queue is full; the writer stopped or is stalled), or `None` when
    /// healthy. For health checks.
    pub fn problem(&self) -> Option<String> {
        let disk = self.trail.lock();
        if disk.stopped {
            return Some(AuditUnavailable::Stopped.to_string());
        }
        if let Some(source) = &disk.failure {
            return Some(
                crate::error::chain(&AuditUnavailable::Failed {
                    source: Arc::clone(source),
                }) + " (retrying every second)",
            );
        }
        if disk
            .unsynced_since
            .is_some_and(|since| since.elapsed() >= WRITE_WAIT)
        {
            return Some(format!(
                "the audit writer is stalled: {} records wait to be synced \
                 (a hung disk, or a stdout nobody reads); issuance is refused",
                disk.unsynced.len()
            ));
        }
        if disk.unsynced.len() + disk.to_print.len() >= disk.capacity {
            return Some(
                AuditUnavailable::QueueFull {
                    capacity: disk.capacity,
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
        let rx = {
            let mut disk = self.trail.lock();
            if disk.stopped {
                return;
            }
            let (tx, rx) = oneshot::channel();
            let seq = disk.chain.seq;
            disk.flushes.push((seq, tx));
            rx
        };
        self.trail.wake.notify_one();
        let _ = rx.await;
    }
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unsynced = self.trail.lock().unsynced.len();
        f.debug_struct("AuditLog")
            .field("unsynced", &unsynced)
            .field("problem", &self.problem())
            .finish()
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
