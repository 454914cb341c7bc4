//! The CLI's client of the fleet server's admin socket: which socket to
//! dial (`--admin-socket`, then `$TETHER_SERVER_ADMIN_SOCKET`, then the
//! server's default for this user), the flags every `tether server`
//! command shares, and the mapping from what went wrong to an exit status.
//! Invariant: every wait is bounded by `--timeout`.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use thiserror::Error;
use tonic::Status;
use tonic::transport::Channel;

use crate::cli::flags::parse_timeout;
use crate::cli::output::Format;
use crate::client::channel::{
    self, CallError, DialError, MAX_MESSAGE_LEN, describe_status, root_cause, status_exit_code,
};
use crate::client::{EXIT_NOPERM, EXIT_UNAVAILABLE};
use crate::config::EnvSource;
use crate::proto::admin as admin_pb;
use crate::proto::server::{self as pb, server_admin_client::ServerAdminClient};
use crate::server::config::default_admin_socket_path;

/// The environment variable naming the server's admin socket, shared with
/// the server's configuration.
pub(crate) const TETHER_SERVER_ADMIN_SOCKET: &str = "TETHER_SERVER_ADMIN_SOCKET";

/// Flags every `tether server` operator command takes.
#[derive(Debug, Args)]
pub(crate) struct ServerAdminArgs {
    /// The server's admin socket (a path). Without it:
    /// $TETHER_SERVER_ADMIN_SOCKET, then the server's default for this
    /// user (/run/tether-admin/server.sock for root).
    #[arg(long, global = true, value_name = "PATH", value_parser = parse_socket_path)]
    admin_socket: Option<PathBuf>,

    /// Print JSON on stdout (stable field names, listed in each command's
    /// --help).
    #[arg(long, global = true)]
    json: bool,

    /// How long to wait for the connection and for each answer
    /// (humantime: 500ms, 5s, 1m).
    #[arg(
        long,
        global = true,
        value_name = "DURATION",
        default_value = "5s",
        value_parser = parse_timeout
    )]
    timeout: Duration,
}

/// Talking to the server's admin API failed.
#[derive(Debug, Error)]
pub(crate) enum ServerClientError {
    /// The socket could not be dialled.
    #[error(
        "cannot connect to the server's admin socket {}: {}; is `tether server run` running? (--admin-socket or ${TETHER_SERVER_ADMIN_SOCKET} names another socket)",
        .socket.display(),
        root_cause(.cause)
    )]
    Connect {
        /// The socket dialled.
        socket: PathBuf,
        /// Why. Its innermost cause is in the message (tonic's outer
        /// levels say nothing), so it is not the `source()` as well.
        cause: tonic::transport::Error,
    },
    /// The server did not answer within the timeout.
    #[error(
        "the server did not answer within {}; admin socket: {}",
        humantime::format_duration(*.after),
        .socket.display()
    )]
    Timeout {
        /// The socket dialled.
        socket: PathBuf,
        /// The timeout.
        after: Duration,
    },
    /// The server answered with an error status (its message names the
    /// field or the reason).
    #[error("{}", describe_status(.socket, .status))]
    Status {
        /// The socket dialled.
        socket: PathBuf,
        /// The answer; its message is in ours, so it is not the `source()`.
        status: Status,
    },
    /// The default socket's directory is someone else's or others may
    /// write it: what answers there may not be the server.
    #[error("refusing the default server admin socket")]
    Untrusted(#[from] crate::trusted_fs::TrustedFsError),
    /// The async runtime could not be set up.
    #[error("setting up the runtime")]
    Runtime {
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// A connected client of the server's admin API: every call bounded by
/// the timeout.
#[derive(Debug, Clone)]
pub(crate) struct ServerClient {
    client: ServerAdminClient<Channel>,
    socket: PathBuf,
    timeout: Duration,
}

// === impl ServerAdminArgs ===

impl ServerAdminArgs {
    /// `--json` or not.
    pub(crate) fn format(&self) -> Format {
        Format::from_json_flag(self.json)
    }

    /// Runs `job` with a connected client, on a current-thread runtime.
    pub(crate) fn block_on<T, E, F>(
        &self,
        env: &dyn EnvSource,
        job: impl FnOnce(ServerClient) -> F,
    ) -> Result<T, E>
    where
        F: Future<Output = Result<T, E>>,
        E: From<ServerClientError>,
    {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| ServerClientError::Runtime { source })?;
        let socket = resolve_socket(self.admin_socket.as_deref(), env)?;
        runtime.block_on(async {
            let client = ServerClient::connect(&socket, self.timeout).await?;
            job(client).await
        })
    }
}

// === impl ServerClientError ===

impl ServerClientError {
    /// The exit status for this failure (see `cli` for the table).
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            Self::Connect { .. } | Self::Timeout { .. } => EXIT_UNAVAILABLE,
            Self::Status { status, .. } => status_exit_code(status.code()),
            Self::Untrusted(_) => EXIT_NOPERM,
            Self::Runtime { .. } => 1,
        }
    }
}

// === impl ServerClient ===

impl ServerClient {
    /// Dials the server's admin socket, waiting at most `timeout`.
    pub(crate) async fn connect(
        socket: &Path,
        timeout: Duration,
    ) -> Result<Self, ServerClientError> {
        let channel = channel::dial(socket, timeout)
            .await
            .map_err(|error| match error {
                DialError::Connect(cause) => ServerClientError::Connect {
                    socket: socket.to_owned(),
                    cause,
                },
                DialError::Timeout => ServerClientError::Timeout {
                    socket: socket.to_owned(),
                    after: timeout,
                },
            })?;
        Ok(Self {
            client: ServerAdminClient::new(channel).max_decoding_message_size(MAX_MESSAGE_LEN),
            socket: socket.to_owned(),
            timeout,
        })
    }

