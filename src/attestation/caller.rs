//! The caller: the process at the other end of a Unix socket, as the kernel saw it.
//!
//! A PID alone is not an identity: the process can exit and the number be
//! handed to someone else while we are still reading /proc. So a [`Caller`]
//! holds a pidfd for the exact process that connected, taken from the
//! kernel's record of the connection (`SO_PEERPIDFD`), plus the process's
//! start time (which, with the PID, names the process in records that
//! outlive the pidfd). Anything read about the PID is trusted only if,
//! *afterwards*, [`Caller::ensure_alive`] confirms the pidfd has not exited:
//! the kernel cannot hand a PID to another process while the one holding
//! it has not exited, so every read before the check was about this process.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{getsockopt, sockopt};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::procfs::FileKey;
use super::{AttestationError, Memo, procfs};

/// The real /proc: caller liveness is a fact about this kernel, never a fixture.
const PROC_ROOT: &str = "/proc";

/// How often [`Caller::exited`] polls when the pidfd cannot be registered
/// with the reactor (a resource limit, not a normal path).
const EXIT_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Set once we have warned that the kernel lacks `SO_PEERPIDFD`.
static WARNED_NO_PEER_PIDFD: AtomicBool = AtomicBool::new(false);

/// A process as the kernel names it for good: pid and start time (a pid
/// reused by a new process has another start time). What budgets, SVIDs
/// bound to a process, and task owners are keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProcessKey {
    pid: i32,
    start_time: u64,
}

/// The peer of a Unix socket connection as the kernel reported it at connect time.
///
/// Cheap to clone: clones share one pidfd.
#[derive(Debug, Clone)]
pub struct Caller {
    pid: i32,
    uid: u32,
    gid: u32,
    /// `/proc/<pid>/stat` field 22, read at accept while the pidfd was alive.
    start_time: u64,
    /// The executable at accept (`stat /proc/<pid>/exe`); `None` when it
    /// could not be read, or for a process watched but never attested.
    exe: Option<FileKey>,
    process: Arc<Process>,
}

/// Where the pidfd came from, which decides how strong the PID-reuse guarantee is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PidfdSource {
    /// `SO_PEERPIDFD`: the kernel's own reference to the process that called
    /// `connect()`. Race-free.
    PeerPidfd,
    /// `pidfd_open(pid)` after `SO_PEERCRED`, for kernels before 6.5. If the
    /// peer exited and its PID was reused between `connect()` and `accept()`,
    /// this pins the newcomer; only the uid/gid comparison in attestation
    /// catches that, as in SPIRE.
    PidfdOpen,
}

/// The pinned process, shared by every clone of a [`Caller`].
#[derive(Debug)]
struct Process {
    pidfd: OwnedFd,
    source: PidfdSource,
    /// Registered with the tokio reactor on first [`Caller::exited`], since
    /// that needs a runtime and most callers never wait for exit. `None`
    /// when registration failed; waiters then poll.
    exit_watch: OnceLock<Option<AsyncFd<OwnedFd>>>,
    /// The last full attestation of this connection's caller.
    memo: Mutex<Option<Arc<Memo>>>,
}

// === impl ProcessKey ===

impl ProcessKey {
    /// The process with this pid that started at `start_time`
    /// (`/proc/<pid>/stat` field 22, clock ticks since boot).
    pub const fn new(pid: i32, start_time: u64) -> Self {
        Self { pid, start_time }
    }

    /// Its pid, in the agent's PID namespace.
    pub const fn pid(self) -> i32 {
        self.pid
    }

    /// Its start time, in clock ticks since boot.
    pub const fn start_time(self) -> u64 {
        self.start_time
    }
}

// === impl Caller ===

impl Caller {
    /// Identifies the peer of a just-accepted connection.
    ///
    /// Reads `SO_PEERCRED`, then `SO_PEERPIDFD`; on kernels without
    /// `SO_PEERPIDFD` falls back to `pidfd_open(pid)`. PID 0 (a peer in a
    /// PID namespace this agent cannot see) is refused, as is a peer that
    /// has already exited.
    pub fn from_stream(stream: &tokio::net::UnixStream) -> Result<Caller, AttestationError> {
        Self::from_stream_with(stream, PidfdSource::PeerPidfd)
    }

