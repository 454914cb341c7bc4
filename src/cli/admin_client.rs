//! The CLI's admin API client: which admin socket to dial, the flags every
//! operator command shares, a tonic `Channel` over the socket, and the
//! mapping from what went wrong to an exit status.
//!
//! The agent decides who may call (root, the agent's user and `admin_uids`, from the peer
//! credentials); this client never guesses. It only adds, when the socket
//! itself refused the connection, the hint that the admin socket is not for
//! everyone. Invariant: every wait is bounded by `--timeout`.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use thiserror::Error;
use tonic::Status;
use tonic::transport::Channel;

use super::flags::parse_timeout;
use super::output::Format;
use crate::client::channel::{
    self, CallError, DialError, MAX_MESSAGE_LEN, describe_status, io_cause, root_cause,
    status_exit_code,
};
use crate::client::{EXIT_NOPERM, EXIT_UNAVAILABLE};
use crate::config::{EnvSource, default_admin_socket_path};
use crate::proto::admin::{self as pb, admin_client};

/// The environment variable naming the admin socket, shared with
/// `tether run`.
pub(crate) const TETHER_ADMIN_SOCKET: &str = "TETHER_ADMIN_SOCKET";

/// Flags every operator command takes (before or after the subcommand).
#[derive(Debug, Args)]
pub(crate) struct AdminArgs {
    /// The agent's admin socket (a path). Without it: $TETHER_ADMIN_SOCKET,
    /// then the agent's default for this user
    /// (/run/tether-admin/admin.sock for root).
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

/// Talking to the admin API failed.
#[derive(Debug, Error)]
pub(crate) enum AdminClientError {
    /// The socket could not be dialled.
    #[error(
        "cannot connect to the agent's admin socket {}: {}; {}",
        .socket.display(),
        root_cause(.cause),
        connect_hint(.cause)
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
        "the agent did not answer within {}; is `tether run` running? admin socket: {}",
        humantime::format_duration(*.after),
        .socket.display()
    )]
    Timeout {
        /// The socket dialled.
        socket: PathBuf,
        /// The timeout.
        after: Duration,
    },
    /// The agent answered with an error status (its message names the
    /// field or the reason).
    #[error("{}", describe_admin_status(.socket, .status))]
    Status {
        /// The socket dialled.
        socket: PathBuf,
        /// The agent's answer. Its message is in ours, so it is not the
        /// `source()` as well (a `Status` prints as a debug dump).
        status: Status,
    },
    /// The default admin socket's directory is someone else's or others
    /// may write it: what answers there may not be the agent.
    #[error("refusing the default admin socket")]
    Untrusted(#[from] crate::trusted_fs::TrustedFsError),
    /// The async runtime could not be set up.
    #[error("setting up the runtime")]
    Runtime {
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// A connected admin API client: every call bounded by the timeout.
#[derive(Debug, Clone)]
pub(crate) struct AdminClient {
    client: admin_client::AdminClient<Channel>,
    socket: PathBuf,
    timeout: Duration,
}

// === impl AdminArgs ===

impl AdminArgs {
    /// `--json` or not.
    pub(crate) fn format(&self) -> Format {
        Format::from_json_flag(self.json)
    }

    /// The admin socket to dial.
    pub(crate) fn socket(&self, env: &dyn EnvSource) -> Result<PathBuf, AdminClientError> {
        resolve_admin_socket(self.admin_socket.as_deref(), env)
    }

    /// Runs `job` with a client connected to the admin socket, on a
    /// current-thread runtime.
    pub(crate) fn block_on<T, E, F>(
        &self,
        env: &dyn EnvSource,
        job: impl FnOnce(AdminClient) -> F,
    ) -> Result<T, E>
    where
        F: Future<Output = Result<T, E>>,
        E: From<AdminClientError>,
    {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| AdminClientError::Runtime { source })?;
        let socket = self.socket(env)?;
        runtime.block_on(async {
            let client = AdminClient::connect(&socket, self.timeout).await?;
            job(client).await
        })
    }
}

// === impl AdminClientError ===

impl AdminClientError {
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

// === impl AdminClient ===

impl AdminClient {
    /// Dials the admin socket, waiting at most `timeout`.
    pub(crate) async fn connect(
        socket: &Path,
        timeout: Duration,
    ) -> Result<Self, AdminClientError> {
        let channel = channel::dial(socket, timeout)
            .await
            .map_err(|error| match error {
                DialError::Connect(cause) => AdminClientError::Connect {
                    socket: socket.to_owned(),
                    cause,
                },
                DialError::Timeout => AdminClientError::Timeout {
                    socket: socket.to_owned(),
                    after: timeout,
                },
            })?;
        let client =
            admin_client::AdminClient::new(channel).max_decoding_message_size(MAX_MESSAGE_LEN);
        Ok(Self {
            client,
            socket: socket.to_owned(),
            timeout,
        })
    }

    /// The socket this client talks to.
    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }

    /// Creates an entry.
    pub(crate) async fn create_entry(
        &mut self,
        spec: pb::EntrySpec,
    ) -> Result<pb::Entry, AdminClientError> {
        let call = self
            .client
            .create_entry(pb::CreateEntryRequest { spec: Some(spec) });
        bounded(self.timeout, &self.socket, call).await
    }

    /// Replaces an entry's spec; `revision` 0 applies it whatever the
    /// entry's revision.
    pub(crate) async fn update_entry(
        &mut self,
        id: String,
        spec: pb::EntrySpec,
        revision: u64,
    ) -> Result<pb::Entry, AdminClientError> {
        let call = self.client.update_entry(pb::UpdateEntryRequest {
            id,
            spec: Some(spec),
            revision,
        });
        bounded(self.timeout, &self.socket, call).await
    }

    /// Deletes an entry.
    pub(crate) async fn delete_entry(&mut self, id: String) -> Result<(), AdminClientError> {
        let call = self.client.delete_entry(pb::DeleteEntryRequest { id });
        bounded(self.timeout, &self.socket, call).await.map(drop)
    }

    /// One entry.
    pub(crate) async fn get_entry(&mut self, id: String) -> Result<pb::Entry, AdminClientError> {
        let call = self.client.get_entry(pb::GetEntryRequest { id });
        bounded(self.timeout, &self.socket, call).await
    }

    /// The entries matching the filters.
    pub(crate) async fn list_entries(
        &mut self,
        request: pb::ListEntriesRequest,
    ) -> Result<Vec<pb::Entry>, AdminClientError> {
        let call = self.client.list_entries(request);
        bounded(self.timeout, &self.socket, call)
            .await
            .map(|r| r.entries)
    }

    /// Every live X.509-SVID and its holders.
    pub(crate) async fn list_svids(&mut self) -> Result<Vec<pb::IssuedSvid>, AdminClientError> {
        let call = self.client.list_svids(pb::ListSvidsRequest {});
        bounded(self.timeout, &self.socket, call)
            .await
            .map(|r| r.svids)
    }

    /// The trust domain's bundle.
    pub(crate) async fn get_bundle(&mut self) -> Result<pb::Bundle, AdminClientError> {
        let call = self.client.get_bundle(pb::GetBundleRequest {});
        bounded(self.timeout, &self.socket, call).await
    }

    /// Whether the agent is serving.
    pub(crate) async fn health(&mut self) -> Result<pb::HealthResponse, AdminClientError> {
        let call = self.client.health(pb::HealthRequest {});
        bounded(self.timeout, &self.socket, call).await
    }

    /// Asks the agent to re-read its config file.
    pub(crate) async fn reload(&mut self) -> Result<pb::ReloadResponse, AdminClientError> {
        let call = self.client.reload(pb::ReloadRequest {});
        bounded(self.timeout, &self.socket, call).await
    }

    /// The live tasks, and with `include_ended` the ended ones the agent
    /// still remembers: every page, each within the message limit.
    pub(crate) async fn list_tasks(
        &mut self,
        include_ended: bool,
    ) -> Result<Vec<pb::TaskInfo>, AdminClientError> {
        let mut tasks = Vec::new();
        let mut page_token = String::new();
        loop {
            let call = self.client.list_tasks(pb::ListTasksRequest {
                include_ended,
                page_size: 0,
                page_token: page_token.clone(),
            });
            let page = bounded(self.timeout, &self.socket, call).await?;
            // A page that brings nothing, or a token that does not move
            // on, would loop for ever: the list ends there.
            let stuck = page.tasks.is_empty() || page.next_page_token == page_token;
            tasks.extend(page.tasks);
            if page.next_page_token.is_empty() || stuck {
                return Ok(tasks);
            }
            page_token = page.next_page_token;
        }
    }

    /// One task.
    pub(crate) async fn get_task(&mut self, id: String) -> Result<pb::TaskInfo, AdminClientError> {
        let call = self.client.get_task(pb::GetTaskRequest { id });
        bounded(self.timeout, &self.socket, call).await
    }

    /// Ends a task as revoked; the task as it is afterwards.
    pub(crate) async fn revoke_task(
        &mut self,
        id: String,
    ) -> Result<pb::TaskInfo, AdminClientError> {
        let call = self.client.revoke_task(pb::RevokeTaskRequest { id });
        bounded(self.timeout, &self.socket, call).await
    }
}

/// Runs a call under the timeout.
async fn bounded<T>(
    timeout: Duration,
    socket: &Path,
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, AdminClientError> {
    channel::bounded(timeout, call)
        .await
        .map_err(|error| match error {
            CallError::Status(status) => AdminClientError::Status {
                socket: socket.to_owned(),
                status,
            },
            CallError::Timeout => AdminClientError::Timeout {
                socket: socket.to_owned(),
                after: timeout,
            },
        })
}

/// The admin socket to dial: `--admin-socket`, else `TETHER_ADMIN_SOCKET`,
/// else the agent's default for this user, when its directory is trusted.
pub(crate) fn resolve_admin_socket(
    flag: Option<&Path>,
    env: &dyn EnvSource,
) -> Result<PathBuf, AdminClientError> {
    if let Some(path) = flag {
        return Ok(path.to_owned());
    }
    match env.var(TETHER_ADMIN_SOCKET) {
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

/// The agent's answer; an Unimplemented answer means the socket serves
/// something else (the workload socket, typically).
fn describe_admin_status(socket: &Path, status: &Status) -> String {
    if status.code() == tonic::Code::Unimplemented {
        return format!(
            "{} does not serve the admin API (is it the workload socket?): {}",
            socket.display(),
            describe_status(socket, status)
        );
    }
    describe_status(socket, status)
}

/// What to suggest after a failed connection: a refusal by the file system
/// is about who may use the socket; anything else, about whether the agent
/// runs there.
fn connect_hint(error: &tonic::transport::Error) -> &'static str {
    match io_cause(error).map(io::Error::kind) {
        Some(io::ErrorKind::PermissionDenied) => {
            "the admin socket is for root, the agent's user and the uids in admin_uids (members of admin_group may connect)"
        }
        _ => {
            "is `tether run` running? (--admin-socket or $TETHER_ADMIN_SOCKET names another socket)"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
    fn admin_socket_precedence_flag_then_env_then_default() {
        let with_env = env(&[(TETHER_ADMIN_SOCKET, "/env/admin.sock")], 0);
        assert_eq!(
            resolve_admin_socket(Some(Path::new("/flag.sock")), &with_env).unwrap(),
            PathBuf::from("/flag.sock")
        );
        assert_eq!(
            resolve_admin_socket(None, &with_env).unwrap(),
            PathBuf::from("/env/admin.sock")
        );
        assert_eq!(
            resolve_admin_socket(None, &env(&[], 0)).unwrap(),
            PathBuf::from("/run/tether-admin/admin.sock")
        );
        assert_eq!(
            resolve_admin_socket(None, &env(&[(TETHER_ADMIN_SOCKET, "")], 1000)).unwrap(),
            PathBuf::from("/tmp/tether-1000-admin/admin.sock")
        );
        assert!(parse_socket_path("").is_err());
    }

    #[test]
    fn agent_answers_map_to_exit_statuses_with_its_message() {
        let status = |status: Status| AdminClientError::Status {
            socket: "/a.sock".into(),
            status,
        };
        let denied = status(Status::permission_denied(
            "admin API: uid 65534 is not allowed (root and admin_uids only)",
        ));
        assert_eq!(denied.exit_code(), EXIT_NOPERM);
        assert_eq!(
            denied.to_string(),
            "admin API: uid 65534 is not allowed (root and admin_uids only)"
        );
        let invalid = status(Status::invalid_argument(
            "selectors: selector \"x\" has no type",
        ));
        assert_eq!(invalid.exit_code(), 1);
        assert!(invalid.to_string().starts_with("selectors:"));
        let down = status(Status::unavailable("the agent is stopping"));
        assert_eq!(down.exit_code(), EXIT_UNAVAILABLE);
        assert!(down.to_string().contains("/a.sock"), "{down}");
        let elsewhere = status(Status::unimplemented(""));
        assert_eq!(elsewhere.exit_code(), 1);
        assert!(
            elsewhere
                .to_string()
                .starts_with("/a.sock does not serve the admin API"),
            "{elsewhere}"
        );
        let slow = AdminClientError::Timeout {
            socket: "/a.sock".into(),
            after: Duration::from_secs(5),
        };
        assert_eq!(slow.exit_code(), EXIT_UNAVAILABLE);
        assert!(slow.to_string().contains("within 5s"), "{slow}");
    }

    #[tokio::test]
    async fn a_missing_socket_is_unavailable_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("admin.sock");
        let error = AdminClient::connect(&socket, Duration::from_secs(60))
            .await
            .unwrap_err();
        assert_eq!(error.exit_code(), EXIT_UNAVAILABLE);
        let shown = error.to_string();
        assert!(shown.contains(&socket.display().to_string()), "{shown}");
        assert!(shown.contains("tether run"), "{shown}");
    }
}
