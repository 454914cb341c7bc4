//! Everything the CLI prints to stdout: the report types of the `api` and
//! operator commands and their two renderings, readable (for people) and
//! `--json` (for scripts).
//!
//! The report structs are the JSON schema: their serde field names are a
//! stable interface, documented on each field. Readable output may change
//! between releases; JSON field names may only be added to. Strings that
//! came from the agent are untrusted, so readable output escapes control
//! characters (no terminal escape sequences from a hostile socket).
//!
//! Invariant: no other module writes to stdout; errors go to stderr through
//! `cli::fail`.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::{self, Write};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Serialize, Serializer};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::audit::AuditRecord;

/// How to print: chosen once from `--json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Aligned text for people.
    Readable,
    /// One JSON document (or one per line for streams) for scripts.
    Json,
}

/// A point in time: RFC 3339 in UTC in both renderings
/// (`"2026-01-01T00:00:00Z"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp(pub OffsetDateTime);

/// `tether api fetch x509` and each `tether api watch` update.
#[derive(Debug, Clone, Serialize)]
pub struct X509Report {
    /// `svids`: one object per X.509-SVID, in the agent's order; the first
    /// is the default identity.
    pub svids: Vec<X509SvidSummary>,
    /// `trust_domain_cas`: the number of distinct CA certificates in the
    /// SVIDs' own trust-domain bundles.
    pub trust_domain_cas: usize,
    /// `federated_bundles`: the bundles of federated trust domains, sorted
    /// by trust domain.
    pub federated_bundles: Vec<FederatedBundleSummary>,
}

/// One X.509-SVID.
#[derive(Debug, Clone, Serialize)]
pub struct X509SvidSummary {
    /// `spiffe_id`: the SVID's SPIFFE ID.
    pub spiffe_id: String,
    /// `hint`: the operator's hint for choosing among SVIDs (may be `""`).
    pub hint: String,
    /// `serial`: the leaf certificate's serial number, lowercase hex.
    pub serial: String,
    /// `not_before`: RFC 3339.
    pub not_before: Timestamp,
    /// `not_after`: RFC 3339.
    pub not_after: Timestamp,
    /// `dns_names`: the leaf's DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// `chain_length`: certificates in the chain, leaf included.
    pub chain_length: usize,
}

/// One federated trust domain's X.509 bundle.
#[derive(Debug, Clone, Serialize)]
pub struct FederatedBundleSummary {
    /// `trust_domain`: the trust domain name (`"partner.example"`).
    pub trust_domain: String,
    /// `cas`: the number of CA certificates in its bundle.
    pub cas: usize,
}

/// `tether api fetch x509` (with `--write`, the files written).
#[derive(Debug, Clone, Serialize)]
pub struct FetchX509Output {
    /// `svids`, `trust_domain_cas`, `federated_bundles`: see [`X509Report`].
    #[serde(flatten)]
    pub report: X509Report,
    /// `files_written`: the paths `--write` wrote, in order (empty without
    /// `--write`).
    pub files_written: Vec<PathBuf>,
}

/// One update of `tether api watch`: one JSON object per line.
#[derive(Debug, Clone, Serialize)]
pub struct WatchUpdate {
    /// `received_at`: when this client received the update, RFC 3339.
    pub received_at: Timestamp,
    /// `update`: 1 for the first message of the stream, then counting.
    pub update: u64,
    /// `svids`, `trust_domain_cas`, `federated_bundles`: see [`X509Report`].
    #[serde(flatten)]
    pub report: X509Report,
}

/// `tether api fetch jwt`.
#[derive(Debug, Clone, Serialize)]
pub struct JwtReport {
    /// `svids`: one object per JWT-SVID; the first is the default.
    pub svids: Vec<JwtSvidSummary>,
}

/// One JWT-SVID.
#[derive(Debug, Clone, Serialize)]
pub struct JwtSvidSummary {
    /// `spiffe_id`: the SVID's SPIFFE ID.
    pub spiffe_id: String,
    /// `hint`: the operator's hint (may be `""`).
    pub hint: String,
    /// `expires_at`: the token's `exp`, RFC 3339; `null` if the token has
    /// no readable `exp`.
    pub expires_at: Option<Timestamp>,
    /// `token`: the JWT-SVID itself (compact JWS).
    pub token: String,
}

/// `tether api fetch bundles`.
#[derive(Debug, Clone, Serialize)]
pub struct BundlesReport {
    /// `bundles`: one object per trust domain, sorted by trust domain.
    pub bundles: Vec<BundleSummary>,
}

/// One trust domain's bundle, both halves.
#[derive(Debug, Clone, Serialize)]
pub struct BundleSummary {
    /// `trust_domain`: the trust domain name (`"example.org"`).
    pub trust_domain: String,
    /// `x509_authorities`: its CA certificates (empty if the agent sent no
    /// X.509 bundle for it).
    pub x509_authorities: Vec<CaSummary>,
    /// `jwt_authorities`: its JWT signing keys (empty if the agent sent no
    /// JWT bundle for it).
    pub jwt_authorities: Vec<JwtKeySummary>,
}

/// One CA certificate of a bundle.
#[derive(Debug, Clone, Serialize)]
pub struct CaSummary {
    /// `subject`: the certificate's subject (RFC 4514 form).
    pub subject: String,
    /// `serial`: lowercase hex.
    pub serial: String,
    /// `not_after`: RFC 3339.
    pub not_after: Timestamp,
}

/// One JWT signing key of a bundle.
#[derive(Debug, Clone, Serialize)]
pub struct JwtKeySummary {
    /// `kid`: the key ID (`""` if the key has none).
    pub kid: String,
    /// `key_type`: the JWK `kty` (`"EC"`, `"RSA"`, `"OKP"`; `""` if absent).
    pub key_type: String,
}

/// `tether api validate jwt`.
#[derive(Debug, Clone, Serialize)]
pub struct ValidationReport {
    /// `spiffe_id`: the SPIFFE ID the token was issued to.
    pub spiffe_id: String,
    /// `claims`: the token's claims as the agent returned them.
    pub claims: serde_json::Value,
}

/// One registration entry: `entry create`, `entry show`, `entry update`,
/// and each element of `entry list`.
#[derive(Debug, Clone, Serialize)]
pub struct EntryView {
    /// `id`: the entry's id (`ent-...` for API entries, `cfg-...` for
    /// config-file entries).
    pub id: String,
    /// `spiffe_id`: the SPIFFE ID (template) granted.
    pub spiffe_id: String,
    /// `selectors`: all must be among a caller's (`"unix:uid:1000"`).
    pub selectors: Vec<String>,
    /// `source`: `"config"` (the config file owns it), `"api"`, or
    /// `"unknown"`.
    pub source: &'static str,
    /// `revision`: counts changes, from 1; `entry update --revision` takes
    /// it.
    pub revision: u64,
    /// `x509_svid_ttl`: humantime (`"1h"`), or `null` for the agent default.
    pub x509_svid_ttl: Option<Ttl>,
    /// `jwt_svid_ttl`: humantime (`"5m"`), or `null` for the agent default.
    pub jwt_svid_ttl: Option<Ttl>,
    /// `dns_names`: DNS SANs of the X.509-SVID.
    pub dns_names: Vec<String>,
    /// `hint`: the operator's hint (may be `""`).
    pub hint: String,
    /// `federates_with`: trust domain names.
    pub federates_with: Vec<String>,
    /// `created_at`: RFC 3339, or `null` if the agent did not say.
    pub created_at: Option<Timestamp>,
    /// `updated_at`: RFC 3339, or `null` if the agent did not say.
    pub updated_at: Option<Timestamp>,
}

