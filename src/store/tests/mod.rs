//! The store's tests, a file per topic: opening (files, damage, schema
//! versions, sharing), entries, X.509 records, tasks, crash safety, and the
//! column codec (`rows`) and schema steps (`migrations`) on their own. The
//! fixtures below build rows at fixed instants, so every test reads the same.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::Connection;

use super::*;

mod crash;
mod entries;
mod migrations;
mod open;
mod rows;
mod tasks;
mod x509;

pub(super) fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + ms)
}

pub(super) fn entry(id: &str, spiffe_id: &str, selectors: &[&str]) -> EntryRow {
    EntryRow {
        id: id.into(),
        spiffe_id: spiffe_id.into(),
        selectors: selectors.iter().map(|s| s.to_string()).collect(),
        x509_svid_ttl: Some(Duration::from_secs(3600)),
        jwt_svid_ttl: None,
        dns_names: vec!["a.example.org".into()],
        hint: Some("primary".into()),
        federates_with: vec!["spiffe://other.org".into()],
        audiences: vec!["https://mcp.jira.internal".into()],
        process_bound: false,
        created_at: at(0),
        updated_at: at(0),
        revision: 1,
    }
}

pub(super) fn revoked(serial: &str, revoked_at: u64, not_after: u64) -> RevokedX509 {
    RevokedX509 {
        serial: serial.into(),
        ca_id: "ca-1".into(),
        revoked_at: at(revoked_at),
        not_after: at(not_after),
        reason: "process exited".into(),
    }
}

pub(super) fn serials(records: &[RevokedX509]) -> Vec<&str> {
    records.iter().map(|r| r.serial.as_str()).collect()
}

pub(super) fn task(id: &str, created_at: u64, deadline: u64) -> TaskRow {
    TaskRow {
        id: id.into(),
        owner_pid: 4242,
        owner_start_time: 1_234_567,
        owner_uid: 1000,
        owner_executable: Some("/usr/local/bin/agent".into()),
        owner_exe_sha256: Some("ab".repeat(32)),
        spiffe_id: "spiffe://example.org/agent".into(),
        entry_id: "e1".into(),
        audience: "https://mcp.jira.internal".into(),
        intent: "triage the open tickets".into(),
        tools: vec!["jira.search".into(), "jira.comment".into()],
        bind_x5t: Some("x".repeat(43)),
        created_at: at(created_at),
        deadline: at(deadline),
        ended: None,
        tokens_issued: 0,
        scope_descendants: false,
    }
}

pub(super) fn end(at_ms: u64, reason: &str) -> TaskEnd {
    TaskEnd {
        at: at(at_ms),
        reason: reason.into(),
    }
}

pub(super) fn task_ids(tasks: &[TaskRow]) -> Vec<&str> {
    tasks.iter().map(|t| t.id.as_str()).collect()
}

pub(super) fn issued(serial: &str, issued_at: u64, not_after: u64) -> IssuedX509 {
    IssuedX509 {
        serial: serial.into(),
        entry_id: "e1".into(),
        spiffe_id: "spiffe://example.org/a".into(),
        not_before: at(issued_at),
        not_after: at(not_after),
        issued_at: at(issued_at),
    }
}

pub(super) fn ids(entries: &[EntryRow]) -> Vec<&str> {
    entries.iter().map(|e| e.id.as_str()).collect()
}

pub(super) fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().mode() & 0o777
}

/// A raw connection, as another program (or damage) would write.
pub(super) fn raw(dir: &Path) -> Connection {
    Connection::open(dir.join(DB_FILE)).unwrap()
}

/// A store of `n` entries, closed (checkpointed into the main file).
pub(super) fn populated(dir: &Path, n: u64) {
    let store = Store::open(dir).unwrap();
    for i in 0..n {
        let id = format!("entry-{i:05}");
        let mut row = entry(&id, &format!("spiffe://example.org/w/{i}"), &["unix:uid:0"]);
        row.created_at = at(i);
        store.insert_entry(&row).unwrap();
    }
}
