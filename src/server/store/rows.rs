//! How the server's rows become columns and back, for both backends, with
//! the agent store's codec (`crate::store::codec`): times are unix
//! milliseconds within 1970..=9999, flags 0 or 1, text bounded per column.
//! A backend hands a row over as [`Columns`] (each value as SQLite's
//! `ValueRef`: PostgreSQL's BIGINT, BOOLEAN, TEXT and BYTEA map onto its
//! integer, text and blob), so one decoder checks rows from either.
//!
//! Both directions apply the same bounds: a row the store could not read
//! back is refused on write ([`ServerStoreError::Unstorable`]), so a stored
//! value outside them can only be damage, and reads as
//! [`ServerStoreError::Corrupt`], never a panic. Node names are checked by
//! [`NodeName::new`] and entry specs by serde as they are read; a task's
//! id as it is written (non-empty printable ASCII), and its end's three
//! columns as set together or not at all.

use std::collections::BTreeSet;

use rusqlite::types::ValueRef;

use crate::registration::EntrySpec;
use crate::registration::entry::MAX_SPIFFE_ID_LEN;
use crate::server::join_token::Admission;
use crate::server::scope::{MAX_NODE_NAME_LEN, NodeName};
use crate::server::store::{
    EntryRecord, FleetTaskEnd, FleetTaskEndRequest, FleetTaskRow, MAX_END_REASON_LEN,
    MAX_ENDS_PER_CALL, MAX_TASKS_PER_READ, MAX_TXN_LEN, NewFleetTask, NodeRow, ServerStoreError,
};
use crate::store::codec::{
    Problem, bounded, decode_flag, decode_integer, decode_text, decode_time, encode_count,
    encode_flag, encode_time,
};

/// Longest attestation kind (`join_token`, `k8s_psat`), in bytes.
pub(super) const MAX_ATTESTATION_LEN: usize = 64;
/// Longest SVID serial, lowercase hex, in bytes (RFC 5280 allows 20 bytes:
/// 40 digits).
pub(super) const MAX_SERIAL_LEN: usize = 128;
/// Longest entry id, in bytes.
pub(super) const MAX_ENTRY_ID_LEN: usize = 256;
/// Longest entry spec as JSON, in bytes. Checked before parsing, so a
/// damaged row never makes the store allocate more than this for it.
pub(super) const MAX_SPEC_JSON_LEN: usize = 64 * 1024;
/// Longest JSON list of the nodes an entry names, in bytes: about a
/// thousand names of the longest kind.
pub(super) const MAX_NODES_JSON_LEN: usize = 256 * 1024;

/// The tables, as errors name them.
pub(super) const JOIN_TOKENS: &str = "join_tokens";
pub(super) const NODES: &str = "nodes";
pub(super) const ENTRIES: &str = "entries";
pub(super) const META: &str = "meta";
pub(super) const BUNDLE_KEYS: &str = "bundle_keys";
pub(super) const FLEET_TASKS: &str = "fleet_tasks";
pub(super) const FLEET_TASK_END_REVISION: &str = "fleet_task_end_revision";

/// Longest replica id, in bytes.
pub(super) const MAX_REPLICA_ID_LEN: usize = 256;
/// Longest bundle document (SPIFFE bundle JSON), in bytes: a few CA
/// certificates and JWT keys are a few kilobytes.
pub(super) const MAX_BUNDLE_JSON_LEN: usize = 256 * 1024;

/// A row as a backend hands it over: its `i`-th column as a SQLite value.
pub(super) trait Columns {
    /// The `i`-th column's value; a column of a type the store never
    /// writes is a [`Problem`].
    fn value(&self, i: usize) -> Result<ValueRef<'_>, Problem>;
}

impl Columns for rusqlite::Row<'_> {
    fn value(&self, i: usize) -> Result<ValueRef<'_>, Problem> {
        self.get_ref(i)
            .map_err(|e| Problem::new("a column", format_args!("unreadable: {e}")))
    }
}

/// An [`Admission`] as the columns `node, expires_at_ms`.
pub(super) struct EncodedAdmission<'a> {
    pub(super) node: &'a str,
    pub(super) expires_at_ms: i64,
}

