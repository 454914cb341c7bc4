//! The rows the store keeps, and how each field becomes a column and back.
//!
//! Both directions apply the same bounds: a row the store would refuse to
//! read back is refused on write ([`super::StoreError::Unstorable`]), so one
//! careless caller cannot leave a row that stops every later
//! [`super::Store::entries`]. A stored value outside the bounds can then only
//! come from damage, and reads as [`super::StoreError::BadRow`].
//!
//! Times are unix milliseconds and durations milliseconds (`INTEGER`), so
//! anything finer than a millisecond is dropped on write. Lists are JSON
//! arrays of strings (`TEXT`). Counters and other unsigned numbers are
//! `INTEGER` too, so one beyond `i64::MAX` is refused. Flags are `INTEGER` 0
//! or 1, strictly: any other stored value is damage, not "set".

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::types::ValueRef;

/// Longest entry id or certificate serial (hex), in bytes.
pub(super) const MAX_ID_LEN: usize = 256;
/// Longest SPIFFE ID, in bytes: the SPIFFE spec's URI limit.
pub(super) const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest hint, in bytes.
pub(super) const MAX_HINT_LEN: usize = 1024;
/// Longest file system path kept (a task owner's executable), in bytes:
/// `PATH_MAX` (4096) and some room.
pub(super) const MAX_PATH_LEN: usize = 4096 + 64;
/// Longest task intent, in bytes.
pub const MAX_INTENT_LEN: usize = 4096;
/// Longest reason for a task's end or a certificate's revocation, in bytes.
pub(super) const MAX_REASON_LEN: usize = 256;
/// Most items in one list column (selectors, DNS names, trust domains,
/// audiences, tools).
pub(super) const MAX_LIST_ITEMS: usize = 256;
/// Longest list item, in bytes: a `unix:path:` selector carries a path.
pub(super) const MAX_LIST_ITEM_LEN: usize = MAX_PATH_LEN;
/// Longest JSON text of one list column, in bytes. Checked before parsing, so
/// a damaged row never makes the store allocate more than this for it.
pub(super) const MAX_LIST_JSON_LEN: usize = 256 * 1024;
/// Latest time and longest duration kept, in milliseconds: the end of year
/// 9999. Far beyond any certificate, and far inside `i64` and `SystemTime`.
pub(super) const MAX_MILLIS: i64 = 253_402_300_799_999;

/// A registration entry as stored: plain data, validated by its caller.
///
/// `created_at` and `updated_at` keep whole milliseconds only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryRow {
    /// Stable identifier, chosen by the caller.
    pub id: String,
    /// The SPIFFE ID the entry grants.
    pub spiffe_id: String,
    /// Selectors in their text form (`unix:uid:1000`), in the caller's order.
    pub selectors: Vec<String>,
    /// X.509-SVID lifetime, when not the default.
    pub x509_svid_ttl: Option<Duration>,
    /// JWT-SVID lifetime, when not the default.
    pub jwt_svid_ttl: Option<Duration>,
    /// DNS SANs for the X.509-SVID.
    pub dns_names: Vec<String>,
    /// Workload API hint.
    pub hint: Option<String>,
    /// Trust domains whose bundles the workload receives.
    pub federates_with: Vec<String>,
    /// Audience names the entry's holders answer to besides their SPIFFE ID
    /// (`https://mcp.jira.internal`): a task token addressed to one of them
    /// may be exchanged by the holder. Not part of the entry's identity (see
    /// [`super::Store::insert_entry`]); empty for entries stored by schema v1.
    pub audiences: Vec<String>,
    /// Whether each process matching the entry gets its own X.509-SVID (key
    /// and certificate), revoked when the process exits, instead of sharing
    /// one per entry. Not part of the entry's identity; false for entries
    /// stored by schema v1.
    pub process_bound: bool,
    /// When the entry was created; entries are listed in this order.
    pub created_at: SystemTime,
    /// When the entry last changed.
    pub updated_at: SystemTime,
    /// Bumped by the caller on every change; see [`super::Store::update_entry`].
    pub revision: u64,
}

/// One issued X.509-SVID, kept for `tether svid list` and investigations.
///
/// Times keep whole milliseconds only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedX509 {
    /// Certificate serial number, hex.
    pub serial: String,
    /// The entry it was issued for (stored or from the config file).
    pub entry_id: String,
    /// The SPIFFE ID in its URI SAN.
    pub spiffe_id: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// When tether signed it.
    pub issued_at: SystemTime,
}