/// A lifetime: humantime in both renderings (`"1h 30m"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ttl(pub Duration);

/// `tether entry list`.
#[derive(Debug, Clone, Serialize)]
pub struct EntriesReport {
    /// `entries`: in the agent's order (config-file entries first).
    pub entries: Vec<EntryView>,
}

/// `tether entry delete`.
#[derive(Debug, Clone, Serialize)]
pub struct DeletedReport {
    /// `deleted`: the id of the entry deleted.
    pub deleted: String,
}

/// `tether svid list`.
#[derive(Debug, Clone, Serialize)]
pub struct SvidsReport {
    /// `svids`: every live X.509-SVID, sorted by SPIFFE ID.
    pub svids: Vec<IssuedSvidView>,
}

/// One live X.509-SVID.
#[derive(Debug, Clone, Serialize)]
pub struct IssuedSvidView {
    /// `spiffe_id`: the SVID's SPIFFE ID.
    pub spiffe_id: String,
    /// `serial`: lowercase hex.
    pub serial: String,
    /// `not_before`: RFC 3339 (`null` if the agent did not say).
    pub not_before: Option<Timestamp>,
    /// `not_after`: RFC 3339 (`null` if the agent did not say).
    pub not_after: Option<Timestamp>,
    /// `entry_id`: the entry it was issued for.
    pub entry_id: String,
    /// `holders`: the processes with an open stream that received it
    /// (empty: none right now).
    pub holders: Vec<HolderView>,
}

/// A process holding an SVID.
#[derive(Debug, Clone, Serialize)]
pub struct HolderView {
    /// `pid`.
    pub pid: i32,
    /// `uid`.
    pub uid: u32,
    /// `executable`: its path (`""` if unknown).
    pub executable: String,
    /// `selectors`: what attestation found for it.
    pub selectors: Vec<String>,
    /// `since`: when its stream received the SVID, RFC 3339 (or `null`).
    pub since: Option<Timestamp>,
}

/// `tether healthcheck`.
#[derive(Debug, Clone, Serialize)]
pub struct HealthReport {
    /// `serving`: the agent can issue SVIDs.
    pub serving: bool,
    /// `trust_domain`: the agent's trust domain name.
    pub trust_domain: String,
    /// `entries`: registration entries, config and API.
    pub entries: u32,
    /// `open_streams`: open Workload API streams.
    pub open_streams: u32,
    /// `version`: the agent's version.
    pub version: String,
    /// `problems`: why it is not serving, one line each (empty when
    /// serving).
    pub problems: Vec<String>,
}

/// `tether reload`.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    /// `config_entries`: entries from the config file after the reload.
    pub config_entries: u32,
    /// `federations`: federated trust domains after the reload.
    pub federations: u32,
    /// `needs_restart`: keys changed in the file that only a restart
    /// applies (the agent keeps their running values).
    pub needs_restart: Vec<String>,
}

/// `tether policy validate`: valid or not, what was read and what is
/// wrong.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyValidation {
    /// `valid`: every file parsed and validated against the schema.
    pub valid: bool,
    /// `files`: `*.cedar` files read (0 when the directory could not be).
    pub files: usize,
    /// `policies`: policies loaded (0 when invalid).
    pub policies: usize,
    /// `ids`: their ids, in file order (`@id`, else `FILE:policyN`).
    pub ids: Vec<String>,
    /// `errors`: what stops the set loading, located.
    pub errors: Vec<PolicyProblemView>,
    /// `warnings`: what the validator found suspicious (a policy that can
    /// never apply); they do not stop a load.
    pub warnings: Vec<PolicyProblemView>,
}

/// One located problem in a policy file.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyProblemView {
    /// `file`: the file, as found under the directory given.
    pub file: PathBuf,
    /// `line`: from 1.
    pub line: usize,
    /// `column`: from 1, in characters.
    pub column: usize,
    /// `reason`: what is wrong.
    pub reason: String,
}

/// `tether policy check`: the decision and the policies behind it.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyDecisionView {
    /// `decision`: `"allow"` or `"deny"`.
    pub decision: &'static str,
    /// `policies`: the ids of the policies that decided (the permits that
    /// matched; or the forbids that matched, or the policies that failed on
    /// the request; empty when nothing permitted it).
    pub policies: Vec<String>,
    /// `reason`: why it was denied; null when allowed.
    pub reason: Option<String>,
}

/// One task: `task show`, `task revoke`, and each element of `task list`.
#[derive(Debug, Clone, Serialize)]
pub struct TaskView {
    /// `id`: the task's id (its tokens' `txn`).
    pub id: String,
    /// `spiffe_id`: the owner's SPIFFE ID (its tokens' `sub`).
    pub spiffe_id: String,
    /// `entry_id`: the registration entry that granted that identity.
    pub entry_id: String,
    /// `owner_pid`: the process that began the task (for `task run`, the
    /// runner).
    pub owner_pid: i32,
    /// `owner_uid`.
    pub owner_uid: u32,
    /// `owner_executable`: its path (`""` if unknown).
    pub owner_executable: String,
    /// `audience`: the one audience of its tokens.
    pub audience: String,
    /// `intent`: what it is for, in words.
    pub intent: String,
    /// `tools`: the tools it may use.
    pub tools: Vec<String>,
    /// `bound`: its tokens are bound to the owner's X.509-SVID.
    pub bound: bool,
    /// `created_at`: RFC 3339 (or `null`).
    pub created_at: Option<Timestamp>,
    /// `deadline`: when it ends at the latest, RFC 3339 (or `null`).
    pub deadline: Option<Timestamp>,
    /// `tokens_issued`: tokens issued for it so far, exchanges included.
    pub tokens_issued: u64,
    /// `state`: `"active"` or `"ended"`.
    pub state: String,
    /// `end_reason`: why it ended (`"completed"`, `"deadline"`, `"owner
    /// exited"`, `"entry removed"`, `"revoked"`), `null` while active.
    pub end_reason: Option<String>,
    /// `ended_at`: RFC 3339, `null` while active.
    pub ended_at: Option<Timestamp>,
}

/// `tether task list`.
#[derive(Debug, Clone, Serialize)]
pub struct TasksReport {
    /// `tasks`: in the agent's order.
    pub tasks: Vec<TaskView>,
}

/// `tether token exchange`.
#[derive(Debug, Clone, Serialize)]
pub struct ExchangedToken {
    /// `token`: the new task token (compact JWS).
    pub token: String,
    /// `expires_at`: RFC 3339 (or `null` if the agent did not say).
    pub expires_at: Option<Timestamp>,
}

