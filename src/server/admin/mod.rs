//! The server's admin socket: the `ServerAdmin` gRPC service operators
//! call (`tether server token|entry|node|bundle`).
//!
//! Owns the socket (bound 0600 in a 0700 directory, through
//! [`BoundSocket`], as the agent's admin socket), who may call
//! ([`authz`]: root and the server's own user,
//! decided from the kernel's peer credentials on every call), and
//! the RPCs ([`ServerAdminService`]): join tokens, entries, nodes and the
//! bundle.
//!
//! Invariants:
//! - Every change (a token created, an entry created or deleted, a node
//!   evicted) is recorded in the server's audit trail before it is made,
//!   and acknowledged only once the record is written; a change that
//!   cannot be recorded is refused.
//! - A join token leaves the server once, in the reply that creates it;
//!   the store keeps its hash and the audit trail names only its node and
//!   expiry.
//! - Requests are bounded: 1 MiB per message, 256 nodes per entry, and
//!   the connection limits of the agent's admin socket.
//! - Errors become a `Status` only through `crate::edge::status`.

mod service;

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;

use crate::admin_api::AdminAuthz;
use crate::proto::server::server_admin_server::ServerAdminServer;
use crate::transport::{self, BindError, BoundSocket};

/// Who may call: root and the server's own user, from the peer's
/// credentials on every call (the agent's admin interceptor).
pub fn authz() -> AdminAuthz {
    AdminAuthz::named(&[], "server admin API", "root and the server's user only")
}
pub use service::{MAX_ENTRY_NODES, ServerAdminService};

/// Most concurrent connections: operators, not workloads.
const MAX_CONNECTIONS: usize = 64;
/// How long a connection has to send the HTTP/2 preface.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may stay open with no call in flight, so idle
/// connections cannot hold the slots.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Largest request.
const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// Binds the server's admin socket at `path`: 0600, in a directory made
/// (or found) 0700 and trusted (see `trusted_fs`).
pub fn bind(path: &Path) -> Result<BoundSocket, BindError> {
    BoundSocket::bind(path, 0o700, 0o600)
}

/// Serves `service` on `socket`, to the callers `authz` allows, until
/// `shutdown` resolves; then waits for the calls in flight. Cancelling
/// `closing` closes the connections still open (the end of a drain).
/// The socket's file stays owned by `socket` (dropping it unlinks it).
pub async fn serve(
    service: ServerAdminService,
    authz: AdminAuthz,
    socket: &mut BoundSocket,
    shutdown: impl Future<Output = ()>,
    closing: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let Some(listener) = socket.take_listener() else {
        return Ok(());
    };
    let service = InterceptedService::new(
        ServerAdminServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES),
        authz,
    );
    Server::builder()
        .layer(transport::InFlightLayer)
        .add_service(service)
        .serve_with_incoming_shutdown(
            transport::incoming(
                listener,
                transport::ConnectionLimits {
                    max_connections: MAX_CONNECTIONS,
                    max_per_process: MAX_CONNECTIONS,
                    max_per_uid: MAX_CONNECTIONS,
                    max_per_unmatched_uid: MAX_CONNECTIONS,
                    handshake_timeout: HANDSHAKE_TIMEOUT,
                    idle_timeout: IDLE_TIMEOUT,
                },
                None,
                closing,
            ),
            shutdown,
        )
        .await
}

#[cfg(test)]
mod tests;
