//! The Workload API client: which socket to dial, a tonic `Channel`
//! over it, the `workload.spiffe.io: true` header on every call, and the
//! one mapping from what went wrong to an exit status.
//!
//! Invariant: every network wait is bounded by the caller's timeout except
//! a stream after its first message (`tether api watch` waits for updates
//! as long as the agent keeps the stream open).

use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use tonic::codec::Streaming;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

use super::EXIT_UNAVAILABLE;
use super::channel::{
    self, CallError, DialError, MAX_MESSAGE_LEN, describe_status, root_cause, status_exit_code,
};
use crate::config::{EnvSource, default_socket_path};
use crate::proto::workload::{self as pb, spiffe_workload_api_client::SpiffeWorkloadApiClient};

/// The environment variable SPIFFE clients read the Workload API address
/// from (a URI).
pub const SPIFFE_ENDPOINT_SOCKET: &str = "SPIFFE_ENDPOINT_SOCKET";
/// tether's own socket override (a path), shared with `tether run`.
pub const TETHER_SOCKET_PATH: &str = "TETHER_SOCKET_PATH";

/// The security header the Workload API requires on every call.
const SECURITY_HEADER: &str = "workload.spiffe.io";

/// Where the socket address came from, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketOrigin {
    /// The `--socket` flag.
    Flag,
    /// `SPIFFE_ENDPOINT_SOCKET`.
    SpiffeEndpointSocket,
}

/// A socket address that cannot be used.
#[derive(Debug, Error)]
pub enum SocketError {
    /// A URI with a scheme other than `unix` (the agent serves only a Unix
    /// socket).
    #[error("{origin} {value:?}: only unix sockets are supported")]
    NotUnix {
        /// Flag or variable.
        origin: SocketOrigin,
        /// What was given.
        value: String,
    },
    /// A value that is not a usable `unix:` URI.
    #[error("{origin} {value:?}: {problem}")]
    Invalid {
        /// Flag or variable.
        origin: SocketOrigin,
        /// What was given.
        value: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The default socket's directory is someone else's or others may
    /// write it: what answers there may not be the agent.
    #[error("refusing the default socket")]
    Untrusted(#[from] crate::trusted_fs::TrustedFsError),
}

/// Talking to the agent failed.
#[derive(Debug, Error)]
pub enum WorkloadClientError {
    /// The socket could not be dialled.
    #[error(
        "cannot connect to the agent: {}; is `tether run` running? socket: {}",
        root_cause(.cause),
        .socket.display()
    )]
    Connect {
        /// The socket dialled.
        socket: PathBuf,
        /// Why. Its innermost cause is in the message (tonic's outer
        /// levels, "transport error", say nothing), so it is not the
        /// `source()` as well.
        cause: tonic::transport::Error,
    },
    /// The agent did not answer within the timeout.
    #[error(
        "the agent did not answer within {}; is `tether run` running? socket: {}",
        humantime::format_duration(*.after),
        .socket.display()
    )]
    Timeout {
        /// The socket dialled.
        socket: PathBuf,
        /// The timeout.
        after: Duration,
    },
    /// The agent answered with an error status.
    #[error("{}", describe_status(.socket, .status))]
    Status {
        /// The socket dialled.
        socket: PathBuf,
        /// The agent's answer. Its message is in ours, so it is not the
        /// `source()` as well (a `Status` prints as a debug dump).
        status: Status,
    },
}

/// Adds the Workload API security header to every request.
#[derive(Debug, Clone, Copy, Default)]
pub struct SecurityHeader;

/// A connected Workload API client.
#[derive(Debug, Clone)]
pub struct WorkloadClient {
    client: SpiffeWorkloadApiClient<InterceptedService<Channel, SecurityHeader>>,
    socket: PathBuf,
    timeout: Duration,
}

// === impl SocketOrigin ===

impl std::fmt::Display for SocketOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Flag => "--socket",
            Self::SpiffeEndpointSocket => SPIFFE_ENDPOINT_SOCKET,
        })
    }
}

// === impl SocketError ===

impl SocketError {
    fn invalid(origin: SocketOrigin, value: &str, problem: &'static str) -> Self {
        Self::Invalid {
            origin,
            value: value.to_owned(),
            problem,
        }
    }
}

// === impl WorkloadClientError ===