/// A [`NodeRow`] as its columns, in `node_columns!` order.
pub(super) struct EncodedNode<'a> {
    pub(super) name: &'a str,
    pub(super) attestation: &'a str,
    pub(super) attested_at_ms: i64,
    pub(super) svid_serial: &'a str,
    pub(super) svid_expires_at_ms: i64,
    pub(super) evicted: i64,
}

/// An [`EntryRecord`] as its columns, in `entry_columns!` order.
pub(super) struct EncodedEntry<'a> {
    pub(super) id: &'a str,
    pub(super) spec_json: String,
    pub(super) nodes_json: String,
    pub(super) revision: i64,
    pub(super) created_at_ms: i64,
    pub(super) updated_at_ms: i64,
}

// === encoding ===

impl<'a> EncodedAdmission<'a> {
    pub(super) fn new(admission: &'a Admission) -> Result<Self, ServerStoreError> {
        let encoded = (|| {
            Ok(Self {
                node: admission.node.as_str(),
                expires_at_ms: encode_time("expires_at_ms", admission.expires_at)?,
            })
        })();
        encoded.map_err(|p| unstorable(JOIN_TOKENS, p))
    }
}

impl<'a> EncodedNode<'a> {
    pub(super) fn new(node: &'a NodeRow) -> Result<Self, ServerStoreError> {
        let encoded = (|| {
            Ok(Self {
                name: node.name.as_str(),
                attestation: bounded("attestation", &node.attestation, MAX_ATTESTATION_LEN)?,
                attested_at_ms: encode_time("attested_at_ms", node.attested_at)?,
                svid_serial: bounded("svid_serial", &node.svid_serial, MAX_SERIAL_LEN)?,
                svid_expires_at_ms: encode_time("svid_expires_at_ms", node.svid_expires_at)?,
                evicted: encode_flag(node.evicted),
            })
        })();
        encoded.map_err(|p| unstorable(NODES, p))
    }
}

impl<'a> EncodedEntry<'a> {
    pub(super) fn new(entry: &'a EntryRecord) -> Result<Self, ServerStoreError> {
        let encoded = (|| {
            let spec_json = serde_json::to_string(&entry.spec)
                .map_err(|e| Problem::new("spec_json", format_args!("not encodable: {e}")))?;
            let names: Vec<&str> = entry.nodes.iter().map(NodeName::as_str).collect();
            // `Value`'s Display cannot fail, unlike `serde_json::to_string`.
            let nodes_json = serde_json::Value::from(names).to_string();
            Ok(Self {
                id: bounded("id", &entry.id, MAX_ENTRY_ID_LEN)?,
                spec_json: json_within("spec_json", spec_json, MAX_SPEC_JSON_LEN)?,
                nodes_json: json_within("nodes_json", nodes_json, MAX_NODES_JSON_LEN)?,
                revision: encode_count("revision", entry.revision)?,
                created_at_ms: encode_time("created_at_ms", entry.created_at)?,
                updated_at_ms: encode_time("updated_at_ms", entry.updated_at)?,
            })
        })();
        encoded.map_err(|p| unstorable(ENTRIES, p))
    }
}

/// A replica's bundle as the columns `replica, bundle_json, updated_at_ms`.
pub(super) struct EncodedBundle<'a> {
    pub(super) replica: &'a str,
    pub(super) bundle_json: &'a str,
    pub(super) updated_at_ms: i64,
}

impl<'a> EncodedBundle<'a> {
    pub(super) fn new(
        replica: &'a str,
        bundle_json: &'a str,
        updated_at: std::time::SystemTime,
    ) -> Result<Self, ServerStoreError> {
        let encoded = (|| {
            Ok(Self {
                replica: replica_id(replica)?,
                bundle_json: bounded("bundle_json", bundle_json, MAX_BUNDLE_JSON_LEN)?,
                updated_at_ms: encode_time("updated_at_ms", updated_at)?,
            })
        })();
        encoded.map_err(|p| unstorable(BUNDLE_KEYS, p))
    }
}