    /// [`Caller::from_stream`], with the fallback path selectable for tests.
    pub(crate) fn from_stream_with(
        stream: &tokio::net::UnixStream,
        preferred: PidfdSource,
    ) -> Result<Caller, AttestationError> {
        let cred = getsockopt(stream, sockopt::PeerCredentials)
            .map_err(AttestationError::PeerCredentials)?;
        let (pid, uid, gid) = (cred.pid(), cred.uid(), cred.gid());
        if pid <= 0 {
            return Err(AttestationError::NoPeerPid);
        }
        let (pidfd, source) = match preferred {
            PidfdSource::PeerPidfd => match peer_pidfd(stream, pid)? {
                Some(pidfd) => (pidfd, PidfdSource::PeerPidfd),
                None => (open_pidfd(pid)?, PidfdSource::PidfdOpen),
            },
            PidfdSource::PidfdOpen => (open_pidfd(pid)?, PidfdSource::PidfdOpen),
        };
        let process = Arc::new(Process::new(pidfd, source));
        // Read the start time and the executable, then check the pidfd: if
        // the process is still running now, what we read was its own.
        let start_time = process.read_start_time(pid)?;
        let exe = procfs::stat_exe(Path::new(PROC_ROOT), pid).ok();
        process.ensure_running(pid)?;
        Ok(Caller {
            pid,
            uid,
            gid,
            start_time,
            exe,
            process,
        })
    }

    /// Watches a process known from before (a task owner recorded before
    /// a restart): pins it with `pidfd_open` and checks it is still the
    /// process that started at `start_time`. A different start time means
    /// the PID now belongs to someone else: CallerExited.
    pub fn reattach(
        pid: i32,
        uid: u32,
        gid: u32,
        start_time: u64,
    ) -> Result<Caller, AttestationError> {
        if pid <= 0 {
            return Err(AttestationError::NoPeerPid);
        }
        let process = Arc::new(Process::new(open_pidfd(pid)?, PidfdSource::PidfdOpen));
        let current = process.read_start_time(pid)?;
        process.ensure_running(pid)?;
        if current != start_time {
            return Err(AttestationError::CallerExited { pid });
        }
        Ok(Caller {
            pid,
            uid,
            gid,
            start_time,
            exe: None,
            process,
        })
    }

    /// The caller's PID in the agent's PID namespace.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The process start time (`/proc/<pid>/stat` field 22, clock ticks
    /// since boot): with the PID, it names one process for good.
    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    /// The process as the kernel names it for good: pid and start time.
    pub fn key(&self) -> ProcessKey {
        ProcessKey::new(self.pid, self.start_time)
    }

    /// The effective uid at `connect()` (`SO_PEERCRED`).
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The effective gid at `connect()` (`SO_PEERCRED`).
    pub fn gid(&self) -> u32 {
        self.gid
    }

    /// The executable the process ran when it connected.
    pub(crate) fn executable_at_connect(&self) -> Option<FileKey> {
        self.exe
    }

    /// The last full attestation of this connection's caller, if any.
    pub(crate) fn memo(&self) -> Option<Arc<Memo>> {
        self.process.memo().clone()
    }

    /// Keeps `memo` for the next call on this connection.
    pub(crate) fn remember(&self, memo: Arc<Memo>) {
        *self.process.memo() = Some(memo);
    }

    /// How the pidfd was obtained.
    pub(crate) fn pidfd_source(&self) -> PidfdSource {
        self.process.source
    }

    /// Confirms the process that connected is still running: its pidfd
    /// has not signalled exit. A PID is not reused before its process has
    /// exited (and been reaped), so a running pidfd means the PID is still
    /// this process; re-reading its start time could only agree.
    ///
    /// Call it *after* reading anything about the PID; success means those
    /// reads described this caller.
    pub fn ensure_alive(&self) -> Result<(), AttestationError> {
        self.process.ensure_running(self.pid)
    }

