//! What `tether audit` prints: the verdict of `verify` (intact or broken)
//! and the records of `tail`.

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::path::PathBuf;

use serde::Serialize;
use time::OffsetDateTime;

use super::text::{field_value, plural, printable};
use super::{Print, Render, Timestamp};
use crate::audit::AuditRecord;

/// `tether audit verify` on an intact trail.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct AuditVerified {
    /// `intact`: `true`.
    pub(crate) intact: bool,
    /// `records`: records checked.
    pub(crate) records: u64,
    /// `files`: audit files read.
    pub(crate) files: usize,
    /// `head_seq`: the seq the trail's `HEAD` names (the last record known
    /// synced; 0 for an empty trail).
    pub(crate) head_seq: u64,
    /// `head_hash`: `HEAD`'s SHA-256, lowercase hex. Kept off the node, it
    /// lets a later check show the trail up to it was not rewritten.
    pub(crate) head_hash: String,
    /// `last_seq`: the last record's seq; more than `head_seq` while a
    /// running agent has records not yet synced.
    pub(crate) last_seq: u64,
    /// `sealed_by`: the id of the audit key that sealed `HEAD` (`null`: a
    /// `HEAD` written before seals).
    pub(crate) sealed_by: Option<String>,
    /// `sealed_at`: when `HEAD` was sealed (RFC 3339).
    pub(crate) sealed_at: Option<String>,
    /// `seals_checked`: the seals were checked against `--public-key`.
    pub(crate) seals_checked: bool,
    /// `recoveries`: the agent's `audit-recovered` records (a start that
    /// found damage or a crash's leftovers).
    pub(crate) recoveries: Vec<AuditRecoveryView>,
}

/// One `audit-recovered` record.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct AuditRecoveryView {
    /// `file`: its audit file.
    pub(crate) file: PathBuf,
    /// `line`: its line, from 1.
    pub(crate) line: u64,
    /// `seq`: its seq.
    pub(crate) seq: u64,
    /// `reason`: what the agent found and did.
    pub(crate) reason: String,
}

/// `tether audit verify` on a broken trail.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct AuditBroken {
    /// `intact`: `false`.
    pub(crate) intact: bool,
    /// `file`: the file of the first broken record (or `HEAD`).
    pub(crate) file: PathBuf,
    /// `line`: its line, from 1.
    pub(crate) line: u64,
    /// `problem`: what is wrong there.
    pub(crate) problem: String,
}

/// One record of `audit tail`: a readable line, or with `--json` the line
/// exactly as stored (not a re-serialisation: what the chain hashes is
/// what a script reads).
#[derive(Debug, Clone, Copy)]
pub(crate) struct StoredRecord<'a>(pub &'a AuditRecord);

// === impl AuditVerified ===

impl Render for AuditVerified {
    fn readable(&self, w: &mut String, _now: OffsetDateTime) -> fmt::Result {
        write!(
            w,
            "audit trail intact: {} record{} in {} file{}, head seq {}",
            self.records,
            plural(self.records as usize),
            self.files,
            plural(self.files),
            self.head_seq
        )?;
        if self.last_seq > self.head_seq {
            write!(
                w,
                " ({} more written, not yet synced)",
                self.last_seq - self.head_seq
            )?;
        }
        match (&self.sealed_by, &self.sealed_at) {
            (Some(key), Some(time)) if self.seals_checked => write!(
                w,
                "; HEAD sealed by audit key {} at {}, seals verified",
                printable(key),
                printable(time)
            )?,
            (Some(key), Some(time)) => write!(
                w,
                "; HEAD sealed by audit key {} at {} (not checked: pass --public-key)",
                printable(key),
                printable(time)
            )?,
            _ => write!(w, "; HEAD is not sealed")?,
        }
        writeln!(w)
    }
}

// === impl AuditBroken ===

impl Render for AuditBroken {
    /// One line.
    fn readable(&self, w: &mut String, _now: OffsetDateTime) -> fmt::Result {
        writeln!(
            w,
            "audit trail broken at {}:{}: {}",
            printable(&self.file.display().to_string()),
            self.line,
            printable(&self.problem)
        )
    }
}

// === impl StoredRecord ===

impl Print for StoredRecord<'_> {
    /// `time  seq  event  decision  spiffe-id  key=value...`: the fields a
    /// record has, ids as they are, free text quoted.
    fn readable_text(&self, w: &mut String, _now: OffsetDateTime) -> fmt::Result {
        let event = &self.0.event;
        write!(
            w,
            "{}  {:>6}  {:<15} {:<5}  {}",
            Timestamp(self.0.time),
            self.0.seq,
            event.event.as_str(),
            event.decision.as_str(),
            event
                .spiffe_id
                .as_deref()
                .map_or(Cow::Borrowed("-"), printable)
        )?;
        if let Some(pid) = event.pid {
            write!(w, "  pid={pid}")?;
        }
        if let Some(uid) = event.uid {
            write!(w, " uid={uid}")?;
        }
        if let Some(repeated) = event.repeated {
            write!(w, " repeated={repeated}")?;
        }
        let ids = [
            ("exe", event.executable.as_deref()),
            ("task", event.task_id.as_deref()),
            ("audience", event.audience.as_deref()),
            ("token", event.token_id.as_deref()),
            ("entry", event.entry_id.as_deref()),
        ];
        for (key, value) in ids {
            if let Some(value) = value {
                write!(w, " {key}={}", field_value(value, false))?;
            }
        }
        let lists = [
            ("tools", &event.tools),
            ("policies", &event.policy_ids),
            ("actors", &event.actors),
        ];
        for (key, items) in lists {
            if !items.is_empty() {
                let items: Vec<Cow<'_, str>> = items.iter().map(|s| field_value(s, true)).collect();
                write!(w, " {key}={}", items.join(","))?;
            }
        }
        // Debug quoting escapes quotes and control characters alike.
        for (key, text) in [("intent", &event.intent), ("reason", &event.reason)] {
            if let Some(text) = text {
                write!(w, " {key}={text:?}")?;
            }
        }
        writeln!(w)
    }

    /// The line exactly as stored: it parsed as JSON, so it holds no raw
    /// control characters.
    fn json_line(&self) -> serde_json::Result<String> {
        Ok(self.0.line.clone())
    }
}
