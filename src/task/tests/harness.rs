//! A real agent for the task tests: an authority with its keys, a store and
//! an audit trail in a temporary directory, and the [`Tasks`] over them.
//! The test process is the owner of every task (the peer of its own socket
//! pair), as `tests/integration` does with the unix attestor.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use spiffe::TrustDomain;
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

use super::super::{
    BeginRequest, ForeignTasks, IssuedToken, Owner, Task, TaskConfig, Tasks, TokenRejection,
    ValidatedTaskToken,
};
use crate::attestation::Caller;
use crate::audit::{AuditConfig, AuditLog, SigningKey};
use crate::authority::{
    Authority, AuthorityConfig, AuthorityError, CrlRequest, JwtRequest, LocalAuthority, SignedJwt,
    SignedX509Svid, X509SvidRequest,
};
use crate::bundle::TrustBundle;
use crate::registration::{EntrySpec, Match, RegistrationEntry};
use crate::store::Store;

/// The owner's SPIFFE ID (`sub` of every token).
pub(super) const OWNER_ID: &str = "spiffe://example.org/agent";
/// The audience tasks are begun for: a workload that may exchange.
pub(super) const SERVICE_ID: &str = "spiffe://example.org/mcp/notes";
/// The next hop a service exchanges for.
pub(super) const NEXT_HOP_ID: &str = "spiffe://example.org/api/publish";
/// The tools tasks are begun with.
pub(super) const TOOLS: [&str; 3] = ["notes.read", "notes.search", "notes.write"];

/// An agent's task state in a scratch directory.
pub(super) struct Agent {
    pub(super) dir: TempDir,
    pub(super) authority: LocalAuthority,
    pub(super) tasks: Tasks,
    pub(super) caller: Caller,
    config: TaskConfig,
    cancel: CancellationToken,
}

impl Agent {
    /// A new agent with `config`; its audit writer runs on the test's
    /// runtime.
    pub(super) async fn start(config: TaskConfig) -> Self {
        let (ours, _theirs) = tokio::net::UnixStream::pair().unwrap();
        let caller = Caller::from_stream(&ours).unwrap();
        let dir = tempfile::tempdir().unwrap();
        Self::open(dir, caller, config, CancellationToken::new())
    }

    /// The same agent after a restart: every in-memory handle dropped, the
    /// keys and the store opened again from disk, and the tasks restored.
    /// Returns it with what [`Tasks::restore`] returned.
    pub(super) fn restart(self) -> (Self, usize) {
        let Self {
            dir,
            authority,
            tasks,
            caller,
            config,
            cancel,
        } = self;
        drop((tasks, authority));
        let agent = Self::open(dir, caller, config, cancel);
        let watched = agent.tasks.restore().unwrap();
        (agent, watched)
    }

    /// The keys in `dir` (created on first use) and the tasks over them.
    fn open(dir: TempDir, caller: Caller, config: TaskConfig, cancel: CancellationToken) -> Self {
        let authority = LocalAuthority::load_or_create(
            TrustDomain::new("example.org").unwrap(),
            AuthorityConfig::default(),
            dir.path(),
        )
        .unwrap();
        let tasks = tasks(&dir, Arc::new(authority.clone()), config.clone(), &cancel);
        Self {
            dir,
            authority,
            tasks,
            caller,
            config,
            cancel,
        }
    }

    /// Tasks that sign with this agent's keys but know none of its tasks
    /// (a store of their own), with the directory that holds them.
    pub(super) fn stranger(&self) -> (TempDir, Tasks) {
        let dir = tempfile::tempdir().unwrap();
        let tasks = tasks(
            &dir,
            Arc::new(self.authority.clone()),
            self.config.clone(),
            &self.cancel,
        );
        (dir, tasks)
    }

    /// Another node of this agent's fleet, that knows of other nodes'
    /// tasks what `foreign` knows: a store and an audit trail of its own,
    /// signing with the same keys through a [`NodeSigner`].
    pub(super) fn node(&self, foreign: &ForeignTasks) -> Node {
        self.node_issuing(foreign, None)
    }