/// `tether token validate`. Every field is always present; all but `valid`
/// and `reason` are empty when the token is not valid.
#[derive(Debug, Clone, Serialize)]
pub struct TaskTokenValidation {
    /// `valid`.
    pub valid: bool,
    /// `reason`: why not, when not valid; `null` when valid.
    pub reason: Option<String>,
    /// `spiffe_id`: the subject (the task owner's SPIFFE ID).
    pub spiffe_id: String,
    /// `task_id`: the task (`txn`).
    pub task_id: String,
    /// `actors`: the actor chain (`act`), newest actor first; empty when
    /// the token was never exchanged.
    pub actors: Vec<String>,
    /// `claims`: every claim of the token, as the agent returned them.
    pub claims: serde_json::Value,
}

/// `tether audit verify` on an intact trail.
#[derive(Debug, Clone, Serialize)]
pub struct AuditVerified {
    /// `intact`: `true`.
    pub intact: bool,
    /// `records`: records checked.
    pub records: u64,
    /// `files`: audit files read.
    pub files: usize,
    /// `head_seq`: the seq the trail's `HEAD` names (the last record known
    /// synced; 0 for an empty trail).
    pub head_seq: u64,
    /// `head_hash`: `HEAD`'s SHA-256, lowercase hex. Kept off the node, it
    /// lets a later check show the trail up to it was not rewritten.
    pub head_hash: String,
    /// `last_seq`: the last record's seq; more than `head_seq` while a
    /// running agent has records not yet synced.
    pub last_seq: u64,
    /// `sealed_by`: the id of the audit key that sealed `HEAD` (`null`: a
    /// `HEAD` written before seals).
    pub sealed_by: Option<String>,
    /// `sealed_at`: when `HEAD` was sealed (RFC 3339).
    pub sealed_at: Option<String>,
    /// `seals_checked`: the seals were checked against `--public-key`.
    pub seals_checked: bool,
    /// `recoveries`: the agent's `audit-recovered` records (a start that
    /// found damage or a crash's leftovers).
    pub recoveries: Vec<AuditRecoveryView>,
}

/// One `audit-recovered` record.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecoveryView {
    /// `file`: its audit file.
    pub file: PathBuf,
    /// `line`: its line, from 1.
    pub line: u64,
    /// `seq`: its seq.
    pub seq: u64,
    /// `reason`: what the agent found and did.
    pub reason: String,
}

/// `tether audit verify` on a broken trail.
#[derive(Debug, Clone, Serialize)]
pub struct AuditBroken {
    /// `intact`: `false`.
    pub intact: bool,
    /// `file`: the file of the first broken record (or `HEAD`).
    pub file: PathBuf,
    /// `line`: its line, from 1.
    pub line: u64,
    /// `problem`: what is wrong there.
    pub problem: String,
}

// === impl Format ===

impl Format {
    /// `--json` or not.
    pub fn from_json_flag(json: bool) -> Self {
        if json { Self::Json } else { Self::Readable }
    }

    /// Prints the result of `fetch x509`.
    pub fn fetch_x509(self, output: &FetchX509Output) -> io::Result<()> {
        self.print(output, |w, now| render_fetch_x509(w, output, now))
    }

    /// Prints one `watch` update, flushed so that a pipe sees it at once.
    pub fn watch_update(self, update: &WatchUpdate) -> io::Result<()> {
        self.print(update, |w, now| render_watch_update(w, update, now))
    }

    /// Prints the result of `fetch jwt`.
    pub fn fetch_jwt(self, report: &JwtReport) -> io::Result<()> {
        self.print(report, |w, now| render_jwt(w, report, now))
    }

    /// Prints a bare token and a newline (`fetch jwt --token-only`), for
    /// `$(...)` in shells. The format does not matter here.
    pub fn token(token: &str) -> io::Result<()> {
        let mut out = io::stdout().lock();
        writeln!(out, "{token}")?;
        out.flush()
    }

    /// Prints the result of `fetch bundles`.
    pub fn bundles(self, report: &BundlesReport) -> io::Result<()> {
        self.print(report, |w, now| render_bundles(w, report, now))
    }

    /// Prints the result of `validate jwt`.
    pub fn validation(self, report: &ValidationReport) -> io::Result<()> {
        self.print(report, |w, _| render_validation(w, report))
    }

    /// Prints one entry (`entry create|show|update`).
    pub fn entry(self, entry: &EntryView) -> io::Result<()> {
        self.print(entry, |w, now| render_entry(w, entry, now))
    }

    /// Prints the result of `entry list`: a table.
    pub fn entries(self, report: &EntriesReport) -> io::Result<()> {
        self.print(report, |w, _| render_entries(w, report))
    }

    /// Prints the result of `entry delete`.
    pub fn deleted(self, report: &DeletedReport) -> io::Result<()> {
        self.print(report, |w, _| {
            writeln!(w, "Deleted entry {}", printable(&report.deleted))
        })
    }

    /// Prints the result of `svid list`: a table, a line per holder.
    pub fn svids(self, report: &SvidsReport) -> io::Result<()> {
        self.print(report, |w, now| render_svids(w, report, now))
    }

    /// Prints the result of `healthcheck`.
    pub fn health(self, report: &HealthReport) -> io::Result<()> {
        self.print(report, |w, _| render_health(w, report))
    }

    /// Prints the result of `reload`.
    pub fn reload(self, report: &ReloadReport) -> io::Result<()> {
        self.print(report, |w, _| {
            writeln!(
                w,
                "reloaded: {} config entr{}, {} federation{}",
                report.config_entries,
                if report.config_entries == 1 {
                    "y"
                } else {
                    "ies"
                },
                report.federations,
                plural(report.federations as usize)
            )?;
            if !report.needs_restart.is_empty() {
                writeln!(
                    w,
                    "not applied, they need a restart: {}",
                    report.needs_restart.join(", ")
                )?;
            }
            Ok(())
        })
    }

    /// Prints the result of `policy validate`: one line when valid ("N
    /// policies in M files: valid"); the problems themselves go to stderr
    /// (see [`PolicyProblemView`]'s Display), unless `--json`.
    pub fn policy_validation(self, report: &PolicyValidation) -> io::Result<()> {
        self.print(report, |w, _| render_policy_validation(w, report))
    }

    /// Prints the result of `policy check`: "allow (policies: a, b)" or
    /// "deny: reason (policies: c)".
    pub fn policy_decision(self, report: &PolicyDecisionView) -> io::Result<()> {
        self.print(report, |w, _| render_policy_decision(w, report))
    }

    /// Prints one task (`task show|revoke`).
    pub fn task(self, task: &TaskView) -> io::Result<()> {
        self.print(task, |w, now| render_task(w, task, now))
    }

    /// Prints the result of `task list`: a table.
    pub fn tasks(self, report: &TasksReport) -> io::Result<()> {
        self.print(report, |w, now| render_tasks(w, report, now))
    }

    /// Prints the result of `token exchange`: the bare token (for `$(...)`)
    /// or, with `--json`, the token and its expiry.
    pub fn exchanged(self, exchanged: &ExchangedToken) -> io::Result<()> {
        self.print(exchanged, |w, _| {
            writeln!(w, "{}", printable(&exchanged.token))
        })
    }