    /// A join token admitting `node_name`; `ttl_ms` 0 is the default.
    pub(crate) async fn create_join_token(
        &mut self,
        node_name: String,
        ttl_ms: u64,
    ) -> Result<pb::CreateJoinTokenResponse, ServerClientError> {
        let call = self
            .client
            .create_join_token(pb::CreateJoinTokenRequest { node_name, ttl_ms });
        bounded(self.timeout, &self.socket, call).await
    }

    /// Creates an entry served on `nodes`.
    pub(crate) async fn create_entry(
        &mut self,
        spec: admin_pb::EntrySpec,
        nodes: Vec<String>,
    ) -> Result<pb::ServerEntry, ServerClientError> {
        let call = self.client.create_entry(pb::CreateServerEntryRequest {
            spec: Some(spec),
            nodes,
        });
        bounded(self.timeout, &self.socket, call).await
    }

    /// One entry.
    pub(crate) async fn get_entry(
        &mut self,
        id: String,
    ) -> Result<pb::ServerEntry, ServerClientError> {
        let call = self.client.get_entry(pb::GetServerEntryRequest { id });
        bounded(self.timeout, &self.socket, call).await
    }

    /// Every entry.
    pub(crate) async fn list_entries(&mut self) -> Result<Vec<pb::ServerEntry>, ServerClientError> {
        let call = self.client.list_entries(pb::ListServerEntriesRequest {});
        bounded(self.timeout, &self.socket, call)
            .await
            .map(|r| r.entries)
    }

    /// Deletes an entry.
    pub(crate) async fn delete_entry(&mut self, id: String) -> Result<(), ServerClientError> {
        let call = self
            .client
            .delete_entry(pb::DeleteServerEntryRequest { id });
        bounded(self.timeout, &self.socket, call).await.map(drop)
    }

    /// Every attested node.
    pub(crate) async fn list_nodes(&mut self) -> Result<Vec<pb::NodeInfo>, ServerClientError> {
        let call = self.client.list_nodes(pb::ListNodesRequest {});
        bounded(self.timeout, &self.socket, call)
            .await
            .map(|r| r.nodes)
    }

    /// Evicts a node.
    pub(crate) async fn evict_node(
        &mut self,
        name: String,
    ) -> Result<pb::NodeInfo, ServerClientError> {
        let call = self.client.evict_node(pb::EvictNodeRequest { name });
        bounded(self.timeout, &self.socket, call).await
    }

    /// The fleet's tasks, newest first.
    pub(crate) async fn list_tasks(
        &mut self,
        include_ended: bool,
        limit: u32,
    ) -> Result<Vec<pb::FleetTask>, ServerClientError> {
        let call = self.client.list_tasks(pb::ListFleetTasksRequest {
            include_ended,
            limit,
        });
        bounded(self.timeout, &self.socket, call)
            .await
            .map(|r| r.tasks)
    }

    /// One task of the fleet's index.
    pub(crate) async fn get_task(
        &mut self,
        id: String,
    ) -> Result<pb::FleetTask, ServerClientError> {
        let call = self.client.get_task(pb::GetFleetTaskRequest { id });
        bounded(self.timeout, &self.socket, call).await
    }

    /// Ends a task on every node.
    pub(crate) async fn revoke_task(
        &mut self,
        id: String,
    ) -> Result<pb::FleetTask, ServerClientError> {
        let call = self.client.revoke_task(pb::RevokeFleetTaskRequest { id });
        bounded(self.timeout, &self.socket, call).await
    }

    /// The trust domain's bundle.
    pub(crate) async fn get_bundle(&mut self) -> Result<admin_pb::Bundle, ServerClientError> {
        let call = self.client.get_bundle(admin_pb::GetBundleRequest {});
        bounded(self.timeout, &self.socket, call).await
    }
}

/// Runs a call under the timeout.
async fn bounded<T>(
    timeout: Duration,
    socket: &Path,
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, ServerClientError> {
    channel::bounded(timeout, call)
        .await
        .map_err(|error| match error {
            CallError::Status(status) => ServerClientError::Status {
                socket: socket.to_owned(),
                status,
            },
            CallError::Timeout => ServerClientError::Timeout {
                socket: socket.to_owned(),
                after: timeout,
            },
        })
}

/// The socket to dial: the flag, else `$TETHER_SERVER_ADMIN_SOCKET`, else
/// the server's default for this user, when its directory is trusted.
pub(crate) fn resolve_socket(
    flag: Option<&Path>,
    env: &dyn EnvSource,
) -> Result<PathBuf, ServerClientError> {
    if let Some(path) = flag {
        return Ok(path.to_owned());
    }
    match env.var(TETHER_SERVER_ADMIN_SOCKET) {
        Some(path) if !path.is_empty() => Ok(PathBuf::from(path)),
        _ => Ok(channel::trusted_default(
            default_admin_socket_path(env),
            env.euid(),
        )?),
    }
}

fn parse_socket_path(value: &str) -> Result<PathBuf, String> {
    if value.is_empty() {
        return Err("is empty".to_owned());
    }
    Ok(PathBuf::from(value))
}
