//! What the operator commands print: registration entries (`entry ...`),
//! live X.509-SVIDs and their holders (`svid list`), the bundle document
//! (`bundle show`), `healthcheck` and `reload`.

use std::fmt::{self, Write as _};

use serde::Serialize;
use time::OffsetDateTime;

use super::text::{cells, list, or_dash, or_none, plural, printable, relative, table, ttl, when};
use super::{Render, Timestamp, Ttl};

/// One registration entry: `entry create`, `entry show`, `entry update`,
/// and each element of `entry list`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct EntryView {
    /// `id`: the entry's id (`ent-...` for API entries, `cfg-...` for
    /// config-file entries).
    pub(crate) id: String,
    /// `spiffe_id`: the SPIFFE ID (template) granted.
    pub(crate) spiffe_id: String,
    /// `selectors`: all must be among a caller's (`"unix:uid:1000"`).
    pub(crate) selectors: Vec<String>,
    /// `source`: `"config"` (the config file owns it), `"api"`, or
    /// `"unknown"`.
    pub(crate) source: &'static str,
    /// `revision`: counts changes, from 1; `entry update --revision` takes
    /// it.
    pub(crate) revision: u64,
    /// `x509_svid_ttl`: humantime (`"1h"`), or `null` for the agent default.
    pub(crate) x509_svid_ttl: Option<Ttl>,
    /// `jwt_svid_ttl`: humantime (`"5m"`), or `null` for the agent default.
    pub(crate) jwt_svid_ttl: Option<Ttl>,
    /// `dns_names`: DNS SANs of the X.509-SVID.
    pub(crate) dns_names: Vec<String>,
    /// `hint`: the operator's hint (may be `""`).
    pub(crate) hint: String,
    /// `federates_with`: trust domain names.
    pub(crate) federates_with: Vec<String>,
    /// `created_at`: RFC 3339, or `null` if the agent did not say.
    pub(crate) created_at: Option<Timestamp>,
    /// `updated_at`: RFC 3339, or `null` if the agent did not say.
    pub(crate) updated_at: Option<Timestamp>,
}

/// `tether entry list`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct EntriesReport {
    /// `entries`: in the agent's order (config-file entries first).
    pub(crate) entries: Vec<EntryView>,
}

/// `tether entry delete`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct DeletedReport {
    /// `deleted`: the id of the entry deleted.
    pub(crate) deleted: String,
}

/// `tether svid list`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SvidsReport {
    /// `svids`: every live X.509-SVID, sorted by SPIFFE ID.
    pub(crate) svids: Vec<IssuedSvidView>,
}

/// One live X.509-SVID.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct IssuedSvidView {
    /// `spiffe_id`: the SVID's SPIFFE ID.
    pub(crate) spiffe_id: String,
    /// `serial`: lowercase hex.
    pub(crate) serial: String,
    /// `not_before`: RFC 3339 (`null` if the agent did not say).
    pub(crate) not_before: Option<Timestamp>,
    /// `not_after`: RFC 3339 (`null` if the agent did not say).
    pub(crate) not_after: Option<Timestamp>,
    /// `entry_id`: the entry it was issued for.
    pub(crate) entry_id: String,
    /// `holders`: the processes with an open stream that received it
    /// (empty: none right now).
    pub(crate) holders: Vec<HolderView>,
}

/// A process holding an SVID.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct HolderView {
    /// `pid`.
    pub(crate) pid: i32,
    /// `uid`.
    pub(crate) uid: u32,
    /// `executable`: its path (`""` if unknown).
    pub(crate) executable: String,
    /// `selectors`: what attestation found for it.
    pub(crate) selectors: Vec<String>,
    /// `since`: when its stream received the SVID, RFC 3339 (or `null`).
    pub(crate) since: Option<Timestamp>,
}

/// `tether healthcheck`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct HealthReport {
    /// `serving`: the agent can issue SVIDs.
    pub(crate) serving: bool,
    /// `trust_domain`: the agent's trust domain name.
    pub(crate) trust_domain: String,
    /// `entries`: registration entries, config and API.
    pub(crate) entries: u32,
    /// `open_streams`: open Workload API streams.
    pub(crate) open_streams: u32,
    /// `version`: the agent's version.
    pub(crate) version: String,
    /// `problems`: why it is not serving, one line each (empty when
    /// serving).
    pub(crate) problems: Vec<String>,
    /// `server`: fleet mode's link to the tether server, in one line
    /// (absent for a standalone agent).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) server: String,
}