    /// Prints the result of `token validate`. Readable output is for a
    /// valid token only (an invalid one is an error on stderr).
    pub fn task_validation(self, report: &TaskTokenValidation) -> io::Result<()> {
        self.print(report, |w, _| render_task_validation(w, report))
    }

    /// Prints a JSON document the agent sent (the SPIFFE bundle): indented
    /// for people, one line for `--json`. It was parsed, so it cannot carry
    /// raw control characters.
    pub fn document(self, document: &serde_json::Value) -> io::Result<()> {
        self.print(document, |w, _| {
            let text = serde_json::to_string_pretty(document).map_err(|_| std::fmt::Error)?;
            writeln!(w, "{text}")
        })
    }

    /// Prints PEM text as it is (`bundle show --format pem`), whatever the
    /// format: PEM is already the machine-readable form.
    pub fn pem(text: &str) -> io::Result<()> {
        let mut out = io::stdout().lock();
        out.write_all(text.as_bytes())?;
        out.flush()
    }

    /// Prints the verdict of `audit verify` on an intact trail.
    pub fn audit_verified(self, report: &AuditVerified) -> io::Result<()> {
        self.print(report, |w, _| {
            write!(
                w,
                "audit trail intact: {} record{} in {} file{}, head seq {}",
                report.records,
                plural(report.records as usize),
                report.files,
                plural(report.files),
                report.head_seq
            )?;
            if report.last_seq > report.head_seq {
                write!(
                    w,
                    " ({} more written, not yet synced)",
                    report.last_seq - report.head_seq
                )?;
            }
            match (&report.sealed_by, &report.sealed_at) {
                (Some(key), Some(time)) if report.seals_checked => write!(
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
        })
    }

    /// Prints the verdict of `audit verify` on a broken trail: one line.
    pub fn audit_broken(self, report: &AuditBroken) -> io::Result<()> {
        self.print(report, |w, _| {
            writeln!(
                w,
                "audit trail broken at {}:{}: {}",
                printable(&report.file.display().to_string()),
                report.line,
                printable(&report.problem)
            )
        })
    }

    /// Prints one audit record (`audit tail`): a readable line, or with
    /// `--json` the line exactly as stored (it parsed as JSON, so it holds
    /// no raw control characters), flushed so a pipe sees it at once.
    pub fn audit_record(self, record: &AuditRecord) -> io::Result<()> {
        let text = match self {
            Self::Json => format!("{}\n", record.line),
            Self::Readable => {
                let mut text = String::new();
                render_audit_record(&mut text, record).map_err(io::Error::other)?;
                text
            }
        };
        let mut out = io::stdout().lock();
        out.write_all(text.as_bytes())?;
        out.flush()
    }

    /// JSON is written compact on one line, so streams are JSON lines.
    fn print<T: Serialize>(
        self,
        value: &T,
        readable: impl FnOnce(&mut String, OffsetDateTime) -> std::fmt::Result,
    ) -> io::Result<()> {
        let text = match self {
            Self::Json => {
                let mut line = serde_json::to_string(value).map_err(io::Error::other)?;
                line.push('\n');
                line
            }
            Self::Readable => {
                let mut text = String::new();
                readable(&mut text, OffsetDateTime::now_utc()).map_err(io::Error::other)?;
                text
            }
        };
        // One write per document: a reader never sees half an update.
        let mut out = io::stdout().lock();
        out.write_all(text.as_bytes())?;
        out.flush()
    }
}

// === impl Timestamp ===

impl Timestamp {
    /// The Unix time `seconds`, if representable.
    pub fn from_unix(seconds: i64) -> Option<Self> {
        OffsetDateTime::from_unix_timestamp(seconds).ok().map(Self)
    }

    /// The Unix time in milliseconds the admin API sends; `None` for 0
    /// (the agent's "unknown") or out of range.
    pub fn from_unix_ms(ms: i64) -> Option<Self> {
        if ms == 0 {
            return None;
        }
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
            .ok()
            .map(Self)
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
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

impl std::fmt::Display for Ttl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for Ttl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

fn render_fetch_x509(
    w: &mut String,
    output: &FetchX509Output,
    now: OffsetDateTime,
) -> std::fmt::Result {
    render_x509(w, &output.report, now)?;
    if !output.files_written.is_empty() {
        writeln!(w)?;
        for path in &output.files_written {
            writeln!(w, "Wrote {}", printable(&path.display().to_string()))?;
        }
    }
    Ok(())
}

fn render_x509(w: &mut String, report: &X509Report, now: OffsetDateTime) -> std::fmt::Result {
    let n = report.svids.len();
    writeln!(w, "Received {n} X.509-SVID{}", plural(n))?;
    for svid in &report.svids {
        writeln!(w)?;
        writeln!(w, "SPIFFE ID:         {}", printable(&svid.spiffe_id))?;
        if !svid.hint.is_empty() {
            writeln!(w, "Hint:              {}", printable(&svid.hint))?;
        }
        writeln!(w, "Serial:            {}", svid.serial)?;
        writeln!(
            w,
            "Valid from:        {} ({})",
            svid.not_before,
            relative(svid.not_before.0, now)
        )?;
        writeln!(
            w,
            "Valid until:       {} ({})",
            svid.not_after,
            relative(svid.not_after.0, now)
        )?;
        writeln!(w, "DNS names:         {}", list(&svid.dns_names))?;
        writeln!(w, "Chain length:      {}", svid.chain_length)?;
    }
    writeln!(w)?;
    writeln!(w, "Trust domain CAs:  {}", report.trust_domain_cas)?;
    let federated: Vec<String> = report
        .federated_bundles
        .iter()
        .map(|b| {
            format!(
                "{} ({} CA{})",
                printable(&b.trust_domain),
                b.cas,
                plural(b.cas)
            )
        })
        .collect();
    if federated.is_empty() {
        writeln!(w, "Federated bundles: 0")
    } else {
        writeln!(
            w,
            "Federated bundles: {}: {}",
            federated.len(),
            federated.join(", ")
        )
    }
}

fn render_watch_update(
    w: &mut String,
    update: &WatchUpdate,
    now: OffsetDateTime,
) -> std::fmt::Result {
    let n = update.report.svids.len();
    writeln!(
        w,
        "{}  update {}: {n} X.509-SVID{}",
        update.received_at,
        update.update,
        plural(n)
    )?;
    for svid in &update.report.svids {
        writeln!(
            w,
            "  {}  serial {}  expires {} ({})",
            printable(&svid.spiffe_id),
            svid.serial,
            svid.not_after,
            relative(svid.not_after.0, now)
        )?;
    }
    writeln!(
        w,
        "  trust domain CAs: {}, federated bundles: {}",
        update.report.trust_domain_cas,
        update.report.federated_bundles.len()
    )?;
    writeln!(w)
}

fn render_jwt(w: &mut String, report: &JwtReport, now: OffsetDateTime) -> std::fmt::Result {
    let n = report.svids.len();
    writeln!(w, "Received {n} JWT-SVID{}", plural(n))?;
    for svid in &report.svids {
        writeln!(w)?;
        writeln!(w, "SPIFFE ID:  {}", printable(&svid.spiffe_id))?;
        if !svid.hint.is_empty() {
            writeln!(w, "Hint:       {}", printable(&svid.hint))?;
        }
        match svid.expires_at {
            Some(at) => writeln!(w, "Expires:    {at} ({})", relative(at.0, now))?,
            None => writeln!(w, "Expires:    (unknown)")?,
        }
        writeln!(w, "Token:      {}", printable(&svid.token))?;
    }
    Ok(())
}

fn render_bundles(w: &mut String, report: &BundlesReport, now: OffsetDateTime) -> std::fmt::Result {
    if report.bundles.is_empty() {
        return writeln!(w, "No bundles received");
    }
    for (i, bundle) in report.bundles.iter().enumerate() {
        if i > 0 {
            writeln!(w)?;
        }
        writeln!(w, "Trust domain: {}", printable(&bundle.trust_domain))?;
        let n = bundle.x509_authorities.len();
        writeln!(w, "  X.509 authorities: {n}")?;
        for ca in &bundle.x509_authorities {
            writeln!(w, "    {}", printable(&ca.subject))?;
            writeln!(
                w,
                "      serial {}, expires {} ({})",
                ca.serial,
                ca.not_after,
                relative(ca.not_after.0, now)
            )?;
        }
        let n = bundle.jwt_authorities.len();
        writeln!(w, "  JWT authorities: {n}")?;
        for key in &bundle.jwt_authorities {
            let kid = if key.kid.is_empty() {
                "(no kid)"
            } else {
                &key.kid
            };
            let key_type = if key.key_type.is_empty() {
                "?"
            } else {
                &key.key_type
            };
            writeln!(w, "    kid {} ({})", printable(kid), printable(key_type))?;
        }
    }
    Ok(())
}

fn render_validation(w: &mut String, report: &ValidationReport) -> std::fmt::Result {
    writeln!(w, "valid")?;
    writeln!(w, "SPIFFE ID: {}", printable(&report.spiffe_id))?;
    writeln!(w, "Claims:")?;
    // Pretty JSON escapes control characters itself.
    let claims = serde_json::to_string_pretty(&report.claims).map_err(|_| std::fmt::Error)?;
    writeln!(w, "{claims}")
}

fn render_task(w: &mut String, task: &TaskView, now: OffsetDateTime) -> std::fmt::Result {
    writeln!(w, "ID:           {}", printable(&task.id))?;
    writeln!(w, "SPIFFE ID:    {}", printable(&task.spiffe_id))?;
    writeln!(w, "Entry:        {}", or_none(&task.entry_id))?;
    writeln!(
        w,
        "Owner:        pid {}, uid {}, {}",
        task.owner_pid,
        task.owner_uid,
        or_none(&task.owner_executable)
    )?;
    writeln!(w, "Audience:     {}", printable(&task.audience))?;
    writeln!(w, "Intent:       {}", or_none(&task.intent))?;
    writeln!(w, "Tools:        {}", list(&task.tools))?;
    writeln!(
        w,
        "Bound:        {}",
        if task.bound {
            "yes (to the owner's X.509-SVID)"
        } else {
            "no"
        }
    )?;
    writeln!(w, "Created:      {}", when(task.created_at, now))?;
    writeln!(w, "Deadline:     {}", when(task.deadline, now))?;
    writeln!(w, "Tokens:       {}", task.tokens_issued)?;
    match &task.end_reason {
        Some(_) => writeln!(
            w,
            "State:        {}, {}",
            task_state(task),
            when(task.ended_at, now)
        ),
        None => writeln!(w, "State:        {}", task_state(task)),
    }
}

fn render_tasks(w: &mut String, report: &TasksReport, now: OffsetDateTime) -> std::fmt::Result {
    if report.tasks.is_empty() {
        return writeln!(w, "No tasks");
    }
    let rows = report.tasks.iter().map(|t| {
        vec![
            printable(&t.id).into_owned(),
            printable(&t.spiffe_id).into_owned(),
            t.owner_pid.to_string(),
            printable(&t.audience).into_owned(),
            cells(&t.tools),
            when(t.deadline, now),
            t.tokens_issued.to_string(),
            task_state(t),
        ]
    });
    table(
        w,
        &[
            "ID",
            "SPIFFE ID",
            "OWNER PID",
            "AUDIENCE",
            "TOOLS",
            "DEADLINE",
            "TOKENS",
            "STATE",
        ],
        rows,
    )
}

/// "active", or "ended: revoked".
fn task_state(task: &TaskView) -> String {
    match &task.end_reason {
        Some(reason) => format!("{}: {}", printable(&task.state), printable(reason)),
        None => printable(&task.state).into_owned(),
    }
}

fn render_task_validation(w: &mut String, report: &TaskTokenValidation) -> std::fmt::Result {
    if !report.valid {
        let reason = report.reason.as_deref().unwrap_or("");
        return writeln!(w, "invalid: {}", printable(reason));
    }
    writeln!(w, "valid")?;
    writeln!(w, "SPIFFE ID:    {}", printable(&report.spiffe_id))?;
    writeln!(w, "Task:         {}", printable(&report.task_id))?;
    if report.actors.is_empty() {
        writeln!(w, "Actor chain:  (none: not exchanged)")?;
    } else {
        writeln!(w, "Actor chain:  {} (newest first)", list(&report.actors))?;
    }
    writeln!(w, "Claims:")?;
    // Pretty JSON escapes control characters itself.
    let claims = serde_json::to_string_pretty(&report.claims).map_err(|_| std::fmt::Error)?;
    writeln!(w, "{claims}")
}

fn render_policy_validation(w: &mut String, report: &PolicyValidation) -> std::fmt::Result {
    if report.valid {
        writeln!(
            w,
            "{} polic{} in {} file{}: valid",
            report.policies,
            if report.policies == 1 { "y" } else { "ies" },
            report.files,
            plural(report.files)
        )
    } else {
        writeln!(
            w,
            "invalid: {} problem{}",
            report.errors.len(),
            plural(report.errors.len())
        )
    }
}

fn render_policy_decision(w: &mut String, report: &PolicyDecisionView) -> std::fmt::Result {
    match &report.reason {
        None => write!(w, "{}", report.decision)?,
        Some(reason) => write!(w, "{}: {}", report.decision, printable(reason))?,
    }
    if !report.policies.is_empty() {
        write!(w, " (policies: {})", list(&report.policies))?;
    }
    writeln!(w)
}

// === impl PolicyProblemView ===

impl std::fmt::Display for PolicyProblemView {
    /// `FILE:LINE:COLUMN: reason`, as compilers print, so editors jump
    /// to it; control characters escaped.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            printable(&self.file.display().to_string()),
            self.line,
            self.column,
            printable(&self.reason)
        )
    }
}

fn render_entry(w: &mut String, entry: &EntryView, now: OffsetDateTime) -> std::fmt::Result {
    writeln!(w, "ID:              {}", printable(&entry.id))?;
    writeln!(w, "SPIFFE ID:       {}", printable(&entry.spiffe_id))?;
    writeln!(w, "Selectors:       {}", list(&entry.selectors))?;
    writeln!(w, "Source:          {}", entry.source)?;
    writeln!(w, "Revision:        {}", entry.revision)?;
    writeln!(w, "X.509-SVID TTL:  {}", ttl(entry.x509_svid_ttl))?;
    writeln!(w, "JWT-SVID TTL:    {}", ttl(entry.jwt_svid_ttl))?;
    writeln!(w, "DNS names:       {}", list(&entry.dns_names))?;
    writeln!(w, "Hint:            {}", or_none(&entry.hint))?;
    writeln!(w, "Federates with:  {}", list(&entry.federates_with))?;
    writeln!(w, "Created:         {}", when(entry.created_at, now))?;
    writeln!(w, "Updated:         {}", when(entry.updated_at, now))
}

fn render_entries(w: &mut String, report: &EntriesReport) -> std::fmt::Result {
    if report.entries.is_empty() {
        return writeln!(w, "No entries");
    }
    let rows = report.entries.iter().map(|e| {
        vec![
            printable(&e.id).into_owned(),
            printable(&e.spiffe_id).into_owned(),
            cells(&e.selectors),
            e.source.to_owned(),
            ttl(e.x509_svid_ttl),
            ttl(e.jwt_svid_ttl),
            or_dash(&e.hint),
        ]
    });
    table(
        w,
        &[
            "ID",
            "SPIFFE ID",
            "SELECTORS",
            "SOURCE",
            "X509 TTL",
            "JWT TTL",
            "HINT",
        ],
        rows,
    )
}

fn render_svids(w: &mut String, report: &SvidsReport, now: OffsetDateTime) -> std::fmt::Result {
    if report.svids.is_empty() {
        return writeln!(w, "No live X.509-SVIDs");
    }
    let mut rows = Vec::new();
    for svid in &report.svids {
        let expires = match svid.not_after {
            Some(at) => format!("{at} ({})", relative(at.0, now)),
            None => "(unknown)".to_owned(),
        };
        let columns = |pid: String, uid: String, executable: String| {
            vec![
                printable(&svid.spiffe_id).into_owned(),
                printable(&svid.serial).into_owned(),
                expires.clone(),
                printable(&svid.entry_id).into_owned(),
                pid,
                uid,
                executable,
            ]
        };
        if svid.holders.is_empty() {
            rows.push(columns("-".into(), "-".into(), "-".into()));
        }
        // A line per holder, each complete, so that `grep` finds a process
        // together with its SVID.
        for holder in &svid.holders {
            rows.push(columns(
                holder.pid.to_string(),
                holder.uid.to_string(),
                or_dash(&holder.executable),
            ));
        }
    }
    table(
        w,
        &[
            "SPIFFE ID",
            "SERIAL",
            "EXPIRES",
            "ENTRY",
            "PID",
            "UID",
            "EXECUTABLE",
        ],
        rows,
    )
}

fn render_health(w: &mut String, report: &HealthReport) -> std::fmt::Result {
    let state = if report.serving {
        "serving"
    } else {
        "not serving"
    };
    writeln!(
        w,
        "{state}: trust domain {}, {} entr{}, {} open stream{}",
        printable(&report.trust_domain),
        report.entries,
        if report.entries == 1 { "y" } else { "ies" },
        report.open_streams,
        plural(report.open_streams as usize)
    )?;
    for problem in &report.problems {
        writeln!(w, "  {}", printable(problem))?;
    }
    Ok(())
}

/// Aligned columns, two spaces apart; the last column is not padded.
/// Cells must already be printable.
/// `time  seq  event  decision  spiffe-id  key=value...`: the fields a
/// record has, ids as they are, free text quoted.
fn render_audit_record(w: &mut String, record: &AuditRecord) -> std::fmt::Result {
    let event = &record.event;
    write!(
        w,
        "{}  {:>6}  {:<15} {:<5}  {}",
        Timestamp(record.time),
        record.seq,
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

fn table(
    w: &mut String,
    header: &[&str],
    rows: impl IntoIterator<Item = Vec<String>>,
) -> std::fmt::Result {
    let rows: Vec<Vec<String>> = rows.into_iter().collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut line = |cells: &mut dyn Iterator<Item = &str>| -> std::fmt::Result {
        let mut text = String::new();
        for (i, (cell, width)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            text.push_str(cell);
            let pad = width.saturating_sub(cell.chars().count());
            text.extend(std::iter::repeat_n(' ', pad));
        }
        writeln!(w, "{}", text.trim_end())
    };
    line(&mut header.iter().copied())?;
    for row in &rows {
        line(&mut row.iter().map(String::as_str))?;
    }
    Ok(())
}

fn ttl(ttl: Option<Ttl>) -> String {
    ttl.map_or_else(|| "default".to_owned(), |t| t.to_string())
}

fn when(at: Option<Timestamp>, now: OffsetDateTime) -> String {
    at.map_or_else(
        || "(unknown)".to_owned(),
        |at| format!("{at} ({})", relative(at.0, now)),
    )
}

/// Several values in one table cell.
fn cells(items: &[String]) -> String {
    if items.is_empty() {
        return "-".to_owned();
    }
    items
        .iter()
        .map(|s| printable(s))
        .collect::<Vec<_>>()
        .join(",")
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        printable(s).into_owned()
    }
}

fn or_none(s: &str) -> Cow<'_, str> {
    if s.is_empty() {
        Cow::Borrowed("(none)")
    } else {
        printable(s)
    }
}

/// "in 59m", "3h 5m ago": coarse, because the exact instant is printed
/// beside it.
pub fn relative(then: OffsetDateTime, now: OffsetDateTime) -> String {
    let seconds = (then - now).whole_seconds();
    let span = coarse(seconds.unsigned_abs());
    if seconds >= 0 {
        format!("in {span}")
    } else {
        format!("{span} ago")
    }
}

fn coarse(seconds: u64) -> String {
    const MINUTE: u64 = 60;
    const HOUR: u64 = 60 * MINUTE;
    const DAY: u64 = 24 * HOUR;
    let pair = |big: u64, big_unit: &str, small: u64, small_unit: &str| {
        if small == 0 {
            format!("{big}{big_unit}")
        } else {
            format!("{big}{big_unit} {small}{small_unit}")
        }
    };
    match seconds {
        s if s < MINUTE => format!("{s}s"),
        s if s < HOUR => format!("{}m", s / MINUTE),
        s if s < DAY => pair(s / HOUR, "h", s % HOUR / MINUTE, "m"),
        s => pair(s / DAY, "d", s % DAY / HOUR, "h"),
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        return "(none)".to_owned();
    }
    items
        .iter()
        .map(|s| printable(s))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A caller-chosen value in a `key=value` line: as it is when it cannot be
/// mistaken for more fields, else quoted and escaped (Debug), so a space,
/// an `=`, a quote (or, in a list, a comma) cannot forge a field.
fn field_value(s: &str, in_list: bool) -> Cow<'_, str> {
    let plain = !s.is_empty()
        && !s.chars().any(|c| {
            c.is_control() || c.is_whitespace() || c == '=' || c == '"' || (in_list && c == ',')
        });
    if plain {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(format!("{s:?}"))
    }
}

/// `s` with control characters escaped, so a hostile agent cannot drive
/// the terminal.
pub(super) fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_unix(seconds).unwrap()
    }

