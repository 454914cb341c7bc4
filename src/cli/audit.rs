//! `tether audit verify|tail`: the audit trail, read from its files. No
//! agent is needed (the agent may be running, stopped, or on another
//! machine: a copy of the directory works too).
//!
//! The directory comes from `--dir`, or from the agent's config file
//! (`--config`: `[audit] dir`, else `data_dir/audit`), or from the default
//! configuration. Rendering lives in [`super::output`].

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use thiserror::Error;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::output::{AuditBroken, AuditRecoveryView, AuditVerified, Format, StoredRecord};
use super::{EXIT_USAGE, fail};
use crate::audit::{self, AuditError, AuditReader, AuditRecord, PublicKey, ReadFilter};
use crate::config::{Config, ConfigError, ProcessEnv};
use crate::error::Chain;

/// Largest public key file read.
const MAX_PUBLIC_KEY_FILE: u64 = 16 * 1024;
/// How often `tail --follow` looks for new records.
const FOLLOW_POLL: Duration = Duration::from_millis(250);

/// Arguments of `tether audit`.
#[derive(Debug, Args)]
pub(crate) struct AuditArgs {
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the whole trail: every record present, in order, unchanged,
    /// up to the last one the agent synced (HEAD).
    ///
    /// Exit 0 and "audit trail intact: N records in M files, head seq S";
    /// or exit 1 and "audit trail broken at FILE:LINE: reason", naming the
    /// first edited, removed, reordered or missing record (or file). The
    /// agent's recoveries from crashes or damage are listed on stderr.
    ///
    /// With --public-key, HEAD's seal and every audit-recovered record's
    /// are checked too: a missing or rewritten seal is "broken". Without
    /// it, the key that sealed HEAD is named, unchecked.
    ///
    /// --json prints {"intact": true, "records", "files", "head_seq",
    /// "head_hash", "last_seq", "sealed_by", "sealed_at", "seals_checked",
    /// "recoveries": [{"file", "line", "seq", "reason"}]} or
    /// {"intact": false, "file", "line", "problem"}.
    Verify(VerifyArgs),
    /// Print audit records, oldest first: time, seq, event, decision,
    /// SPIFFE ID, then pid, task, audience, tools, policies, intent and
    /// reason when the record has them.
    ///
    /// --json prints each record's line exactly as stored (JSON lines:
    /// "seq", "time", "prev", "event", "decision", and "spiffe_id", "pid",
    /// "uid", "executable", "task_id", "intent", "audience", "tools",
    /// "reason", "policy_ids", "token_id", "entry_id", "actors", "repeated"
    /// when set).
    /// A line that is not a record is reported on stderr and skipped (exit
    /// 1 at the end).
    Tail(TailArgs),
}

/// Where the trail is, and how to print.
#[derive(Debug, Args)]
struct TrailArgs {
    /// The agent's config file: the trail is its [audit] dir, or
    /// data_dir/audit. Without --config or --dir: the default
    /// configuration's.
    #[arg(long, short, value_name = "FILE", conflicts_with = "dir")]
    config: Option<PathBuf>,

    /// The audit directory itself (a copy works too).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,

    /// Print JSON on stdout (stable field names, listed in --help).
    #[arg(long)]
    json: bool,
}

/// Arguments of `tether audit verify`.
#[derive(Debug, Args)]
struct VerifyArgs {
    #[command(flatten)]
    trail: TrailArgs,

    /// The agent's published audit key (data_dir/audit.pub, PEM), copied
    /// off the node: HEAD's seal and every audit-recovered record's must
    /// hold, so a cut tail with a rewritten HEAD is detected. Repeat it
    /// for a trail sealed by more than one key (after a key change).
    #[arg(long, value_name = "FILE")]
    public_key: Vec<PathBuf>,
}

/// Arguments of `tether audit tail`.
#[derive(Debug, Args)]
struct TailArgs {
    #[command(flatten)]
    trail: TrailArgs,

    /// Keep printing records as they are written (until interrupted).
    #[arg(long, short)]
    follow: bool,

