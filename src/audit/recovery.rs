//! What [`AuditLog::open`](super::AuditLog::open) finds on disk: where the
//! chain continues, which file to append to, and what to say about damage.
//!
//! Invariant: recovery never rewrites or deletes a complete record. The one
//! write it makes is cutting an incomplete last line (a crash mid-write)
//! from the newest file.

use std::cmp::Ordering;
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::files::{
    HEAD_FILE, Hash, Head, HeadFile, HeadState, Item, LineReader, MAX_LINE, list_segments,
    open_read, read_head, segment_name, seq_prefix, sync_dir,
};
use super::seal::{SealProblem, SigningKey, head_message};
use super::{AuditError, io_error};

/// The state of the trail as the writer takes it over.
#[derive(Debug)]
pub(super) struct Recovered {
    /// The record the next one chains to.
    pub chain: Head,
    /// The segment to append to and its length, or `None` to start
    /// `next_number`.
    pub append_to: Option<(u32, PathBuf, u64)>,
    /// The number of the next segment to create.
    pub next_number: u32,
    /// What `HEAD` holds, if it is valid.
    pub head: Option<Head>,
    /// Damage found and what was done about it, for the `audit-recovered`
    /// record; empty after a clean stop.
    pub notes: Vec<String>,
    /// What a crash leaves and recovery repairs as designed (an incomplete
    /// last line cut): said in the same record, but not damage.
    pub crash_notes: Vec<String>,
}

/// A record's place, for notes.
#[derive(Debug, Clone)]
struct Found {
    head: Head,
    file: PathBuf,
    line: u64,
}

/// One segment, scanned.
#[derive(Debug, Default)]
struct Scan {
    /// The last line that starts like a record.
    tail: Option<Found>,
    /// The record with `HEAD`'s seq, if in this segment.
    at_head: Option<Found>,
    /// The last line, if it does not start like a record.
    damaged_last: Option<u64>,
    lines: u64,
    consumed: u64,
    fragment: u64,
}

/// Scans the directory (already created and locked) and cuts a torn last
/// line.
/// `key` is the agent's: a `HEAD` it did not seal is noted.
pub(super) fn recover(dir: &Path, key: &SigningKey) -> Result<Recovered, AuditError> {
    let head_path = dir.join(HEAD_FILE);
    let head_state = read_head(dir).map_err(io_error(&head_path))?;
    let mut notes = Vec::new();
    let mut crash_notes = Vec::new();
    let head = match &head_state {
        HeadState::Valid(file) => {
            notes.extend(seal_note(file, key));
            Some(file.head)
        }
        _ => None,
    };
    let segments = list_segments(dir).map_err(io_error(dir))?;
    let next_number = match segments.last() {
        None => 1,
        Some((number, path)) => number.checked_add(1).ok_or_else(|| AuditError::Io {
            path: path.clone(),
            source: std::io::Error::other("no segment number left"),
        })?,
    };

    let mut append_to = None;
    let mut tail = None;
    let mut at_head = None;
    // Newest first: the chain's end is in the newest file that holds a
    // record (older files only when newer ones hold none).
    for (i, (number, path)) in segments.iter().enumerate().rev() {
        let scan = scan(path, head.map(|h| h.seq))?;
        if i + 1 == segments.len() {
            append_to = cut_torn_line(
                path,
                *number,
                &scan,
                next_number,
                &mut notes,
                &mut crash_notes,
            )?;
            if let Some(line) = scan.damaged_last {
                notes.push(format!(
                    "{}:{line} is not an audit record (left as found)",
                    path.display()
                ));
            }
        }
        at_head = at_head.or(scan.at_head);
        if scan.tail.is_some() {
            tail = scan.tail;
            break;
        }
    }

    let chain = continue_from(tail, &head_state, at_head, !segments.is_empty(), &mut notes);
    Ok(Recovered {
        chain,
        append_to,
        next_number,
        head,
        notes,
        crash_notes,
    })
}

