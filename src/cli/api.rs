//! `tether api`: talk to a running agent's Workload API the way a workload
//! does, like `spire-agent api`. Fetch X.509 and JWT SVIDs and bundles,
//! validate a JWT-SVID, watch X.509 rotation.
//!
//! Everything the agent sends is untrusted input: certificates are parsed
//! with `x509-parser`, PEM is written with `pem`, trust domain names are
//! checked with `spiffe` before they become file names, and no malformed
//! answer can panic the CLI. Rendering lives in [`super::output`]; dialling
//! and the status-to-exit-code mapping in [`crate::client::workload`].

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{DirBuilder, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::fd::AsFd as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use pem::{EncodeConfig, LineEnding, Pem};
use serde::Deserialize;
use spiffe::{SpiffeIdError, TrustDomain};
use thiserror::Error;
use time::OffsetDateTime;
use tokio::signal::unix::{SignalKind, signal};
use x509_parser::certificate::X509Certificate;
use x509_parser::error::X509Error;
use x509_parser::extensions::GeneralName;
use zeroize::{Zeroize as _, Zeroizing};

use super::output::{
    self, BundleSummary, BundlesReport, CaSummary, FederatedBundleSummary, FetchX509Output, Format,
    JwtKeySummary, JwtReport, JwtSvidSummary, Timestamp, ValidationReport, WatchUpdate, X509Report,
    X509SvidSummary,
};
use super::{EXIT_NOPERM, EXIT_UNAVAILABLE, EXIT_USAGE, fail};
use crate::client::workload::{SocketError, WorkloadClient, WorkloadClientError, resolve_socket};
use crate::config::ProcessEnv;
use crate::proto::workload as pb;

/// Longest token read from stdin (`--token -`). Far above any real JWT; a
/// bound so that a wrong pipe cannot fill memory.
const MAX_STDIN_TOKEN_LEN: u64 = 1024 * 1024;

/// Arguments of `tether api`.
#[derive(Debug, Args)]
pub struct ApiArgs {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: ApiCommand,
}

/// Flags every `api` command takes (before or after the subcommand).
#[derive(Debug, Args)]
struct CommonArgs {
    /// The Workload API socket: a path, or a URI (unix:///abs/path or
    /// unix:/abs/path). Without it: $SPIFFE_ENDPOINT_SOCKET (a unix: URI),
    /// then $TETHER_SOCKET_PATH, then the agent's default for this user
    /// (/run/tether/agent.sock for root).
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<String>,

    /// Print JSON on stdout (stable field names, listed in each command's
    /// --help). Streams print one JSON object per line.
    #[arg(long, global = true)]
    json: bool,

    /// How long to wait for the connection, for each answer and for a
    /// stream's first message (humantime: 500ms, 5s, 1m).
    #[arg(
        long,
        global = true,
        value_name = "DURATION",
        default_value = "5s",
        value_parser = super::flags::parse_timeout
    )]
    timeout: Duration,
}

#[derive(Debug, Subcommand)]
enum ApiCommand {
    /// Fetch SVIDs or bundles once.
    #[command(subcommand)]
    Fetch(FetchCommand),
    /// Ask the agent to validate a credential.
    #[command(subcommand)]
    Validate(ValidateCommand),
    /// Print every X.509-SVID update as the agent streams it, until the
    /// stream ends or Ctrl-C.
    ///
    /// --json prints one object per update and line: received_at (RFC 3339),
    /// update (1, 2, ...), and the fields of `fetch x509 --json` except
    /// files_written.
    Watch,
}

#[derive(Debug, Subcommand)]
enum FetchCommand {
    /// Fetch this process's X.509-SVIDs (the first message of
    /// FetchX509SVID).
    ///
    /// --json prints {"svids": [{"spiffe_id", "hint", "serial" (hex),
    /// "not_before", "not_after" (RFC 3339), "dns_names": [..],
    /// "chain_length"}], "trust_domain_cas": n, "federated_bundles":
    /// [{"trust_domain", "cas"}], "files_written": [paths]}.
    X509(FetchX509Args),
    /// Fetch JWT-SVIDs for one or more audiences.
    ///
    /// --json prints {"svids": [{"spiffe_id", "hint", "expires_at"
    /// (RFC 3339 or null), "token"}]}; the first SVID is the default.
    Jwt(FetchJwtArgs),
    /// Fetch the trust bundles: X.509 CAs and JWT keys per trust domain.
    ///
    /// --json prints {"bundles": [{"trust_domain", "x509_authorities":
    /// [{"subject", "serial", "not_after"}], "jwt_authorities": [{"kid",
    /// "key_type"}]}]}, sorted by trust domain.
    Bundles,
}