    /// Only records of this task.
    #[arg(long, value_name = "ID")]
    task: Option<String>,

    /// Only records with this SPIFFE ID as the subject or an actor.
    #[arg(long, value_name = "ID")]
    spiffe_id: Option<String>,

    /// Only records since this long ago (humantime: 10m, 2h, 1d) or since
    /// this time (RFC 3339: 2026-05-01T10:00:00Z).
    #[arg(long, value_name = "WHEN", value_parser = parse_since)]
    since: Option<OffsetDateTime>,

    /// Only the last N matching records (then, with --follow, new ones).
    #[arg(long, short = 'n', value_name = "N")]
    lines: Option<usize>,
}

/// Why an audit command failed.
#[derive(Debug, Error)]
pub(crate) enum AuditCliError {
    /// The config file named no usable trail.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Reading the trail failed.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// Some lines were not records (each reported on stderr).
    #[error("{0} line{s} of the trail {are} not audit records (run `tether audit verify`)", s = if *.0 == 1 { "" } else { "s" }, are = if *.0 == 1 { "is" } else { "are" })]
    Damaged(u64),
    /// Printing failed.
    #[error("writing to stdout")]
    Stdout {
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

// === impl AuditCliError ===

impl AuditCliError {
    /// The exit status for this failure (see `cli` for the table).
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) => EXIT_USAGE,
            _ => 1,
        }
    }
}

/// Runs `tether audit ...`.
pub(crate) fn run(args: &AuditArgs) -> ExitCode {
    let result = match &args.command {
        AuditCommand::Verify(verify) => run_verify(verify),
        AuditCommand::Tail(tail) => run_tail(tail),
    };
    match result {
        Ok(code) => code,
        Err(AuditCliError::Stdout { source }) if source.kind() == io::ErrorKind::BrokenPipe => {
            ExitCode::SUCCESS
        }
        Err(error) => fail(error.exit_code(), &error),
    }
}

fn run_verify(args: &VerifyArgs) -> Result<ExitCode, AuditCliError> {
    let trail = &args.trail;
    let dir = trail.dir()?;
    let format = Format::from_json_flag(trail.json);
    let keys = args
        .public_key
        .iter()
        .map(|path| read_public_key(path))
        .collect::<Result<Vec<_>, _>>()?;
    match audit::verify(&dir, &keys) {
        Ok(report) => {
            for recovery in &report.recoveries {
                eprintln!(
                    "tether: note: {}:{}: the agent recovered the trail at seq {}: {}",
                    recovery.file.display(),
                    recovery.line,
                    recovery.seq,
                    super::output::printable(&recovery.reason)
                );
            }
            format
                .print(&AuditVerified {
                    intact: true,
                    records: report.records,
                    files: report.files,
                    head_seq: report.head_seq,
                    head_hash: report.head_hash,
                    last_seq: report.last_seq,
                    sealed_by: report.sealed.as_ref().map(|(key, _)| key.clone()),
                    sealed_at: report.sealed.map(|(_, time)| time),
                    seals_checked: report.seals_checked,
                    recoveries: report
                        .recoveries
                        .into_iter()
                        .map(|r| AuditRecoveryView {
                            file: r.file,
                            line: r.line,
                            seq: r.seq,
                            reason: r.reason,
                        })
                        .collect(),
                })
                .map_err(stdout)?;
            Ok(ExitCode::SUCCESS)
        }
        Err(AuditError::Broken {
            file,
            line,
            problem,
        }) => {
            format
                .print(&AuditBroken {
                    intact: false,
                    file,
                    line,
                    problem,
                })
                .map_err(stdout)?;
            Ok(ExitCode::from(1))
        }
        Err(error) => Err(error.into()),
    }
}

