//! The Task API client: the Task API is served on the workload socket, so
//! this is the workload client's sibling. The same socket resolution
//! ([`super::workload::resolve_socket`]), the same `workload.spiffe.io:
//! true` header, the same errors and exit codes ([`WorkloadClientError`]);
//! and the one helper that binding tokens needs (`task run --bind`, `token
//! exchange --bind`, the MCP examples): this process's own X.509-SVID
//! leaf.
//!
//! Invariant: every wait is bounded by the caller's timeout, except the
//! messages of a WatchTask stream after it opened (tokens come when they
//! come).

use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use tonic::Status;
use tonic::codec::Streaming;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use zeroize::Zeroize as _;

use super::channel::MAX_MESSAGE_LEN;
use super::workload::{
    SecurityHeader, SocketError, WorkloadClient, WorkloadClientError, bounded, status_error,
};
use super::{EXIT_NOPERM, EXIT_UNAVAILABLE, EXIT_USAGE};
use crate::proto::task::{self as pb, tasks_client::TasksClient};
use crate::proto::workload::X509svid;

/// Talking to the Task API failed, or the agent's answer is unusable.
#[derive(Debug, Error)]
pub enum TaskClientError {
    /// The socket address from the flag or the environment is unusable.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// Reaching the agent failed, or the agent refused.
    #[error(transparent)]
    Client(#[from] WorkloadClientError),
    /// The agent ended the X.509-SVID stream before its first message.
    #[error("the agent closed the X.509-SVID stream without sending anything")]
    NoSvidMessage,
    /// This process holds no X.509-SVID (for the SPIFFE ID asked).
    #[error("this process holds no X.509-SVID{}", .spiffe_id.as_ref().map(|id| format!(" for {id}")).unwrap_or_default())]
    NoSvid {
        /// The SPIFFE ID asked for, if one was.
        spiffe_id: Option<String>,
    },
    /// The agent sent an X.509-SVID whose leaf does not parse.
    #[error("the agent sent a malformed X.509-SVID for {spiffe_id}")]
    MalformedSvid {
        /// Its SPIFFE ID.
        spiffe_id: String,
    },
}

/// Which of this process's X.509-SVIDs to bind tokens to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvidChoice<'a> {
    /// The default (first) one.
    Default,
    /// The one with this SPIFFE ID, or none.
    Exactly(&'a str),
    /// The one with this SPIFFE ID if held, else the default.
    Preferably(&'a str),
}

/// A connected Task API client.
#[derive(Debug, Clone)]
pub struct TaskClient {
    client: TasksClient<InterceptedService<Channel, SecurityHeader>>,
    socket: PathBuf,
    timeout: Duration,
}

// === impl TaskClientError ===

impl TaskClientError {
    /// The exit status for this failure (see [`crate::client`] for the table).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Socket(SocketError::Untrusted(_)) => EXIT_NOPERM,
            Self::Socket(_) => EXIT_USAGE,
            Self::Client(error) => error.exit_code(),
            Self::NoSvidMessage => EXIT_UNAVAILABLE,
            Self::NoSvid { .. } => EXIT_NOPERM,
            Self::MalformedSvid { .. } => 1,
        }
    }
}

// === impl TaskClient ===

impl TaskClient {
    /// Dials `socket`, waiting at most `timeout`.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Self, WorkloadClientError> {
        let channel = super::workload::dial(socket, timeout).await?;
        let client = TasksClient::with_interceptor(channel, SecurityHeader)
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

    /// Begins a task owned by this process.
    pub async fn begin(
        &mut self,
        request: pb::BeginTaskRequest,
    ) -> Result<pb::BeginTaskResponse, WorkloadClientError> {
        let call = self.client.begin_task(request);
        bounded(self.timeout, &self.socket, call).await
    }

    /// Opens the stream of fresh tokens for a task this process owns.
    pub async fn watch(
        &mut self,
        task_id: String,
    ) -> Result<Streaming<pb::TaskToken>, WorkloadClientError> {
        let call = self.client.watch_task(pb::WatchTaskRequest { task_id });
        bounded(self.timeout, &self.socket, call).await
    }

    /// Ends a task this process owns.
    pub async fn end(&mut self, task_id: String) -> Result<(), WorkloadClientError> {
        let call = self.client.end_task(pb::EndTaskRequest { task_id });
        bounded(self.timeout, &self.socket, call).await.map(drop)
    }