    #[test]
    fn relative_times_are_coarse() {
        let now = at(1_000_000).0;
        let cases = [
            (0, "in 0s"),
            (42, "in 42s"),
            (59 * 60 + 59, "in 59m"),
            (3600, "in 1h"),
            (3600 + 5 * 60, "in 1h 5m"),
            (86_400 * 2 + 3600 * 3, "in 2d 3h"),
            (-90, "1m ago"),
        ];
        for (delta, want) in cases {
            assert_eq!(relative(at(1_000_000 + delta).0, now), want, "{delta}");
        }
    }

    #[test]
    fn timestamps_are_rfc3339_in_json() {
        let ts = at(1_700_000_000);
        assert_eq!(ts.to_string(), "2023-11-14T22:13:20Z");
        assert_eq!(
            serde_json::to_value(ts).unwrap(),
            serde_json::json!("2023-11-14T22:13:20Z")
        );
        // Outside RFC 3339's years: shown, not a panic.
        let far = Timestamp(OffsetDateTime::from_unix_timestamp(-100_000_000_000).unwrap());
        assert!(!far.to_string().is_empty());
    }

    #[test]
    fn audit_records_are_one_readable_line() {
        use crate::audit::{AuditEvent, EventKind, Outcome};
        let event = AuditEvent {
            spiffe_id: Some("spiffe://example.org/agent".into()),
            pid: Some(42),
            task_id: Some("tsk-1".into()),
            audience: Some("mcp://jira".into()),
            tools: vec!["jira.search".into(), "jira.read".into()],
            policy_ids: vec!["p0".into()],
            reason: Some("tool \"x\"\n\u{1b}[2J".into()),
            ..AuditEvent::new(EventKind::Deny, Outcome::Deny)
        };
        let record = AuditRecord {
            seq: 7,
            time: at(1_700_000_000).0,
            prev: "0".repeat(64),
            event,
            line: String::new(),
        };
        let mut text = String::new();
        render_audit_record(&mut text, &record).unwrap();
        assert_eq!(
            text,
            "2023-11-14T22:13:20Z       7  deny            deny   spiffe://example.org/agent  pid=42 \
             task=tsk-1 audience=mcp://jira tools=jira.search,jira.read policies=p0 \
             reason=\"tool \\\"x\\\"\\n\\u{1b}[2J\"\n"
        );
    }