#[derive(Debug, Subcommand)]
enum ValidateCommand {
    /// Validate a JWT-SVID for an audience (ValidateJWTSVID). Exit 0 and
    /// print "valid", the SPIFFE ID and the claims; exit 1 with the
    /// agent's reason if the token is not valid.
    ///
    /// --json prints {"spiffe_id", "claims": {..}}.
    Jwt(ValidateJwtArgs),
}

/// Arguments of `tether api fetch x509`.
#[derive(Debug, Args)]
struct FetchX509Args {
    /// Also write, for SVID i: svid.<i>.pem (the chain, leaf first),
    /// svid.<i>.key (PKCS#8, mode 0600), bundle.<i>.pem, and
    /// federated_bundle.<trust-domain>.pem per federated bundle. DIR is
    /// created (mode 0700) if missing.
    #[arg(long, value_name = "DIR")]
    write: Option<PathBuf>,
}

/// Arguments of `tether api fetch jwt`.
#[derive(Debug, Args)]
struct FetchJwtArgs {
    /// An audience for the token (repeat for several).
    #[arg(
        long = "audience",
        short = 'a',
        value_name = "AUDIENCE",
        required = true
    )]
    audiences: Vec<String>,

    /// Only this identity's SVID (default: every identity of this process).
    #[arg(long, value_name = "SPIFFE_ID")]
    spiffe_id: Option<String>,

    /// Print only the first SVID's token and a newline, for
    /// `$(tether api fetch jwt --audience A --token-only)`. Wins over --json.
    #[arg(long)]
    token_only: bool,
}

/// Arguments of `tether api validate jwt`.
#[derive(Debug, Args)]
struct ValidateJwtArgs {
    /// The audience the token must be for.
    #[arg(long, short = 'a', value_name = "AUDIENCE")]
    audience: String,

    /// The token; `-` reads it from stdin (surrounding whitespace
    /// trimmed), which keeps it out of the process list.
    #[arg(long, value_name = "TOKEN")]
    token: String,
}