/// A [`NewFleetTask`] as the columns `txn, owner_node, spiffe_id,
/// began_at_ms, deadline_ms`.
pub(super) struct EncodedNewFleetTask<'a> {
    pub(super) txn: &'a str,
    pub(super) owner_node: &'a str,
    pub(super) spiffe_id: &'a str,
    pub(super) began_at_ms: i64,
    pub(super) deadline_ms: i64,
}

impl<'a> EncodedNewFleetTask<'a> {
    pub(super) fn new(task: &'a NewFleetTask) -> Result<Self, ServerStoreError> {
        let encoded = (|| {
            Ok(Self {
                txn: fleet_txn(&task.txn)?,
                owner_node: task.owner_node.as_str(),
                spiffe_id: bounded("spiffe_id", &task.spiffe_id, MAX_SPIFFE_ID_LEN)?,
                began_at_ms: encode_time("began_at_ms", task.began_at)?,
                deadline_ms: encode_time("deadline_ms", task.deadline)?,
            })
        })();
        encoded.map_err(|p| unstorable(FLEET_TASKS, p))
    }
}

/// A [`FleetTaskEndRequest`] as the columns `txn, ended_reason,
/// ended_at_ms`.
pub(super) struct EncodedFleetTaskEnd<'a> {
    pub(super) txn: &'a str,
    pub(super) reason: &'a str,
    pub(super) at_ms: i64,
}

/// Every end of one `end_fleet_tasks` call, checked before any is written:
/// at most [`MAX_ENDS_PER_CALL`], each within its bounds.
pub(super) fn encode_fleet_task_ends(
    ends: &[FleetTaskEndRequest],
) -> Result<Vec<EncodedFleetTaskEnd<'_>>, ServerStoreError> {
    if ends.len() > MAX_ENDS_PER_CALL {
        return Err(ServerStoreError::Unstorable {
            table: FLEET_TASKS,
            detail: format!(
                "{} ends in one call, at most {MAX_ENDS_PER_CALL}",
                ends.len()
            ),
        });
    }
    ends.iter()
        .map(|end| {
            Ok(EncodedFleetTaskEnd {
                txn: fleet_txn(&end.txn)?,
                reason: bounded("ended_reason", &end.reason, MAX_END_REASON_LEN)?,
                at_ms: encode_time("ended_at_ms", end.at)?,
            })
        })
        .collect::<Result<_, Problem>>()
        .map_err(|p| unstorable(FLEET_TASKS, p))
}

/// The revision an end takes after `latest`, as a column.
pub(super) fn next_end_revision(latest: u64) -> Result<(u64, i64), ServerStoreError> {
    latest
        .checked_add(1)
        .and_then(|next| Some((next, i64::try_from(next).ok()?)))
        .ok_or_else(|| ServerStoreError::Corrupt {
            table: FLEET_TASK_END_REVISION,
            detail: format!("revision {latest} is at its maximum"),
        })
}

/// A task id: non-empty printable ASCII (spaces included), at most
/// [`MAX_TXN_LEN`] bytes.
pub(super) fn fleet_txn(txn: &str) -> Result<&str, Problem> {
    let txn = bounded("txn", txn, MAX_TXN_LEN)?;
    if txn.is_empty() || !txn.bytes().all(|b| matches!(b, b' '..=b'~')) {
        return Err(Problem::new("txn", "expected non-empty printable ASCII"));
    }
    Ok(txn)
}

/// A read's `limit` as its `LIMIT` parameter, at most
/// [`MAX_TASKS_PER_READ`].
pub(super) fn read_limit(limit: u32) -> i64 {
    i64::from(limit.min(MAX_TASKS_PER_READ))
}

/// A revision to compare with (`end_revision > $1`): one past every stored
/// revision matches none.
pub(super) fn revision_bound(revision: u64) -> i64 {
    i64::try_from(revision).unwrap_or(i64::MAX)
}

