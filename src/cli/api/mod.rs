//! `tether api`: talk to a running agent's Workload API the way a workload
//! does, like `spire-agent api`. Fetch X.509 and JWT SVIDs and bundles,
//! validate a JWT-SVID, watch X.509 rotation.
//!
//! Everything the agent sends is untrusted input: certificates are parsed
//! with `x509-parser`, PEM is written with `pem`, trust domain names are
//! checked with `spiffe` before they become file names, and no malformed
//! answer can panic the CLI. Reading the answers lives in [`report`], the
//! files of `--write` in [`files`], rendering in [`super::output`];
//! dialling and the status-to-exit-code mapping in
//! [`crate::client::workload`].

mod files;
mod report;

use std::io::{self, Read as _};
use std::os::fd::AsFd as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use spiffe::SpiffeIdError;
use thiserror::Error;
use time::OffsetDateTime;
use tokio::signal::unix::{SignalKind, signal};
use x509_parser::error::X509Error;
use zeroize::Zeroize as _;

use super::output::{
    self, FetchX509Output, Format, JwtReport, JwtSvidSummary, Timestamp, ValidationReport,
    WatchUpdate,
};
use super::{EXIT_NOPERM, EXIT_UNAVAILABLE, EXIT_USAGE, fail};
use crate::client::workload::{SocketError, WorkloadClient, WorkloadClientError, resolve_socket};
use crate::config::ProcessEnv;
use crate::proto::workload as pb;
pub(crate) use files::write_atomically;
use files::write_x509_files;
pub(crate) use report::struct_to_json;
use report::{bundles_report, token_expiry, x509_report};

/// Longest token read from stdin (`--token -`). Far above any real JWT; a
/// bound so that a wrong pipe cannot fill memory.
const MAX_STDIN_TOKEN_LEN: u64 = 1024 * 1024;

/// Arguments of `tether api`.
#[derive(Debug, Args)]
pub(crate) struct ApiArgs {
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
pub(crate) enum ApiError {
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
    #[error("the agent sent a malformed certificate ({what})")]
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
    #[error("the agent sent a bundle for {value:?}, which is not a trust domain")]
    TrustDomain {
        /// The key the agent sent.
        value: String,
        /// Why it is not a trust domain.
        #[source]
        source: SpiffeIdError,
    },
    /// The agent sent a JWT bundle that is not a JWK set.
    #[error("the agent sent a malformed JWT bundle for {trust_domain}")]
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
    #[error("reading the token from stdin")]
    Stdin {
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Writing a `--write` file failed.
    #[error("writing {}", path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Printing the result failed.
    #[error("writing to stdout")]
    Stdout {
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The async runtime or a signal handler could not be set up.
    #[error("setting up the runtime")]
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

// === impl ApiError ===

impl ApiError {
    /// The exit status for this failure (see `cli` for the table).
    pub(crate) fn exit_code(&self) -> u8 {
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
pub(crate) fn run(args: &ApiArgs) -> ExitCode {
    match execute(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.is_broken_pipe() => ExitCode::SUCCESS,
        Err(error) => fail(error.exit_code(), &error),
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

fn stdout(source: io::Error) -> ApiError {
    ApiError::Stdout { source }
}

#[cfg(test)]
mod tests;