/// Why an `api` command failed.
#[derive(Debug, Error)]
pub enum ApiError {
    /// The socket address from the flag or the environment is unusable.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// Reaching the agent, or the agent's answer, failed.
    #[error(transparent)]
    Client(#[from] WorkloadClientError),
    /// The agent ended a stream before its first message.
    #[error("the agent closed the {stream} stream without sending anything")]
    NoMessage {
        /// Which stream.
        stream: &'static str,
    },
    /// The agent sent a certificate that does not parse.
    #[error("the agent sent a malformed certificate ({what}): {source}")]
    Certificate {
        /// Where it was.
        what: String,
        /// The parser's complaint.
        #[source]
        source: x509_parser::nom::Err<X509Error>,
    },
    /// The agent sent an X.509-SVID without certificates or key.
    #[error("the agent sent an X.509-SVID without {missing} ({spiffe_id})")]
    IncompleteSvid {
        /// The SVID's SPIFFE ID.
        spiffe_id: String,
        /// What is missing.
        missing: &'static str,
    },
    /// The agent keyed a bundle by something that is not a trust domain.
    #[error("the agent sent a bundle for {value:?}, which is not a trust domain: {source}")]
    TrustDomain {
        /// The key the agent sent.
        value: String,
        /// Why it is not a trust domain.
        #[source]
        source: SpiffeIdError,
    },
    /// The agent sent a JWT bundle that is not a JWK set.
    #[error("the agent sent a malformed JWT bundle for {trust_domain}: {source}")]
    JwtBundle {
        /// Whose bundle.
        trust_domain: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The agent answered FetchJWTSVID with no SVID.
    #[error("the agent returned no JWT-SVID")]
    NoJwtSvid,
    /// `--token -` read nothing.
    #[error("the token is empty")]
    EmptyToken,
    /// Reading the token from stdin failed.
    #[error("reading the token from stdin: {source}")]
    Stdin {
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Writing a `--write` file failed.
    #[error("writing {}: {source}", path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Printing the result failed.
    #[error("writing to stdout: {source}")]
    Stdout {
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The async runtime or a signal handler could not be set up.
    #[error("setting up the runtime: {source}")]
    Runtime {
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// A FetchX509SVID message whose private keys are wiped when it is dropped,
/// on every path out of the command.
#[derive(Debug)]
struct X509Response(pb::X509svidResponse);

/// A certificate and the DER it was parsed from.
struct Parsed<'a> {
    der: &'a [u8],
    cert: X509Certificate<'a>,
}

/// The parts of a JWK set this CLI shows; everything else is ignored.
#[derive(Debug, Deserialize)]
struct JwkSet {
    #[serde(default)]
    keys: Vec<JwkInfo>,
}

#[derive(Debug, Deserialize)]
struct JwkInfo {
    #[serde(default)]
    kid: String,
    #[serde(default)]
    kty: String,
}

/// The one claim `fetch jwt` reads from a token, for display.
#[derive(Debug, Deserialize)]
struct Expiry {
    exp: Option<serde_json::Number>,
}

// === impl ApiError ===

impl ApiError {
    /// The exit status for this failure (see `cli` for the table).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Socket(SocketError::Untrusted(_)) => EXIT_NOPERM,
            Self::Socket(_) => EXIT_USAGE,
            Self::Client(error) => error.exit_code(),
            Self::NoMessage { .. } => EXIT_UNAVAILABLE,
            _ => 1,
        }
    }

    /// The reader of our output went away (`| head -1`): not worth a
    /// complaint.
    fn is_broken_pipe(&self) -> bool {
        matches!(self, Self::Stdout { source } if source.kind() == io::ErrorKind::BrokenPipe)
    }
}

// === impl X509Response ===

impl Drop for X509Response {
    fn drop(&mut self) {
        for svid in &mut self.0.svids {
            svid.x509_svid_key.zeroize();
        }
    }
}

/// Runs `tether api ...` on a current-thread runtime.
pub fn run(args: &ApiArgs) -> ExitCode {
    match execute(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.is_broken_pipe() => ExitCode::SUCCESS,
        Err(error) => fail(error.exit_code(), error),
    }
}

fn execute(args: &ApiArgs) -> Result<(), ApiError> {
    let common = &args.common;
    let format = Format::from_json_flag(common.json);
    let socket = resolve_socket(common.socket.as_deref(), &ProcessEnv)?;
    // Blocking input is read before the runtime starts.
    let token = match &args.command {
        ApiCommand::Validate(ValidateCommand::Jwt(v)) => Some(read_token(&v.token)?),
        _ => None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| ApiError::Runtime { source })?;
    let connect = WorkloadClient::connect(&socket, common.timeout);

    match &args.command {
        ApiCommand::Fetch(FetchCommand::X509(x509)) => {
            let response = runtime.block_on(async {
                let mut client = connect.await?;
                let mut stream = client.fetch_x509_svid().await?;
                client
                    .first(&mut stream)
                    .await?
                    .map(X509Response)
                    .ok_or(ApiError::NoMessage {
                        stream: "X.509-SVID",
                    })
            })?;
            fetch_x509(format, x509, response)
        }
        ApiCommand::Fetch(FetchCommand::Jwt(jwt)) => {
            let request = pb::JwtsvidRequest {
                audience: jwt.audiences.clone(),
                spiffe_id: jwt.spiffe_id.clone().unwrap_or_default(),
            };
            let response =
                runtime.block_on(async { connect.await?.fetch_jwt_svid(request).await })?;
            fetch_jwt(format, jwt, &response)
        }
        ApiCommand::Fetch(FetchCommand::Bundles) => {
            let (x509, jwt) = runtime.block_on(async {
                let mut client = connect.await?;
                let mut x509 = client.fetch_x509_bundles().await?;
                let x509 = client.first(&mut x509).await?.ok_or(ApiError::NoMessage {
                    stream: "X.509 bundles",
                })?;
                let mut jwt = client.fetch_jwt_bundles().await?;
                let jwt = client.first(&mut jwt).await?.ok_or(ApiError::NoMessage {
                    stream: "JWT bundles",
                })?;
                Ok::<_, ApiError>((x509, jwt))
            })?;
            let report = bundles_report(&x509, &jwt)?;
            format.print(&report).map_err(stdout)
        }
        ApiCommand::Validate(ValidateCommand::Jwt(validate)) => {
            let request = pb::ValidateJwtsvidRequest {
                audience: validate.audience.clone(),
                svid: token.unwrap_or_default(),
            };
            let response =
                runtime.block_on(async { connect.await?.validate_jwt_svid(request).await })?;
            let report = ValidationReport {
                spiffe_id: response.spiffe_id,
                claims: response.claims.as_ref().map_or_else(
                    || serde_json::Value::Object(Default::default()),
                    struct_to_json,
                ),
            };
            format.print(&report).map_err(stdout)
        }
        ApiCommand::Watch => runtime.block_on(watch(format, connect)),
    }
}

fn fetch_x509(
    format: Format,
    args: &FetchX509Args,
    mut response: X509Response,
) -> Result<(), ApiError> {
    // Everything is parsed before anything is written: a malformed answer
    // leaves no half-written directory behind.
    let report = x509_report(&response.0)?;
    let files_written = match &args.write {
        Some(dir) => write_x509_files(dir, &mut response.0)?,
        None => Vec::new(),
    };
    drop(response);
    format
        .print(&FetchX509Output {
            report,
            files_written,
        })
        .map_err(stdout)
}

fn fetch_jwt(
    format: Format,
    args: &FetchJwtArgs,
    response: &pb::JwtsvidResponse,
) -> Result<(), ApiError> {
    if args.token_only {
        let first = response.svids.first().ok_or(ApiError::NoJwtSvid)?;
        return output::print_token(&first.svid).map_err(stdout);
    }
    let report = JwtReport {
        svids: response
            .svids
            .iter()
            .map(|svid| JwtSvidSummary {
                spiffe_id: svid.spiffe_id.clone(),
                hint: svid.hint.clone(),
                expires_at: token_expiry(&svid.svid),
                token: svid.svid.clone(),
            })
            .collect(),
    };
    format.print(&report).map_err(stdout)
}

async fn watch(
    format: Format,
    connect: impl Future<Output = Result<WorkloadClient, WorkloadClientError>>,
) -> Result<(), ApiError> {
    // Installed before the first wait so that Ctrl-C is always a clean
    // exit once the handler exists.
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(|source| ApiError::Runtime { source })?;
    let mut terminate =
        signal(SignalKind::terminate()).map_err(|source| ApiError::Runtime { source })?;
    let mut client = connect.await?;
    let mut stream = client.fetch_x509_svid().await?;
    let mut next = client.first(&mut stream).await?;
    let mut update = 0;
    let reader_gone = stdout_closed();
    tokio::pin!(reader_gone);
    loop {
        let Some(message) = next.map(X509Response) else {
            // The agent ended the stream without an error: nothing more
            // will come.
            return if update == 0 {
                Err(ApiError::NoMessage {
                    stream: "X.509-SVID",
                })
            } else {
                Ok(())
            };
        };
        update += 1;
        let report = x509_report(&message.0)?;
        drop(message);
        format
            .print(&WatchUpdate {
                received_at: Timestamp(OffsetDateTime::now_utc()),
                update,
                report,
            })
            .map_err(stdout)?;
        // No timeout from here on: updates come when SVIDs rotate.
        next = tokio::select! {
            _ = interrupt.recv() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
            () = &mut reader_gone => return Ok(()),
            message = client.next(&mut stream) => message?,
        };
    }
}

/// Resolves when stdout is a pipe whose reader has gone, so that
/// `tether api watch | head -1` ends with `head`, not at the next rotation
/// (only a write would notice otherwise). Never resolves for regular
/// files, which cannot report this.
fn stdout_closed() -> impl Future<Output = ()> {
    let (closed, on_closed) = tokio::sync::oneshot::channel::<()>();
    // A thread rather than a runtime job: it sits in poll(2) for the whole
    // command, and the process exit, not the runtime, must end it.
    let watcher = std::thread::Builder::new()
        .name("stdout-watch".into())
        .spawn(move || {
            let stdout = io::stdout();
            // No events asked for: poll(2) still reports POLLERR (the pipe's
            // reader closed) and POLLHUP (the terminal hung up).
            let mut fds = [PollFd::new(stdout.as_fd(), PollFlags::empty())];
            loop {
                match poll(&mut fds, PollTimeout::NONE) {
                    Err(Errno::EINTR) => continue,
                    Err(_) => return,
                    Ok(_) => {
                        let revents = fds[0].revents().unwrap_or(PollFlags::empty());
                        if revents.intersects(PollFlags::POLLERR | PollFlags::POLLHUP) {
                            let _ = closed.send(());
                            return;
                        }
                        if !revents.is_empty() {
                            return;
                        }
                    }
                }
            }
        });
    async move {
        // No watcher, or it gave up: wait for the other ways out.
        if watcher.is_err() || on_closed.await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

fn x509_report(response: &pb::X509svidResponse) -> Result<X509Report, ApiError> {
    let mut svids = Vec::with_capacity(response.svids.len());
    let mut cas = BTreeSet::new();
    for (i, svid) in response.svids.iter().enumerate() {
        let chain = parse_certificates(&svid.x509_svid, || {
            format!("X.509-SVID {i} ({})", svid.spiffe_id)
        })?;
        let leaf = &chain
            .first()
            .ok_or_else(|| ApiError::IncompleteSvid {
                spiffe_id: svid.spiffe_id.clone(),
                missing: "certificates",
            })?
            .cert;
        let bundle = parse_certificates(&svid.bundle, || {
            format!("bundle of X.509-SVID {i} ({})", svid.spiffe_id)
        })?;
        cas.extend(bundle.iter().map(|p| p.der));
        svids.push(X509SvidSummary {
            spiffe_id: svid.spiffe_id.clone(),
            hint: svid.hint.clone(),
            serial: leaf.serial.to_str_radix(16),
            not_before: Timestamp(leaf.validity().not_before.to_datetime()),
            not_after: Timestamp(leaf.validity().not_after.to_datetime()),
            dns_names: dns_names(leaf),
            chain_length: chain.len(),
        });
    }
    let mut federated_bundles = Vec::with_capacity(response.federated_bundles.len());
    for (key, der) in &response.federated_bundles {
        let trust_domain = trust_domain(key)?;
        let certs = parse_certificates(der, || format!("federated bundle of {trust_domain}"))?;
        federated_bundles.push(FederatedBundleSummary {
            trust_domain: trust_domain.to_string(),
            cas: certs.len(),
        });
    }
    federated_bundles.sort_by(|a, b| a.trust_domain.cmp(&b.trust_domain));
    Ok(X509Report {
        svids,
        trust_domain_cas: cas.len(),
        federated_bundles,
    })
}

fn bundles_report(
    x509: &pb::X509BundlesResponse,
    jwt: &pb::JwtBundlesResponse,
) -> Result<BundlesReport, ApiError> {
    let mut bundles: BTreeMap<String, BundleSummary> = BTreeMap::new();
    for (key, der) in &x509.bundles {
        let certs = parse_certificates(der, || format!("X.509 bundle of {key}"))?;
        bundle_entry(&mut bundles, key)?
            .x509_authorities
            .extend(certs.iter().map(|p| CaSummary {
                subject: p.cert.subject().to_string(),
                serial: p.cert.serial.to_str_radix(16),
                not_after: Timestamp(p.cert.validity().not_after.to_datetime()),
            }));
    }
    for (key, json) in &jwt.bundles {
        let summary = bundle_entry(&mut bundles, key)?;
        // An empty document is an empty bundle, not an error.
        if json.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let set: JwkSet = serde_json::from_slice(json).map_err(|source| ApiError::JwtBundle {
            trust_domain: summary.trust_domain.clone(),
            source,
        })?;
        summary
            .jwt_authorities
            .extend(set.keys.into_iter().map(|k| JwtKeySummary {
                kid: k.kid,
                key_type: k.kty,
            }));
    }
    Ok(BundlesReport {
        bundles: bundles.into_values().collect(),
    })
}

fn bundle_entry<'m>(
    bundles: &'m mut BTreeMap<String, BundleSummary>,
    key: &str,
) -> Result<&'m mut BundleSummary, ApiError> {
    let name = trust_domain(key)?.to_string();
    Ok(bundles
        .entry(name.clone())
        .or_insert_with(|| BundleSummary {
            trust_domain: name,
            x509_authorities: Vec::new(),
            jwt_authorities: Vec::new(),
        }))
}

/// Parses concatenated DER certificates (the Workload API's encoding of
/// chains and bundles).
fn parse_certificates(
    mut der: &[u8],
    what: impl Fn() -> String,
) -> Result<Vec<Parsed<'_>>, ApiError> {
    let mut certs = Vec::new();
    while !der.is_empty() {
        let (rest, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|source| ApiError::Certificate {
                what: what(),
                source,
            })?;
        let used = der.len() - rest.len();
        let (this, _) = der.split_at(used);
        certs.push(Parsed { der: this, cert });
        der = rest;
    }
    Ok(certs)
}

fn dns_names(cert: &X509Certificate<'_>) -> Vec<String> {
    // A SAN extension that does not parse shows as no names: this is a
    // summary, and the leaf itself parsed.
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            _ => None,
        })
        .collect()
}