    #[test]
    fn caller_values_cannot_forge_fields_of_an_audit_line() {
        assert_eq!(field_value("mcp://jira", false), "mcp://jira");
        assert_eq!(
            field_value("a b token=FORGED", false),
            "\"a b token=FORGED\""
        );
        assert_eq!(field_value("x\u{1b}[2J", false), "\"x\\u{1b}[2J\"");
        assert_eq!(field_value("a,b", false), "a,b");
        assert_eq!(field_value("a,b", true), "\"a,b\"");
        assert_eq!(field_value("", false), "\"\"");
    }

    #[test]
    fn agent_strings_cannot_drive_the_terminal() {
        assert_eq!(printable("spiffe://a/b"), "spiffe://a/b");
        assert_eq!(printable("x\u{1b}[2Jy\n"), "x\\u{1b}[2Jy\\n");
    }

    fn entry(id: &str, source: &'static str, selectors: &[&str]) -> EntryView {
        EntryView {
            id: id.into(),
            spiffe_id: format!("spiffe://example.org/{id}"),
            selectors: selectors.iter().map(|s| (*s).to_owned()).collect(),
            source,
            revision: 1,
            x509_svid_ttl: Some(Ttl(Duration::from_secs(600))),
            jwt_svid_ttl: None,
            dns_names: Vec::new(),
            hint: String::new(),
            federates_with: Vec::new(),
            created_at: Some(at(0)),
            updated_at: None,
        }
    }