/// A replica id: non-empty, bounded, printable ASCII without spaces (it is
/// logged and compared, never parsed).
pub(super) fn replica_id(id: &str) -> Result<&str, Problem> {
    let id = bounded("replica", id, MAX_REPLICA_ID_LEN)?;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Problem::new(
            "replica",
            "expected non-empty printable ASCII without spaces",
        ));
    }
    Ok(id)
}

fn json_within(column: &str, json: String, max: usize) -> Result<String, Problem> {
    if json.len() > max {
        return Err(Problem::new(
            column,
            format_args!("{} bytes as JSON, at most {max}", json.len()),
        ));
    }
    Ok(json)
}

// === decoding ===

/// A token read by `SELECT node, expires_at_ms, used_at_ms`.
pub(super) fn decode_admission(row: &impl Columns) -> Result<Admission, ServerStoreError> {
    let decoded = (|| {
        Ok(Admission {
            node: decode_node_name("node", value(row, 0)?)?,
            expires_at: decode_time("expires_at_ms", value(row, 1)?)?,
            used_at: match value(row, 2)? {
                ValueRef::Null => None,
                used => Some(decode_time("used_at_ms", used)?),
            },
        })
    })();
    decoded.map_err(|p| corrupt(JOIN_TOKENS, p))
}

/// A token as the consuming update returns it (`node, expires_at_ms`): as
/// it was before, unused.
pub(super) fn decode_consumed(row: &impl Columns) -> Result<Admission, ServerStoreError> {
    let decoded = (|| {
        Ok(Admission {
            node: decode_node_name("node", value(row, 0)?)?,
            expires_at: decode_time("expires_at_ms", value(row, 1)?)?,
            used_at: None,
        })
    })();
    decoded.map_err(|p| corrupt(JOIN_TOKENS, p))
}

/// A node read by its columns (`node_columns!`).
pub(super) fn decode_node(row: &impl Columns) -> Result<NodeRow, ServerStoreError> {
    let decoded = (|| {
        Ok(NodeRow {
            name: decode_node_name("name", value(row, 0)?)?,
            attestation: decode_text("attestation", value(row, 1)?, MAX_ATTESTATION_LEN)?.into(),
            attested_at: decode_time("attested_at_ms", value(row, 2)?)?,
            svid_serial: decode_text("svid_serial", value(row, 3)?, MAX_SERIAL_LEN)?.into(),
            svid_expires_at: decode_time("svid_expires_at_ms", value(row, 4)?)?,
            evicted: decode_flag("evicted", value(row, 5)?)?,
        })
    })();
    decoded.map_err(|p| corrupt(NODES, p))
}

/// An entry read by its columns (`entry_columns!`).
pub(super) fn decode_entry(row: &impl Columns) -> Result<EntryRecord, ServerStoreError> {
    let decoded = (|| {
        let id = decode_text("id", value(row, 0)?, MAX_ENTRY_ID_LEN)?;
        let spec_json = decode_text("spec_json", value(row, 1)?, MAX_SPEC_JSON_LEN)?;
        let spec: EntrySpec = serde_json::from_str(spec_json)
            .map_err(|e| Problem::new("spec_json", format_args!("entry {id:?}: {e}")))?;
        let nodes_json = decode_text("nodes_json", value(row, 2)?, MAX_NODES_JSON_LEN)?;
        let names: Vec<String> = serde_json::from_str(nodes_json)
            .map_err(|e| Problem::new("nodes_json", format_args!("entry {id:?}: {e}")))?;
        let nodes = names
            .iter()
            .map(|name| {
                NodeName::new(name).map_err(|e| Problem::new("nodes_json", format_args!("{e}")))
            })
            .collect::<Result<BTreeSet<_>, _>>()?;
        Ok(EntryRecord {
            id: id.into(),
            spec,
            nodes,
            revision: decode_integer("revision", value(row, 3)?, 1)?,
            created_at: decode_time("created_at_ms", value(row, 4)?)?,
            updated_at: decode_time("updated_at_ms", value(row, 5)?)?,
        })
    })();
    decoded.map_err(|p| corrupt(ENTRIES, p))
}