/// The agent keys bundles by trust domain SPIFFE ID (`spiffe://td`);
/// checked before it names a file.
fn trust_domain(key: &str) -> Result<TrustDomain, ApiError> {
    TrustDomain::new(key).map_err(|source| ApiError::TrustDomain {
        value: key.to_owned(),
        source,
    })
}

/// The token's `exp`, for display only. Reading it unverified is fine: the
/// token came from the agent over its socket, and nothing here trusts it;
/// `tether api validate jwt` is how a token is checked.
fn token_expiry(token: &str) -> Option<Timestamp> {
    let claims: Expiry = jsonwebtoken::dangerous::insecure_decode_claims(token).ok()?;
    let exp = claims.exp?;
    #[expect(
        clippy::cast_possible_truncation,
        reason = "a fractional exp is shown to the second; out-of-range values saturate and then fail from_unix"
    )]
    let seconds = exp.as_i64().or_else(|| exp.as_f64().map(|f| f as i64))?;
    Timestamp::from_unix(seconds)
}

/// Writes the files of `--write DIR`, returning their paths in order.
fn write_x509_files(
    dir: &Path,
    response: &mut pb::X509svidResponse,
) -> Result<Vec<PathBuf>, ApiError> {
    let write_error = |path: &Path| {
        let path = path.to_owned();
        move |source| ApiError::Write { path, source }
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(write_error(dir))?;
    let mut written = Vec::new();
    let mut write = |name: String, contents: &[u8], mode: u32| -> Result<(), ApiError> {
        let path = dir.join(name);
        write_atomically(&path, contents, mode).map_err(write_error(&path))?;
        written.push(path);
        Ok(())
    };
    for (i, svid) in response.svids.iter_mut().enumerate() {
        if svid.x509_svid_key.is_empty() {
            return Err(ApiError::IncompleteSvid {
                spiffe_id: svid.spiffe_id.clone(),
                missing: "a private key",
            });
        }
        write(
            format!("svid.{i}.pem"),
            certificates_pem(&svid.x509_svid).as_bytes(),
            0o644,
        )?;
        // The key moves into the PEM value and is wiped from there; the
        // base64 text is wiped as well.
        let key = Pem::new("PRIVATE KEY", std::mem::take(&mut svid.x509_svid_key));
        let key_pem = Zeroizing::new(pem::encode_config(&key, pem_config()));
        drop(Zeroizing::new(key.into_contents()));
        write(format!("svid.{i}.key"), key_pem.as_bytes(), 0o600)?;
        write(
            format!("bundle.{i}.pem"),
            certificates_pem(&svid.bundle).as_bytes(),
            0o644,
        )?;
    }
    let mut federated: Vec<(TrustDomain, &Vec<u8>)> = response
        .federated_bundles
        .iter()
        .map(|(key, der)| Ok((trust_domain(key)?, der)))
        .collect::<Result<_, ApiError>>()?;
    federated.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    for (trust_domain, der) in federated {
        // A validated trust domain name is [a-z0-9._-]+: safe as a file name.
        write(
            format!("federated_bundle.{}.pem", trust_domain.as_str()),
            certificates_pem(der).as_bytes(),
            0o644,
        )?;
    }
    Ok(written)
}

/// Concatenated DER certificates as PEM CERTIFICATE blocks, in order.
/// Only called on DER that `parse_certificates` accepted.
fn certificates_pem(der: &[u8]) -> String {
    let blocks: Vec<Pem> = match parse_certificates(der, String::new) {
        Ok(certs) => certs
            .iter()
            .map(|p| Pem::new("CERTIFICATE", p.der))
            .collect(),
        Err(_) => Vec::new(),
    };
    pem::encode_many_config(&blocks, pem_config())
}

fn pem_config() -> EncodeConfig {
    EncodeConfig::new().set_line_ending(LineEnding::LF)
}

/// Writes `contents` to `path` through a temporary file created with
/// `mode` in the same directory, then renamed over `path`: the file never
/// exists half-written, and a key is never readable by others, not even
/// between create and chmod.
pub(super) fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let open = || {
        // create_new: O_EXCL, so a planted symlink is never followed.
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
    };
    let mut file = match open() {
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
            // Left over from a run of ours that was killed midway.
            std::fs::remove_file(&tmp)?;
            open()?
        }
        other => other?,
    };
    let result = file
        .write_all(contents)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `--token T`, or the token on stdin for `--token -`.
