//! Everything the CLI prints to stdout: the report types of the `api`,
//! operator, task, policy and audit commands, each described once by a
//! [`Render`] impl, and [`Format::print`], which writes any of them in the
//! format chosen: readable (for people) or `--json` (for scripts).
//!
//! The report structs are the JSON schema: their serde field names are a
//! stable interface, documented on each field. Readable output may change
//! between releases; JSON field names may only be added to. Strings that
//! came from the agent are untrusted, so readable output escapes control
//! characters (no terminal escape sequences from a hostile socket).
//!
//! One file per topic: [`workload`] (`tether api`), [`operator`] (entries,
//! SVIDs, bundle, health, reload), [`server`] (`tether server`: the
//! fleet's entries and nodes), [`task`] (tasks and task tokens),
//! [`policy`], [`audit`]; [`text`] holds the readable form's shared
//! vocabulary (tables, times, escapes).
//!
//! Invariant: no other module writes to stdout; errors go to stderr through
//! `cli::fail`.

mod audit;
mod operator;
mod policy;
mod server;
mod task;
mod text;
mod workload;

use std::fmt;
use std::io::{self, Write};
use std::time::Duration;

use serde::{Serialize, Serializer};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

pub(crate) use audit::{AuditBroken, AuditRecoveryView, AuditVerified, StoredRecord};
pub(crate) use operator::{
    DeletedReport, Document, EntriesReport, EntryView, HealthReport, HolderView, IssuedSvidView,
    ReloadReport, SvidsReport,
};
pub(crate) use policy::{PolicyDecisionView, PolicyProblemView, PolicyValidation};
pub(crate) use server::{
    FleetTaskView, FleetTasksReport, NodeView, NodesReport, ServerEntriesReport, ServerEntryView,
};
pub(crate) use task::{ExchangedToken, TaskTokenValidation, TaskView, TasksReport};
pub(crate) use text::printable;
pub(crate) use workload::{
    BundleSummary, BundlesReport, CaSummary, FederatedBundleSummary, FetchX509Output,
    JwtKeySummary, JwtReport, JwtSvidSummary, ValidationReport, WatchUpdate, X509Report,
    X509SvidSummary,
};

/// How to print: chosen once from `--json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// Aligned text for people.
    Readable,
    /// One JSON document (or one per line for streams) for scripts.
    Json,
}

/// One kind of thing the CLI prints, described once: its readable form
/// here, its `--json` form by serde (the struct is the schema). Every
/// format follows from these two.
pub(crate) trait Render: Serialize {
    /// Writes the readable form to `w`, newline-terminated. `now` is for
    /// the coarse "in 59m" beside a timestamp. Strings from the agent go
    /// through [`printable`].
    fn readable(&self, w: &mut String, now: OffsetDateTime) -> fmt::Result;
}

/// What [`Format::print`] takes: a thing's readable form and its JSON line.
/// Every [`Render`] is one; an audit record ([`StoredRecord`]) is one by
/// itself, because its JSON form is its line as stored, not a
/// re-serialisation.
pub(crate) trait Print {
    /// The readable form (see [`Render::readable`]).
    fn readable_text(&self, w: &mut String, now: OffsetDateTime) -> fmt::Result;
    /// The JSON form: one compact line, without its newline.
    fn json_line(&self) -> serde_json::Result<String>;
}

/// A point in time: RFC 3339 in UTC in both renderings
/// (`"2026-01-01T00:00:00Z"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timestamp(pub(crate) OffsetDateTime);

/// A lifetime: humantime in both renderings (`"1h 30m"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ttl(pub(crate) Duration);

// === impl Format ===

impl Format {
    /// `--json` or not.
    pub(crate) fn from_json_flag(json: bool) -> Self {
        if json { Self::Json } else { Self::Readable }
    }

    /// Prints `value` in this format, in one write, flushed: a reader (a
    /// pipe following `watch` or `audit tail`) never sees half a document,
    /// and sees each one at once. JSON is compact on one line, so streams
    /// are JSON lines.
    pub(crate) fn print(self, value: &impl Print) -> io::Result<()> {
        let text = match self {
            Self::Json => {
                let mut line = value.json_line().map_err(io::Error::other)?;
                line.push('\n');
                line
            }
            Self::Readable => {
                let mut text = String::new();
                value
                    .readable_text(&mut text, OffsetDateTime::now_utc())
                    .map_err(io::Error::other)?;
                text
            }
        };
        write_stdout(&text)
    }
}

/// Prints a bare token and a newline (`fetch jwt --token-only`), for
/// `$(...)` in shells, whatever the format.
pub(crate) fn print_token(token: &str) -> io::Result<()> {
    write_stdout(&format!("{token}\n"))
}

/// Prints PEM text as it is (`bundle show --format pem`), whatever the
/// format: PEM is already the machine-readable form.
pub(crate) fn print_pem(text: &str) -> io::Result<()> {
    write_stdout(text)
}

fn write_stdout(text: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

// === impl Print ===

impl<T: Render> Print for T {
    fn readable_text(&self, w: &mut String, now: OffsetDateTime) -> fmt::Result {
        self.readable(w, now)
    }

    fn json_line(&self) -> serde_json::Result<String> {
        serde_json::to_string(self)
    }
}

// === impl Timestamp ===

impl Timestamp {
    /// The Unix time `seconds`, if representable.
    pub(crate) fn from_unix(seconds: i64) -> Option<Self> {
        OffsetDateTime::from_unix_timestamp(seconds).ok().map(Self)
    }

    /// The Unix time in milliseconds the admin API sends; `None` for 0
    /// (the agent's "unknown") or out of range.
    pub(crate) fn from_unix_ms(ms: i64) -> Option<Self> {
        if ms == 0 {
            return None;
        }
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
            .ok()
            .map(Self)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.format(&Rfc3339) {
            Ok(text) => f.write_str(&text),
            // RFC 3339 has only four-digit years; anything else (a hostile
            // certificate's year 10000, say) is shown in `time`'s own form.
            Err(_) => write!(f, "{}", self.0),
        }
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

// === impl Ttl ===

impl fmt::Display for Ttl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for Ttl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests;
