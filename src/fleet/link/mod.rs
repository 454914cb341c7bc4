//! The agent's link to the fleet's server: the node's identity, the
//! connection, the sync stream, and the bundle it keeps current.
//!
//! [`Link::start`] makes the node known to the server before the agent
//! serves anything:
//! 1. the bundle it verifies the server with: the one the server last sent
//!    (`data_dir/node/bundle.json`), else the bootstrap bundle file;
//! 2. the node SVID: the stored one while it is valid, else the node
//!    attests (`AttestNode`) for a fresh key's CSR, with its join token
//!    (once) or its projected service account token (`k8s_psat`, read
//!    from its file at every attestation: the kubelet rotates it);
//! 3. a mutual-TLS connection with that SVID, and the sync stream's first
//!    snapshot (the entries this node may serve and the bundle).
//!
//! [`Link::run`] (`follow.rs`) then follows the sync stream (entries into
//! the registry, the bundle into [`Link::subscribe_bundle`], other nodes'
//! task ends and the heartbeats into `task::ForeignTasks`), reconnects
//! with backoff and jitter after a failure (trying every address in turn,
//! asking for the task ends after the last one applied), and renews the
//! node SVID at half life. While the server is unreachable the agent keeps
//! serving what it holds; [`Link::problems`] says why it cannot issue
//! anything new, and other nodes' tasks are refused once the server has
//! been silent for `server.revocation_staleness`. [`report_ends`] sends
//! this node's task ends to the server.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use spiffe::{SpiffeId, TrustDomain};
use tokio::sync::watch;
use tonic::transport::Channel;

mod error;
mod follow;

pub use error::LinkError;
pub use follow::report_ends;

use super::config::{FleetConfig, NodeAttestation};
use super::node_files::NodeFiles;
use crate::admin_api::convert;
use crate::authority::key_store;
use crate::bundle::TrustBundle;
use crate::error::Chain;
use crate::mtls::{self, Identity, SwappableIdentity};
use crate::proto::server as pb;
use crate::proto::server::node_client::NodeClient;
use crate::registration::{EntryId, EntrySource, RegistrationEntry};
use crate::task::{ForeignTasks, Tasks};

/// Longest service account token file read.
const MAX_PSAT_LEN: u64 = 16 * 1024;
/// How long a connection attempt (TCP and TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the first sync snapshot may take at start.
const FIRST_SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(30);
/// Reconnection backoff: from 1 s, doubling, at most 30 s, with jitter.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The agent's link to the server (cheap Clone).
#[derive(Debug, Clone)]
pub struct Link {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    trust_domain: TrustDomain,
    config: FleetConfig,
    files: NodeFiles,
    federations: BTreeSet<TrustDomain>,
    server_id: SpiffeId,
    bundle: watch::Sender<Arc<TrustBundle>>,
    /// The fleet's OIDC issuer, as the last snapshot named it.
    issuer: Mutex<Option<String>>,
    /// The node SVID presented; `None` until the node has one.
    identity: Mutex<Option<SwappableIdentity>>,
    node_expires: Mutex<SystemTime>,
    /// When to renew it: fixed when it arrives, between 40% and 50% of its
    /// life, so nodes that got theirs together do not renew together.
    node_renew_at: Mutex<SystemTime>,
    channel: Mutex<Option<Channel>>,
    problem: Mutex<Option<String>>,
    /// The sync stream `start` opened, until `run` takes it.
    first_stream: Mutex<Option<tonic::Streaming<pb::SyncMessage>>>,
    /// Other nodes' ended tasks, and whether this agent is current.
    foreign: ForeignTasks,
    /// This agent's tasks, once the daemon has them: a fleet end of one of
    /// them (an operator's revoke on the server) ends it here too.
    tasks: std::sync::OnceLock<Tasks>,
}

// === impl Link ===

