//! `tether entry create|list|show|update|delete`: registration entries at
//! runtime, over the admin socket.
//!
//! The agent validates every field and its refusal names the field; the
//! CLI only parses what it must to build the request (durations) and never
//! second-guesses selectors or SPIFFE IDs, so there is one set of rules.
//! Rendering lives in [`super::output`]; dialling and exit codes in
//! [`super::admin_client`].

use std::io;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use thiserror::Error;

use super::admin_client::{AdminArgs, AdminClientError};
use super::fail;
use super::output::{DeletedReport, EntriesReport, EntryView, Timestamp, Ttl};
use crate::config::ProcessEnv;
use crate::proto::admin as pb;

/// Arguments of `tether entry`.
#[derive(Debug, Args)]
pub(crate) struct EntryArgs {
    #[command(flatten)]
    common: AdminArgs,
    #[command(subcommand)]
    command: EntryCommand,
}

#[derive(Debug, Subcommand)]
enum EntryCommand {
    /// Create an entry: callers with all these selectors get this SPIFFE
    /// ID. Prints the entry, id first.
    ///
    /// --json prints the entry: {"id", "spiffe_id", "selectors": [..],
    /// "source" ("config" | "api"), "revision", "x509_svid_ttl",
    /// "jwt_svid_ttl" (humantime, or null for the agent default),
    /// "dns_names": [..], "hint", "federates_with": [..], "created_at",
    /// "updated_at" (RFC 3339)}.
    Create(SpecArgs),
    /// List entries, config-file and API ones, as a table.
    ///
    /// --json prints {"entries": [entry, ..]}, each as `entry create
    /// --json` prints it.
    List(ListArgs),
    /// Show one entry.
    ///
    /// --json prints the entry as `entry create --json` does.
    Show(IdArg),
    /// Replace an entry's spec: every flag of `create`, the whole spec (a
    /// flag left out is cleared, not kept). Config-file entries are the
    /// file's and cannot be changed here.
    ///
    /// --json prints the entry as `entry create --json` does.
    Update(UpdateArgs),
    /// Delete an entry created through the admin API. Holders of its SVIDs
    /// stop receiving them.
    ///
    /// --json prints {"deleted": id}.
    Delete(IdArg),
}

/// What an operator writes for an entry (`create`, `update`, and
/// `tether server entry create`).
#[derive(Debug, Args)]
pub(crate) struct SpecArgs {
    /// The SPIFFE ID to grant, in the agent's trust domain. May use
    /// {type:key} placeholders filled from the caller's selectors:
    /// spiffe://example.org/user/{unix:user}.
    #[arg(long, value_name = "SPIFFE_ID")]
    spiffe_id: String,

    /// A selector the caller must have, TYPE:KEY:VALUE (unix:uid:1000,
    /// unix:path:/usr/bin/agent). Repeat: all must match.
    #[arg(long = "selector", value_name = "SELECTOR", required = true)]
    selectors: Vec<String>,

    /// X.509-SVID lifetime (humantime: 90s, 5m, 1h); the agent's default
    /// without it.
    #[arg(long, value_name = "DURATION", value_parser = parse_ttl)]
    x509_ttl: Option<Duration>,

    /// JWT-SVID lifetime (humantime); the agent's default without it.
    #[arg(long, value_name = "DURATION", value_parser = parse_ttl)]
    jwt_ttl: Option<Duration>,

    /// A DNS name for the X.509-SVID (repeat for several).
    #[arg(long = "dns", value_name = "NAME")]
    dns_names: Vec<String>,

    /// A hint returned with the SVIDs, for workloads choosing among
    /// several.
    #[arg(long, value_name = "HINT")]
    hint: Option<String>,

    /// A trust domain (configured as a [[federation]]) whose bundle this
    /// entry's holders receive (repeat for several).
    #[arg(long = "federates-with", value_name = "TRUST_DOMAIN")]
    federates_with: Vec<String>,

    /// An audience name this entry's holders answer to besides their SPIFFE
    /// ID (an MCP server's URI): task tokens addressed to it may be
    /// exchanged by them (repeat for several).
    #[arg(long = "audience", value_name = "AUDIENCE")]
    audiences: Vec<String>,

    /// Give each matching process its own X.509-SVID, revoked (and listed
    /// in the CRL) when the process exits.
    #[arg(long)]
    process_bound: bool,
}

/// Arguments of `tether entry update`.
#[derive(Debug, Args)]
struct UpdateArgs {
    /// The entry's id.
    id: String,

    #[command(flatten)]
    spec: SpecArgs,

    /// Apply only if the entry is still at this revision (as `entry show`
    /// printed it); without it the update applies whatever the revision.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    revision: Option<u64>,
}

/// Arguments of `tether entry list`.
#[derive(Debug, Args)]
struct ListArgs {
    /// Only entries with exactly this SPIFFE ID (template).
    #[arg(long, value_name = "SPIFFE_ID")]
    spiffe_id: Option<String>,