/// A public key file, bounded and parsed.
fn read_public_key(path: &std::path::Path) -> Result<PublicKey, AuditCliError> {
    use std::io::Read as _;
    let key_error = |problem: String| {
        AuditCliError::Audit(AuditError::Key(format!("{}: {problem}", path.display())))
    };
    let mut text = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_PUBLIC_KEY_FILE + 1).read_to_end(&mut text))
        .map_err(|e| key_error(e.to_string()))?;
    if text.len() as u64 > MAX_PUBLIC_KEY_FILE {
        return Err(key_error(format!(
            "larger than {MAX_PUBLIC_KEY_FILE} bytes: not a public key"
        )));
    }
    PublicKey::from_pem(&text).map_err(|e| key_error(e.to_string()))
}

fn run_tail(args: &TailArgs) -> Result<ExitCode, AuditCliError> {
    let dir = args.trail.dir()?;
    let format = Format::from_json_flag(args.trail.json);
    let filter = ReadFilter {
        task_id: args.task.clone(),
        spiffe_id: args.spiffe_id.clone(),
        since: args.since,
    };
    let mut reader = AuditReader::new(&dir, filter);
    let mut damaged = 0;

    // What is there now: all of it, or the last N.
    let mut last: VecDeque<AuditRecord> = VecDeque::new();
    while let Some(record) = next(&mut reader, &mut damaged)? {
        match args.lines {
            Some(n) => {
                last.push_back(record);
                if last.len() > n {
                    last.pop_front();
                }
            }
            None => format.print(&StoredRecord(&record)).map_err(stdout)?,
        }
    }
    for record in &last {
        format.print(&StoredRecord(record)).map_err(stdout)?;
    }

    if args.follow {
        loop {
            while let Some(record) = next(&mut reader, &mut damaged)? {
                format.print(&StoredRecord(&record)).map_err(stdout)?;
            }
            std::thread::sleep(FOLLOW_POLL);
        }
    }
    if damaged > 0 {
        return Err(AuditCliError::Damaged(damaged));
    }
    Ok(ExitCode::SUCCESS)
}

/// The next record; a line that is not one is reported, counted and
/// skipped.
fn next(reader: &mut AuditReader, damaged: &mut u64) -> Result<Option<AuditRecord>, AuditCliError> {
    loop {
        match reader.next_record() {
            Ok(record) => return Ok(record),
            Err(error @ AuditError::Broken { .. }) => {
                *damaged += 1;
                eprintln!("tether: warning: {}", Chain(&error));
            }
            Err(error) => return Err(error.into()),
        }
    }
}

// === impl TrailArgs ===

impl TrailArgs {
    /// `--dir`, or the trail the config (given or default) names.
    fn dir(&self) -> Result<PathBuf, AuditCliError> {
        if let Some(dir) = &self.dir {
            return Ok(dir.clone());
        }
        let config = Config::load(self.config.as_deref(), &ProcessEnv)?;
        Ok(config
            .audit
            .dir
            .unwrap_or_else(|| config.data_dir.join("audit")))
    }
}

/// `10m` (that long ago) or an RFC 3339 time.
fn parse_since(value: &str) -> Result<OffsetDateTime, String> {
    if let Ok(time) = OffsetDateTime::parse(value, &Rfc3339) {
        return Ok(time);
    }
    let ago = humantime::parse_duration(value).map_err(|e| {
        format!("{e}: expected a duration (10m, 2h, 1d) or an RFC 3339 time (2026-05-01T10:00:00Z)")
    })?;
    OffsetDateTime::now_utc()
        .checked_sub(time::Duration::try_from(ago).map_err(|e| e.to_string())?)
        .ok_or_else(|| format!("{value} ago is before any time this tool can show"))
}

fn stdout(source: io::Error) -> AuditCliError {
    AuditCliError::Stdout { source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_duration_or_a_time() {
        let ten_minutes = time::Duration::minutes(10);
        let before = OffsetDateTime::now_utc();
        let since = parse_since("10m").unwrap();
        let after = OffsetDateTime::now_utc();
        assert!(before - ten_minutes <= since && since <= after - ten_minutes);
        assert_eq!(
            parse_since("2026-05-01T10:00:00Z").unwrap(),
            OffsetDateTime::parse("2026-05-01T10:00:00Z", &Rfc3339).unwrap()
        );
        assert!(parse_since("soon").unwrap_err().contains("RFC 3339"));
    }
}