    /// Resolves once the process has exited (immediately if it already has).
    ///
    /// Cancel-safe, and any number of clones may wait at once. Must be polled
    /// inside a tokio runtime.
    pub async fn exited(&self) {
        if let Some(watch) = self.process.exit_watch(self.pid) {
            loop {
                match watch.readable().await {
                    Ok(mut ready) => {
                        // Reactor readiness can be stale; ask the pidfd itself.
                        if self.process.has_exited().unwrap_or(true) {
                            return;
                        }
                        ready.clear_ready();
                    }
                    Err(error) => {
                        tracing::warn!(pid = self.pid, error = %crate::error::Chain(&error), "waiting on pidfd failed; polling");
                        break;
                    }
                }
            }
        }
        loop {
            // An error polling our own pidfd cannot be fixed by retrying;
            // report the process gone so its tokens are revoked (fail closed).
            if self.process.has_exited().unwrap_or(true) {
                return;
            }
            tokio::time::sleep(EXIT_POLL_INTERVAL).await;
        }
    }
}

// === impl Process ===

impl Process {
    fn new(pidfd: OwnedFd, source: PidfdSource) -> Self {
        Self {
            pidfd,
            source,
            exit_watch: OnceLock::new(),
            memo: Mutex::new(None),
        }
    }

    /// The memo slot; a poisoned lock still holds a whole `Option`.
    fn memo(&self) -> MutexGuard<'_, Option<Arc<Memo>>> {
        self.memo.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Err(CallerExited) once the pidfd reports exit.
    fn ensure_running(&self, pid: i32) -> Result<(), AttestationError> {
        match self.has_exited() {
            Ok(false) => Ok(()),
            Ok(true) => Err(AttestationError::CallerExited { pid }),
            Err(source) => Err(AttestationError::PollPidfd { pid, source }),
        }
    }

    /// A pidfd polls readable once the process has exited; any other event
    /// (hang-up after reaping, error) is read as exited too.
    fn has_exited(&self) -> Result<bool, Errno> {
        let mut fds = [PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN)];
        loop {
            match nix::poll::poll(&mut fds, PollTimeout::ZERO) {
                Ok(_) => break,
                Err(Errno::EINTR) => continue,
                Err(errno) => return Err(errno),
            }
        }
        Ok(fds[0].revents().is_some_and(|events| !events.is_empty()))
    }

    /// The start time, or CallerExited when /proc no longer has the PID and
    /// the pidfd agrees it is gone.
    fn read_start_time(&self, pid: i32) -> Result<u64, AttestationError> {
        procfs::read_start_time(Path::new(PROC_ROOT), pid).map_err(|error| {
            match self.ensure_running(pid) {
                Ok(()) => error,
                Err(exited) => exited,
            }
        })
    }

    #[expect(
        deprecated,
        reason = "tokio deprecated the safe AsyncFd constructors because an arbitrary T may \
                  change or close its fd; an OwnedFd cannot, so this use meets the contract of \
                  the unsafe replacement, which unsafe_code = forbid rules out"
    )]
    fn exit_watch(&self, pid: i32) -> Option<&AsyncFd<OwnedFd>> {
        self.exit_watch
            .get_or_init(|| {
                // A duplicate shares the open file; the reactor owns it and
                // ensure_alive keeps polling the original.
                let registered = self
                    .pidfd
                    .try_clone()
                    .and_then(|fd| AsyncFd::with_interest(fd, Interest::READABLE));
                match registered {
                    Ok(watch) => Some(watch),
                    Err(error) => {
                        tracing::warn!(pid, error = %crate::error::Chain(&error), "cannot register pidfd with the reactor; polling for exit");
                        None
                    }
                }
            })
            .as_ref()
    }
}

