//! What the three MCP example processes share: the way to their local
//! tether (the workload socket, found as `tether api` finds it), their own
//! SPIFFE ID, the one question a resource server asks tether about a
//! presented token, and the RFC 6750 bearer conventions on the wire.
//!
//! Nothing here holds a credential longer than a call, and nothing decides
//! on its own: tether validates every token, the process only turns the
//! answer into HTTP.

// Each example uses a different part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::response::{IntoResponse as _, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use tether::client::task::TaskClient;
use tether::client::workload::{WorkloadClient, WorkloadClientError, resolve_socket};
use tether::config::ProcessEnv;
use tether::proto::task as pb;
use tonic::Code;
use zeroize::Zeroize as _;

/// How long any one call to tether may take.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Makes aws-lc-rs the process's rustls provider. Every example calls it
/// first: reqwest is built without a provider of its own (so that ring is
/// never compiled in), and refuses to build a client, even a plain HTTP one,
/// until one is installed.
pub fn install_crypto_provider() {
    // Err: one is installed already, which is as good.
    let _ = tokio_rustls::rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The workload socket: `--socket`, else `SPIFFE_ENDPOINT_SOCKET`, else
/// `TETHER_SOCKET_PATH`, else the agent's default for this user.
pub fn socket(flag: Option<&str>) -> Result<PathBuf> {
    Ok(resolve_socket(flag, &ProcessEnv)?)
}

/// Dials the Task API.
pub async fn tasks(socket: &Path) -> Result<TaskClient> {
    TaskClient::connect(socket, TIMEOUT)
        .await
        .context("reaching tether")
}

/// This process's SPIFFE ID, as tether attested it: the first X.509-SVID's.
/// The private key that comes with it is wiped at once.
pub async fn own_spiffe_id(socket: &Path) -> Result<String> {
    let mut client = WorkloadClient::connect(socket, TIMEOUT)
        .await
        .context("reaching tether")?;
    let mut stream = client
        .fetch_x509_svid()
        .await
        .context("asking tether who this process is")?;
    let mut response = client
        .first(&mut stream)
        .await
        .context("asking tether who this process is")?
        .context("tether sent no X.509-SVID")?;
    for svid in &mut response.svids {
        svid.x509_svid_key.zeroize();
    }
    response
        .svids
        .first()
        .map(|svid| svid.spiffe_id.clone())
        .context("tether knows no identity for this process")
}

/// This process's X.509-SVID and trust bundle, kept fresh by the `spiffe`
/// crate's X509Source over tether's Workload API: what `spiffe-rustls`
/// builds mTLS configurations from.
pub async fn x509_source(socket: &Path) -> Result<spiffe::X509Source> {
    spiffe::X509Source::builder()
        .endpoint(format!("unix:{}", socket.display()))
        .build()
        .await
        .context("fetching this process's X.509-SVID from tether")
}

/// The DER leaf certificate of the source's current X.509-SVID: what a
/// token is bound to (`cnf`).
pub fn leaf_certificate(source: &spiffe::X509Source) -> Result<Vec<u8>> {
    let svid = source.svid().context("no X.509-SVID")?;
    svid.cert_chain()
        .first()
        .map(|cert| cert.as_bytes().to_vec())
        .context("an X.509-SVID without a certificate")
}

/// The peer's DER leaf certificate on an mTLS connection, put in each
/// request's extensions by the TLS server loop.
#[derive(Debug, Clone)]
pub struct PeerCertificate(pub Vec<u8>);

/// A presented token that tether accepted. Its `Debug` leaves the token
/// out: it must never reach a log.
#[derive(Clone)]
pub struct Accepted {
    /// The token itself, kept only for an exchange within this request.
    pub token: String,
    /// `sub`: the workload the task belongs to.
    pub spiffe_id: String,
    /// The task.
    pub task_id: String,
    /// The actor chain, newest first.
    pub actors: Vec<String>,
    /// The certificate it was presented with (mTLS; empty otherwise): an
    /// exchange of a bound token must show it.
    pub presenter: Vec<u8>,
}

impl std::fmt::Debug for Accepted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accepted")
            .field("spiffe_id", &self.spiffe_id)
            .field("task_id", &self.task_id)
            .field("actors", &self.actors)
            .finish_non_exhaustive()
    }
}

/// Why a presented token was not accepted, as an HTTP resource server says
/// it (RFC 6750 section 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No bearer token: 401, a bare challenge.
    Missing,
    /// Not valid for this audience at all (expired, revoked, ended, for
    /// someone else, bound to another certificate): 401 `invalid_token`.
    InvalidToken(String),
    /// Valid, but not for this tool (outside the task's tools, or refused
    /// by policy): 403 `insufficient_scope`.
    InsufficientScope(String),
    /// tether could not be asked: 503.
    Unavailable(String),
}