impl Link {
    /// Makes the node known to the server and takes the first snapshot:
    /// the link and the entries this node may serve.
    pub async fn start(
        trust_domain: TrustDomain,
        config: FleetConfig,
        data_dir: &std::path::Path,
        federations: BTreeSet<TrustDomain>,
        foreign: ForeignTasks,
    ) -> Result<(Self, Vec<RegistrationEntry>), LinkError> {
        let files = NodeFiles::new(data_dir);
        let bundle = initial_bundle(&trust_domain, &config, &files).await?;
        let server_id =
            SpiffeId::new(format!("spiffe://{trust_domain}/tether/server")).map_err(|e| {
                LinkError::BadReply {
                    what: "the server's SPIFFE ID",
                    detail: e.to_string(),
                }
            })?;
        if config.insecure_bootstrap {
            tracing::warn!(
                "server.insecure_bootstrap is set: a first contact accepts whichever server answers; \
                 set server.bootstrap_bundle instead"
            );
        }
        let stored = {
            let files = files.clone();
            tokio::task::spawn_blocking(move || files.load_svid()).await??
        };
        let this = Self {
            inner: Arc::new(Inner {
                trust_domain,
                config,
                files,
                federations,
                server_id,
                bundle: watch::channel(Arc::new(bundle)).0,
                issuer: Mutex::new(None),
                identity: Mutex::new(None),
                node_expires: Mutex::new(UNIX_EPOCH),
                node_renew_at: Mutex::new(UNIX_EPOCH),
                channel: Mutex::new(None),
                problem: Mutex::new(None),
                first_stream: Mutex::new(None),
                foreign,
                tasks: std::sync::OnceLock::new(),
            }),
        };
        let now = SystemTime::now();
        match stored.and_then(|s| {
            leaf_not_after(&s.chain)
                .filter(|t| *t > now)
                .map(|t| (s, t))
        }) {
            Some((svid, expires)) => {
                this.use_identity(svid.chain, svid.key, expires)?;
                tracing::info!("node SVID loaded from the data dir");
            }
            None => this.attest().await?,
        }
        let (channel, mut stream) = this.connect_and_sync().await?;
        let first = tokio::time::timeout(FIRST_SNAPSHOT_TIMEOUT, stream.message())
            .await
            .map_err(|_| LinkError::NoSnapshot(FIRST_SNAPSHOT_TIMEOUT))?
            .map_err(|source| LinkError::Refused {
                what: "the sync stream",
                source,
            })?
            .ok_or(LinkError::NoSnapshot(FIRST_SNAPSHOT_TIMEOUT))?;
        // The server sends the snapshot first; the task ends follow, and
        // `run` reads them.
        let Some(pb::sync_message::Kind::Snapshot(first)) = first.kind else {
            return Err(LinkError::BadReply {
                what: "the sync stream",
                detail: "its first message is not the entries' snapshot".into(),
            });
        };
        let entries = this.apply_bundle_and_entries(first)?;
        *lock(&this.inner.channel) = Some(channel);
        *lock(&this.inner.first_stream) = Some(stream);
        Ok((this, entries))
    }

    /// A client of the node API on the current connection; `None` while
    /// there is none.
    pub(crate) fn client(&self) -> Option<NodeClient<Channel>> {
        lock(&self.inner.channel).clone().map(NodeClient::new)
    }

    /// Has the fleet's ends of this node's own tasks (an operator's
    /// `tether server task revoke`) end them in `tasks` too. Once.
    pub fn end_own_tasks_in(&self, tasks: Tasks) {
        if self.inner.tasks.set(tasks).is_err() {
            tracing::warn!("the link already ends this agent's tasks");
        }
    }

    /// What this agent knows of other nodes' tasks (fed by [`Link::run`]).
    pub fn foreign(&self) -> ForeignTasks {
        self.inner.foreign.clone()
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.inner.trust_domain
    }