impl WorkloadClientError {
    /// The exit status for this failure (see [`crate::client`] for the table).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Connect { .. } | Self::Timeout { .. } => EXIT_UNAVAILABLE,
            // InvalidArgument is the request's fault (a bad token, a SPIFFE
            // ID the caller does not hold): an ordinary failure.
            Self::Status { status, .. } => status_exit_code(status.code()),
        }
    }
}

// === impl SecurityHeader ===

impl Interceptor for SecurityHeader {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert(SECURITY_HEADER, MetadataValue::from_static("true"));
        Ok(request)
    }
}

/// Dials the workload socket (both its APIs share it), the failure as a
/// client error naming the socket.
pub(super) async fn dial(socket: &Path, timeout: Duration) -> Result<Channel, WorkloadClientError> {
    channel::dial(socket, timeout)
        .await
        .map_err(|error| match error {
            DialError::Connect(cause) => WorkloadClientError::Connect {
                socket: socket.to_owned(),
                cause,
            },
            DialError::Timeout => timed_out(timeout, socket),
        })
}

// === impl WorkloadClient ===

impl WorkloadClient {
    /// Dials `socket`, waiting at most `timeout`.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Self, WorkloadClientError> {
        let channel = dial(socket, timeout).await?;
        let client = SpiffeWorkloadApiClient::with_interceptor(channel, SecurityHeader)
            .max_decoding_message_size(MAX_MESSAGE_LEN);
        Ok(Self {
            client,
            socket: socket.to_owned(),
            timeout,
        })
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Opens the X.509-SVID stream.
    pub async fn fetch_x509_svid(
        &mut self,
    ) -> Result<Streaming<pb::X509svidResponse>, WorkloadClientError> {
        let call = self.client.fetch_x509svid(pb::X509svidRequest {});
        bounded(self.timeout, &self.socket, call).await
    }

    /// Opens the X.509 bundles stream.
    pub async fn fetch_x509_bundles(
        &mut self,
    ) -> Result<Streaming<pb::X509BundlesResponse>, WorkloadClientError> {
        let call = self.client.fetch_x509_bundles(pb::X509BundlesRequest {});
        bounded(self.timeout, &self.socket, call).await
    }

    /// Opens the JWT bundles stream.
    pub async fn fetch_jwt_bundles(
        &mut self,
    ) -> Result<Streaming<pb::JwtBundlesResponse>, WorkloadClientError> {
        let call = self.client.fetch_jwt_bundles(pb::JwtBundlesRequest {});
        bounded(self.timeout, &self.socket, call).await
    }

    /// Fetches JWT-SVIDs.
    pub async fn fetch_jwt_svid(
        &mut self,
        request: pb::JwtsvidRequest,
    ) -> Result<pb::JwtsvidResponse, WorkloadClientError> {
        let call = self.client.fetch_jwtsvid(request);
        bounded(self.timeout, &self.socket, call).await
    }

    /// Asks the agent to validate a JWT-SVID.
    pub async fn validate_jwt_svid(
        &mut self,
        request: pb::ValidateJwtsvidRequest,
    ) -> Result<pb::ValidateJwtsvidResponse, WorkloadClientError> {
        let call = self.client.validate_jwtsvid(request);
        bounded(self.timeout, &self.socket, call).await
    }

    /// The first message of a stream, under the timeout. `Ok(None)`: the
    /// agent ended the stream without sending one.
    pub async fn first<T>(
        &self,
        stream: &mut Streaming<T>,
    ) -> Result<Option<T>, WorkloadClientError> {
        match tokio::time::timeout(self.timeout, stream.message()).await {
            Ok(result) => result.map_err(|status| status_error(&self.socket, status)),
            Err(_elapsed) => Err(timed_out(self.timeout, &self.socket)),
        }
    }

    /// The next message of a stream, however long it takes.
    pub async fn next<T>(
        &self,
        stream: &mut Streaming<T>,
    ) -> Result<Option<T>, WorkloadClientError> {
        stream
            .message()
            .await
            .map_err(|status| status_error(&self.socket, status))
    }
}