    /// Only entries requiring this selector (repeat: every one).
    #[arg(long = "selector", value_name = "SELECTOR")]
    selectors: Vec<String>,
}

/// An entry id (`ent-...` or `cfg-...`).
#[derive(Debug, Args)]
pub(crate) struct IdArg {
    /// The entry's id, as `entry list` shows it.
    pub(crate) id: String,
}

/// Why an `entry` command failed.
#[derive(Debug, Error)]
pub(crate) enum EntryError {
    /// Reaching the agent failed, or the agent refused.
    #[error(transparent)]
    Client(#[from] AdminClientError),
    /// The agent answered with an entry that has no spec.
    #[error("the agent sent entry {id:?} without its spec")]
    IncompleteEntry {
        /// The entry's id.
        id: String,
    },
    /// Printing the result failed.
    #[error("writing to stdout")]
    Stdout {
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

// === impl EntryError ===

impl EntryError {
    /// The exit status for this failure (see `cli` for the table).
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            Self::Client(error) => error.exit_code(),
            Self::IncompleteEntry { .. } | Self::Stdout { .. } => 1,
        }
    }

    /// The reader of our output went away (`| head -1`): not worth a
    /// complaint.
    pub(crate) fn is_broken_pipe(&self) -> bool {
        matches!(self, Self::Stdout { source } if source.kind() == io::ErrorKind::BrokenPipe)
    }
}

// === impl SpecArgs ===

impl SpecArgs {
    /// The spec the flags describe.
    pub(crate) fn to_spec(&self) -> pb::EntrySpec {
        pb::EntrySpec {
            spiffe_id: self.spiffe_id.clone(),
            selectors: self.selectors.clone(),
            x509_svid_ttl_ms: self.x509_ttl.map_or(0, whole_ms),
            jwt_svid_ttl_ms: self.jwt_ttl.map_or(0, whole_ms),
            dns_names: self.dns_names.clone(),
            hint: self.hint.clone().unwrap_or_default(),
            federates_with: self.federates_with.clone(),
            audiences: self.audiences.clone(),
            process_bound: self.process_bound,
        }
    }
}

/// Runs `tether entry ...`.
pub(crate) fn run(args: &EntryArgs) -> ExitCode {
    match execute(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.is_broken_pipe() => ExitCode::SUCCESS,
        Err(error) => fail(error.exit_code(), &error),
    }
}

fn execute(args: &EntryArgs) -> Result<(), EntryError> {
    let common = &args.common;
    let format = common.format();
    match &args.command {
        EntryCommand::Create(spec) => {
            let entry = common.block_on(&ProcessEnv, |mut client| async move {
                Ok::<_, EntryError>(client.create_entry(spec.to_spec()).await?)
            })?;
            format.print(&entry_view(entry)?).map_err(stdout)
        }
        EntryCommand::List(list) => {
            let request = pb::ListEntriesRequest {
                spiffe_id: list.spiffe_id.clone().unwrap_or_default(),
                selectors: list.selectors.clone(),
            };
            let entries = common.block_on(&ProcessEnv, |mut client| async move {
                Ok::<_, EntryError>(client.list_entries(request).await?)
            })?;
            let report = EntriesReport {
                entries: entries
                    .into_iter()
                    .map(entry_view)
                    .collect::<Result<_, _>>()?,
            };
            format.print(&report).map_err(stdout)
        }
        EntryCommand::Show(IdArg { id }) => {
            let entry = common.block_on(&ProcessEnv, |mut client| async move {
                Ok::<_, EntryError>(client.get_entry(id.clone()).await?)
            })?;
            format.print(&entry_view(entry)?).map_err(stdout)
        }
        EntryCommand::Update(update) => {
            let entry = common.block_on(&ProcessEnv, |mut client| async move {
                let entry = client
                    .update_entry(
                        update.id.clone(),
                        update.spec.to_spec(),
                        update.revision.unwrap_or(0),
                    )
                    .await?;
                Ok::<_, EntryError>(entry)
            })?;
            format.print(&entry_view(entry)?).map_err(stdout)
        }
        EntryCommand::Delete(IdArg { id }) => {
            common.block_on(&ProcessEnv, |mut client| async move {
                Ok::<_, EntryError>(client.delete_entry(id.clone()).await?)
            })?;
            format
                .print(&DeletedReport {
                    deleted: id.clone(),
                })
                .map_err(stdout)
        }
    }
}

/// The agent's (or the fleet server's) entry, for printing.
pub(crate) fn entry_view(entry: pb::Entry) -> Result<EntryView, EntryError> {
    let source = match pb::EntrySource::try_from(entry.source) {
        Ok(pb::EntrySource::Config) => "config",
        Ok(pb::EntrySource::Api) => "api",
        Ok(pb::EntrySource::Server) => "server",
        Ok(pb::EntrySource::Unspecified) | Err(_) => "unknown",
    };
    let Some(spec) = entry.spec else {
        return Err(EntryError::IncompleteEntry { id: entry.id });
    };
    let ttl = |ms: u64| (ms != 0).then(|| Ttl(Duration::from_millis(ms)));
    Ok(EntryView {
        id: entry.id,
        spiffe_id: spec.spiffe_id,
        selectors: spec.selectors,
        source,
        revision: entry.revision,
        x509_svid_ttl: ttl(spec.x509_svid_ttl_ms),
        jwt_svid_ttl: ttl(spec.jwt_svid_ttl_ms),
        dns_names: spec.dns_names,
        hint: spec.hint,
        federates_with: spec.federates_with,
        created_at: Timestamp::from_unix_ms(entry.created_at_ms),
        updated_at: Timestamp::from_unix_ms(entry.updated_at_ms),
    })
}

/// A TTL flag: a humantime duration of whole milliseconds (the admin API's
/// unit), at least 1ms; 0 would mean "the agent default", which is said by
/// leaving the flag out.
fn parse_ttl(value: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(value).map_err(|e| e.to_string())?;
    if ttl < Duration::from_millis(1) {
        return Err("must be at least 1ms; leave the flag out for the agent's default".to_owned());
    }
    if ttl.subsec_nanos() % 1_000_000 != 0 {
        return Err("must be whole milliseconds".to_owned());
    }
    if u64::try_from(ttl.as_millis()).is_err() {
        return Err("is too long".to_owned());
    }
    Ok(ttl)
}

/// `ttl` in milliseconds; `parse_ttl` has checked that it fits.
fn whole_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}