/// A revoked X.509-SVID, listed on the CRL of the CA that signed it until
/// the certificate expires.
///
/// Written once: the first record of a serial is kept (see
/// [`super::Store::revoke_x509`]). Times keep whole milliseconds only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedX509 {
    /// Certificate serial number, hex; identifies the record.
    pub serial: String,
    /// The id of the CA that signed it.
    pub ca_id: String,
    /// When it was revoked.
    pub revoked_at: SystemTime,
    /// The certificate's expiry: the record is kept until then.
    pub not_after: SystemTime,
    /// Why, in a few words (`process exited`).
    pub reason: String,
}

/// A task: a unit of delegated agent work that owns short-lived tokens.
///
/// Written when the task begins, and changed once more when it ends (see
/// [`super::Store::end_task`]). Times keep whole milliseconds only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRow {
    /// The task id (the tokens' `txn` claim), chosen by the caller.
    pub id: String,
    /// The owner process's pid; greater than 0.
    pub owner_pid: i32,
    /// The owner process's start time, in clock ticks since boot
    /// (`/proc/<pid>/stat` field 22): with the pid, it tells the owner from a
    /// later process that reused its pid. At most `i64::MAX`.
    pub owner_start_time: u64,
    /// The owner process's uid.
    pub owner_uid: u32,
    /// The owner's executable, when it was known.
    pub owner_executable: Option<String>,
    /// SHA-256 of the owner's executable, hex, when it was computed.
    pub owner_exe_sha256: Option<String>,
    /// The SPIFFE ID the task acts for.
    pub spiffe_id: String,
    /// The entry that granted that SPIFFE ID.
    pub entry_id: String,
    /// Who the task's tokens are addressed to.
    pub audience: String,
    /// What the task is for, as its owner stated it.
    pub intent: String,
    /// The tools the task's tokens allow.
    pub tools: Vec<String>,
    /// The base64url SHA-256 thumbprint of the certificate the tokens are
    /// bound to (`cnf.x5t#S256`), if bound.
    pub bind_x5t: Option<String>,
    /// When the task began; tasks are listed in this order.
    pub created_at: SystemTime,
    /// When the task ends at the latest; no token of it outlives this.
    pub deadline: SystemTime,
    /// How the task ended; `None` while active. A task is stored active.
    pub ended: Option<TaskEnd>,
    /// How many tokens the task issued, as recorded at its end.
    pub tokens_issued: u64,
    /// Whether the owner's descendants are scoped to the task (their
    /// FetchJWTSVID gets its token only).
    pub scope_descendants: bool,
}

/// The end of a task: once recorded, its tokens are refused for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskEnd {
    /// When it ended.
    pub at: SystemTime,
    /// Why, in a few words (`completed`, `owner exited`).
    pub reason: String,
}

/// What is wrong with one field, on its way in or out. Becomes
/// `Unstorable` or `BadRow` once the row is known.
#[derive(Debug)]
pub(crate) struct Problem {
    pub(crate) what: String,
    pub(super) source: Option<serde_json::Error>,
}

/// An [`EntryRow`] as its columns.
#[derive(Debug)]
pub(super) struct EncodedEntry<'a> {
    pub(super) id: &'a str,
    pub(super) spiffe_id: &'a str,
    pub(super) selectors: String,
    /// The selectors sorted, deduplicated and JSON-encoded: two entries with
    /// the same SPIFFE ID and this key are the same entry.
    pub(super) selector_key: String,
    pub(super) x509_svid_ttl_ms: Option<i64>,
    pub(super) jwt_svid_ttl_ms: Option<i64>,
    pub(super) dns_names: String,
    pub(super) hint: Option<&'a str>,
    pub(super) federates_with: String,
    pub(super) audiences: String,
    pub(super) process_bound: i64,
    pub(super) created_at_ms: i64,
    pub(super) updated_at_ms: i64,
    pub(super) revision: i64,
}

/// An [`IssuedX509`] as its columns.
#[derive(Debug)]
pub(super) struct EncodedX509<'a> {
    pub(super) serial: &'a str,
    pub(super) entry_id: &'a str,
    pub(super) spiffe_id: &'a str,
    pub(super) not_before_ms: i64,
    pub(super) not_after_ms: i64,
    pub(super) issued_at_ms: i64,
}