    /// The bundle as the server last sent it.
    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.inner.bundle.borrow().clone()
    }

    /// The fleet's OIDC issuer, as the server last named it (`None`:
    /// the server has no `[oidc]`).
    pub fn issuer(&self) -> Option<String> {
        lock(&self.inner.issuer).clone()
    }

    /// Wakes when the server sends a changed bundle.
    pub fn subscribe_bundle(&self) -> watch::Receiver<Arc<TrustBundle>> {
        self.inner.bundle.subscribe()
    }

    /// The link in one line, for `tether healthcheck`: the node's SPIFFE
    /// ID, and connected or why not.
    pub fn status(&self) -> String {
        let node = lock(&self.inner.identity)
            .as_ref()
            .map(|identity| identity.current().spiffe_id().to_string())
            .unwrap_or_else(|| "not attested".into());
        let link = match lock(&self.inner.problem).as_ref() {
            Some(problem) => format!("{node}, not connected: {problem}"),
            None => format!(
                "{node}, connected to {}",
                self.inner.config.addresses.join(" or ")
            ),
        };
        let tasks = match self.inner.foreign.problem() {
            Some(problem) => format!("other nodes' tasks refused: {problem}"),
            None => format!(
                "other nodes' tasks checked (last heartbeat {} ago, {} ended tasks known)",
                self.inner.foreign.last_heard_age().map_or_else(
                    || "never".into(),
                    |age| format!("{:.1}s", age.as_secs_f64())
                ),
                self.inner.foreign.len()
            ),
        };
        format!("{link}; {tasks}")
    }

    /// Why the agent cannot reach the server right now (empty: it can).
    pub fn problems(&self) -> Vec<String> {
        lock(&self.inner.problem).iter().cloned().collect()
    }

    /// Reconnects (a new connection with the current SVID) and opens the
    /// sync stream; a node SVID that expired meanwhile is attested again
    /// (with the service account token's current value, or a join token
    /// when one is configured).
    async fn reconnect(&self) -> Result<tonic::Streaming<pb::SyncMessage>, LinkError> {
        if *lock(&self.inner.node_expires) <= SystemTime::now() {
            self.attest().await?;
        }
        let (channel, stream) = self.connect_and_sync().await?;
        *lock(&self.inner.channel) = Some(channel);
        Ok(stream)
    }

    /// Connects with the node SVID and opens the sync stream. When the
    /// server no longer accepts the SVID (the node was evicted) and a join
    /// token is configured, the node attests again with it, once.
    async fn connect_and_sync(
        &self,
    ) -> Result<(Channel, tonic::Streaming<pb::SyncMessage>), LinkError> {
        let channel = self.connect().await?;
        match self.open_sync(&channel).await {
            Ok(stream) => Ok((channel, stream)),
            Err(LinkError::Refused { source, .. })
                if source.code() == tonic::Code::Unauthenticated && self.can_attest() =>
            {
                tracing::warn!(
                    reason = source.message(),
                    "the tether server does not accept this node's SVID; attesting again with the join token or service account token"
                );
                self.attest().await?;
                let channel = self.connect().await?;
                let stream = self.open_sync(&channel).await?;
                Ok((channel, stream))
            }
            Err(error) => Err(error),
        }
    }

    /// Whether the node has a credential to attest with.
    fn can_attest(&self) -> bool {
        match self.inner.config.node_attestation {
            NodeAttestation::JoinToken => self.inner.config.join_token.is_some(),
            NodeAttestation::K8sPsat { .. } => true,
        }
    }

    /// Presents the node's credential (a join token, once; or its current
    /// service account token): a node SVID for a fresh key, and the
    /// server's bundle.
    async fn attest(&self) -> Result<(), LinkError> {
        let (credential, what) = match &self.inner.config.node_attestation {
            NodeAttestation::JoinToken => {
                let token = self
                    .inner
                    .config
                    .join_token
                    .clone()
                    .ok_or(LinkError::NoJoinToken)?;
                (
                    pb::attest_node_request::Credential::JoinToken(token.to_string()),
                    "the join token",
                )
            }
            NodeAttestation::K8sPsat { psat_path } => (
                pb::attest_node_request::Credential::Psat(read_psat(psat_path).await?),
                "the service account token (k8s_psat)",
            ),
        };
        let (key, csr) = tokio::task::spawn_blocking(crate::authority::key_and_csr)
            .await?
            .map_err(LinkError::Key)?;
        let tls = mtls::client_config(
            self.inner.bundle.subscribe(),
            self.inner.server_id.clone(),
            None,
            self.inner.config.insecure_bootstrap,
        );
        let channel = self.dial(tls).await?;
        let response = NodeClient::new(channel)
            .attest_node(pb::AttestNodeRequest {
                credential: Some(credential),
                csr,
            })
            .await
            .map_err(|source| LinkError::Refused { what, source })?
            .into_inner();
        if let Some(bundle) = &response.bundle {
            self.take_bundle(bundle)?;
        }
        let svid = response.svid.ok_or(LinkError::BadReply {
            what: "AttestNode",
            detail: "no SVID".into(),
        })?;
        self.keep_svid(svid.cert_chain, key).await?;
        tracing::info!(node = %response.node_name, "node attested to the tether server");
        Ok(())
    }

    /// Renews the node SVID for a fresh key over the current connection,
    /// then reconnects with it.
    async fn renew(&self) -> Result<(), LinkError> {
        let (key, csr) = tokio::task::spawn_blocking(crate::authority::key_and_csr)
            .await?
            .map_err(LinkError::Key)?;
        let mut client = self.client().ok_or(LinkError::NoSnapshot(Duration::ZERO))?;
        let svid = client
            .renew_node(pb::RenewNodeRequest { csr })
            .await
            .map_err(|source| LinkError::Refused {
                what: "the node SVID renewal",
                source,
            })?
            .into_inner();
        self.keep_svid(svid.cert_chain, key).await?;
        tracing::info!("node SVID renewed");
        Ok(())
    }

    /// Stores and uses a new node SVID.
    async fn keep_svid(
        &self,
        chain: Vec<Vec<u8>>,
        key: zeroize::Zeroizing<Vec<u8>>,
    ) -> Result<(), LinkError> {
        let expires = leaf_not_after(&chain).ok_or(LinkError::BadReply {
            what: "the node SVID",
            detail: "not an X.509 certificate".into(),
        })?;
        {
            let (files, chain, key) = (self.inner.files.clone(), chain.clone(), key.clone());
            tokio::task::spawn_blocking(move || files.save_svid(&chain, &key)).await??;
        }
        self.use_identity(chain, key, expires)
    }

    fn use_identity(
        &self,
        chain: Vec<Vec<u8>>,
        key: zeroize::Zeroizing<Vec<u8>>,
        expires: SystemTime,
    ) -> Result<(), LinkError> {
        let identity = Identity::new(chain, key).map_err(LinkError::Identity)?;
        let mut slot = lock(&self.inner.identity);
        match slot.as_ref() {
            Some(current) => current.set(identity),
            None => *slot = Some(SwappableIdentity::new(identity)),
        }
        drop(slot);
        *lock(&self.inner.node_expires) = expires;
        *lock(&self.inner.node_renew_at) = renewal_time(SystemTime::now(), expires);
        Ok(())
    }

    /// A mutual-TLS connection with the node SVID.
    async fn connect(&self) -> Result<Channel, LinkError> {
        let tls = mtls::client_config(
            self.inner.bundle.subscribe(),
            self.inner.server_id.clone(),
            lock(&self.inner.identity).clone(),
            false,
        );
        self.dial(tls).await
    }

    async fn dial(
        &self,
        tls: Arc<tokio_rustls::rustls::ClientConfig>,
    ) -> Result<Channel, LinkError> {
        mtls::connect(&self.inner.config.addresses, tls, CONNECT_TIMEOUT)
            .await
            .map_err(|source| LinkError::Connect {
                addresses: self.inner.config.addresses.join(", "),
                source,
            })
    }

    async fn open_sync(
        &self,
        channel: &Channel,
    ) -> Result<tonic::Streaming<pb::SyncMessage>, LinkError> {
        let stream = NodeClient::new(channel.clone())
            .sync(pb::SyncRequest {
                task_ends_after: self.inner.foreign.watermark(),
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(|source| LinkError::Refused {
                what: "the sync stream",
                source,
            })?;
        // Not caught up on other nodes' task ends until its first
        // heartbeat.
        self.inner.foreign.stream_opened();
        Ok(stream)
    }

    /// Takes a snapshot's bundle and returns its entries, each validated as
    /// the agent validates entries (one that does not validate is skipped
    /// and logged: the others still apply).
    fn apply_bundle_and_entries(
        &self,
        snapshot: pb::SyncSnapshot,
    ) -> Result<Vec<RegistrationEntry>, LinkError> {
        if let Some(bundle) = &snapshot.bundle {
            self.take_bundle(bundle)?;
        }
        self.take_issuer(&snapshot.issuer);
        let mut entries = Vec::with_capacity(snapshot.entries.len());
        for entry in snapshot.entries {
            match self.entry_of(entry) {
                Ok(entry) => entries.push(entry),
                Err(problem) => {
                    tracing::error!(problem, "an entry from the server was refused");
                }
            }
        }
        Ok(entries)
    }

    fn entry_of(&self, entry: crate::proto::admin::Entry) -> Result<RegistrationEntry, String> {
        let spec = convert::spec(entry.spec).map_err(|s| s.message().to_owned())?;
        let id = EntryId::parse(&entry.id).map_err(|e| format!("{}", Chain(&e)))?;
        let time = |ms: i64| UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
        let mut entry = RegistrationEntry::from_api(
            &spec,
            &self.inner.trust_domain,
            &self.inner.federations,
            id,
            entry.revision.max(1),
            time(entry.created_at_ms),
            time(entry.updated_at_ms),
        )
        .map_err(|e| format!("{}: {}", spec.spiffe_id, Chain(&e)))?;
        entry.source = EntrySource::Server;
        Ok(entry)
    }

    /// Keeps the issuer a snapshot names, when it is one (an issuer the
    /// agent's own `[oidc]` would accept); a malformed one is refused and
    /// logged, and the last one stays.
    fn take_issuer(&self, issuer: &str) {
        let next = if issuer.is_empty() {
            None
        } else {
            match crate::oidc::normalize_issuer(issuer) {
                Ok(normal) if normal == issuer => Some(normal),
                Ok(_) | Err(_) => {
                    tracing::error!(
                        issuer = issuer.chars().take(80).collect::<String>(),
                        "the server names a malformed OIDC issuer; keeping the last one"
                    );
                    return;
                }
            }
        };
        let mut current = lock(&self.inner.issuer);
        if *current != next {
            tracing::info!(
                issuer = next.as_deref().unwrap_or("(none)"),
                "the fleet's OIDC issuer"
            );
            *current = next;
        }
    }

    /// Keeps a bundle the server sent (in memory and in the data dir) when
    /// it is the trust domain's and new.
    fn take_bundle(&self, message: &pb::Bundle) -> Result<(), LinkError> {
        let bundle = TrustBundle::from_spiffe_json(
            self.inner.trust_domain.clone(),
            message.spiffe_json.as_bytes(),
        )
        .map_err(|source| LinkError::Bundle {
            what: "server's bundle",
            source,
        })?;
        if bundle.x509_authorities().is_empty() {
            return Err(LinkError::BadReply {
                what: "the bundle",
                detail: "it has no X.509 authority".into(),
            });
        }
        let changed = self.inner.bundle.send_if_modified(|current| {
            if current.same_keys(&bundle) {
                return false;
            }
            *current = Arc::new(bundle);
            true
        });
        if changed && let Err(error) = self.inner.files.save_bundle(&message.spiffe_json) {
            tracing::warn!(error = %Chain(&error), "could not keep the server's bundle in the data dir");
        }
        Ok(())
    }

    /// How long until the node SVID is due for renewal.
    fn renew_in(&self) -> Duration {
        lock(&self.inner.node_renew_at)
            .duration_since(SystemTime::now())
            .unwrap_or_default()
    }

    fn set_problem(&self, problem: String) {
        *lock(&self.inner.problem) = Some(problem);
    }

    fn clear_problem(&self) {
        *lock(&self.inner.problem) = None;
    }
}

/// The bundle to verify the server with at start.
async fn initial_bundle(
    trust_domain: &TrustDomain,
    config: &FleetConfig,
    files: &NodeFiles,
) -> Result<TrustBundle, LinkError> {
    let (bytes, what) = match files.load_bundle()? {
        Some(bytes) => (bytes, "kept bundle (data_dir/node/bundle.json)"),
        None => match &config.bootstrap_bundle {
            Some(path) => {
                let path = path.clone();
                let read = tokio::task::spawn_blocking({
                    let path = path.clone();
                    move || key_store::read_mounted(&path)
                })
                .await?;
                let bytes = read.map_err(|source| LinkError::BootstrapRead {
                    path: path.display().to_string(),
                    source,
                })?;
                (bytes, "bootstrap bundle")
            }
            None => {
                return Ok(TrustBundle::new(
                    trust_domain.clone(),
                    Vec::new(),
                    Vec::new(),
                    0,
                ));
            }
        },
    };
    TrustBundle::from_spiffe_json(trust_domain.clone(), &bytes)
        .map_err(|source| LinkError::Bundle { what, source })
}

/// The leaf's `notAfter`.
/// The projected service account token, trimmed; at most
/// [`MAX_PSAT_LEN`] bytes are read (a longer file is refused).
async fn read_psat(path: &std::path::Path) -> Result<String, LinkError> {
    use tokio::io::AsyncReadExt as _;
    let error = |source| LinkError::Psat {
        path: path.display().to_string(),
        source,
    };
    let file = tokio::fs::File::open(path).await.map_err(error)?;
    let mut text = String::new();
    file.take(MAX_PSAT_LEN + 1)
        .read_to_string(&mut text)
        .await
        .map_err(error)?;
    let token = text.trim();
    if text.len() as u64 > MAX_PSAT_LEN || token.is_empty() {
        return Err(error(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("expected one token of at most {MAX_PSAT_LEN} bytes"),
        )));
    }
    Ok(token.to_owned())
}