fn read_token(arg: &str) -> Result<String, ApiError> {
    let token = if arg == "-" {
        let mut text = String::new();
        io::stdin()
            .lock()
            .take(MAX_STDIN_TOKEN_LEN)
            .read_to_string(&mut text)
            .map_err(|source| ApiError::Stdin { source })?;
        text.trim().to_owned()
    } else {
        arg.to_owned()
    };
    if token.is_empty() {
        return Err(ApiError::EmptyToken);
    }
    Ok(token)
}

/// A protobuf `Struct` (the claims of ValidateJWTSVID) as JSON.
pub(super) fn struct_to_json(s: &prost_types::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

/// Recursion is bounded: prost refuses messages nested deeper than 100.
fn value_to_json(v: &prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    use serde_json::Value;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::NumberValue(n)) => number_to_json(*n),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::ListValue(list)) => {
            Value::Array(list.values.iter().map(value_to_json).collect())
        }
        Some(Kind::StructValue(s)) => struct_to_json(s),
    }
}

/// Protobuf numbers are doubles; integral ones (`exp`, `iat`) are shown as
/// integers, as they were in the token. NaN and infinities have no JSON
/// form and become null.
fn number_to_json(n: f64) -> serde_json::Value {
    // Beyond 2^53 a double no longer holds every integer: keep it a float.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    #[expect(
        clippy::cast_possible_truncation,
        reason = "n is integral and within ±2^53, so the cast is exact"
    )]
    if n.fract() == 0.0 && n.abs() <= EXACT {
        return serde_json::Value::from(n as i64);
    }
    serde_json::Number::from_f64(n).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