/// A [`RevokedX509`] as its columns.
#[derive(Debug)]
pub(super) struct EncodedRevoked<'a> {
    pub(super) serial: &'a str,
    pub(super) ca_id: &'a str,
    pub(super) revoked_at_ms: i64,
    pub(super) not_after_ms: i64,
    pub(super) reason: &'a str,
}

/// An active [`TaskRow`] as its columns (the end columns are NULL).
#[derive(Debug)]
pub(super) struct EncodedTask<'a> {
    pub(super) id: &'a str,
    pub(super) owner_pid: i32,
    pub(super) owner_start_time: i64,
    pub(super) owner_uid: u32,
    pub(super) owner_executable: Option<&'a str>,
    pub(super) owner_exe_sha256: Option<&'a str>,
    pub(super) spiffe_id: &'a str,
    pub(super) entry_id: &'a str,
    pub(super) audience: &'a str,
    pub(super) intent: &'a str,
    pub(super) tools: String,
    pub(super) bind_x5t: Option<&'a str>,
    pub(super) created_at_ms: i64,
    pub(super) deadline_ms: i64,
    pub(super) tokens_issued: i64,
    pub(super) scope_descendants: i64,
}

/// The end of task `id` and its final token count, as their columns.
#[derive(Debug)]
pub(super) struct EncodedEnd<'a> {
    pub(super) id: &'a str,
    pub(super) ended_at_ms: i64,
    pub(super) end_reason: &'a str,
    pub(super) tokens_issued: i64,
}

// === impl Problem ===

impl Problem {
    pub(crate) fn new(column: &str, what: impl std::fmt::Display) -> Problem {
        Problem {
            what: format!("{column}: {what}"),
            source: None,
        }
    }
}

// === impl EncodedEntry ===

