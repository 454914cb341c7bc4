//! The operator commands that are not about entries: `svid list`, `bundle
//! show`, `healthcheck` and `reload`, over the admin socket.
//!
//! What the agent sends is untrusted input here too: the bundle's
//! certificates are parsed with `x509-parser` before they are printed as
//! PEM (written with `pem`), and its JSON document is parsed before it is
//! printed. Rendering lives in [`super::output`]; dialling and exit codes
//! in [`super::admin_client`].

use std::io;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use pem::{EncodeConfig, LineEnding, Pem};
use thiserror::Error;
use x509_parser::error::X509Error;

use super::admin_client::{AdminArgs, AdminClientError};
use super::output::{
    self, Document, Format, HealthReport, HolderView, IssuedSvidView, ReloadReport, SvidsReport,
    Timestamp,
};
use super::{EXIT_USAGE, fail};
use crate::config::ProcessEnv;
use crate::proto::admin as pb;

/// Arguments of `tether svid`.
#[derive(Debug, Args)]
pub(crate) struct SvidArgs {
    #[command(flatten)]
    common: AdminArgs,
    #[command(subcommand)]
    command: SvidCommand,
}

#[derive(Debug, Subcommand)]
enum SvidCommand {
    /// List every live X.509-SVID and the processes holding it (an open
    /// Workload API stream that received it): one line per holder, or "-".
    ///
    /// --json prints {"svids": [{"spiffe_id", "serial" (hex), "not_before",
    /// "not_after" (RFC 3339), "entry_id", "holders": [{"pid", "uid",
    /// "executable", "selectors": [..], "since" (RFC 3339)}]}]}.
    List,
}

/// Arguments of `tether bundle`.
#[derive(Debug, Args)]
pub(crate) struct BundleArgs {
    #[command(flatten)]
    common: AdminArgs,
    #[command(subcommand)]
    command: BundleCommand,
}

#[derive(Debug, Subcommand)]
enum BundleCommand {
    /// Print the agent's trust bundle, for relying parties and federation.
    Show(ShowBundleArgs),
}

/// Arguments of `tether bundle show` (and `tether server bundle show`).
#[derive(Debug, Args)]
pub(crate) struct ShowBundleArgs {
    /// spiffe: the SPIFFE bundle document (a JWK Set with x509-svid and
    /// jwt-svid keys), indented, or on one line with --json. pem: the
    /// X.509 authorities as PEM CERTIFICATE blocks (not with --json).
    #[arg(long, value_enum, default_value_t = BundleFormat::Spiffe)]
    pub(crate) format: BundleFormat,
}

/// How `bundle show` prints the bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum BundleFormat {
    /// The SPIFFE bundle document (JSON).
    Spiffe,
    /// The X.509 authorities as PEM.
    Pem,
}

/// Arguments of `tether healthcheck` and `tether reload`.
#[derive(Debug, Args)]
pub(crate) struct PlainArgs {
    #[command(flatten)]
    common: AdminArgs,
}