fn stdout(source: io::Error) -> ApiError {
    ApiError::Stdout { source }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use prost_types::value::Kind;
    use serde_json::json;

    use super::*;

    fn value(kind: Kind) -> prost_types::Value {
        prost_types::Value { kind: Some(kind) }
    }

    #[test]
    fn claims_struct_to_json() {
        let nested = prost_types::Struct {
            fields: [("k".to_owned(), value(Kind::BoolValue(true)))].into(),
        };
        let claims = prost_types::Struct {
            fields: [
                (
                    "sub".to_owned(),
                    value(Kind::StringValue("spiffe://a/b".into())),
                ),
                ("exp".to_owned(), value(Kind::NumberValue(1_700_000_000.0))),
                ("ratio".to_owned(), value(Kind::NumberValue(0.5))),
                ("nan".to_owned(), value(Kind::NumberValue(f64::NAN))),
                ("huge".to_owned(), value(Kind::NumberValue(1e300))),
                ("none".to_owned(), value(Kind::NullValue(0))),
                ("unset".to_owned(), prost_types::Value { kind: None }),
                (
                    "aud".to_owned(),
                    value(Kind::ListValue(prost_types::ListValue {
                        values: vec![value(Kind::StringValue("x".into()))],
                    })),
                ),
                ("nested".to_owned(), value(Kind::StructValue(nested))),
            ]
            .into(),
        };
        assert_eq!(
            struct_to_json(&claims),
            json!({
                "sub": "spiffe://a/b",
                "exp": 1_700_000_000,
                "ratio": 0.5,
                "nan": null,
                "huge": 1e300,
                "none": null,
                "unset": null,
                "aud": ["x"],
                "nested": {"k": true},
            })
        );
    }

    fn test_certificate() -> (Vec<u8>, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["svc.example.org".to_owned()]).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        (cert.der().to_vec(), key.serialize_der())
    }

    fn svid_response(key: Vec<u8>, cert: &[u8]) -> pb::X509svidResponse {
        pb::X509svidResponse {
            svids: vec![pb::X509svid {
                spiffe_id: "spiffe://example.org/a".into(),
                x509_svid: cert.to_vec(),
                x509_svid_key: key,
                bundle: [cert, cert].concat(),
                hint: "a".into(),
            }],
            crl: Vec::new(),
            federated_bundles: [("spiffe://partner.example".to_owned(), cert.to_vec())].into(),
        }
    }

    #[test]
    fn write_creates_private_key_files_and_parsable_pem() {
        let (cert, key) = test_certificate();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("creds");
        let mut response = svid_response(key.clone(), &cert);
        let report = x509_report(&response).unwrap();
        assert_eq!(report.svids[0].dns_names, ["svc.example.org"]);
        assert_eq!(report.trust_domain_cas, 1, "the same CA twice counts once");
        assert_eq!(report.federated_bundles[0].trust_domain, "partner.example");

        let written = write_x509_files(&out, &mut response).unwrap();
        let names: Vec<_> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "svid.0.pem",
                "svid.0.key",
                "bundle.0.pem",
                "federated_bundle.partner.example.pem"
            ]
        );
        let mode = |name: &str| {
            std::fs::metadata(out.join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("svid.0.key"), 0o600);
        assert_eq!(
            std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let key_pem = pem::parse(std::fs::read(out.join("svid.0.key")).unwrap()).unwrap();
        assert_eq!(key_pem.tag(), "PRIVATE KEY");
        assert_eq!(key_pem.contents(), key);
        let bundle = pem::parse_many(std::fs::read(out.join("bundle.0.pem")).unwrap()).unwrap();
        assert_eq!(bundle.len(), 2);
        assert!(
            bundle
                .iter()
                .all(|p| p.tag() == "CERTIFICATE" && p.contents() == cert)
        );
        assert!(response.svids[0].x509_svid_key.is_empty(), "key moved out");

        // Again over the same files, with a stale temporary file in the
        // way: replaced, still 0600, nothing left over.
        std::fs::write(
            out.join(format!(".svid.0.key.tmp-{}", std::process::id())),
            "x",
        )
        .unwrap();
        let mut again = svid_response(key, &cert);
        write_x509_files(&out, &mut again).unwrap();
        assert_eq!(mode("svid.0.key"), 0o600);
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 4);
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        let (cert, key) = test_certificate();
        let mut truncated = svid_response(key.clone(), &cert);
        truncated.svids[0].x509_svid.truncate(cert.len() / 2);
        assert!(matches!(
            x509_report(&truncated),
            Err(ApiError::Certificate { .. })
        ));
        let mut trailing = svid_response(key.clone(), &cert);
        trailing.svids[0].bundle.push(0x30);
        assert!(matches!(
            x509_report(&trailing),
            Err(ApiError::Certificate { .. })
        ));
        let mut empty = svid_response(key.clone(), &cert);
        empty.svids[0].x509_svid.clear();
        assert!(matches!(
            x509_report(&empty),
            Err(ApiError::IncompleteSvid { .. })
        ));
        let mut traversal = svid_response(key.clone(), &cert);
        traversal.federated_bundles = [("../../etc/passwd".to_owned(), cert.clone())].into();
        assert!(matches!(
            x509_report(&traversal),
            Err(ApiError::TrustDomain { .. })
        ));
        let dir = tempfile::tempdir().unwrap();
        assert!(write_x509_files(dir.path(), &mut traversal).is_err());

        let jwt = pb::JwtBundlesResponse {
            bundles: [("spiffe://example.org".to_owned(), b"{not json".to_vec())].into(),
        };
        let x509 = pb::X509BundlesResponse::default();
        assert!(matches!(
            bundles_report(&x509, &jwt),
            Err(ApiError::JwtBundle { .. })
        ));
    }

    #[test]
    fn bundles_merge_by_trust_domain() {
        let (cert, _) = test_certificate();
        let x509 = pb::X509BundlesResponse {
            crl: Vec::new(),
            bundles: [("spiffe://example.org".to_owned(), cert)].into(),
        };
        let jwt = pb::JwtBundlesResponse {
            bundles: [
                (
                    "spiffe://example.org".to_owned(),
                    br#"{"keys":[{"kty":"EC","kid":"k1","crv":"P-256"}]}"#.to_vec(),
                ),
                (
                    "spiffe://partner.example".to_owned(),
                    b"{\"keys\":[]}".to_vec(),
                ),
            ]
            .into(),
        };
        let report = serde_json::to_value(bundles_report(&x509, &jwt).unwrap()).unwrap();
        assert_eq!(report["bundles"][0]["trust_domain"], "example.org");
        assert_eq!(
            report["bundles"][0]["jwt_authorities"][0],
            json!({"kid": "k1", "key_type": "EC"})
        );
        assert_eq!(
            report["bundles"][0]["x509_authorities"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        assert_eq!(report["bundles"][1]["trust_domain"], "partner.example");
    }

    #[test]
    fn token_expiry_is_read_for_display() {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let token = format!(
            "{}.{}.sig",
            b64(r#"{"alg":"ES256","typ":"JWT"}"#),
            b64(r#"{"sub":"spiffe://a/b","exp":1700000000}"#)
        );
        assert_eq!(token_expiry(&token), Timestamp::from_unix(1_700_000_000));
        assert_eq!(token_expiry("not a token"), None);
    }

    #[test]
    fn timeouts_must_be_positive_durations() {
        let parse = super::super::flags::parse_timeout;
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse("0s").is_err());
        assert!(parse("soon").is_err());
    }
}