/// The entries' revision, read from `meta`.
pub(super) fn decode_revision(value: ValueRef<'_>) -> Result<u64, ServerStoreError> {
    decode_integer("entries_revision", value, 0).map_err(|p| corrupt(META, p))
}

/// The entries' revision, read as the one column of a row from `meta`.
pub(super) fn decode_revision_row(row: &impl Columns) -> Result<u64, ServerStoreError> {
    decode_revision(value(row, 0).map_err(|p| corrupt(META, p))?)
}

fn decode_node_name(column: &str, value: ValueRef<'_>) -> Result<NodeName, Problem> {
    let name = decode_text(column, value, MAX_NODE_NAME_LEN)?;
    NodeName::new(name).map_err(|e| Problem::new(column, e))
}

/// A replica's bundle read by `replica, bundle_json`.
pub(super) fn decode_bundle(row: &impl Columns) -> Result<(String, String), ServerStoreError> {
    let decoded = (|| {
        let replica = replica_id(decode_text("replica", value(row, 0)?, MAX_REPLICA_ID_LEN)?)?;
        let json = decode_text("bundle_json", value(row, 1)?, MAX_BUNDLE_JSON_LEN)?;
        Ok((replica.to_owned(), json.to_owned()))
    })();
    decoded.map_err(|p| corrupt(BUNDLE_KEYS, p))
}

/// A task read by its columns (`fleet_task_columns!`). The end's three
/// columns are NULL together (live) or set together (ended); a mix is
/// damage.
pub(super) fn decode_fleet_task(row: &impl Columns) -> Result<FleetTaskRow, ServerStoreError> {
    let decoded = (|| {
        let txn = fleet_txn(decode_text("txn", value(row, 0)?, MAX_TXN_LEN)?)?;
        let ended = match (value(row, 5)?, value(row, 6)?, value(row, 7)?) {
            (ValueRef::Null, ValueRef::Null, ValueRef::Null) => None,
            (reason, at, revision) if !is_null(reason) && !is_null(at) && !is_null(revision) => {
                Some(FleetTaskEnd {
                    reason: decode_text("ended_reason", reason, MAX_END_REASON_LEN)?.into(),
                    at: decode_time("ended_at_ms", at)?,
                    revision: decode_integer("end_revision", revision, 1)?,
                })
            }
            _ => {
                return Err(Problem::new(
                    "ended_reason",
                    format_args!("task {txn:?}: its end is partly recorded"),
                ));
            }
        };
        Ok(FleetTaskRow {
            txn: txn.into(),
            owner_node: decode_node_name("owner_node", value(row, 1)?)?,
            spiffe_id: decode_text("spiffe_id", value(row, 2)?, MAX_SPIFFE_ID_LEN)?.into(),
            began_at: decode_time("began_at_ms", value(row, 3)?)?,
            deadline: decode_time("deadline_ms", value(row, 4)?)?,
            ended,
        })
    })();
    decoded.map_err(|p| corrupt(FLEET_TASKS, p))
}

/// The task ends' revision, read as the one column of its row.
pub(super) fn decode_end_revision_row(row: &impl Columns) -> Result<u64, ServerStoreError> {
    value(row, 0)
        .and_then(|v| decode_integer("revision", v, 0))
        .map_err(|p| corrupt(FLEET_TASK_END_REVISION, p))
}

/// The task ends' revision row is missing: damage.
pub(super) fn missing_end_revision() -> ServerStoreError {
    ServerStoreError::Corrupt {
        table: FLEET_TASK_END_REVISION,
        detail: "its one row is missing".into(),
    }
}

fn is_null(value: ValueRef<'_>) -> bool {
    matches!(value, ValueRef::Null)
}

fn value(row: &impl Columns, i: usize) -> Result<ValueRef<'_>, Problem> {
    row.value(i)
}

// === errors ===

fn unstorable(table: &'static str, problem: Problem) -> ServerStoreError {
    ServerStoreError::Unstorable {
        table,
        detail: problem.what,
    }
}

fn corrupt(table: &'static str, problem: Problem) -> ServerStoreError {
    ServerStoreError::Corrupt {
        table,
        detail: problem.what,
    }
}