    #[test]
    fn entry_tables_align_and_show_defaults() {
        let report = EntriesReport {
            entries: vec![
                entry("cfg-1", "config", &["unix:uid:1"]),
                entry("ent-long-id", "api", &["unix:uid:2", "unix:gid:2"]),
            ],
        };
        let mut text = String::new();
        render_entries(&mut text, &report).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "ID           SPIFFE ID                         SELECTORS              SOURCE  X509 TTL  JWT TTL  HINT",
                "cfg-1        spiffe://example.org/cfg-1        unix:uid:1             config  10m       default  -",
                "ent-long-id  spiffe://example.org/ent-long-id  unix:uid:2,unix:gid:2  api     10m       default  -",
            ]
        );
        let mut text = String::new();
        render_entry(&mut text, &report.entries[0], at(60).0).unwrap();
        assert!(text.starts_with("ID:              cfg-1\n"), "{text}");
        assert!(text.contains("Hint:            (none)"), "{text}");
        assert!(
            text.contains("Created:         1970-01-01T00:00:00Z (1m ago)"),
            "{text}"
        );
        assert!(text.contains("Updated:         (unknown)"), "{text}");
        let mut empty = String::new();
        render_entries(&mut empty, &EntriesReport { entries: vec![] }).unwrap();
        assert_eq!(empty, "No entries\n");
    }

    #[test]
    fn svid_tables_have_a_line_per_holder_or_a_dash() {
        let svid = |id: &str, holders: Vec<HolderView>| IssuedSvidView {
            spiffe_id: format!("spiffe://example.org/{id}"),
            serial: "0a".into(),
            not_before: Some(at(0)),
            not_after: Some(at(3600)),
            entry_id: format!("ent-{id}"),
            holders,
        };
        let holder = |pid: i32| HolderView {
            pid,
            uid: 0,
            executable: "/usr/bin/x".into(),
            selectors: Vec::new(),
            since: None,
        };
        let report = SvidsReport {
            svids: vec![svid("a", vec![holder(7), holder(8)]), svid("b", Vec::new())],
        };
        let mut text = String::new();
        render_svids(&mut text, &report, at(0).0).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("SPIFFE ID"), "{text}");
        assert!(lines[1].contains("ent-a  7    0    /usr/bin/x"), "{text}");
        assert!(lines[2].contains("ent-a  8    0    /usr/bin/x"), "{text}");
        assert!(lines[1].contains("1970-01-01T01:00:00Z (in 1h)"), "{text}");
        assert!(lines[3].starts_with("spiffe://example.org/b"), "{text}");
        assert!(lines[3].ends_with("ent-b  -    -    -"), "{text}");
    }

    #[test]
    fn health_and_reload_lines_count_in_words() {
        let health = |entries, open_streams| HealthReport {
            serving: true,
            trust_domain: "example.org".into(),
            entries,
            open_streams,
            version: "0.1.0".into(),
            problems: Vec::new(),
        };
        let mut text = String::new();
        render_health(&mut text, &health(1, 2)).unwrap();
        assert_eq!(
            text,
            "serving: trust domain example.org, 1 entry, 2 open streams\n"
        );
        let mut text = String::new();
        render_health(&mut text, &health(3, 1)).unwrap();
        assert_eq!(
            text,
            "serving: trust domain example.org, 3 entries, 1 open stream\n"
        );
        let json = serde_json::to_value(health(3, 1)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"serving": true, "trust_domain": "example.org",
                "entries": 3, "open_streams": 1, "version": "0.1.0", "problems": []})
        );
    }

    #[test]
    fn policy_reports_read_like_compiler_output() {
        let problem = PolicyProblemView {
            file: "policies/a.cedar".into(),
            line: 3,
            column: 7,
            reason: "unexpected token `}`\u{1b}".into(),
        };
        assert_eq!(
            problem.to_string(),
            "policies/a.cedar:3:7: unexpected token `}`\\u{1b}"
        );
        let valid = |policies, files| PolicyValidation {
            valid: true,
            files,
            policies,
            ids: Vec::new(),
            errors: Vec::new(),
            warnings: Vec::new(),
        };
        let mut text = String::new();
        render_policy_validation(&mut text, &valid(7, 5)).unwrap();
        assert_eq!(text, "7 policies in 5 files: valid\n");
        let mut text = String::new();
        render_policy_validation(&mut text, &valid(1, 1)).unwrap();
        assert_eq!(text, "1 policy in 1 file: valid\n");

        let decision = |decision, policies: &[&str], reason: Option<&str>| PolicyDecisionView {
            decision,
            policies: policies.iter().map(|p| (*p).to_owned()).collect(),
            reason: reason.map(str::to_owned),
        };
        let mut text = String::new();
        render_policy_decision(&mut text, &decision("allow", &["a", "b"], None)).unwrap();
        assert_eq!(text, "allow (policies: a, b)\n");
        let mut text = String::new();
        let denied = decision("deny", &["c"], Some("forbidden by c"));
        render_policy_decision(&mut text, &denied).unwrap();
        assert_eq!(text, "deny: forbidden by c (policies: c)\n");
        let mut text = String::new();
        render_policy_decision(
            &mut text,
            &decision("deny", &[], Some("no policy permits x")),
        )
        .unwrap();
        assert_eq!(text, "deny: no policy permits x\n");
        assert_eq!(
            serde_json::to_value(&denied).unwrap(),
            serde_json::json!({"decision": "deny", "policies": ["c"], "reason": "forbidden by c"})
        );
    }

    fn task(id: &str, end_reason: Option<&str>) -> TaskView {
        TaskView {
            id: id.into(),
            spiffe_id: "spiffe://example.org/agent".into(),
            entry_id: "cfg-1".into(),
            owner_pid: 4242,
            owner_uid: 1000,
            owner_executable: "/usr/bin/tether".into(),
            audience: "spiffe://example.org/mcp".into(),
            intent: "triage".into(),
            tools: vec!["jira.read".into(), "jira.search".into()],
            bound: false,
            created_at: Some(at(0)),
            deadline: Some(at(240)),
            tokens_issued: 2,
            state: if end_reason.is_some() {
                "ended"
            } else {
                "active"
            }
            .into(),
            end_reason: end_reason.map(str::to_owned),
            ended_at: end_reason.map(|_| at(60)),
        }
    }

    #[test]
    fn task_tables_show_owner_deadline_and_state() {
        let report = TasksReport {
            tasks: vec![task("tsk-a", None), task("tsk-b", Some("revoked"))],
        };
        let mut text = String::new();
        render_tasks(&mut text, &report, at(0).0).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "ID     SPIFFE ID                   OWNER PID  AUDIENCE                  TOOLS                  DEADLINE                      TOKENS  STATE",
                "tsk-a  spiffe://example.org/agent  4242       spiffe://example.org/mcp  jira.read,jira.search  1970-01-01T00:04:00Z (in 4m)  2       active",
                "tsk-b  spiffe://example.org/agent  4242       spiffe://example.org/mcp  jira.read,jira.search  1970-01-01T00:04:00Z (in 4m)  2       ended: revoked",
            ]
        );
        let mut shown = String::new();
        render_task(&mut shown, &report.tasks[1], at(120).0).unwrap();
        assert!(
            shown.contains("Owner:        pid 4242, uid 1000, /usr/bin/tether"),
            "{shown}"
        );
        assert!(
            shown.contains("State:        ended: revoked, 1970-01-01T00:01:00Z (1m ago)"),
            "{shown}"
        );
        let mut empty = String::new();
        render_tasks(&mut empty, &TasksReport { tasks: vec![] }, at(0).0).unwrap();
        assert_eq!(empty, "No tasks\n");
    }

    #[test]
    fn task_token_validations_show_the_actor_chain() {
        let report = TaskTokenValidation {
            valid: true,
            reason: None,
            spiffe_id: "spiffe://example.org/agent".into(),
            task_id: "tsk-1".into(),
            actors: vec![
                "spiffe://example.org/b".into(),
                "spiffe://example.org/a".into(),
            ],
            claims: serde_json::json!({"txn": "tsk-1"}),
        };
        let mut text = String::new();
        render_task_validation(&mut text, &report).unwrap();
        assert!(
            text.starts_with(
                "valid\nSPIFFE ID:    spiffe://example.org/agent\nTask:         tsk-1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "Actor chain:  spiffe://example.org/b, spiffe://example.org/a (newest first)"
            ),
            "{text}"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["reason"], serde_json::Value::Null);
        assert_eq!(json["actors"][0], "spiffe://example.org/b");
    }

    #[test]
    fn fetch_x509_json_field_names_are_stable() {
        let output = FetchX509Output {
            report: X509Report {
                svids: vec![X509SvidSummary {
                    spiffe_id: "spiffe://example.org/a".into(),
                    hint: "a".into(),
                    serial: "1f".into(),
                    not_before: at(0),
                    not_after: at(3600),
                    dns_names: vec!["a.example.org".into()],
                    chain_length: 1,
                }],
                trust_domain_cas: 1,
                federated_bundles: vec![FederatedBundleSummary {
                    trust_domain: "partner.example".into(),
                    cas: 2,
                }],
            },
            files_written: vec!["/tmp/svid.0.pem".into()],
        };
        let json = serde_json::to_value(&output).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "svids": [{
                    "spiffe_id": "spiffe://example.org/a",
                    "hint": "a",
                    "serial": "1f",
                    "not_before": "1970-01-01T00:00:00Z",
                    "not_after": "1970-01-01T01:00:00Z",
                    "dns_names": ["a.example.org"],
                    "chain_length": 1,
                }],
                "trust_domain_cas": 1,
                "federated_bundles": [{"trust_domain": "partner.example", "cas": 2}],
                "files_written": ["/tmp/svid.0.pem"],
            })
        );
        let mut text = String::new();
        render_fetch_x509(&mut text, &output, at(60).0).unwrap();
        assert!(
            text.contains("SPIFFE ID:         spiffe://example.org/a"),
            "{text}"
        );
        assert!(text.contains("1970-01-01T01:00:00Z (in 59m)"), "{text}");
        assert!(text.contains("partner.example (2 CAs)"), "{text}");
        assert!(text.contains("Wrote /tmp/svid.0.pem"), "{text}");
    }
}