/// `tether reload`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ReloadReport {
    /// `config_entries`: entries from the config file after the reload.
    pub(crate) config_entries: u32,
    /// `federations`: federated trust domains after the reload.
    pub(crate) federations: u32,
    /// `needs_restart`: keys changed in the file that only a restart
    /// applies (the agent keeps their running values).
    pub(crate) needs_restart: Vec<String>,
}

/// A JSON document the agent sent (the SPIFFE bundle of `bundle show`):
/// indented for people, one line for `--json`. It was parsed, so it cannot
/// carry raw control characters.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub(crate) struct Document(pub serde_json::Value);

// === impl EntryView ===

impl Render for EntryView {
    fn readable(&self, w: &mut String, now: OffsetDateTime) -> fmt::Result {
        writeln!(w, "ID:              {}", printable(&self.id))?;
        writeln!(w, "SPIFFE ID:       {}", printable(&self.spiffe_id))?;
        writeln!(w, "Selectors:       {}", list(&self.selectors))?;
        writeln!(w, "Source:          {}", self.source)?;
        writeln!(w, "Revision:        {}", self.revision)?;
        writeln!(w, "X.509-SVID TTL:  {}", ttl(self.x509_svid_ttl))?;
        writeln!(w, "JWT-SVID TTL:    {}", ttl(self.jwt_svid_ttl))?;
        writeln!(w, "DNS names:       {}", list(&self.dns_names))?;
        writeln!(w, "Hint:            {}", or_none(&self.hint))?;
        writeln!(w, "Federates with:  {}", list(&self.federates_with))?;
        writeln!(w, "Created:         {}", when(self.created_at, now))?;
        writeln!(w, "Updated:         {}", when(self.updated_at, now))
    }
}

// === impl EntriesReport ===

impl Render for EntriesReport {
    fn readable(&self, w: &mut String, _now: OffsetDateTime) -> fmt::Result {
        if self.entries.is_empty() {
            return writeln!(w, "No entries");
        }
        let rows = self.entries.iter().map(|e| {
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
}

// === impl DeletedReport ===

impl Render for DeletedReport {
    fn readable(&self, w: &mut String, _now: OffsetDateTime) -> fmt::Result {
        writeln!(w, "Deleted entry {}", printable(&self.deleted))
    }
}

// === impl SvidsReport ===

impl Render for SvidsReport {
    fn readable(&self, w: &mut String, now: OffsetDateTime) -> fmt::Result {
        if self.svids.is_empty() {
            return writeln!(w, "No live X.509-SVIDs");
        }
        let mut rows = Vec::new();
        for svid in &self.svids {
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
}

// === impl HealthReport ===

impl Render for HealthReport {
    fn readable(&self, w: &mut String, _now: OffsetDateTime) -> fmt::Result {
        let state = if self.serving {
            "serving"
        } else {
            "not serving"
        };
        writeln!(
            w,
            "{state}: trust domain {}, {} entr{}, {} open stream{}",
            printable(&self.trust_domain),
            self.entries,
            if self.entries == 1 { "y" } else { "ies" },
            self.open_streams,
            plural(self.open_streams as usize)
        )?;
        if !self.server.is_empty() {
            writeln!(w, "  server: {}", printable(&self.server))?;
        }
        for problem in &self.problems {
            writeln!(w, "  {}", printable(problem))?;
        }
        Ok(())
    }
}

// === impl ReloadReport ===

impl Render for ReloadReport {
    fn readable(&self, w: &mut String, _now: OffsetDateTime) -> fmt::Result {
        writeln!(
            w,
            "reloaded: {} config entr{}, {} federation{}",
            self.config_entries,
            if self.config_entries == 1 { "y" } else { "ies" },
            self.federations,
            plural(self.federations as usize)
        )?;
        if !self.needs_restart.is_empty() {
            writeln!(
                w,
                "not applied, they need a restart: {}",
                self.needs_restart.join(", ")
            )?;
        }
        Ok(())
    }
}

// === impl Document ===

impl Render for Document {
    fn readable(&self, w: &mut String, _now: OffsetDateTime) -> fmt::Result {
        let text = serde_json::to_string_pretty(&self.0).map_err(|_| fmt::Error)?;
        writeln!(w, "{text}")
    }
}