/// Why an operator command failed.
#[derive(Debug, Error)]
pub(crate) enum OperatorError {
    /// Reaching the agent failed, or the agent refused.
    #[error(transparent)]
    Client(#[from] AdminClientError),
    /// The agent answers but does not serve.
    #[error("the agent is not serving (trust domain {trust_domain}): {problems}; admin socket: {}", .socket.display())]
    NotServing {
        /// The agent's trust domain.
        trust_domain: String,
        /// Why, as the agent says.
        problems: String,
        /// The admin socket asked.
        socket: PathBuf,
    },
    /// The agent sent an X.509 authority that does not parse.
    #[error("the agent sent a malformed X.509 authority (number {index} of the bundle)")]
    Certificate {
        /// Its position in the bundle, from 1.
        index: usize,
        /// The parser's complaint.
        #[source]
        source: x509_parser::nom::Err<X509Error>,
    },
    /// The agent sent an X.509 authority followed by other bytes.
    #[error("the agent sent an X.509 authority with trailing data (number {index} of the bundle)")]
    TrailingData {
        /// Its position in the bundle, from 1.
        index: usize,
    },
    /// The agent sent a bundle document that is not JSON.
    #[error("the agent sent a malformed SPIFFE bundle document")]
    BundleDocument {
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// `--json` with `--format pem`.
    #[error("--format pem prints PEM, not JSON: drop --json, or use --format spiffe")]
    PemAsJson,
    /// Printing the result failed.
    #[error("writing to stdout")]
    Stdout {
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

// === impl OperatorError ===

impl OperatorError {
    /// The exit status for this failure (see `cli` for the table).
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            Self::Client(error) => error.exit_code(),
            Self::PemAsJson => EXIT_USAGE,
            _ => 1,
        }
    }

    /// The reader of our output went away (`| head -1`): not worth a
    /// complaint.
    pub(crate) fn is_broken_pipe(&self) -> bool {
        matches!(self, Self::Stdout { source } if source.kind() == io::ErrorKind::BrokenPipe)
    }
}

/// Runs `tether svid ...`.
pub(crate) fn run_svid(args: &SvidArgs) -> ExitCode {
    finish(match args.command {
        SvidCommand::List => svid_list(&args.common),
    })
}

/// Runs `tether bundle ...`.
pub(crate) fn run_bundle(args: &BundleArgs) -> ExitCode {
    finish(match &args.command {
        BundleCommand::Show(show) => bundle_show(&args.common, show.format),
    })
}

/// Runs `tether healthcheck`: exit 0 only when the agent answers and
/// serves.
pub(crate) fn run_healthcheck(args: &PlainArgs) -> ExitCode {
    finish(healthcheck(&args.common))
}

/// Runs `tether reload`.
pub(crate) fn run_reload(args: &PlainArgs) -> ExitCode {
    finish(reload(&args.common))
}

fn finish(result: Result<(), OperatorError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.is_broken_pipe() => ExitCode::SUCCESS,
        Err(error) => fail(error.exit_code(), &error),
    }
}

fn svid_list(common: &AdminArgs) -> Result<(), OperatorError> {
    let svids = common.block_on(&ProcessEnv, |mut client| async move {
        Ok::<_, OperatorError>(client.list_svids().await?)
    })?;
    let report = SvidsReport {
        svids: svids.into_iter().map(svid_view).collect(),
    };
    common.format().print(&report).map_err(stdout)
}

fn bundle_show(common: &AdminArgs, format: BundleFormat) -> Result<(), OperatorError> {
    check_bundle_format(format, common.format())?;
    let bundle = common.block_on(&ProcessEnv, |mut client| async move {
        Ok::<_, OperatorError>(client.get_bundle().await?)
    })?;
    print_bundle(&bundle, format, common.format())
}

/// Prints a bundle as `bundle show` does (the agent's, or the fleet
/// server's): the SPIFFE document, parsed first, or the X.509 authorities
/// as PEM, each parsed first. Call [`check_bundle_format`] before asking
/// for the bundle.
pub(crate) fn print_bundle(
    bundle: &pb::Bundle,
    format: BundleFormat,
    output_format: Format,
) -> Result<(), OperatorError> {
    match format {
        BundleFormat::Spiffe => {
            let document: serde_json::Value = serde_json::from_str(&bundle.spiffe_json)
                .map_err(|source| OperatorError::BundleDocument { source })?;
            output_format.print(&Document(document)).map_err(stdout)
        }
        BundleFormat::Pem => output::print_pem(&authorities_pem(bundle)?).map_err(stdout),
    }
}

/// Refuses `--format pem` with `--json` (PEM is not JSON).
pub(crate) fn check_bundle_format(
    format: BundleFormat,
    output_format: Format,
) -> Result<(), OperatorError> {
    if format == BundleFormat::Pem && output_format == Format::Json {
        return Err(OperatorError::PemAsJson);
    }
    Ok(())
}

fn healthcheck(common: &AdminArgs) -> Result<(), OperatorError> {
    let (health, socket) = common.block_on(&ProcessEnv, |mut client| async move {
        let health = client.health().await?;
        Ok::<_, OperatorError>((health, client.socket().to_owned()))
    })?;
    let report = HealthReport {
        serving: health.serving,
        trust_domain: health.trust_domain,
        entries: health.entries,
        open_streams: health.open_streams,
        version: health.version,
        problems: health.problems,
        server: health.server,
    };
    let format = common.format();
    // Scripts get the document either way; people get the reason on
    // stderr only, as one line.
    if report.serving || format == Format::Json {
        format.print(&report).map_err(stdout)?;
    }
    if report.serving {
        Ok(())
    } else {
        Err(OperatorError::NotServing {
            trust_domain: report.trust_domain,
            problems: if report.problems.is_empty() {
                "its signing keys are not usable".to_owned()
            } else {
                report.problems.join("; ")
            },
            socket,
        })
    }
}

fn reload(common: &AdminArgs) -> Result<(), OperatorError> {
    let outcome = common.block_on(&ProcessEnv, |mut client| async move {
        Ok::<_, OperatorError>(client.reload().await?)
    })?;
    common
        .format()
        .print(&ReloadReport {
            config_entries: outcome.config_entries,
            federations: outcome.federations,
            needs_restart: outcome.needs_restart,
        })
        .map_err(stdout)
}

fn svid_view(svid: pb::IssuedSvid) -> IssuedSvidView {
    IssuedSvidView {
        spiffe_id: svid.spiffe_id,
        serial: svid.serial,
        not_before: Timestamp::from_unix_ms(svid.not_before_ms),
        not_after: Timestamp::from_unix_ms(svid.not_after_ms),
        entry_id: svid.entry_id,
        holders: svid
            .holders
            .into_iter()
            .map(|h| HolderView {
                pid: h.pid,
                uid: h.uid,
                executable: h.executable,
                selectors: h.selectors,
                since: Timestamp::from_unix_ms(h.since_ms),
            })
            .collect(),
    }
}

/// The bundle's X.509 authorities as PEM CERTIFICATE blocks, in the
/// agent's order; each must be exactly one certificate.
fn authorities_pem(bundle: &pb::Bundle) -> Result<String, OperatorError> {
    let mut blocks = Vec::with_capacity(bundle.x509_authorities.len());
    for (i, der) in bundle.x509_authorities.iter().enumerate() {
        let index = i + 1;
        let (rest, _) = x509_parser::parse_x509_certificate(der)
            .map_err(|source| OperatorError::Certificate { index, source })?;
        if !rest.is_empty() {
            return Err(OperatorError::TrailingData { index });
        }
        blocks.push(Pem::new("CERTIFICATE", der.as_slice()));
    }
    Ok(pem::encode_many_config(
        &blocks,
        EncodeConfig::new().set_line_ending(LineEnding::LF),
    ))
}

fn stdout(source: io::Error) -> OperatorError {
    OperatorError::Stdout { source }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_der() -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn authorities_become_pem_blocks_and_malformed_ones_errors() {
        let (a, b) = (ca_der(), ca_der());
        let bundle = pb::Bundle {
            x509_authorities: vec![a.clone(), b.clone()],
            ..Default::default()
        };
        let text = authorities_pem(&bundle).unwrap();
        let blocks = pem::parse_many(&text).unwrap();
        assert_eq!(blocks.len(), 2);
        assert!(blocks.iter().all(|p| p.tag() == "CERTIFICATE"));
        assert_eq!(blocks[0].contents(), a);
        assert_eq!(blocks[1].contents(), b);

        let mut truncated = bundle.clone();
        truncated.x509_authorities[1].truncate(10);
        assert!(matches!(
            authorities_pem(&truncated),
            Err(OperatorError::Certificate { index: 2, .. })
        ));
        let mut trailing = bundle;
        trailing.x509_authorities[0].push(0);
        assert!(matches!(
            authorities_pem(&trailing),
            Err(OperatorError::TrailingData { index: 1 })
        ));
    }

    #[test]
    fn svids_from_the_agent_keep_every_holder() {
        let svid = pb::IssuedSvid {
            spiffe_id: "spiffe://example.org/a".into(),
            entry_id: "ent-1".into(),
            serial: "0a".into(),
            not_before_ms: 1_700_000_000_000,
            not_after_ms: 1_700_003_600_000,
            holders: vec![pb::SvidHolder {
                pid: 42,
                uid: 1000,
                executable: "/usr/bin/agent".into(),
                selectors: vec!["unix:uid:1000".into()],
                since_ms: 1_700_000_000_000,
            }],
        };
        let json = serde_json::to_value(svid_view(svid)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "spiffe_id": "spiffe://example.org/a",
                "serial": "0a",
                "not_before": "2023-11-14T22:13:20Z",
                "not_after": "2023-11-14T23:13:20Z",
                "entry_id": "ent-1",
                "holders": [{
                    "pid": 42,
                    "uid": 1000,
                    "executable": "/usr/bin/agent",
                    "selectors": ["unix:uid:1000"],
                    "since": "2023-11-14T22:13:20Z",
                }],
            })
        );
    }
}
