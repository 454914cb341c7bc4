//! Attestation: from a connected caller to the selectors that describe it.
//!
//! Owns [`Caller`] (the peer of a Unix socket as the kernel reported it at
//! connect, pinned by a pidfd), [`Attestor`] (the closed set of attestors:
//! unix always, Kubernetes when configured), the [`Attested`] result and
//! [`AttestationError`]. Submodules: `caller` (peer credentials, pidfd,
//! liveness), `procfs` (pure /proc parsers and thin readers), `unix` (the
//! unix attestor and its executable-hash cache), [`k8s`] (pods through the
//! kubelet).
//!
//! Invariants:
//! - It reads the OS, never the registry: selectors are facts about the
//!   process, and matching them to entries is `registration`'s job.
//! - Identity comes from the kernel, never from what the caller says: the
//!   uid/gid come from `SO_PEERCRED` and /proc and must agree, and nothing
//!   the caller sends over the socket is consulted.
//! - No selectors for a process that is gone: every attestation ends with
//!   [`Caller::ensure_alive`], so a caller that exits or whose PID is
//!   recycled mid-attestation gets an error, never another's identity.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use serde::Deserialize;

use crate::registration::selector::SelectorSet;

mod caller;
pub mod k8s;
pub mod procfs;
mod unix;

pub use caller::{Caller, ProcessKey};
pub use procfs::ProcfsError;

use procfs::{FileKey, ProcStatus};
use unix::{UnixAttestor, UnixFacts};

/// Deepest ancestor chain read for task scopes.
const MAX_LINEAGE: usize = 64;

/// Longest a connection's attestation is reused, however unchanged the
/// process: the user and group names in it are as fresh as the name cache.
const MEMO_MAX_AGE: Duration = unix::NAME_TTL;

/// Default [`UnixAttestorConfig::workload_size_limit`]: 256 MiB.
const DEFAULT_WORKLOAD_SIZE_LIMIT: u64 = 256 * 1024 * 1024;

/// The `[attestor]` section of the config file.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AttestorConfig {
    /// `[attestor.unix]`.
    pub unix: UnixAttestorConfig,
    /// `[attestor.k8s]`.
    pub k8s: k8s::K8sAttestorConfig,
}

/// The `[attestor.unix]` section of the config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UnixAttestorConfig {
    /// Produce `unix:path` and `unix:sha256` (default true). When on, an
    /// executable that cannot be read fails attestation.
    pub discover_workload_path: bool,
    /// Largest executable hashed for `unix:sha256`, in bytes (default 256
    /// MiB). Larger ones get no sha256 selector (logged), never a failed
    /// attestation. Hashing is the one cost a caller controls, hence the
    /// bound; 0 hashes nothing (unlike SPIRE, where 0 means unlimited).
    pub workload_size_limit: u64,
}

/// Turns a [`Caller`] into [`Attested`] selectors. Cheap to clone; clones
/// share the executable-hash cache.
///
/// A closed set of attestors: the unix attestor always runs (its uid/gid
/// check is what ties /proc to the connection); the Kubernetes one when
/// configured. Fields, `Option`al by configuration, not plugins.
#[derive(Debug, Clone)]
pub struct Attestor {
    proc_root: Arc<Path>,
    unix: UnixAttestor,
    k8s: Option<Arc<k8s::K8sAttestor>>,
}

/// What attestation established about one caller.
#[derive(Debug, Clone)]
pub struct Attested {
    /// The caller's PID in the agent's PID namespace.
    pub pid: i32,
    /// Effective uid (`SO_PEERCRED`, confirmed by /proc).
    pub uid: u32,
    /// Effective gid (`SO_PEERCRED`, confirmed by /proc).
    pub gid: u32,
    /// `readlink /proc/<pid>/exe`, when `discover_workload_path` is on.
    pub executable: Option<PathBuf>,
    /// Every selector the attestors produced.
    pub selectors: SelectorSet,
}

/// A connection's last full attestation, and the kernel facts it rests on.
///
/// Reused by the next call on the same connection only while those facts
/// still hold: the same credentials in `/proc/<pid>/status`, the same
/// executable (device, inode, size, times), the process alive (pidfd), and
/// younger than [`MEMO_MAX_AGE`]. Anything else attests afresh.
#[derive(Debug)]
pub(crate) struct Memo {
    taken: Instant,
    status: ProcStatus,
    /// `/proc/<pid>/status`, open since the attestation: a re-check reads
    /// it again without a path walk.
    status_file: procfs::StatusFile,
    exe_key: Option<FileKey>,
    attested: Attested,
    pod: Option<k8s::PodContainer>,
}