fn leaf_not_after(chain: &[Vec<u8>]) -> Option<SystemTime> {
    let (_, leaf) = x509_parser::parse_x509_certificate(chain.first()?).ok()?;
    let secs = u64::try_from(leaf.validity().not_after.timestamp()).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

/// When an SVID received at `now` and expiring at `expires` is renewed:
/// at half its life less up to a fifth of that half, at random.
fn renewal_time(now: SystemTime, expires: SystemTime) -> SystemTime {
    let half = expires.duration_since(now).unwrap_or_default() / 2;
    now + jitter_fifth(half)
}

/// `base` less up to a fifth, at random.
fn jitter_fifth(base: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let _ = aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut byte);
    base - base / 5 * u32::from(byte[0]) / 255
}

/// `base` less up to a quarter, at random: agents that lost the server
/// together do not come back together.
fn jitter(base: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let _ = aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut byte);
    base - base / 4 * u32::from(byte[0]) / 255
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_svid_is_renewed_between_two_fifths_and_half_its_life() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let expires = now + Duration::from_secs(3600);
        let mut seen = BTreeSet::new();
        for _ in 0..200 {
            let at = renewal_time(now, expires).duration_since(now).unwrap();
            assert!(
                at >= Duration::from_secs(1440) && at <= Duration::from_secs(1800),
                "{at:?}"
            );
            seen.insert(at.as_secs());
        }
        assert!(seen.len() > 10, "spread out, not one instant: {seen:?}");
        assert_eq!(
            renewal_time(expires, now),
            expires,
            "an expired SVID is due now"
        );
    }
}