    /// [`Agent::node`], its tokens under the fleet's OIDC `issuer` (as
    /// the server names it on the sync stream).
    pub(super) fn node_issuing(&self, foreign: &ForeignTasks, issuer: Option<&str>) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let signer = Arc::new(NodeSigner {
            keys: self.authority.clone(),
            issuer: issuer.map(str::to_owned),
            subject_tokens: Mutex::default(),
        });
        let tasks = tasks(
            &dir,
            Arc::clone(&signer) as Arc<dyn Authority>,
            self.config.clone(),
            &self.cancel,
        )
        .with_foreign(foreign.clone());
        Node {
            _dir: dir,
            tasks,
            signer,
        }
    }

    /// `claims` signed with this agent's JWT key exactly as given (`exp`
    /// included): a token the agent's rules never issue, for the checks
    /// that must refuse it anyway.
    pub(super) fn sign(&self, claims: &impl serde::Serialize) -> String {
        self.authority.jwt_signer().unwrap().sign(claims).unwrap()
    }

    /// The test process as a task owner.
    pub(super) fn owner(&self) -> Owner {
        Owner {
            process: self.caller.key(),
            uid: self.caller.uid(),
            executable: None,
            exe_sha256: None,
        }
    }

    /// Begins a task for [`SERVICE_ID`] with `tools`, living `ttl`, its
    /// tokens bound to `bind_x5t` when given.
    pub(super) async fn begin_with(
        &self,
        tools: &[&str],
        ttl: Duration,
        bind_x5t: Option<String>,
    ) -> (Arc<Task>, IssuedToken) {
        begin_on(&self.tasks, &self.caller, tools, ttl, bind_x5t).await
    }

    /// Begins a task for [`SERVICE_ID`] with [`TOOLS`], for ten minutes.
    pub(super) async fn begin(&self) -> (Arc<Task>, IssuedToken) {
        self.begin_with(&TOOLS, Duration::from_secs(600), None)
            .await
    }

    /// A token of `task` (its own audience and tools) whose `exp` is
    /// `not_after`, signed as the agent signs every task token.
    pub(super) async fn token_expiring(&self, task: &Task, not_after: SystemTime) -> IssuedToken {
        self.tasks
            .issue(
                task,
                &task.audience,
                &task.tools,
                None,
                None,
                Some(not_after),
                task.requester(),
            )
            .await
            .unwrap()
    }

    /// This agent's own bundle, for its own trust domain only.
    pub(super) fn bundle_for(&self) -> impl Fn(&TrustDomain) -> Option<Arc<TrustBundle>> + use<> {
        let bundle = self.authority.bundle();
        let own = self.authority.trust_domain().clone();
        move |td: &TrustDomain| (*td == own).then(|| Arc::clone(&bundle))
    }

    /// [`Tasks::validate`] against this agent's bundle.
    pub(super) fn validate(
        &self,
        token: &str,
        audience: &str,
        tool: Option<&str>,
        presenter: Option<&[u8]>,
    ) -> Result<ValidatedTaskToken, TokenRejection> {
        self.tasks
            .validate(token, audience, tool, presenter, self.bundle_for())
    }
}

/// Another node of the fleet ([`Agent::node`]).
pub(super) struct Node {
    _dir: TempDir,
    /// Its tasks, with other nodes' tasks judged by the fleet's word.
    pub(super) tasks: Tasks,
    /// What it signs with.
    pub(super) signer: Arc<NodeSigner>,
}

/// How a fleet node signs, for the tests: the trust domain's keys (the
/// test agent's), but like `fleet::RemoteAuthority` it calls none of them
/// its own, and it keeps the subject token of every JWT request (the one
/// thing the server is shown and a local authority ignores).
#[derive(Debug)]
pub(super) struct NodeSigner {
    keys: LocalAuthority,
    /// The fleet's OIDC issuer, as the node learned it.
    issuer: Option<String>,
    subject_tokens: Mutex<Vec<Option<String>>>,
}

impl NodeSigner {
    /// The subject token of each JWT request so far, in order.
    pub(super) fn subject_tokens(&self) -> Vec<Option<String>> {
        self.subject_tokens.lock().unwrap().clone()
    }
}

impl Authority for NodeSigner {
    fn trust_domain(&self) -> &TrustDomain {
        self.keys.trust_domain()
    }