/// Runs a unary call, or the opening of a stream, under the timeout (both
/// clients of the workload socket).
pub(super) async fn bounded<T>(
    timeout: Duration,
    socket: &Path,
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, WorkloadClientError> {
    channel::bounded(timeout, call)
        .await
        .map_err(|error| match error {
            CallError::Status(status) => status_error(socket, status),
            CallError::Timeout => timed_out(timeout, socket),
        })
}

pub(super) fn status_error(socket: &Path, status: Status) -> WorkloadClientError {
    WorkloadClientError::Status {
        socket: socket.to_owned(),
        status,
    }
}

pub(super) fn timed_out(after: Duration, socket: &Path) -> WorkloadClientError {
    WorkloadClientError::Timeout {
        socket: socket.to_owned(),
        after,
    }
}

/// The socket to dial: `--socket` (a path or a `unix:` URI), else
/// `SPIFFE_ENDPOINT_SOCKET` (a `unix:` URI), else `TETHER_SOCKET_PATH`,
/// else the agent's default for this user, when its directory is trusted.
pub fn resolve_socket(flag: Option<&str>, env: &dyn EnvSource) -> Result<PathBuf, SocketError> {
    if let Some(value) = flag {
        return parse_flag(value);
    }
    if let Some(value) = env.var(SPIFFE_ENDPOINT_SOCKET) {
        return parse_unix_uri(SocketOrigin::SpiffeEndpointSocket, &value);
    }
    if let Some(path) = env.var(TETHER_SOCKET_PATH) {
        return Ok(PathBuf::from(path));
    }
    Ok(channel::trusted_default(
        default_socket_path(env),
        env.euid(),
    )?)
}

/// `--socket` takes a plain path (relative paths are the user's own
/// business) or a URI.
fn parse_flag(value: &str) -> Result<PathBuf, SocketError> {
    match scheme(value) {
        Some(scheme) if scheme.eq_ignore_ascii_case("unix") => {
            parse_unix_uri(SocketOrigin::Flag, value)
        }
        // `tcp://...`, `http://...`: clearly a URI, and not one we serve.
        Some(_) if value.contains("://") => Err(SocketError::NotUnix {
            origin: SocketOrigin::Flag,
            value: value.to_owned(),
        }),
        _ if value.is_empty() => Err(SocketError::invalid(SocketOrigin::Flag, value, "is empty")),
        _ => Ok(PathBuf::from(value)),
    }
}

/// Parses `unix:///abs/path` or `unix:/abs/path`, the forms the SPIFFE
/// Workload Endpoint spec allows, as strictly as go-spiffe does: a value
/// other SPIFFE clients would reject is rejected here too.
fn parse_unix_uri(origin: SocketOrigin, value: &str) -> Result<PathBuf, SocketError> {
    let Some(scheme) = scheme(value) else {
        return Err(SocketError::invalid(
            origin,
            value,
            "must be a URI such as unix:///run/tether/agent.sock",
        ));
    };
    if !scheme.eq_ignore_ascii_case("unix") {
        return Err(SocketError::NotUnix {
            origin,
            value: value.to_owned(),
        });
    }
    let rest = &value[scheme.len() + 1..];
    let path = match rest.strip_prefix("//") {
        Some(after_authority) => {
            if !after_authority.is_empty() && !after_authority.starts_with('/') {
                return Err(SocketError::invalid(
                    origin,
                    value,
                    "must not name a host: write unix:///absolute/path",
                ));
            }
            after_authority
        }
        None => rest,
    };
    if !path.starts_with('/') {
        return Err(SocketError::invalid(
            origin,
            value,
            "must name an absolute path: unix:///absolute/path",
        ));
    }
    if path.contains(['?', '#']) {
        return Err(SocketError::invalid(
            origin,
            value,
            "must not have a query or fragment",
        ));
    }
    // Decoding would be the only reason to accept `%`; no real socket path
    // needs it, and a half-right decoder is worse than a clear refusal.
    if path.contains('%') {
        return Err(SocketError::invalid(
            origin,
            value,
            "percent-encoded paths are not supported",
        ));
    }
    if path.len() == 1 {
        return Err(SocketError::invalid(
            origin,
            value,
            "must name a socket, not /",
        ));
    }
    Ok(PathBuf::from(path))
}

/// The URI scheme of `value` (RFC 3986: a letter, then letters, digits,
/// `+`, `-`, `.`, before the first `:`), if it has one.
fn scheme(value: &str) -> Option<&str> {
    let (scheme, _) = value.split_once(':')?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
    .then_some(scheme)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::EXIT_NOPERM;
    use crate::config::MapEnv;

    fn env(vars: &[(&str, &str)], euid: u32) -> MapEnv {
        MapEnv {
            vars: vars
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            euid,
        }
    }

    #[test]
    fn socket_flag_and_uri_forms() {
        let ok = [
            ("/run/tether/agent.sock", "/run/tether/agent.sock"),
            ("relative/agent.sock", "relative/agent.sock"),
            ("unix:///run/tether/agent.sock", "/run/tether/agent.sock"),
            ("unix:/run/tether/agent.sock", "/run/tether/agent.sock"),
            ("UNIX:///tmp/a.sock", "/tmp/a.sock"),
            // Not a URI: a file name that happens to contain a colon.
            ("odd:name.sock", "odd:name.sock"),
        ];
        for (value, want) in ok {
            assert_eq!(
                resolve_socket(Some(value), &env(&[], 1000)).unwrap(),
                PathBuf::from(want),
                "{value}"
            );
        }
        let bad = [
            ("tcp://127.0.0.1:8081", "only unix sockets are supported"),
            ("http://localhost/x", "only unix sockets are supported"),
            ("unix://host/run/agent.sock", "must not name a host"),
            ("unix:relative.sock", "absolute path"),
            ("unix://", "absolute path"),
            ("unix:///", "not /"),
            ("unix:///tmp/a.sock?x=1", "query"),
            ("unix:///tmp/a.sock#frag", "fragment"),
            ("unix:///tmp/a%20b.sock", "percent"),
            ("", "empty"),
        ];
        for (value, want) in bad {
            let err = resolve_socket(Some(value), &env(&[], 1000)).unwrap_err();
            assert!(err.to_string().contains(want), "{value} => {err}");
            assert!(err.to_string().starts_with("--socket"), "{err}");
        }
    }

    #[test]
    fn socket_precedence_flag_then_spiffe_env_then_tether_env_then_default() {
        let both = env(
            &[
                (SPIFFE_ENDPOINT_SOCKET, "unix:///spiffe.sock"),
                (TETHER_SOCKET_PATH, "/tether.sock"),
            ],
            1000,
        );
        assert_eq!(
            resolve_socket(Some("/flag.sock"), &both).unwrap(),
            PathBuf::from("/flag.sock")
        );
        assert_eq!(
            resolve_socket(None, &both).unwrap(),
            PathBuf::from("/spiffe.sock")
        );
        let tether = env(&[(TETHER_SOCKET_PATH, "/tether.sock")], 1000);
        assert_eq!(
            resolve_socket(None, &tether).unwrap(),
            PathBuf::from("/tether.sock")
        );
        assert_eq!(
            resolve_socket(None, &env(&[], 0)).unwrap(),
            PathBuf::from("/run/tether/agent.sock")
        );
        assert_eq!(
            resolve_socket(None, &env(&[], 1000)).unwrap(),
            PathBuf::from("/tmp/tether-1000/agent.sock")
        );
    }

    #[test]
    fn spiffe_endpoint_socket_must_be_a_unix_uri() {
        let cases = [
            ("tcp://127.0.0.1:8081", "only unix sockets are supported"),
            ("/run/agent.sock", "must be a URI"),
            ("unix:agent.sock", "absolute path"),
        ];
        for (value, want) in cases {
            let err =
                resolve_socket(None, &env(&[(SPIFFE_ENDPOINT_SOCKET, value)], 0)).unwrap_err();
            let shown = err.to_string();
            assert!(shown.starts_with(SPIFFE_ENDPOINT_SOCKET), "{shown}");
            assert!(shown.contains(want), "{value} => {shown}");
        }
    }

    #[test]
    fn status_codes_map_to_exit_statuses() {
        let cases = [
            (Status::permission_denied("no identity issued"), EXIT_NOPERM),
            (Status::unauthenticated("who"), EXIT_NOPERM),
            (Status::unavailable("down"), EXIT_UNAVAILABLE),
            (Status::deadline_exceeded("slow"), EXIT_UNAVAILABLE),
            (Status::invalid_argument("bad token"), 1),
            (Status::internal("oops"), 1),
        ];
        for (status, want) in cases {
            let code = status.code();
            let err = WorkloadClientError::Status {
                socket: "/s.sock".into(),
                status,
            };
            assert_eq!(err.exit_code(), want, "{code:?}");
        }
        let down = WorkloadClientError::Status {
            socket: "/s.sock".into(),
            status: Status::unavailable("tether is shutting down"),
        };
        assert!(down.to_string().contains("socket: /s.sock"), "{down}");
        let denied = WorkloadClientError::Status {
            socket: "/s.sock".into(),
            status: Status::permission_denied("no identity issued: nothing matches"),
        };
        assert_eq!(denied.to_string(), "no identity issued: nothing matches");
    }
}