impl<'a> EncodedEntry<'a> {
    pub(super) fn new(row: &'a EntryRow) -> Result<EncodedEntry<'a>, Problem> {
        Ok(EncodedEntry {
            id: bounded("id", &row.id, MAX_ID_LEN)?,
            spiffe_id: bounded("spiffe_id", &row.spiffe_id, MAX_SPIFFE_ID_LEN)?,
            selectors: encode_list("selectors", &row.selectors)?,
            selector_key: selector_key(&row.selectors),
            x509_svid_ttl_ms: row
                .x509_svid_ttl
                .map(|d| encode_duration("x509_svid_ttl", d))
                .transpose()?,
            jwt_svid_ttl_ms: row
                .jwt_svid_ttl
                .map(|d| encode_duration("jwt_svid_ttl", d))
                .transpose()?,
            dns_names: encode_list("dns_names", &row.dns_names)?,
            hint: row
                .hint
                .as_deref()
                .map(|h| bounded("hint", h, MAX_HINT_LEN))
                .transpose()?,
            federates_with: encode_list("federates_with", &row.federates_with)?,
            audiences: encode_list("audiences", &row.audiences)?,
            process_bound: encode_flag(row.process_bound),
            created_at_ms: encode_time("created_at", row.created_at)?,
            updated_at_ms: encode_time("updated_at", row.updated_at)?,
            revision: encode_count("revision", row.revision)?,
        })
    }
}

// === impl EncodedX509 ===

impl<'a> EncodedX509<'a> {
    pub(super) fn new(record: &'a IssuedX509) -> Result<EncodedX509<'a>, Problem> {
        Ok(EncodedX509 {
            serial: bounded("serial", &record.serial, MAX_ID_LEN)?,
            entry_id: bounded("entry_id", &record.entry_id, MAX_ID_LEN)?,
            spiffe_id: bounded("spiffe_id", &record.spiffe_id, MAX_SPIFFE_ID_LEN)?,
            not_before_ms: encode_time("not_before", record.not_before)?,
            not_after_ms: encode_time("not_after", record.not_after)?,
            issued_at_ms: encode_time("issued_at", record.issued_at)?,
        })
    }
}

// === impl EncodedRevoked ===

impl<'a> EncodedRevoked<'a> {
    pub(super) fn new(record: &'a RevokedX509) -> Result<EncodedRevoked<'a>, Problem> {
        Ok(EncodedRevoked {
            serial: bounded("serial", &record.serial, MAX_ID_LEN)?,
            ca_id: bounded("ca_id", &record.ca_id, MAX_ID_LEN)?,
            revoked_at_ms: encode_time("revoked_at", record.revoked_at)?,
            not_after_ms: encode_time("not_after", record.not_after)?,
            reason: bounded("reason", &record.reason, MAX_REASON_LEN)?,
        })
    }
}

// === impl EncodedTask ===

impl<'a> EncodedTask<'a> {
    /// Refuses a task that has already ended: a task is stored when it
    /// begins, and its end is recorded by [`super::Store::end_task`] only, so
    /// "first end wins" has a single place to hold.
    pub(super) fn new(row: &'a TaskRow) -> Result<EncodedTask<'a>, Problem> {
        if row.ended.is_some() {
            return Err(Problem::new(
                "ended",
                "set; a task is stored active and ended with end_task",
            ));
        }
        if row.owner_pid <= 0 {
            return Err(Problem::new(
                "owner_pid",
                format_args!("{}, must be greater than 0", row.owner_pid),
            ));
        }
        Ok(EncodedTask {
            id: bounded("id", &row.id, MAX_ID_LEN)?,
            owner_pid: row.owner_pid,
            owner_start_time: encode_count("owner_start_time", row.owner_start_time)?,
            owner_uid: row.owner_uid,
            owner_executable: row
                .owner_executable
                .as_deref()
                .map(|p| bounded("owner_executable", p, MAX_PATH_LEN))
                .transpose()?,
            owner_exe_sha256: row
                .owner_exe_sha256
                .as_deref()
                .map(|h| bounded("owner_exe_sha256", h, MAX_ID_LEN))
                .transpose()?,
            spiffe_id: bounded("spiffe_id", &row.spiffe_id, MAX_SPIFFE_ID_LEN)?,
            entry_id: bounded("entry_id", &row.entry_id, MAX_ID_LEN)?,
            audience: bounded("audience", &row.audience, MAX_SPIFFE_ID_LEN)?,
            intent: bounded("intent", &row.intent, MAX_INTENT_LEN)?,
            tools: encode_list("tools", &row.tools)?,
            bind_x5t: row
                .bind_x5t
                .as_deref()
                .map(|t| bounded("bind_x5t", t, MAX_ID_LEN))
                .transpose()?,
            created_at_ms: encode_time("created_at", row.created_at)?,
            deadline_ms: encode_time("deadline", row.deadline)?,
            tokens_issued: encode_count("tokens_issued", row.tokens_issued)?,
            scope_descendants: encode_flag(row.scope_descendants),
        })
    }
}

// === impl EncodedEnd ===

impl<'a> EncodedEnd<'a> {
    /// `id` is not bounded: an id no task could have simply matches none.
    pub(super) fn new(
        id: &'a str,
        end: &'a TaskEnd,
        tokens_issued: u64,
    ) -> Result<EncodedEnd<'a>, Problem> {
        Ok(EncodedEnd {
            id,
            ended_at_ms: encode_time("ended.at", end.at)?,
            end_reason: bounded("ended.reason", &end.reason, MAX_REASON_LEN)?,
            tokens_issued: encode_count("tokens_issued", tokens_issued)?,
        })
    }
}

// === encoding ===

pub(crate) fn bounded<'a>(column: &str, value: &'a str, max: usize) -> Result<&'a str, Problem> {
    if value.len() > max {
        return Err(Problem::new(
            column,
            format_args!("{} bytes, at most {max}", value.len()),
        ));
    }
    Ok(value)
}

pub(super) fn encode_list(column: &str, items: &[String]) -> Result<String, Problem> {
    check_list(column, items)?;
    // `Value`'s Display cannot fail, unlike `serde_json::to_string`.
    let json = serde_json::Value::from(items.to_vec()).to_string();
    if json.len() > MAX_LIST_JSON_LEN {
        return Err(Problem::new(
            column,
            format_args!("{} bytes as JSON, at most {MAX_LIST_JSON_LEN}", json.len()),
        ));
    }
    Ok(json)
}

/// The canonical form of a selector set: sorted, deduplicated, JSON. JSON
/// rather than a separator-joined string because a selector may contain any
/// separator (`unix:path:/a,b`); JSON escaping keeps distinct sets distinct.
pub(super) fn selector_key(selectors: &[String]) -> String {
    let mut set: Vec<&String> = selectors.iter().collect();
    set.sort();
    set.dedup();
    serde_json::Value::from(set.into_iter().cloned().collect::<Vec<_>>()).to_string()
}

pub(crate) fn encode_time(column: &str, time: SystemTime) -> Result<i64, Problem> {
    let since_epoch = time
        .duration_since(UNIX_EPOCH)
        .map_err(|_| Problem::new(column, "before 1970"))?;
    millis(column, since_epoch)
}

/// A flag as an `INTEGER`, 0 or 1.
pub(crate) fn encode_flag(flag: bool) -> i64 {
    i64::from(flag)
}

/// An unsigned number as an `INTEGER`.
pub(crate) fn encode_count(column: &str, n: u64) -> Result<i64, Problem> {
    i64::try_from(n).map_err(|_| Problem::new(column, "larger than i64::MAX"))
}

pub(super) fn encode_duration(column: &str, duration: Duration) -> Result<i64, Problem> {
    millis(column, duration)
}

fn millis(column: &str, duration: Duration) -> Result<i64, Problem> {
    i64::try_from(duration.as_millis())
        .ok()
        .filter(|ms| *ms <= MAX_MILLIS)
        .ok_or_else(|| Problem::new(column, "beyond the year 9999"))
}

// === decoding ===

/// How the rows of one table are read back: the columns its decoder reads,
/// in its order, and the decoder. `Store::select` reads every row through
/// one of these.
pub(super) struct RowCodec<T, const N: usize> {
    /// The table.
    pub(super) table: &'static str,
    /// The columns `decode` reads, in its order, as SQL.
    pub(super) columns: &'static str,
    /// The row from those columns' values.
    pub(super) decode: fn(&[ValueRef<'_>; N]) -> Result<T, Problem>,
}

pub(super) const ENTRIES: &str = "entries";
pub(super) const ISSUED_X509: &str = "issued_x509";
pub(super) const REVOKED_X509: &str = "revoked_x509";
pub(super) const TASKS: &str = "tasks";

const ENTRY_COLUMNS: usize = 13;
const X509_COLUMNS: usize = 6;
const REVOKED_COLUMNS: usize = 5;
const TASK_COLUMNS: usize = 18;

/// [`EntryRow`]s, from `entries`.
pub(super) const ENTRY: RowCodec<EntryRow, ENTRY_COLUMNS> = RowCodec {
    table: ENTRIES,
    columns: "id, spiffe_id, selectors, x509_svid_ttl_ms, jwt_svid_ttl_ms, dns_names, hint, \
              federates_with, audiences, process_bound, created_at_ms, updated_at_ms, revision",
    decode: decode_entry,
};

/// [`IssuedX509`] records, from `issued_x509`.
pub(super) const X509: RowCodec<IssuedX509, X509_COLUMNS> = RowCodec {
    table: ISSUED_X509,
    columns: "serial, entry_id, spiffe_id, not_before_ms, not_after_ms, issued_at_ms",
    decode: decode_x509,
};

/// [`RevokedX509`] records, from `revoked_x509`.
pub(super) const REVOKED: RowCodec<RevokedX509, REVOKED_COLUMNS> = RowCodec {
    table: REVOKED_X509,
    columns: "serial, ca_id, revoked_at_ms, not_after_ms, reason",
    decode: decode_revoked,
};

/// [`TaskRow`]s, from `tasks`.
pub(super) const TASK: RowCodec<TaskRow, TASK_COLUMNS> = RowCodec {
    table: TASKS,
    columns: "id, owner_pid, owner_start_time, owner_uid, owner_executable, owner_exe_sha256, \
              spiffe_id, entry_id, audience, intent, tools, bind_x5t, created_at_ms, \
              deadline_ms, ended_at_ms, end_reason, tokens_issued, scope_descendants",
    decode: decode_task,
};

fn decode_entry(v: &[ValueRef<'_>; ENTRY_COLUMNS]) -> Result<EntryRow, Problem> {
    Ok(EntryRow {
        id: decode_text("id", v[0], MAX_ID_LEN)?.to_owned(),
        spiffe_id: decode_text("spiffe_id", v[1], MAX_SPIFFE_ID_LEN)?.to_owned(),
        selectors: decode_list("selectors", v[2])?,
        x509_svid_ttl: decode_opt_duration("x509_svid_ttl_ms", v[3])?,
        jwt_svid_ttl: decode_opt_duration("jwt_svid_ttl_ms", v[4])?,
        dns_names: decode_list("dns_names", v[5])?,
        hint: decode_opt_text("hint", v[6], MAX_HINT_LEN)?.map(str::to_owned),
        federates_with: decode_list("federates_with", v[7])?,
        audiences: decode_list("audiences", v[8])?,
        process_bound: decode_flag("process_bound", v[9])?,
        created_at: decode_time("created_at_ms", v[10])?,
        updated_at: decode_time("updated_at_ms", v[11])?,
        revision: decode_revision(v[12])?,
    })
}

fn decode_x509(v: &[ValueRef<'_>; X509_COLUMNS]) -> Result<IssuedX509, Problem> {
    Ok(IssuedX509 {
        serial: decode_text("serial", v[0], MAX_ID_LEN)?.to_owned(),
        entry_id: decode_text("entry_id", v[1], MAX_ID_LEN)?.to_owned(),
        spiffe_id: decode_text("spiffe_id", v[2], MAX_SPIFFE_ID_LEN)?.to_owned(),
        not_before: decode_time("not_before_ms", v[3])?,
        not_after: decode_time("not_after_ms", v[4])?,
        issued_at: decode_time("issued_at_ms", v[5])?,
    })
}

fn decode_revoked(v: &[ValueRef<'_>; REVOKED_COLUMNS]) -> Result<RevokedX509, Problem> {
    Ok(RevokedX509 {
        serial: decode_text("serial", v[0], MAX_ID_LEN)?.to_owned(),
        ca_id: decode_text("ca_id", v[1], MAX_ID_LEN)?.to_owned(),
        revoked_at: decode_time("revoked_at_ms", v[2])?,
        not_after: decode_time("not_after_ms", v[3])?,
        reason: decode_text("reason", v[4], MAX_REASON_LEN)?.to_owned(),
    })
}

fn decode_task(v: &[ValueRef<'_>; TASK_COLUMNS]) -> Result<TaskRow, Problem> {
    Ok(TaskRow {
        id: decode_text("id", v[0], MAX_ID_LEN)?.to_owned(),
        owner_pid: decode_integer("owner_pid", v[1], 1)?,
        owner_start_time: decode_integer("owner_start_time", v[2], 0)?,
        owner_uid: decode_integer("owner_uid", v[3], 0)?,
        owner_executable: decode_opt_text("owner_executable", v[4], MAX_PATH_LEN)?
            .map(str::to_owned),
        owner_exe_sha256: decode_opt_text("owner_exe_sha256", v[5], MAX_ID_LEN)?.map(str::to_owned),
        spiffe_id: decode_text("spiffe_id", v[6], MAX_SPIFFE_ID_LEN)?.to_owned(),
        entry_id: decode_text("entry_id", v[7], MAX_ID_LEN)?.to_owned(),
        audience: decode_text("audience", v[8], MAX_SPIFFE_ID_LEN)?.to_owned(),
        intent: decode_text("intent", v[9], MAX_INTENT_LEN)?.to_owned(),
        tools: decode_list("tools", v[10])?,
        bind_x5t: decode_opt_text("bind_x5t", v[11], MAX_ID_LEN)?.map(str::to_owned),
        created_at: decode_time("created_at_ms", v[12])?,
        deadline: decode_time("deadline_ms", v[13])?,
        ended: decode_end(v[14], v[15])?,
        tokens_issued: decode_integer("tokens_issued", v[16], 0)?,
        scope_descendants: decode_flag("scope_descendants", v[17])?,
    })
}

/// Both end columns NULL (active), or both set (ended); one without the
/// other is damage.
pub(super) fn decode_end(
    at: ValueRef<'_>,
    reason: ValueRef<'_>,
) -> Result<Option<TaskEnd>, Problem> {
    match (at, reason) {
        (ValueRef::Null, ValueRef::Null) => Ok(None),
        (at, reason) => Ok(Some(TaskEnd {
            at: decode_time("ended_at_ms", at)?,
            reason: decode_text("end_reason", reason, MAX_REASON_LEN)?.to_owned(),
        })),
    }
}

/// A `TEXT` column within `max` bytes.
pub(crate) fn decode_text<'r>(
    column: &str,
    value: ValueRef<'r>,
    max: usize,
) -> Result<&'r str, Problem> {
    match value {
        ValueRef::Text(bytes) if bytes.len() > max => Err(Problem::new(
            column,
            format_args!("{} bytes, at most {max}", bytes.len()),
        )),
        ValueRef::Text(bytes) => {
            std::str::from_utf8(bytes).map_err(|_| Problem::new(column, "not UTF-8"))
        }
        other => Err(unexpected(column, "text", other)),
    }
}

pub(super) fn decode_opt_text<'r>(
    column: &str,
    value: ValueRef<'r>,
    max: usize,
) -> Result<Option<&'r str>, Problem> {
    match value {
        ValueRef::Null => Ok(None),
        other => decode_text(column, other, max).map(Some),
    }
}

pub(super) fn decode_list(column: &str, value: ValueRef<'_>) -> Result<Vec<String>, Problem> {
    let json = decode_text(column, value, MAX_LIST_JSON_LEN)?;
    let items: Vec<String> = serde_json::from_str(json).map_err(|source| Problem {
        what: format!("{column}: not a JSON list of strings"),
        source: Some(source),
    })?;
    check_list(column, &items)?;
    Ok(items)
}

pub(crate) fn decode_time(column: &str, value: ValueRef<'_>) -> Result<SystemTime, Problem> {
    let ms = decode_millis(column, value)?;
    UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .ok_or_else(|| Problem::new(column, "not representable as a time"))
}

pub(super) fn decode_opt_duration(
    column: &str,
    value: ValueRef<'_>,
) -> Result<Option<Duration>, Problem> {
    match value {
        ValueRef::Null => Ok(None),
        other => decode_millis(column, other).map(|ms| Some(Duration::from_millis(ms))),
    }
}

pub(super) fn decode_revision(value: ValueRef<'_>) -> Result<u64, Problem> {
    decode_integer("revision", value, 0)
}

/// An `INTEGER` column holding 0 or 1, strictly: any other value is damage,
/// not "true".
pub(crate) fn decode_flag(column: &str, value: ValueRef<'_>) -> Result<bool, Problem> {
    match value {
        ValueRef::Integer(0) => Ok(false),
        ValueRef::Integer(1) => Ok(true),
        ValueRef::Integer(n) => Err(Problem::new(column, format_args!("{n}, not 0 or 1"))),
        other => Err(unexpected(column, "integer", other)),
    }
}

/// An `INTEGER` column of at least `min` that fits `T`.
pub(crate) fn decode_integer<T: TryFrom<i64>>(
    column: &str,
    value: ValueRef<'_>,
    min: i64,
) -> Result<T, Problem> {
    match value {
        ValueRef::Integer(n) if n < min => {
            Err(Problem::new(column, format_args!("{n}, at least {min}")))
        }
        ValueRef::Integer(n) => {
            T::try_from(n).map_err(|_| Problem::new(column, format_args!("{n} is out of range")))
        }
        other => Err(unexpected(column, "integer", other)),
    }
}

fn decode_millis(column: &str, value: ValueRef<'_>) -> Result<u64, Problem> {
    match value {
        ValueRef::Integer(ms) if (0..=MAX_MILLIS).contains(&ms) => {
            u64::try_from(ms).map_err(|_| Problem::new(column, "negative"))
        }
        ValueRef::Integer(ms) => Err(Problem::new(
            column,
            format_args!("{ms} ms is outside 0..={MAX_MILLIS}"),
        )),
        other => Err(unexpected(column, "integer", other)),
    }
}

fn check_list(column: &str, items: &[String]) -> Result<(), Problem> {
    if items.len() > MAX_LIST_ITEMS {
        return Err(Problem::new(
            column,
            format_args!("{} items, at most {MAX_LIST_ITEMS}", items.len()),
        ));
    }
    if let Some(long) = items.iter().find(|i| i.len() > MAX_LIST_ITEM_LEN) {
        return Err(Problem::new(
            column,
            format_args!(
                "an item of {} bytes, at most {MAX_LIST_ITEM_LEN}",
                long.len()
            ),
        ));
    }
    Ok(())
}

fn unexpected(column: &str, wanted: &str, found: ValueRef<'_>) -> Problem {
    Problem::new(
        column,
        format_args!("expected {wanted}, found {}", found.data_type()),
    )
}