    fn issuer(&self) -> Option<String> {
        self.issuer.clone()
    }

    fn sign_x509_svid(
        &self,
        request: X509SvidRequest,
    ) -> BoxFuture<'_, Result<SignedX509Svid, AuthorityError>> {
        self.keys.sign_x509_svid(request)
    }

    fn sign_jwt(&self, request: JwtRequest) -> BoxFuture<'_, Result<SignedJwt, AuthorityError>> {
        self.subject_tokens
            .lock()
            .unwrap()
            .push(request.subject_token.clone());
        self.keys.sign_jwt(request)
    }

    fn sign_crl(
        &self,
        request: CrlRequest,
    ) -> BoxFuture<'_, Result<Option<Vec<u8>>, AuthorityError>> {
        self.keys.sign_crl(request)
    }

    fn bundle(&self) -> Arc<TrustBundle> {
        self.keys.bundle()
    }

    fn subscribe_bundle(&self) -> tokio::sync::watch::Receiver<Arc<TrustBundle>> {
        self.keys.subscribe_bundle()
    }

    fn issued_here(&self, cert_der: &[u8]) -> bool {
        self.keys.issued_here(cert_der)
    }

    fn is_own_jwt_key(&self, _kid: &str) -> bool {
        false
    }

    fn problems(&self) -> Vec<String> {
        self.keys.problems()
    }
}

/// Begins a task on `tasks` owned by `caller` (as [`OWNER_ID`]) for
/// [`SERVICE_ID`] with `tools`, living `ttl`, its tokens bound to
/// `bind_x5t` when given.
pub(super) async fn begin_on(
    tasks: &Tasks,
    caller: &Caller,
    tools: &[&str],
    ttl: Duration,
    bind_x5t: Option<String>,
) -> (Arc<Task>, IssuedToken) {
    let request = BeginRequest {
        audience: SERVICE_ID.into(),
        intent: "summarise this week's notes".into(),
        tools: tools.iter().map(|t| (*t).to_owned()).collect(),
        ttl: Some(ttl),
        bind_x5t,
        scope_descendants: false,
        decided_by: Vec::new(),
    };
    let owner = Owner {
        process: caller.key(),
        uid: caller.uid(),
        executable: None,
        exe_sha256: None,
    };
    tasks
        .begin(caller, owner, &matched(OWNER_ID), request)
        .await
        .unwrap()
}

/// The identity a caller matched: an entry with the fixed ID `spiffe_id`.
pub(super) fn matched(spiffe_id: &str) -> Match {
    let entry = RegistrationEntry::from_config(
        &EntrySpec {
            spiffe_id: spiffe_id.into(),
            selectors: vec!["unix:uid:1000".into()],
            ..EntrySpec::default()
        },
        &TrustDomain::new("example.org").unwrap(),
        &BTreeSet::new(),
    )
    .unwrap();
    Match {
        spiffe_id: entry.spiffe_id.as_fixed().unwrap().clone(),
        entry: Arc::new(entry),
    }
}

/// A self-signed certificate (DER) for `name`, as a presenter would show.
pub(super) fn certificate(name: &str) -> Vec<u8> {
    rcgen::generate_simple_self_signed(vec![name.to_owned()])
        .unwrap()
        .cert
        .der()
        .to_vec()
}

/// [`Tasks`] over the store in `dir` and a fresh audit trail beside it
/// (a writer still running holds its trail's lock).
fn tasks(
    dir: &TempDir,
    authority: Arc<dyn Authority>,
    config: TaskConfig,
    cancel: &CancellationToken,
) -> Tasks {
    static OPENED: AtomicUsize = AtomicUsize::new(0);
    let n = OPENED.fetch_add(1, Ordering::Relaxed);
    let (audit, writer) = AuditLog::open(
        &dir.path().join(format!("audit-{n}")),
        &AuditConfig::default(),
        Arc::new(SigningKey::generate().unwrap().0),
    )
    .unwrap();
    tokio::spawn(writer.run(cancel.clone()));
    let store = Store::open(dir.path()).unwrap();
    Tasks::new(config, authority, store, audit).0
}
