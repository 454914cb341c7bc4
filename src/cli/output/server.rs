//! What `tether server ...` prints: the fleet's entries (the agent's
//! entry view and the nodes each names), its attested nodes, and its task
//! index.

use std::fmt::{self, Write as _};

use serde::Serialize;
use time::OffsetDateTime;

use super::text::{cells, list, or_dash, printable, table, ttl, when};
use super::{EntryView, Render, Timestamp};

/// One of the server's entries: `server entry create|show`, and each
/// element of `server entry list`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ServerEntryView {
    /// Every field of `tether entry show --json`.
    #[serde(flatten)]
    pub(crate) entry: EntryView,
    /// `nodes`: the nodes it is served on whatever runs there.
    pub(crate) nodes: Vec<String>,
}

/// `tether server entry list`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ServerEntriesReport {
    /// `entries`: the configuration file's first, then the API's.
    pub(crate) entries: Vec<ServerEntryView>,
}

/// One attested node: each element of `server node list`, and `server
/// node evict`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct NodeView {
    /// `name`: the node's name.
    pub(crate) name: String,
    /// `attestation`: how it attested (`"join_token"`).
    pub(crate) attestation: String,
    /// `attested_at`: RFC 3339, or `null` if the server did not say.
    pub(crate) attested_at: Option<Timestamp>,
    /// `svid_serial`: its node SVID's serial (hex).
    pub(crate) svid_serial: String,
    /// `svid_expires_at`: RFC 3339, or `null` if the server did not say.
    pub(crate) svid_expires_at: Option<Timestamp>,
    /// `evicted`: its SVID is no longer accepted.
    pub(crate) evicted: bool,
}

/// `tether server node list`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct NodesReport {
    /// `nodes`: by name.
    pub(crate) nodes: Vec<NodeView>,
}

// === impl ServerEntryView ===

impl Render for ServerEntryView {
    fn readable(&self, w: &mut String, now: OffsetDateTime) -> fmt::Result {
        self.entry.readable(w, now)?;
        writeln!(w, "Nodes:           {}", list(&self.nodes))
    }
}

// === impl ServerEntriesReport ===

impl Render for ServerEntriesReport {
    fn readable(&self, w: &mut String, _now: OffsetDateTime) -> fmt::Result {
        if self.entries.is_empty() {
            return writeln!(w, "No entries");
        }
        let rows = self.entries.iter().map(|e| {
            vec![
                printable(&e.entry.id).into_owned(),
                printable(&e.entry.spiffe_id).into_owned(),
                cells(&e.entry.selectors),
                cells(&e.nodes),
                e.entry.source.to_owned(),
                ttl(e.entry.x509_svid_ttl),
                ttl(e.entry.jwt_svid_ttl),
            ]
        });
        table(
            w,
            &[
                "ID",
                "SPIFFE ID",
                "SELECTORS",
                "NODES",
                "SOURCE",
                "X509 TTL",
                "JWT TTL",
            ],
            rows,
        )
    }
}

// === impl NodeView ===

impl Render for NodeView {
    fn readable(&self, w: &mut String, now: OffsetDateTime) -> fmt::Result {
        writeln!(w, "Name:            {}", printable(&self.name))?;
        writeln!(w, "Attestation:     {}", printable(&self.attestation))?;
        writeln!(w, "Attested:        {}", when(self.attested_at, now))?;
        writeln!(w, "SVID serial:     {}", or_dash(&self.svid_serial))?;
        writeln!(w, "SVID expires:    {}", when(self.svid_expires_at, now))?;
        writeln!(
            w,
            "Evicted:         {}",
            if self.evicted { "yes" } else { "no" }
        )
    }
}

// === impl NodesReport ===

impl Render for NodesReport {
    fn readable(&self, w: &mut String, now: OffsetDateTime) -> fmt::Result {
        if self.nodes.is_empty() {
            return writeln!(w, "No nodes");
        }
        let rows = self.nodes.iter().map(|n| {
            vec![
                printable(&n.name).into_owned(),
                printable(&n.attestation).into_owned(),
                when(n.attested_at, now),
                or_dash(&n.svid_serial),
                when(n.svid_expires_at, now),
                if n.evicted { "yes" } else { "no" }.to_owned(),
            ]
        });
        table(
            w,
            &[
                "NAME",
                "ATTESTATION",
                "ATTESTED",
                "SVID SERIAL",
                "SVID EXPIRES",
                "EVICTED",
            ],
            rows,
        )
    }
}

/// One task of the fleet's index: `server task show|revoke`, and each
/// element of `server task list`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FleetTaskView {
    /// `id`: the task's id (its tokens' `txn`).
    pub(crate) id: String,
    /// `owner_node`: the node it was begun on.
    pub(crate) owner_node: String,
    /// `spiffe_id`: its owner's SPIFFE ID (its tokens' `sub`).
    pub(crate) spiffe_id: String,
    /// `began_at`: RFC 3339 (or `null`).
    pub(crate) began_at: Option<Timestamp>,
    /// `deadline`: RFC 3339 (or `null`).
    pub(crate) deadline: Option<Timestamp>,
    /// `state`: `"active"` or `"ended"`.
    pub(crate) state: String,
    /// `end_reason`: why it ended (`""` while active).
    pub(crate) end_reason: String,
    /// `ended_at`: RFC 3339, or `null` while active.
    pub(crate) ended_at: Option<Timestamp>,
}

/// `tether server task list`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FleetTasksReport {
    /// `tasks`: newest first.
    pub(crate) tasks: Vec<FleetTaskView>,
}

// === impl FleetTaskView ===

impl Render for FleetTaskView {
    fn readable(&self, w: &mut String, now: OffsetDateTime) -> fmt::Result {
        writeln!(w, "ID:              {}", printable(&self.id))?;
        writeln!(w, "Owner node:      {}", printable(&self.owner_node))?;
        writeln!(w, "SPIFFE ID:       {}", printable(&self.spiffe_id))?;
        writeln!(w, "Began:           {}", when(self.began_at, now))?;
        writeln!(w, "Deadline:        {}", when(self.deadline, now))?;
        writeln!(w, "State:           {}", printable(&self.state))?;
        if !self.end_reason.is_empty() {
            writeln!(w, "End reason:      {}", printable(&self.end_reason))?;
            writeln!(w, "Ended:           {}", when(self.ended_at, now))?;
        }
        Ok(())
    }
}

// === impl FleetTasksReport ===

impl Render for FleetTasksReport {
    fn readable(&self, w: &mut String, now: OffsetDateTime) -> fmt::Result {
        if self.tasks.is_empty() {
            return writeln!(w, "No tasks");
        }
        let rows = self.tasks.iter().map(|t| {
            vec![
                printable(&t.id).into_owned(),
                printable(&t.owner_node).into_owned(),
                printable(&t.spiffe_id).into_owned(),
                when(t.deadline, now),
                if t.end_reason.is_empty() {
                    t.state.clone()
                } else {
                    format!("{} ({})", t.state, printable(&t.end_reason))
                },
            ]
        });
        table(
            w,
            &["ID", "OWNER NODE", "SPIFFE ID", "DEADLINE", "STATE"],
            rows,
        )
    }
}