    /// Exchanges a task token addressed to this process for one addressed
    /// to the next audience.
    pub async fn exchange(
        &mut self,
        request: pb::ExchangeTokenRequest,
    ) -> Result<pb::TaskToken, WorkloadClientError> {
        let call = self.client.exchange_token(request);
        let response = bounded(self.timeout, &self.socket, call).await?;
        response.token.ok_or_else(|| {
            status_error(
                &self.socket,
                Status::internal("the agent answered the exchange without a token"),
            )
        })
    }

    /// Asks the agent to validate a task token.
    pub async fn validate(
        &mut self,
        request: pb::ValidateTaskTokenRequest,
    ) -> Result<pb::ValidateTaskTokenResponse, WorkloadClientError> {
        let call = self.client.validate_task_token(request);
        bounded(self.timeout, &self.socket, call).await
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

/// The DER leaf certificate of one of this process's X.509-SVIDs, from
/// the first FetchX509SVID message. The private keys in that message are
/// wiped before this returns.
pub async fn own_leaf_certificate(
    socket: &Path,
    timeout: Duration,
    which: SvidChoice<'_>,
) -> Result<Vec<u8>, TaskClientError> {
    let mut client = WorkloadClient::connect(socket, timeout).await?;
    let mut stream = client.fetch_x509_svid().await?;
    let mut response = client
        .first(&mut stream)
        .await?
        .ok_or(TaskClientError::NoSvidMessage)?;
    let leaf = leaf_of(&response.svids, which);
    for svid in &mut response.svids {
        svid.x509_svid_key.zeroize();
    }
    leaf
}

/// The leaf of the SVID `which` names.
fn leaf_of(svids: &[X509svid], which: SvidChoice<'_>) -> Result<Vec<u8>, TaskClientError> {
    let with_id = |id: &str| svids.iter().find(|s| s.spiffe_id == id);
    let svid = match which {
        SvidChoice::Default => svids.first(),
        SvidChoice::Exactly(id) => with_id(id),
        SvidChoice::Preferably(id) => with_id(id).or_else(|| svids.first()),
    }
    .ok_or_else(|| TaskClientError::NoSvid {
        spiffe_id: match which {
            SvidChoice::Exactly(id) => Some(id.to_owned()),
            SvidChoice::Default | SvidChoice::Preferably(_) => None,
        },
    })?;
    // The chain is concatenated DER, leaf first: the leaf is what the
    // first certificate's parse consumed.
    let malformed = || TaskClientError::MalformedSvid {
        spiffe_id: svid.spiffe_id.clone(),
    };
    let (rest, _) =
        x509_parser::parse_x509_certificate(&svid.x509_svid).map_err(|_| malformed())?;
    let len = svid.x509_svid.len() - rest.len();
    svid.x509_svid
        .get(..len)
        .map(<[u8]>::to_vec)
        .ok_or_else(malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(name: &str) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn svid(id: &str, chain: Vec<u8>) -> X509svid {
        X509svid {
            spiffe_id: id.into(),
            x509_svid: chain,
            ..Default::default()
        }
    }

    #[test]
    fn the_leaf_is_the_first_certificate_of_the_chosen_svid() {
        let (a, b, ca) = (certificate("a"), certificate("b"), certificate("ca"));
        let svids = [
            svid("spiffe://example.org/a", [a.clone(), ca.clone()].concat()),
            svid("spiffe://example.org/b", [b.clone(), ca].concat()),
        ];
        let (b_id, c_id) = ("spiffe://example.org/b", "spiffe://example.org/c");
        assert_eq!(
            leaf_of(&svids, SvidChoice::Default).unwrap(),
            a,
            "the default is first"
        );
        assert_eq!(leaf_of(&svids, SvidChoice::Exactly(b_id)).unwrap(), b);
        assert_eq!(leaf_of(&svids, SvidChoice::Preferably(b_id)).unwrap(), b);
        assert_eq!(leaf_of(&svids, SvidChoice::Preferably(c_id)).unwrap(), a);
        let missing = leaf_of(&svids, SvidChoice::Exactly(c_id)).unwrap_err();
        assert_eq!(missing.exit_code(), EXIT_NOPERM);
        assert!(missing.to_string().ends_with("for spiffe://example.org/c"));
        assert!(matches!(
            leaf_of(&[], SvidChoice::Preferably(c_id)),
            Err(TaskClientError::NoSvid { spiffe_id: None })
        ));
        let broken = [svid("spiffe://example.org/a", vec![0x30, 0x03, 1])];
        assert!(matches!(
            leaf_of(&broken, SvidChoice::Default),
            Err(TaskClientError::MalformedSvid { .. })
        ));
    }
}