/// `SO_PEERPIDFD`, or `None` when this kernel does not know the option.
fn peer_pidfd(
    stream: &tokio::net::UnixStream,
    pid: i32,
) -> Result<Option<OwnedFd>, AttestationError> {
    match getsockopt(stream, sockopt::PeerPidfd) {
        Ok(pidfd) => Ok(Some(pidfd)),
        Err(Errno::ENOPROTOOPT) => {
            if !WARNED_NO_PEER_PIDFD.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "kernel lacks SO_PEERPIDFD (Linux < 6.5): using pidfd_open after accept, \
                     which cannot detect PID reuse between connect and accept by the same user"
                );
            }
            Ok(None)
        }
        // Linux 6.5 to 6.15 answer EINVAL when the peer has already been
        // reaped. Falling back to pidfd_open(pid) then could pin whoever
        // got the PID next, so this is the caller gone, not a missing feature.
        Err(Errno::EINVAL | Errno::ESRCH) => Err(AttestationError::CallerExited { pid }),
        Err(source) => Err(AttestationError::PeerPidfd(source)),
    }
}

fn open_pidfd(pid: i32) -> Result<OwnedFd, AttestationError> {
    let raw = rustix::process::Pid::from_raw(pid).ok_or(AttestationError::NoPeerPid)?;
    rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()).map_err(|errno| {
        if errno == rustix::io::Errno::SRCH {
            AttestationError::CallerExited { pid }
        } else {
            AttestationError::PidfdOpen {
                pid,
                source: io::Error::from(errno),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use tokio::net::UnixStream;

    use super::super::test_peer;
    use super::*;

    #[tokio::test]
    async fn reattach_finds_a_live_process_and_refuses_a_reused_pid() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let me = Caller::from_stream(&ours).unwrap();
        let again = Caller::reattach(me.pid(), me.uid(), me.gid(), me.start_time()).unwrap();
        again.ensure_alive().unwrap();
        let err = Caller::reattach(me.pid(), me.uid(), me.gid(), me.start_time() + 1).unwrap_err();
        assert!(
            matches!(err, AttestationError::CallerExited { .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn peer_of_a_pair_is_this_process() {
        for source in [PidfdSource::PeerPidfd, PidfdSource::PidfdOpen] {
            let (ours, _theirs) = UnixStream::pair().unwrap();
            let caller = Caller::from_stream_with(&ours, source).unwrap();
            assert_eq!(caller.pid(), i32::try_from(std::process::id()).unwrap());
            assert_eq!(caller.uid(), nix::unistd::geteuid().as_raw());
            assert_eq!(caller.gid(), nix::unistd::getegid().as_raw());
            assert_eq!(caller.pidfd_source(), source);
            caller.ensure_alive().unwrap();
            // We are alive, so exited() must not resolve.
            let waited = tokio::time::timeout(Duration::from_millis(50), caller.exited()).await;
            assert!(waited.is_err());
        }
    }

    #[tokio::test]
    async fn exited_resolves_when_a_live_caller_is_killed() {
        let (mut peer, stream) = test_peer::connect("", true).await;
        let caller = Caller::from_stream(&stream).unwrap();
        caller.ensure_alive().unwrap();

        // Cancel-safe: a wait that is dropped leaves nothing behind.
        let early = tokio::time::timeout(Duration::from_millis(50), caller.exited()).await;
        assert!(early.is_err());

        // Many clones wait on the one pidfd at once.
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let caller = caller.clone();
                tokio::spawn(async move { caller.exited().await })
            })
            .collect();
        tokio::task::yield_now().await;
        peer.child.kill().unwrap();
        for waiter in waiters {
            tokio::time::timeout(Duration::from_secs(60), waiter)
                .await
                .unwrap()
                .unwrap();
        }
        // Not yet reaped (a zombie) is already exited.
        assert!(matches!(
            caller.ensure_alive(),
            Err(AttestationError::CallerExited { .. })
        ));
        // And it stays resolved.
        tokio::time::timeout(Duration::from_secs(60), caller.exited())
            .await
            .unwrap();
        peer.finish();
    }

    #[tokio::test]
    async fn peer_gone_before_accept_is_refused() {
        for source in [PidfdSource::PeerPidfd, PidfdSource::PidfdOpen] {
            let (mut peer, stream) = test_peer::connect("", false).await;
            peer.finish();
            let err = Caller::from_stream_with(&stream, source).unwrap_err();
            assert!(
                matches!(err, AttestationError::CallerExited { pid } if pid == peer.pid()),
                "{source:?}: {err:?}"
            );
            assert!(err.is_caller_fault());
        }
    }
}
