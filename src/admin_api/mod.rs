//! The admin API: operators' gRPC service on its own Unix socket.
//!
//! Entries at runtime, what was issued to whom, the trust bundle, health
//! and reload. Only root and the uids in `admin_uids` get in: [`authz`]
//! checks the peer credentials of every call, whatever the socket's file
//! mode says. The workload socket never serves this service, so a workload
//! cannot reach an admin method even by name.
//!
//! The socket keeps its own connection limits, not `[limits]`: 64
//! connections in all, a preface within 10 s, closed after 5 minutes with
//! no call in flight. Registration entries play no part in who may
//! connect, so there is no smaller budget for uids they do not name.

pub mod authz;
pub mod convert;
pub mod service;

use std::future::Future;
use std::path::PathBuf;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;

use crate::proto::admin::admin_server::AdminServer;
use crate::transport::{self, BoundSocket};
pub use authz::AdminAuthz;
pub use service::{AdminApi, ReloadOutcome, ReloadRequest, ServerStatus};

/// Most concurrent admin connections: operators, not workloads.
const MAX_CONNECTIONS: usize = 64;
/// How long an operator's connection has to send the HTTP/2 preface.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long an operator's connection may stay open with no call in flight
/// (as the workload socket's default `limits.idle_connection_timeout`), so
/// idle connections cannot hold the 64 slots.
const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5 * 60);
/// Largest admin request.
const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// Admin socket settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminApiConfig {
    /// The admin socket.
    pub socket_path: PathBuf,
    /// Uids besides root that may call the admin API.
    pub uids: Vec<u32>,
    /// A group whose members may connect (socket mode 0660, group owner);
    /// without it the socket is 0600. The uid check applies either way.
    pub gid: Option<u32>,
}

/// Binds the admin socket: 0600 in a 0700 directory, or 0660 owned by the
/// configured group in a 0755 one (its members must reach it).
pub fn bind(config: &AdminApiConfig) -> Result<BoundSocket, transport::BindError> {
    let (dir_mode, mode) = if config.gid.is_some() {
        (0o755, 0o660)
    } else {
        (0o700, 0o600)
    };
    let socket = BoundSocket::bind(&config.socket_path, dir_mode, mode)?;
    if let Some(gid) = config.gid {
        // The socket itself, never what a symlink in its place leads to.
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            &config.socket_path,
            None,
            Some(nix::unistd::Gid::from_raw(gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|errno| transport::BindError::Io {
            path: config.socket_path.clone(),
            source: errno.into(),
        })?;
    }
    Ok(socket)
}

/// Serves `api` on `socket` until `shutdown` resolves.
pub async fn serve(
    api: AdminApi,
    authz: AdminAuthz,
    socket: &mut BoundSocket,
    shutdown: impl Future<Output = ()>,
    closing: tokio_util::sync::CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let Some(listener) = socket.take_listener() else {
        return Ok(());
    };
    let service = InterceptedService::new(
        AdminServer::new(api).max_decoding_message_size(MAX_REQUEST_BYTES),
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