fn stdout(source: io::Error) -> EntryError {
    EntryError::Stdout { source }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::Cli;

    #[test]
    fn ttl_flags_are_humantime_whole_milliseconds() {
        assert_eq!(parse_ttl("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_ttl("250ms"), Ok(Duration::from_millis(250)));
        for bad in ["0s", "500us", "1500us", "soon", ""] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn create_flags_become_the_spec() {
        let cli = Cli::try_parse_from([
            "tether",
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/a",
            "--selector",
            "unix:uid:1",
            "--selector",
            "unix:gid:2",
            "--x509-ttl",
            "1h",
            "--dns",
            "a.example.org",
            "--hint",
            "a",
            "--federates-with",
            "partner.example",
            "--json",
        ])
        .unwrap();
        let crate::cli::Command::Entry(EntryArgs {
            common,
            command: EntryCommand::Create(spec),
        }) = cli.command
        else {
            panic!("parsed as something else");
        };
        assert_eq!(common.format(), crate::cli::output::Format::Json);
        assert_eq!(
            spec.to_spec(),
            pb::EntrySpec {
                spiffe_id: "spiffe://example.org/a".into(),
                selectors: vec!["unix:uid:1".into(), "unix:gid:2".into()],
                x509_svid_ttl_ms: 3_600_000,
                jwt_svid_ttl_ms: 0,
                dns_names: vec!["a.example.org".into()],
                hint: "a".into(),
                federates_with: vec!["partner.example".into()],
                audiences: Vec::new(),
                process_bound: false,
            }
        );
        // No selector, or a revision of 0: clap's usage error.
        for args in [
            &["tether", "entry", "create", "--spiffe-id", "spiffe://e/a"][..],
            &[
                "tether",
                "entry",
                "update",
                "ent-1",
                "--spiffe-id",
                "spiffe://e/a",
                "--selector",
                "unix:uid:1",
                "--revision",
                "0",
            ],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
    }

    #[test]
    fn entries_from_the_agent_become_views() {
        let entry = pb::Entry {
            id: "ent-1".into(),
            spec: Some(pb::EntrySpec {
                spiffe_id: "spiffe://example.org/a".into(),
                selectors: vec!["unix:uid:1".into()],
                jwt_svid_ttl_ms: 300_000,
                ..Default::default()
            }),
            source: pb::EntrySource::Config.into(),
            revision: 3,
            created_at_ms: 1_700_000_000_000,
            updated_at_ms: 0,
        };
        let view = serde_json::to_value(entry_view(entry).unwrap()).unwrap();
        assert_eq!(
            view,
            serde_json::json!({
                "id": "ent-1",
                "spiffe_id": "spiffe://example.org/a",
                "selectors": ["unix:uid:1"],
                "source": "config",
                "revision": 3,
                "x509_svid_ttl": null,
                "jwt_svid_ttl": "5m",
                "dns_names": [],
                "hint": "",
                "federates_with": [],
                "created_at": "2023-11-14T22:13:20Z",
                "updated_at": null,
            })
        );
        let odd = pb::Entry {
            id: "ent-2".into(),
            source: 42,
            ..Default::default()
        };
        assert!(matches!(
            entry_view(odd),
            Err(EntryError::IncompleteEntry { .. })
        ));
    }
}
