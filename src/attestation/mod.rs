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
        if procfs::read_status(&self.proc_root, pid)? != memo.status {
            return Ok(false);
        }
        match memo.exe_key {
            Some(key) => Ok(procfs::stat_exe(&self.proc_root, pid)? == key),
            None => Ok(true),
        }
    }

    /// The caller's ancestors (parent first) as (pid, start time): kernel
    /// facts a task scope is recognised by. Blocking reads, off the runtime.
    pub async fn lineage(&self, caller: &Caller) -> Vec<(i32, u64)> {
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
            exe_key,
        } = facts;
        Ok(Memo {
            taken,
            status,
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
pub(crate) mod test_peer {
    use std::io::{BufRead, BufReader};
    use std::process::{Child, ChildStdin, Command, Stdio};

    use tempfile::TempDir;
    use tokio::net::{UnixListener, UnixStream};

    /// A child process connected to our listener, waiting for its stdin to close.
    pub(crate) struct Peer {
        pub(crate) child: Child,
        stdin: Option<ChildStdin>,
        _dir: TempDir,
    }

    /// Spawns a child that connects, runs `after_connect` (Python), says
    /// ready, then waits for stdin to close (or exits at once if `linger`
    /// is false). Returns once the child has connected, with the server side.
    pub(crate) async fn connect(after_connect: &str, linger: bool) -> (Peer, UnixStream) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let wait = if linger { "sys.stdin.read()" } else { "" };
        let script = format!(
            "import os, socket, sys\n\
             s = socket.socket(socket.AF_UNIX)\n\
             s.connect(sys.argv[1])\n\
             {after_connect}\n\
             print('ready', flush=True)\n\
             {wait}\n"
        );
        let python = if std::path::Path::new("/usr/bin/python3").exists() {
            "/usr/bin/python3"
        } else {
            "python3"
        };
        let mut child = Command::new(python)
            .arg("-c")
            .arg(script)
            .arg(&path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        // The connection sits in the backlog until accept, so blocking here is fine.
        BufReader::new(stdout).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "child did not connect");
        let (stream, _) = listener.accept().await.unwrap();
        let peer = Peer {
            child,
            stdin,
            _dir: dir,
        };
        (peer, stream)
    }

    impl Peer {
        pub(crate) fn pid(&self) -> i32 {
            i32::try_from(self.child.id()).unwrap()
        }

        /// Writes a line to the child's stdin.
        pub(crate) fn say(&mut self, line: &str) {
            use std::io::Write as _;
            let stdin = self.stdin.as_mut().unwrap();
            writeln!(stdin, "{line}").unwrap();
            stdin.flush().unwrap();
        }

        /// Lets the child exit normally and reaps it.
        pub(crate) fn finish(&mut self) {
            drop(self.stdin.take());
            self.child.wait().unwrap();
        }
    }

    impl Drop for Peer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use aws_lc_rs::digest;
    use tokio::net::UnixStream;

    use super::caller::PidfdSource;
    use super::*;
    use crate::registration::selector::Selector;

    fn sel(s: &str) -> Selector {
        s.parse().unwrap()
    }

    fn values(attested: &Attested, key: &str) -> Vec<String> {
        attested
            .selectors
            .iter()
            .filter(|s| s.key() == key)
            .map(|s| s.value()[key.len() + 1..].to_owned())
            .collect()
    }

    fn expected_sha256(path: &Path) -> String {
        let bytes = std::fs::read(path).unwrap();
        digest::digest(&digest::SHA256, &bytes)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[tokio::test]
    async fn attests_this_process() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let caller = Caller::from_stream(&ours).unwrap();
        assert_eq!(caller.pidfd_source(), PidfdSource::PeerPidfd);
        let attestor = Attestor::new(&AttestorConfig::default()).unwrap();
        let attested = attestor.attest(&caller).await.unwrap();

        let uid = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        assert_eq!(attested.pid, i32::try_from(std::process::id()).unwrap());
        assert_eq!((attested.uid, attested.gid), (uid, gid));
        let s = &attested.selectors;
        assert!(s.contains(&sel(&format!("unix:uid:{uid}"))));
        assert!(s.contains(&sel(&format!("unix:gid:{gid}"))));
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .unwrap()
            .unwrap();
        assert!(s.contains(&sel(&format!("unix:user:{}", user.name))));
        let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
            .unwrap()
            .unwrap();
        assert!(s.contains(&sel(&format!("unix:group:{}", group.name))));

        let mut want_groups: Vec<String> = nix::unistd::getgroups()
            .unwrap()
            .iter()
            .map(|g| g.as_raw().to_string())
            .collect();
        want_groups.sort();
        want_groups.dedup();
        let mut got_groups = values(&attested, "supplementary_gid");
        got_groups.sort();
        assert_eq!(got_groups, want_groups);

        let exe = std::env::current_exe().unwrap().canonicalize().unwrap();
        assert_eq!(attested.executable.as_deref(), Some(exe.as_path()));
        assert!(s.contains(&sel(&format!("unix:path:{}", exe.display()))));
        assert_eq!(values(&attested, "sha256"), [expected_sha256(&exe)]);

        // Every selector is one an entry could be written with.
        for selector in s {
            assert_eq!(sel(&selector.to_string()), *selector);
        }
    }

    #[tokio::test]
    async fn hash_cache_hits_on_the_same_binary() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let caller = Caller::from_stream(&ours).unwrap();
        let attestor = Attestor::new(&AttestorConfig::default()).unwrap();
        let first = attestor.attest(&caller).await.unwrap();
        assert_eq!(
            (attestor.unix.cache_len(), attestor.unix.cache_hits()),
            (1, 0)
        );
        // A clone shares the cache; a new connection attests in full.
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let caller = Caller::from_stream(&ours).unwrap();
        let second = attestor.clone().attest(&caller).await.unwrap();
        assert_eq!(
            (attestor.unix.cache_len(), attestor.unix.cache_hits()),
            (1, 1)
        );
        assert_eq!(first.selectors, second.selectors);
    }

    #[tokio::test]
    async fn a_connection_reuses_its_attestation_while_the_process_is_unchanged() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let caller = Caller::from_stream(&ours).unwrap();
        let attestor = Attestor::new(&AttestorConfig::default()).unwrap();
        let first = attestor.attest(&caller).await.unwrap();
        let memo = caller.memo().unwrap();
        let again = attestor.attest(&caller.clone()).await.unwrap();
        assert_eq!(first.selectors, again.selectors);
        // Reused, not redone: the same memo, and the hash cache never asked.
        assert!(Arc::ptr_eq(&memo, &caller.memo().unwrap()));
        assert_eq!(attestor.unix.cache_hits(), 0);
    }

    #[tokio::test]
    async fn a_caller_that_execs_after_connecting_is_refused() {
        // With and without an attestation remembered from before the exec.
        for attest_first in [true, false] {
            let exec_sleep = "print('ready', flush=True); sys.stdin.readline(); \
                              os.execv('/bin/sleep', ['sleep', '60'])";
            let (mut peer, stream) = test_peer::connect(exec_sleep, true).await;
            let caller = Caller::from_stream(&stream).unwrap();
            let attestor = Attestor::new(&AttestorConfig::default()).unwrap();
            if attest_first {
                let attested = attestor.attest(&caller).await.unwrap();
                assert!(values(&attested, "path")[0].contains("python"));
            }
            peer.say("exec now");
            let exe = PathBuf::from(format!("/proc/{}/exe", peer.pid()));
            tokio::time::timeout(Duration::from_secs(30), async {
                while !std::fs::read_link(&exe).is_ok_and(|p| p.ends_with("sleep")) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
            .expect("the peer never exec'd");
            let err = attestor.attest(&caller).await.unwrap_err();
            assert!(
                matches!(err, AttestationError::ExecutableChanged { pid } if pid == peer.pid()),
                "attest_first {attest_first}: {err:?}"
            );
            assert!(err.is_caller_fault());
            peer.child.kill().unwrap();
            peer.child.wait().unwrap();
        }
    }

    #[tokio::test]
    async fn attests_through_the_pidfd_open_fallback() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let caller = Caller::from_stream_with(&ours, PidfdSource::PidfdOpen).unwrap();
        assert_eq!(caller.pidfd_source(), PidfdSource::PidfdOpen);
        let attested = Attestor::new(&AttestorConfig::default())
            .unwrap()
            .attest(&caller)
            .await
            .unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        assert!(
            attested
                .selectors
                .contains(&sel(&format!("unix:uid:{uid}")))
        );
        assert_eq!(values(&attested, "sha256").len(), 1);
    }

    #[tokio::test]
    async fn caller_that_exited_is_refused() {
        for source in [PidfdSource::PeerPidfd, PidfdSource::PidfdOpen] {
            let (mut peer, stream) = test_peer::connect("", true).await;
            let caller = Caller::from_stream_with(&stream, source).unwrap();
            assert_eq!(caller.pid(), peer.pid());
            assert_eq!(caller.pidfd_source(), source);
            let attestor = Attestor::new(&AttestorConfig::default()).unwrap();
            // Alive: attested as the Python interpreter it runs.
            let attested = attestor.attest(&caller).await.unwrap();
            assert!(
                values(&attested, "path")[0].contains("python"),
                "{attested:?}"
            );

            peer.finish();
            let err = attestor.attest(&caller).await.unwrap_err();
            assert!(
                matches!(err, AttestationError::CallerExited { pid } if pid == peer.pid()),
                "{source:?}: {err:?}"
            );
            assert!(err.is_caller_fault());
            assert!(matches!(
                caller.ensure_alive(),
                Err(AttestationError::CallerExited { .. })
            ));
            tokio::time::timeout(Duration::from_secs(60), caller.exited())
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    #[ignore = "needs root (changes a child's credentials): scripts/test runs it"]
    async fn changed_credentials_are_refused() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "prerequisite missing: changing a child's credentials needs root"
        );
        let (_peer, stream) =
            test_peer::connect("os.setegid(65534); os.seteuid(65534)", true).await;
        let caller = Caller::from_stream(&stream).unwrap();
        assert_eq!(caller.uid(), 0);
        let err = Attestor::new(&AttestorConfig::default())
            .unwrap()
            .attest(&caller)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                AttestationError::CredentialsChanged {
                    peer_uid: 0,
                    proc_uid: 65534,
                    proc_gid: 65534,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.is_caller_fault());
    }

    #[tokio::test]
    async fn size_limit_omits_only_the_hash() {
        let config = AttestorConfig {
            unix: UnixAttestorConfig {
                workload_size_limit: 1,
                ..UnixAttestorConfig::default()
            },
            ..AttestorConfig::default()
        };
        let attestor = Attestor::new(&config).unwrap();
        for _ in 0..2 {
            // A new connection each time: attested in full, not remembered.
            let (ours, _theirs) = UnixStream::pair().unwrap();
            let caller = Caller::from_stream(&ours).unwrap();
            let attested = attestor.attest(&caller).await.unwrap();
            assert!(values(&attested, "sha256").is_empty());
            assert_eq!(values(&attested, "path").len(), 1);
        }
        // The "too large" verdict is cached too, so it is logged once.
        assert_eq!(attestor.unix.cache_hits(), 1);
    }

    #[tokio::test]
    async fn path_discovery_can_be_turned_off() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let caller = Caller::from_stream(&ours).unwrap();
        let config = AttestorConfig {
            unix: UnixAttestorConfig {
                discover_workload_path: false,
                ..UnixAttestorConfig::default()
            },
            ..AttestorConfig::default()
        };
        let attested = Attestor::new(&config)
            .unwrap()
            .attest(&caller)
            .await
            .unwrap();
        assert!(attested.executable.is_none());
        assert!(values(&attested, "path").is_empty());
        assert!(values(&attested, "sha256").is_empty());
        assert_eq!(values(&attested, "uid").len(), 1);
    }

    #[tokio::test]
    async fn unreadable_proc_is_an_agent_fault() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let caller = Caller::from_stream(&ours).unwrap();
        let attestor = Attestor::with_proc_root(
            &AttestorConfig::default(),
            PathBuf::from("/nonexistent-proc"),
        )
        .unwrap();
        let err = attestor.attest(&caller).await.unwrap_err();
        assert!(matches!(err, AttestationError::ReadProc { .. }), "{err:?}");
        assert!(!err.is_caller_fault());
    }

    #[test]
    fn config_defaults_and_unknown_fields() {
        let config: AttestorConfig = toml::from_str("").unwrap();
        assert!(config.unix.discover_workload_path);
        assert_eq!(config.unix.workload_size_limit, 256 * 1024 * 1024);

        let config: AttestorConfig =
            toml::from_str("[unix]\ndiscover_workload_path = false\n").unwrap();
        assert!(!config.unix.discover_workload_path);
        assert_eq!(config.unix.workload_size_limit, 256 * 1024 * 1024);

        assert!(toml::from_str::<AttestorConfig>("[unix]\nworkload_size_limt = 1\n").is_err());
        assert!(toml::from_str::<AttestorConfig>("[k8]\n").is_err());
        assert!(toml::from_str::<AttestorConfig>("[unix]\nworkload_size_limit = -1\n").is_err());
    }
}
