//! `tether token exchange|validate`: task tokens on the workload socket,
//! as the MCP server (or API) a token is addressed to uses them: exchange
//! one for the next hop, validate one presented to it.
//!
//! The agent does every check; the CLI reads the token (from stdin for
//! `--token -`, bounded) and the presenter's certificate, and reads a
//! token's `aud` unverified only to choose which of its own SVIDs to bind
//! to. Rendering lives in [`super::output`]; the client in
//! [`crate::client::task`].

use std::io::{self, Read as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde::Deserialize;
use thiserror::Error;

use super::api::struct_to_json;
use super::fail;
use super::flags::SocketArgs;
use super::output::{ExchangedToken, Format, TaskTokenValidation, Timestamp};
use crate::client::task::{SvidChoice, TaskClient, TaskClientError, own_leaf_certificate};
use crate::client::workload::WorkloadClientError;
use crate::config::ProcessEnv;
use crate::proto::task as pb;

/// Longest token read from stdin (`--token -`): far above any real token,
/// a bound so that a wrong pipe cannot fill memory.
const MAX_STDIN_TOKEN_LEN: u64 = 1024 * 1024;
/// Largest `--presenter-cert` file read.
const MAX_CERT_FILE_LEN: u64 = 1024 * 1024;

/// Arguments of `tether token`.
#[derive(Debug, Args)]
pub(crate) struct TokenArgs {
    #[command(flatten)]
    socket: SocketArgs,

    /// Print JSON on stdout (stable field names, listed in each command's
    /// --help).
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Exchange a task token addressed to this process for one addressed to
    /// the next audience (RFC 8693 style: same subject and task, this
    /// process added to the actor chain, tools only narrowed, never
    /// outliving the original). Prints the new token.
    ///
    /// --json prints {"token", "expires_at" (RFC 3339 or null)}.
    Exchange(ExchangeArgs),
    /// Validate a task token for an audience (and a tool). Exit 0 and print
    /// "valid", the SPIFFE ID, the task, the actor chain and the claims;
    /// exit 1 with "invalid: <reason>" on stderr otherwise.
    ///
    /// --json prints {"valid", "reason" (null when valid), "spiffe_id",
    /// "task_id", "actors": [newest first], "claims": {..}}, for an invalid
    /// token too.
    Validate(ValidateArgs),
}

/// Arguments of `tether token exchange`.
#[derive(Debug, Args)]
struct ExchangeArgs {
    /// The task token this process received; `-` reads it from stdin
    /// (surrounding whitespace trimmed), which keeps it out of the process
    /// list.
    #[arg(long, value_name = "TOKEN")]
    token: String,

    /// The next audience.
    #[arg(long, value_name = "AUDIENCE")]
    audience: String,

    /// A tool the new token keeps (repeat; a subset of the token's tools;
    /// none keeps them all).
    #[arg(long = "tool", value_name = "TOOL")]
    tools: Vec<String>,

    /// Bind the new token to this process's X.509-SVID (the one for the
    /// token's audience when it holds that, else its default).
    #[arg(long)]
    bind: bool,

    /// The certificate the token was presented with (PEM; the first
    /// CERTIFICATE block): needed to exchange a bound token, which must be
    /// bound to it.
    #[arg(long, value_name = "PEM_FILE")]
    presenter_cert: Option<PathBuf>,
}

/// Arguments of `tether token validate`.
#[derive(Debug, Args)]
struct ValidateArgs {
    /// The token; `-` reads it from stdin (surrounding whitespace trimmed).
    #[arg(long, value_name = "TOKEN")]
    token: String,

    /// The audience the token must be for.
    #[arg(long, value_name = "AUDIENCE")]
    audience: String,

    /// A tool the token must allow.
    #[arg(long, value_name = "TOOL")]
    tool: Option<String>,

    /// The presenter's certificate (PEM; the first CERTIFICATE block),
    /// checked against a bound token's cnf.
    #[arg(long, value_name = "PEM_FILE")]
    presenter_cert: Option<PathBuf>,
}

/// Why a `token` command failed.
#[derive(Debug, Error)]
pub(crate) enum TokenError {
    /// Reaching the agent failed, the agent refused, or this process holds
    /// no SVID to bind to.
    #[error(transparent)]
    Client(#[from] TaskClientError),
    /// The agent found the token not valid.
    #[error("invalid: {reason}")]
    Invalid {
        /// The agent's reason.
        reason: String,
    },
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
    /// Reading `--presenter-cert` failed.
    #[error("reading {}", .path.display())]
    ReadCertificate {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// `--presenter-cert` holds no PEM certificate.
    #[error("{}: {problem}", .path.display())]
    Certificate {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// Printing the result failed.
    #[error("writing to stdout")]
    Stdout {
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The async runtime could not be set up.
    #[error("setting up the runtime")]
    Runtime {
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// The one claim read from a token before exchanging it.
#[derive(Debug, Deserialize)]
struct Audience {
    aud: Option<serde_json::Value>,
}

// === impl TokenError ===

impl TokenError {
    /// The exit status for this failure (see `cli` for the table).
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            Self::Client(error) => error.exit_code(),
            _ => 1,
        }
    }

    /// The reader of our output went away (`| head -1`): not worth a
    /// complaint.
    fn is_broken_pipe(&self) -> bool {
        matches!(self, Self::Stdout { source } if source.kind() == io::ErrorKind::BrokenPipe)
    }
}

impl From<WorkloadClientError> for TokenError {
    fn from(error: WorkloadClientError) -> Self {
        Self::Client(TaskClientError::Client(error))
    }
}

/// Runs `tether token ...` on a current-thread runtime.
pub(crate) fn run(args: &TokenArgs) -> ExitCode {
    match execute(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.is_broken_pipe() => ExitCode::SUCCESS,
        Err(error) => fail(error.exit_code(), &error),
    }
}

fn execute(args: &TokenArgs) -> Result<(), TokenError> {
    let format = Format::from_json_flag(args.json);
    let socket = args
        .socket
        .socket(&ProcessEnv)
        .map_err(TaskClientError::from)?;
    let timeout = args.socket.timeout();
    // Blocking input is read before the runtime starts.
    let (token, presenter_cert) = match &args.command {
        TokenCommand::Exchange(exchange) => (&exchange.token, &exchange.presenter_cert),
        TokenCommand::Validate(validate) => (&validate.token, &validate.presenter_cert),
    };
    let token = read_token(token)?;
    let presenter = presenter_cert
        .as_deref()
        .map(read_certificate)
        .transpose()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| TokenError::Runtime { source })?;

    match &args.command {
        TokenCommand::Exchange(exchange) => {
            let issued = runtime.block_on(async {
                let bind_certificate = if exchange.bind {
                    let audience = audience_of(&token);
                    let which = audience
                        .as_deref()
                        .map_or(SvidChoice::Default, SvidChoice::Preferably);
                    own_leaf_certificate(&socket, timeout, which).await?
                } else {
                    Vec::new()
                };
                let mut client = TaskClient::connect(&socket, timeout).await?;
                let request = pb::ExchangeTokenRequest {
                    subject_token: token,
                    audience: exchange.audience.clone(),
                    tools: exchange.tools.clone(),
                    bind_certificate,
                    subject_presenter_certificate: presenter.unwrap_or_default(),
                };
                Ok::<_, TokenError>(client.exchange(request).await?)
            })?;
            format
                .print(&ExchangedToken {
                    token: issued.token,
                    expires_at: Timestamp::from_unix_ms(issued.expires_at_ms),
                })
                .map_err(stdout)
        }
        TokenCommand::Validate(validate) => {
            let request = pb::ValidateTaskTokenRequest {
                token,
                audience: validate.audience.clone(),
                tool: validate.tool.clone().unwrap_or_default(),
                presenter_certificate: presenter.unwrap_or_default(),
            };
            let response = runtime.block_on(async {
                let mut client = TaskClient::connect(&socket, timeout).await?;
                Ok::<_, TokenError>(client.validate(request).await?)
            })?;
            let report = validation_report(response);
            // Scripts get the document either way; people get an invalid
            // token's reason on stderr only, as one line.
            if report.valid || format == Format::Json {
                format.print(&report).map_err(stdout)?;
            }
            match report.reason {
                Some(reason) if !report.valid => Err(TokenError::Invalid { reason }),
                None if !report.valid => Err(TokenError::Invalid {
                    reason: "the agent gave no reason".to_owned(),
                }),
                _ => Ok(()),
            }
        }
    }
}

fn validation_report(response: pb::ValidateTaskTokenResponse) -> TaskTokenValidation {
    TaskTokenValidation {
        valid: response.valid,
        reason: (!response.valid).then_some(response.reason),
        spiffe_id: response.spiffe_id,
        task_id: response.task_id,
        actors: response.actors,
        claims: response.claims.as_ref().map_or_else(
            || serde_json::Value::Object(serde_json::Map::new()),
            struct_to_json,
        ),
    }
}

/// `--token T`, or the token on stdin for `--token -`.
fn read_token(arg: &str) -> Result<String, TokenError> {
    let token = if arg == "-" {
        let mut text = String::new();
        io::stdin()
            .lock()
            .take(MAX_STDIN_TOKEN_LEN)
            .read_to_string(&mut text)
            .map_err(|source| TokenError::Stdin { source })?;
        text.trim().to_owned()
    } else {
        arg.to_owned()
    };
    if token.is_empty() {
        return Err(TokenError::EmptyToken);
    }
    Ok(token)
}

/// The DER of the first CERTIFICATE block of a PEM file.
fn read_certificate(path: &Path) -> Result<Vec<u8>, TokenError> {
    let read_error = |source| TokenError::ReadCertificate {
        path: path.to_owned(),
        source,
    };
    let mut text = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_CERT_FILE_LEN).read_to_end(&mut text))
        .map_err(read_error)?;
    let problem = |problem: String| TokenError::Certificate {
        path: path.to_owned(),
        problem,
    };
    let blocks = pem::parse_many(&text).map_err(|e| problem(format!("not PEM: {e}")))?;
    blocks
        .into_iter()
        .find(|block| block.tag() == "CERTIFICATE")
        .map(pem::Pem::into_contents)
        .ok_or_else(|| problem("holds no PEM CERTIFICATE block".to_owned()))
}

/// The token's audience, read unverified: only to choose which SVID to
/// bind the exchanged token to. The agent checks the token itself.
fn audience_of(token: &str) -> Option<String> {
    let claims: Audience = jsonwebtoken::dangerous::insecure_decode_claims(token).ok()?;
    match claims.aud? {
        serde_json::Value::String(aud) => Some(aud),
        serde_json::Value::Array(auds) => auds.into_iter().find_map(|a| match a {
            serde_json::Value::String(aud) => Some(aud),
            _ => None,
        }),
        _ => None,
    }
}

fn stdout(source: io::Error) -> TokenError {
    TokenError::Stdout { source }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::*;

    fn token_with(claims: &str) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!(
            "{}.{}.sig",
            b64(r#"{"alg":"ES256","typ":"JWT"}"#),
            b64(claims)
        )
    }

    #[test]
    fn the_audience_is_read_for_choosing_an_svid_only() {
        assert_eq!(
            audience_of(&token_with(r#"{"aud":"spiffe://example.org/mcp"}"#)).as_deref(),
            Some("spiffe://example.org/mcp")
        );
        assert_eq!(
            audience_of(&token_with(r#"{"aud":["a","b"]}"#)).as_deref(),
            Some("a")
        );
        assert_eq!(audience_of(&token_with(r#"{"sub":"x"}"#)), None);
        assert_eq!(audience_of("not a token"), None);
    }

    #[test]
    fn presenter_certificates_are_pem_files() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("cert.pem");
        std::fs::write(&good, format!("{}{}", key.serialize_pem(), cert.pem())).unwrap();
        assert_eq!(read_certificate(&good).unwrap(), cert.der().to_vec());
        let keys_only = dir.path().join("key.pem");
        std::fs::write(&keys_only, key.serialize_pem()).unwrap();
        let err = read_certificate(&keys_only).unwrap_err();
        assert!(err.to_string().contains("no PEM CERTIFICATE"), "{err}");
        let missing = read_certificate(&dir.path().join("none.pem")).unwrap_err();
        assert!(matches!(missing, TokenError::ReadCertificate { .. }));
    }

    #[test]
    fn invalid_tokens_keep_every_json_field() {
        let report = validation_report(pb::ValidateTaskTokenResponse {
            valid: false,
            reason: "task tsk-1 ended: completed".into(),
            ..Default::default()
        });
        assert_eq!(
            serde_json::to_value(&report).unwrap(),
            serde_json::json!({
                "valid": false,
                "reason": "task tsk-1 ended: completed",
                "spiffe_id": "",
                "task_id": "",
                "actors": [],
                "claims": {},
            })
        );
        assert_eq!(
            TokenError::Invalid {
                reason: report.reason.unwrap()
            }
            .to_string(),
            "invalid: task tsk-1 ended: completed"
        );
    }
}
