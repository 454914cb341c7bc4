//! What every client of tether's sockets shares: a tonic `Channel` over a
//! Unix socket dialled under a timeout, calls bounded by the same timeout,
//! and the one reading of a gRPC status as an exit status and a message.
//!
//! Each client ([`super::workload`], [`super::task`], the CLI's admin
//! client) keeps its own error type, because what to suggest when the
//! agent cannot be reached differs; this module only reports what happened.

use std::path::Path;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Status};

use super::{EXIT_NOPERM, EXIT_UNAVAILABLE};
use crate::trusted_fs::{self, TrustedFsError};

/// Largest message accepted from the agent. tonic's default, stated here
/// because the agent is untrusted input: a bigger message fails the call
/// instead of growing memory.
pub const MAX_MESSAGE_LEN: usize = 4 * 1024 * 1024;
/// tonic needs an HTTP URI to build requests; the connector ignores it and
/// dials the socket.
const PLACEHOLDER_URI: &str = "http://[::]:50051";

/// The agent's default socket for this user, refused when its directory
/// exists and is not trusted ([`trusted_fs::check_dir`] for `uid`): in a
/// directory someone else owns or may write, the socket could be theirs,
/// taking the tokens sent to it and answering what they like. A missing
/// directory is fine: there is no agent to talk to, and dialling says so.
pub fn trusted_default(
    socket: std::path::PathBuf,
    uid: u32,
) -> Result<std::path::PathBuf, TrustedFsError> {
    let Some(dir) = socket.parent() else {
        return Ok(socket);
    };
    match trusted_fs::check_dir(dir, uid) {
        Err(TrustedFsError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(socket)
        }
        Err(error) => Err(error),
        Ok(()) => Ok(socket),
    }
}

/// Dialling a socket failed.
#[derive(Debug)]
pub enum DialError {
    /// The connection was refused, or the socket is missing or forbidden.
    Connect(tonic::transport::Error),
    /// No connection within the timeout.
    Timeout,
}

/// A call, or the opening of a stream, failed.
#[derive(Debug)]
pub enum CallError {
    /// The agent (or the transport on its behalf) answered with a status.
    Status(Status),
    /// No answer within the timeout.
    Timeout,
}

/// Dials `socket`, waiting at most `timeout` for the connection.
pub async fn dial(socket: &Path, timeout: Duration) -> Result<Channel, DialError> {
    let endpoint = Endpoint::from_static(PLACEHOLDER_URI);
    let path = socket.to_owned();
    let connector = tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move { UnixStream::connect(path).await.map(TokioIo::new) }
    });
    match tokio::time::timeout(timeout, endpoint.connect_with_connector(connector)).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(source)) => Err(DialError::Connect(source)),
        Err(_elapsed) => Err(DialError::Timeout),
    }
}

/// Runs a unary call, or the opening of a stream, under `timeout`.
pub async fn bounded<T>(
    timeout: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, CallError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(CallError::Status(status)),
        Err(_elapsed) => Err(CallError::Timeout),
    }
}

/// The exit status for a status the agent answered with (see [`super`] for
/// the table).
pub fn status_exit_code(code: Code) -> u8 {
    match code {
        Code::PermissionDenied | Code::Unauthenticated => EXIT_NOPERM,
        Code::Unavailable | Code::DeadlineExceeded => EXIT_UNAVAILABLE,
        // InvalidArgument, NotFound, AlreadyExists, FailedPrecondition,
        // Aborted: the request's fault, and the message says which field.
        _ => 1,
    }
}

/// One line for a status: the agent's own message, with the socket and a
/// hint added when the agent could not be reached.
pub fn describe_status(socket: &Path, status: &Status) -> String {
    let message = if status.message().is_empty() {
        status.code().description()
    } else {
        status.message()
    };
    // A status built from a transport failure carries its cause; one the
    // agent sent does not, and its message already says what is wrong.
    let from_transport = std::error::Error::source(status).is_some() || status.message().is_empty();
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded if from_transport => format!(
            "the agent is unavailable: {message}; is `tether run` running? socket: {}",
            socket.display()
        ),
        Code::Unavailable | Code::DeadlineExceeded => {
            format!(
                "the agent is unavailable: {message} (socket: {})",
                socket.display()
            )
        }
        _ => message.to_owned(),
    }
}

/// The innermost cause of a transport error: "No such file or directory
/// (os error 2)" says more than tonic's "transport error".
pub fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

/// The I/O error at the bottom of a transport error, if there is one (to
/// tell "forbidden" from "not there").
pub fn io_cause<'e>(error: &'e (dyn std::error::Error + 'static)) -> Option<&'e std::io::Error> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        current = error.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_exit_statuses() {
        let cases = [
            (Code::PermissionDenied, EXIT_NOPERM),
            (Code::Unauthenticated, EXIT_NOPERM),
            (Code::Unavailable, EXIT_UNAVAILABLE),
            (Code::DeadlineExceeded, EXIT_UNAVAILABLE),
            (Code::InvalidArgument, 1),
            (Code::AlreadyExists, 1),
            (Code::NotFound, 1),
            (Code::FailedPrecondition, 1),
            (Code::Aborted, 1),
            (Code::Internal, 1),
        ];
        for (code, want) in cases {
            assert_eq!(status_exit_code(code), want, "{code:?}");
        }
    }

    #[tokio::test]
    async fn dialling_a_missing_socket_names_the_os_error() {
        let dir = tempfile::tempdir().unwrap();
        let Err(DialError::Connect(error)) =
            dial(&dir.path().join("none.sock"), Duration::from_secs(60)).await
        else {
            panic!("dialling nothing must fail to connect");
        };
        assert!(root_cause(&error).contains("No such file"), "{error}");
        let io = io_cause(&error).expect("an I/O cause");
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
    }
}