/// Where the chain continues, given the files' last record and `HEAD`.
/// When they disagree, `HEAD` (the durable promise) wins, so the damage
/// stays in the chain for `verify` to find.
fn continue_from(
    tail: Option<Found>,
    head_state: &HeadState,
    at_head: Option<Found>,
    any_files: bool,
    notes: &mut Vec<String>,
) -> Head {
    let at = |found: &Found| {
        format!(
            "seq {}, {}:{}",
            found.head.seq,
            found.file.display(),
            found.line
        )
    };
    match (tail, head_state) {
        (None, HeadState::Missing) => {
            if any_files {
                notes.push(
                    "no record in the audit files and no HEAD: the chain starts again at seq 1"
                        .into(),
                );
            }
            Head::GENESIS
        }
        (None, HeadState::Valid(HeadFile { head, .. })) => {
            if head.seq > 0 {
                notes.push(format!(
                    "HEAD records seq {} but the audit files hold no record: records 1 to {} are missing; the chain continues from HEAD",
                    head.seq, head.seq
                ));
            }
            *head
        }
        (None, HeadState::Damaged(problem)) => {
            notes.push(format!(
                "HEAD {problem}, and the audit files hold no record: the chain starts again at seq 1"
            ));
            Head::GENESIS
        }
        (Some(tail), HeadState::Missing) => {
            notes.push(format!(
                "HEAD was missing: the chain continues after the last record in the files ({})",
                at(&tail)
            ));
            tail.head
        }
        (Some(tail), HeadState::Damaged(problem)) => {
            notes.push(format!(
                "HEAD {problem}: the chain continues after the last record in the files ({})",
                at(&tail)
            ));
            tail.head
        }
        (Some(tail), HeadState::Valid(HeadFile { head, .. })) => match tail.head.seq.cmp(&head.seq)
        {
            Ordering::Equal if tail.head.hash == head.hash => tail.head,
            Ordering::Equal => {
                notes.push(format!(
                    "the last record ({}) does not match HEAD: it was changed after it was written; the chain continues from HEAD",
                    at(&tail)
                ));
                *head
            }
            Ordering::Less => {
                let first = tail.head.seq + 1;
                notes.push(format!(
                    "the audit files end at {} but HEAD records seq {}: records {first} to {} are missing (the tail was cut); the chain continues from HEAD",
                    at(&tail),
                    head.seq,
                    head.seq
                ));
                *head
            }
            Ordering::Greater => {
                match at_head {
                    Some(found) if found.head.hash != head.hash => notes.push(format!(
                        "the record with HEAD's seq ({}) does not match HEAD: it was changed",
                        at(&found)
                    )),
                    _ => tracing::info!(
                        records = tail.head.seq - head.seq,
                        last_seq = tail.head.seq,
                        "audit records written after the last sync of an unclean stop are kept"
                    ),
                }
                tail.head
            }
        },
    }
}

/// What to say about `HEAD`'s seal, if it is not this agent's seal of it.
fn seal_note(file: &HeadFile, key: &SigningKey) -> Option<String> {
    let Some(sealed) = &file.sealed else {
        return Some(
            "HEAD was not sealed (a tether before seals wrote it, or it was rewritten)".into(),
        );
    };
    let text = head_message(file.head.seq, &file.head.hash, &sealed.time);
    match sealed
        .seal
        .check(std::slice::from_ref(key.public_key()), &text)
    {
        Ok(()) => None,
        Err(SealProblem::UnknownKey(id)) => Some(format!(
            "HEAD was sealed by audit key {id}, not by the key of this agent, {} (the audit key was replaced or removed, or HEAD was rewritten)",
            key.id()
        )),
        Err(SealProblem::BadSignature(_)) => Some(
            "HEAD's seal does not verify with this agent's audit key: HEAD was rewritten".into(),
        ),
    }
}

/// Cuts an incomplete last line from the newest segment, and says which
/// segment to append to.
fn cut_torn_line(
    path: &Path,
    number: u32,
    scan: &Scan,
    next_number: u32,
    notes: &mut Vec<String>,
    crash_notes: &mut Vec<String>,
) -> Result<Option<(u32, PathBuf, u64)>, AuditError> {
    if scan.fragment == 0 {
        return Ok(Some((number, path.to_owned(), scan.consumed)));
    }
    let line = scan.lines + 1;
    // A torn write leaves a prefix of one record: at most a line. Anything
    // longer is not ours to remove.
    if scan.fragment > MAX_LINE as u64 + 1 {
        notes.push(format!(
            "{}:{line} ends the file with {} bytes and no newline, too long to be a record cut by a crash: left as found; records continue in {}",
            path.display(),
            scan.fragment,
            segment_name(next_number)
        ));
        return Ok(None);
    }
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_error(path))?;
    file.set_len(scan.consumed)
        .and_then(|()| file.sync_all())
        .map_err(io_error(path))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir).map_err(io_error(dir))?;
    }
    tracing::warn!(
        file = %path.display(),
        line,
        bytes = scan.fragment,
        "cut an incomplete last audit record left by a crash mid-write (it was never synced)"
    );
    crash_notes.push(format!(
        "cut an incomplete last record ({} bytes) at {}:{line}, left by a crash mid-write; it was never synced",
        scan.fragment,
        path.display()
    ));
    Ok(Some((number, path.to_owned(), scan.consumed)))
}

/// Reads a segment line by line: each line's seq from its prefix, hashing
/// only the lines recovery needs.
fn scan(path: &Path, head_seq: Option<u64>) -> Result<Scan, AuditError> {
    let mut reader = LineReader::new(open_read(path).map_err(io_error(path))?);
    let mut result = Scan::default();
    let mut last: Option<(u64, Vec<u8>, u64)> = None;
    while let Some(item) = reader.next_item().map_err(io_error(path))? {
        let line = reader.line_number();
        let seq = match &item {
            Item::Line(bytes) => seq_prefix(bytes),
            Item::TooLong(_) => None,
        };
        match (seq, item) {
            (Some(seq), Item::Line(bytes)) => {
                if Some(seq) == head_seq {
                    result.at_head = Some(Found {
                        head: Head {
                            seq,
                            hash: Hash::of(&bytes),
                        },
                        file: path.to_owned(),
                        line,
                    });
                }
                last = Some((seq, bytes, line));
                result.damaged_last = None;
            }
            _ => result.damaged_last = Some(line),
        }
    }
    result.tail = last.map(|(seq, bytes, line)| Found {
        head: Head {
            seq,
            hash: Hash::of(&bytes),
        },
        file: path.to_owned(),
        line,
    });
    result.lines = reader.line_number();
    result.consumed = reader.consumed();
    result.fragment = reader.fragment_len();
    Ok(result)
}