/// Asks tether whether `token` may be used here (`audience`) for each of
/// `tools` (none: any use of this audience). One ValidateTaskToken per tool,
/// on every request: an ended task or a dead owner is refused at the next
/// call, never cached as good.
pub async fn check(
    tasks: &TaskClient,
    token: &str,
    audience: &str,
    tools: &[String],
    presenter_certificate: &[u8],
) -> Result<Accepted, Refusal> {
    let mut tasks = tasks.clone();
    let ask = |tool: &str| pb::ValidateTaskTokenRequest {
        token: token.to_owned(),
        audience: audience.to_owned(),
        tool: tool.to_owned(),
        presenter_certificate: presenter_certificate.to_vec(),
    };
    let mut accepted = None;
    for tool in tools
        .iter()
        .map(String::as_str)
        .chain(tools.is_empty().then_some(""))
    {
        let answer = match tasks.validate(ask(tool)).await {
            Ok(answer) => answer,
            // A policy refusing the tool (UseTool) answers PermissionDenied.
            Err(WorkloadClientError::Status { status, .. })
                if status.code() == Code::PermissionDenied && !tool.is_empty() =>
            {
                return Err(Refusal::InsufficientScope(status.message().to_owned()));
            }
            Err(e) => return Err(Refusal::Unavailable(e.to_string())),
        };
        if !answer.valid {
            if tool.is_empty() {
                return Err(Refusal::InvalidToken(answer.reason));
            }
            // Is it the token, or only this tool? Ask once more without it.
            return match tasks.validate(ask("")).await {
                Ok(plain) if plain.valid => Err(Refusal::InsufficientScope(answer.reason)),
                Ok(plain) => Err(Refusal::InvalidToken(plain.reason)),
                Err(e) => Err(Refusal::Unavailable(e.to_string())),
            };
        }
        accepted = Some(Accepted {
            token: token.to_owned(),
            spiffe_id: answer.spiffe_id,
            task_id: answer.task_id,
            actors: answer.actors,
            presenter: presenter_certificate.to_vec(),
        });
    }
    accepted.ok_or_else(|| Refusal::Unavailable("nothing was validated".into()))
}

/// The bearer token of a request (`Authorization: Bearer <token>`, the
/// scheme in any case), if there is exactly one well-formed one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next()?.to_str().ok()?;
    if values.next().is_some() {
        return None;
    }
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && !token.contains(' '))
        .then_some(token)
}

/// A future that resolves on SIGINT or SIGTERM (never, if they cannot be
/// watched). The handlers are installed when this is called, not when the
/// future is first polled: call it before telling anyone you are ready, or
/// a signal sent at once kills the process instead.
pub fn stop_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let signals = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    );
    async move {
        let (Ok(mut int), Ok(mut term)) = signals else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    }
}

// === impl Refusal ===

impl Refusal {
    /// The HTTP answer, logged on stderr as `who: refused: ...`: the status
    /// and, for 401 and 403, a `WWW-Authenticate` challenge with the reason.
    pub fn response(&self, who: &str) -> Response {
        eprintln!("{who}: refused: {}", self.describe());
        let challenge = |error: Option<(&str, &str)>| {
            let mut value = format!("Bearer realm=\"{}\"", quotable(who));
            if let Some((code, description)) = error {
                value.push_str(&format!(
                    ", error=\"{code}\", error_description=\"{}\"",
                    quotable(description)
                ));
            }
            HeaderValue::from_str(&value).ok()
        };
        let (status, challenge) = match self {
            Self::Missing => (StatusCode::UNAUTHORIZED, challenge(None)),
            Self::InvalidToken(reason) => (
                StatusCode::UNAUTHORIZED,
                challenge(Some(("invalid_token", reason))),
            ),
            Self::InsufficientScope(reason) => (
                StatusCode::FORBIDDEN,
                challenge(Some(("insufficient_scope", reason))),
            ),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, None),
        };
        let mut response = (status, self.describe()).into_response();
        if let Some(challenge) = challenge {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, challenge);
        }
        response
    }

    /// One line for logs and response bodies.
    pub fn describe(&self) -> String {
        match self {
            Self::Missing => "no bearer token".into(),
            Self::InvalidToken(reason) => format!("invalid token: {reason}"),
            Self::InsufficientScope(reason) => format!("insufficient scope: {reason}"),
            Self::Unavailable(reason) => format!("tether unavailable: {reason}"),
        }
    }
}

/// `s` as the inside of an RFC 6750 quoted string: printable ASCII without
/// `"` and `\` (a double quote becomes a single one; anything else `?`).
fn quotable(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '"' => '\'',
            ' ' | '!' | '#'..='[' | ']'..='~' => c,
            _ => '?',
        })
        .collect()
}