/// Why a caller could not be identified or attested.
#[derive(Debug, thiserror::Error)]
pub enum AttestationError {
    /// `SO_PEERCRED` could not be read from the connection.
    #[error("cannot read the peer's credentials (SO_PEERCRED)")]
    PeerCredentials(#[source] Errno),
    /// The kernel reported PID 0: the peer is in a PID namespace the agent
    /// cannot see (the agent needs the host PID namespace, `hostPID: true`).
    #[error(
        "the peer's PID is not visible from the agent's PID namespace (run the agent with hostPID)"
    )]
    NoPeerPid,
    /// `SO_PEERPIDFD` failed for a reason other than an old kernel or a departed peer.
    #[error("cannot read the peer's pidfd (SO_PEERPIDFD)")]
    PeerPidfd(#[source] Errno),
    /// `pidfd_open` failed for a reason other than the process being gone.
    #[error("pidfd_open({pid}) failed")]
    PidfdOpen {
        /// The caller's PID.
        pid: i32,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// Polling the caller's pidfd for exit failed.
    #[error("cannot poll the pidfd of pid {pid}")]
    PollPidfd {
        /// The caller's PID.
        pid: i32,
        /// The system error.
        #[source]
        source: Errno,
    },
    /// The process that connected has exited, or its PID now names another process.
    #[error("caller pid {pid} has exited")]
    CallerExited {
        /// The PID the caller had.
        pid: i32,
    },
    /// The process's effective uid/gid differ from what `SO_PEERCRED` recorded at connect.
    #[error(
        "caller pid {pid} connected as uid {peer_uid} gid {peer_gid} but now runs as uid {proc_uid} gid {proc_gid}"
    )]
    CredentialsChanged {
        /// The caller's PID.
        pid: i32,
        /// Effective uid at connect (`SO_PEERCRED`).
        peer_uid: u32,
        /// Effective gid at connect (`SO_PEERCRED`).
        peer_gid: u32,
        /// Effective uid in /proc at attestation.
        proc_uid: u32,
        /// Effective gid in /proc at attestation.
        proc_gid: u32,
    },
    /// The caller runs another program than the one that connected (it
    /// exec'd after connecting, or while being attested).
    #[error("caller pid {pid} executed another program after connecting; reconnect")]
    ExecutableChanged {
        /// The caller's PID.
        pid: i32,
    },
    /// A /proc file (or the executable behind `/proc/<pid>/exe`) could not be read.
    #[error("cannot read {}", path.display())]
    ReadProc {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A /proc file held something other than what the kernel writes.
    #[error("cannot parse {}", path.display())]
    ParseProc {
        /// The file.
        path: PathBuf,
        /// What was wrong with it.
        #[source]
        source: ProcfsError,
    },
    /// The blocking attestation job panicked or was cancelled by runtime shutdown.
    #[error("the attestation job did not complete")]
    Blocking(#[source] tokio::task::JoinError),
    /// The caller's cgroups place it in two pods or containers at once.
    #[error("caller pid {pid} is in two pods or containers at once")]
    Cgroup {
        /// The caller's PID.
        pid: i32,
        /// What disagreed.
        #[source]
        source: k8s::CgroupError,
    },
    /// The caller runs in a pod that the kubelet could not tell about.
    #[error("caller pid {pid} runs in a pod that could not be attested")]
    Kubernetes {
        /// The caller's PID.
        pid: i32,
        /// Why.
        #[source]
        source: k8s::K8sError,
    },
}

// === impl Attestor ===

impl Attestor {
    /// An attestor reading the real `/proc`. Fails only when the Kubernetes
    /// attestor is enabled and its kubelet client cannot be set up (the CA
    /// file).
    pub fn new(config: &AttestorConfig) -> Result<Self, k8s::KubeletError> {
        Self::with_proc_root(config, PathBuf::from("/proc"))
    }

    /// An attestor reading `proc_root` instead of `/proc` for attestation
    /// (fixtures, or a host /proc mounted elsewhere). Caller liveness is
    /// always checked against the real `/proc`.
    pub fn with_proc_root(
        config: &AttestorConfig,
        proc_root: PathBuf,
    ) -> Result<Self, k8s::KubeletError> {
        let k8s = if config.k8s.enabled {
            Some(Arc::new(k8s::K8sAttestor::new(&config.k8s)?))
        } else {
            None
        };
        Ok(Self {
            proc_root: proc_root.into(),
            unix: UnixAttestor::new(&config.unix),
            k8s,
        })
    }

    /// Reads the caller's selectors, then confirms it is still the process
    /// that connected. The /proc work runs on the blocking pool (NSS lookups
    /// and hashing block); a caller in a pod is then looked up in the
    /// kubelet's pod list, asynchronously.
    ///
    /// A later call on the same connection reuses that work when the
    /// process is unchanged (see `Memo`): a few /proc reads on the
    /// calling thread instead of a trip through the blocking pool. Pod
    /// selectors are looked up on every call either way, so label changes
    /// show as soon as the pod cache has them.
    ///
    /// Cancelling the future does not stop the blocking job; it completes
    /// and its result is dropped.
    pub async fn attest(&self, caller: &Caller) -> Result<Attested, AttestationError> {
        let remembered = match caller.memo() {
            Some(memo) if self.still_holds(caller, &memo)? => memo,
            _ => {
                let attestor = self.clone();
                let blocking_caller = caller.clone();
                let memo =
                    tokio::task::spawn_blocking(move || attestor.attest_blocking(&blocking_caller))
                        .await
                        .map_err(AttestationError::Blocking)??;
                let memo = Arc::new(memo);
                caller.remember(Arc::clone(&memo));
                memo
            }
        };
        let mut attested = remembered.attested.clone();
        if let (Some(k8s), Some(pod)) = (&self.k8s, &remembered.pod) {
            // The pod and container were read from the caller's own cgroup
            // before its liveness was confirmed: the lookup maps facts
            // already pinned to this caller.
            let selectors =
                k8s.selectors(pod)
                    .await
                    .map_err(|source| AttestationError::Kubernetes {
                        pid: attested.pid,
                        source,
                    })?;
            attested.selectors.extend(selectors);
        }
        Ok(attested)
    }

    /// True when `memo` still describes the caller: same credentials, same
    /// executable, still running, not too old. A changed process is not an
    /// error here; the full attestation that follows decides about it.
    /// Non-blocking /proc reads, done on the calling thread.
    fn still_holds(&self, caller: &Caller, memo: &Memo) -> Result<bool, AttestationError> {
        if memo.taken.elapsed() >= MEMO_MAX_AGE {
            return Ok(false);
        }
        // A read that failed because the caller left is the caller's doing.
        let unchanged = match self.facts_unchanged(caller.pid(), memo) {
            Ok(unchanged) => unchanged,
            Err(error) => {
                caller.ensure_alive()?;
                return Err(error);
            }
        };
        // The reads described this caller only if it is still running now.
        caller.ensure_alive()?;
        Ok(unchanged)
    }

    /// The same credentials in `/proc/<pid>/status`, and the same
    /// executable (when the memo has one), as when `memo` was taken.
    fn facts_unchanged(&self, pid: i32, memo: &Memo) -> Result<bool, AttestationError> {
        if memo.status_file.read()? != memo.status {
            return Ok(false);
        }
        match memo.exe_key {
            Some(key) => Ok(procfs::stat_exe(&self.proc_root, pid)? == key),
            None => Ok(true),
        }
    }

    /// The caller's ancestors (parent first): kernel facts a task scope is
    /// recognised by. Blocking reads, off the runtime.
    pub async fn lineage(&self, caller: &Caller) -> Vec<ProcessKey> {
        let proc_root = Arc::clone(&self.proc_root);
        let pid = caller.pid();
        tokio::task::spawn_blocking(move || procfs::read_lineage(&proc_root, pid, MAX_LINEAGE))
            .await
            .unwrap_or_default()
    }

    fn attest_blocking(&self, caller: &Caller) -> Result<Memo, AttestationError> {
        let pod = match &self.k8s {
            Some(k8s) => {
                let file = procfs::read_cgroup(k8s.proc_root(), caller.pid());
                let file = match file {
                    Ok(file) => file,
                    Err(error) => {
                        caller.ensure_alive()?;
                        return Err(error);
                    }
                };
                k8s::pod_container(&file).map_err(|source| AttestationError::Cgroup {
                    pid: caller.pid(),
                    source,
                })?
            }
            None => None,
        };
        let taken = Instant::now();
        let facts = match self.unix.attest(&self.proc_root, caller) {
            Ok(facts) => facts,
            // A read that failed because the caller left is the caller's
            // doing: report that rather than an agent-side fault.
            Err(error) => {
                caller.ensure_alive()?;
                return Err(error);
            }
        };
        // Every read above was about this caller only if it is still running now.
        caller.ensure_alive()?;
        tracing::debug!(
            pid = caller.pid(),
            uid = caller.uid(),
            pidfd = ?caller.pidfd_source(),
            selectors = facts.selectors.len(),
            "caller attested"
        );
        let UnixFacts {
            executable,
            selectors,
            status,
            status_file,
            exe_key,
        } = facts;
        Ok(Memo {
            taken,
            status,
            status_file,
            exe_key,
            attested: Attested {
                pid: caller.pid(),
                uid: caller.uid(),
                gid: caller.gid(),
                executable,
                selectors,
            },
            pod,
        })
    }
}

// === impl UnixAttestorConfig ===

impl Default for UnixAttestorConfig {
    fn default() -> Self {
        Self {
            discover_workload_path: true,
            workload_size_limit: DEFAULT_WORKLOAD_SIZE_LIMIT,
        }
    }
}

// === impl AttestationError ===

impl AttestationError {
    /// True when the caller's own behaviour caused the failure (it exited,
    /// changed its credentials after connecting, or exec'd mid-attestation),
    /// as opposed to an agent-side or deployment fault worth an operator's
    /// attention.
    pub fn is_caller_fault(&self) -> bool {
        matches!(
            self,
            Self::CallerExited { .. }
                | Self::CredentialsChanged { .. }
                | Self::ExecutableChanged { .. }
        )
    }
}

/// Real peer processes for tests: a Python child that connects to a socket.
#[cfg(test)]
pub(crate) mod test_peer;

#[cfg(test)]
mod tests;
