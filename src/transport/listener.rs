//! The workload socket: binding it safely, and accepting connections with
//! the caller identified from the kernel at accept time.
//!
//! Binding refuses to take over a path that is not a stale socket: a live
//! agent answering on it, a symlink, a regular file. The socket is made
//! world-connectable (0777) on purpose: attestation, not file permissions,
//! decides what each caller gets. The path is unlinked when the
//! [`BoundSocket`] is dropped, but only if it is still our socket.
//!
//! Accepting never waits on a budget: each connection is accepted at once
//! and, over a budget, closed unread (issue 15, finding 4). Every open
//! connection then holds its slots until it is closed: by the client, by
//! the handshake timeout (no HTTP/2 preface), by the idle timeout (nothing
//! in flight, see [`idle`](super::idle)), or by the drain at shutdown.

use std::future::Future as _;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;

use super::h2_authority::AuthorityFix;
use super::idle::Activity;
use super::slots::{ProcessSlots, Slot};
use crate::attestation::{AttestationError, Caller, ProcessKey};
use crate::registration::Registry;
use crate::trusted_fs::{self, TrustedFsError};

/// Pause after an accept failure such as EMFILE, so a full fd table does
/// not turn the accept loop into a busy loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The HTTP/2 client connection preface: what every gRPC client sends
/// first. A connection must get this far within the handshake timeout.
const PREFACE_LEN: usize = 24;

/// Where connections whose peer gives no uid are counted: together,
/// under one per-uid budget (`(uid_t) -1` is nobody's uid).
const UNIDENTIFIED_UID: u32 = u32::MAX;

/// Whose per-process connection budget a connection counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum BudgetHolder {
    /// The process the kernel named at accept.
    Process(ProcessKey),
    /// Every connection whose process the kernel could not name (gone or
    /// unreadable by then), together under one budget.
    Unidentified,
}

/// Bounds on the connections one socket holds.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Most connections open at once; further ones are closed as soon as
    /// they are accepted (never left waiting in the backlog).
    pub max_connections: usize,
    /// Most connections one process may hold open; more are closed as
    /// soon as they are accepted.
    pub max_per_process: usize,
    /// Most connections the processes of one uid may hold open together;
    /// more are closed as soon as they are accepted. One user's many
    /// processes cannot take every connection.
    pub max_per_uid: usize,
    /// The same, for a uid no registration entry can match
    /// ([`EntrySet::may_match_uid`](crate::registration::EntrySet::may_match_uid)):
    /// a user with no identity to get needs few connections. Applies only
    /// where [`incoming`] is given the entries.
    pub max_per_unmatched_uid: usize,
    /// A connection that has not sent the HTTP/2 preface this long after
    /// it was accepted is closed, so silent connections cannot hold the
    /// slots everyone else needs.
    pub handshake_timeout: Duration,
    /// A connection with no request in flight this long (counted from
    /// accept, then from the end of its last request) is closed. Only
    /// requests count, not bytes: PINGs keep nothing open.
    pub idle_timeout: Duration,
}

/// Why the socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Another process is serving on the path.
    #[error(
        "{0} is in use by a running agent (a connection to it succeeded); stop it or choose another socket_path"
    )]
    InUse(PathBuf),
    /// The path exists and is not a socket: never delete what we did not create.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// The socket's directory is someone else's or others may write it.
    #[error(transparent)]
    Untrusted(#[from] TrustedFsError),
    /// The file system refused.
    #[error("{path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A bound, listening socket; unlinks its path on drop.
#[derive(Debug)]
pub struct BoundSocket {
    identity: SocketIdentity,
    listener: Option<UnixListener>,
}

/// A bound socket's path and the file it was bound as, to tell whether the
/// path still leads to it. The file is its device and inode, and its birth
/// time where the file system keeps one: a socket bound in its place may
/// get the same inode number back (tmpfs and ext4 reuse them at once),
/// never the same birth time. (Not the change time: a chown or chmod of
/// the socket changes that, and is no replacement.)
#[derive(Debug, Clone)]
pub struct SocketIdentity {
    path: PathBuf,
    file: FileKey,
}

type FileKey = (u64, u64, Option<std::time::SystemTime>);

fn file_of(meta: &std::fs::Metadata) -> FileKey {
    (meta.dev(), meta.ino(), meta.created().ok())
}

/// The peer of one connection, as request extensions see it.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The process at the other end as the kernel named it at accept, or
    /// why it could not be named.
    pub caller: Result<Caller, Arc<AttestationError>>,
    /// The connection's requests in flight, counted by
    /// [`InFlightLayer`](super::idle::InFlightLayer).
    pub(super) activity: Arc<Activity>,
}

/// An accepted connection and its peer.
#[derive(Debug)]
pub struct PeerStream {
    stream: UnixStream,
    peer: PeerInfo,
    fix: AuthorityFix,
    /// Until the preface is in: the bytes still due, and the deadline.
    handshake: Option<(usize, Pin<Box<Sleep>>)>,
    /// Requests in flight on this connection, and since when none has been.
    activity: Arc<Activity>,
    idle_timeout: Duration,
    /// Fires when the connection may have been idle for `idle_timeout`;
    /// moved whenever it turns idle again.
    idle_deadline: Pin<Box<Sleep>>,
    /// Fires when the server gives up on its open connections (the drain
    /// after a stop is over): reads and writes fail from then on.
    closing: Pin<Box<WaitForCancellationFutureOwned>>,
    _permit: OwnedSemaphorePermit,
    _slot: Slot<BudgetHolder>,
    _uid_slot: Slot<u32>,
}

// === impl BoundSocket ===

impl BoundSocket {
    /// Binds `path` with mode `mode`, removing a stale socket left by a
    /// crash. Its directory is created with `dir_mode` when missing; an
    /// existing one must be trusted ([`trusted_fs::dir`]): in a directory
    /// someone else owns or may write, they could move the socket aside and
    /// answer in its place.
    pub fn bind(path: &Path, dir_mode: u32, mode: u32) -> Result<Self, BindError> {
        let io_err = |source| BindError::Io {
            path: path.to_owned(),
            source,
        };
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        trusted_fs::dir(dir, dir_mode)?;
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                match std::os::unix::net::UnixStream::connect(path) {
                    Ok(_) => return Err(BindError::InUse(path.to_owned())),
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        tracing::info!(path = %path.display(), "removing stale socket left by a previous run");
                        std::fs::remove_file(path).map_err(io_err)?;
                    }
                    Err(e) => return Err(io_err(e)),
                }
            }
            Ok(_) => return Err(BindError::NotASocket(path.to_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
        let listener = UnixListener::bind(path).map_err(io_err)?;
        trusted_fs::set_mode(path, mode)?;
        let meta = std::fs::symlink_metadata(path).map_err(io_err)?;
        Ok(Self {
            identity: SocketIdentity {
                path: path.to_owned(),
                file: file_of(&meta),
            },
            listener: Some(listener),
        })
    }

    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.identity.path
    }

    /// The path and the file bound there, to watch it.
    pub fn identity(&self) -> SocketIdentity {
        self.identity.clone()
    }

    /// Takes the listener out to serve on; the path stays owned by `self`.
    pub fn take_listener(&mut self) -> Option<UnixListener> {
        self.listener.take()
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        // Only unlink the socket we created: if the path was replaced (by an
        // operator, or another agent after we lost it) it is not ours.
        let path = &self.identity.path;
        if self.identity.problem().is_none()
            && let Err(error) = std::fs::remove_file(path)
        {
            tracing::warn!(path = %path.display(), error = %crate::error::Chain(&error), "could not remove socket");
        }
    }
}

// === impl SocketIdentity ===

impl SocketIdentity {
    /// Why clients connecting to the path no longer reach this socket
    /// (removed, or replaced by another file); `None` while they do.
    pub fn problem(&self) -> Option<String> {
        let path = self.path.display();
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.file_type().is_socket() && file_of(&meta) == self.file => None,
            Ok(_) => Some(format!(
                "socket {path} was replaced by another file; clients no longer reach this agent (restart it)"
            )),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Some(format!(
                "socket {path} was removed; clients no longer reach this agent (restart it)"
            )),
            Err(error) => Some(format!("socket {path}: {error}")),
        }
    }
}

/// Accepts connections forever, identifying each peer, within `limits`:
/// at most so many open at once, per uid and per process (more are
/// accepted and closed at once, never left waiting in the backlog); each
/// must send the HTTP/2 preface within the handshake timeout, and is closed
/// once idle for the idle timeout. With `entries`, a uid that no entry can
/// match gets the smaller per-uid budget; without (the admin socket), every
/// uid gets the same.
pub fn incoming(
    listener: UnixListener,
    limits: ConnectionLimits,
    entries: Option<Registry>,
    closing: CancellationToken,
) -> impl futures_util::Stream<Item = io::Result<PeerStream>> {
    let acceptor = Acceptor {
        listener,
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        per_process: ProcessSlots::new(limits.max_per_process, "max_connections_per_process"),
        per_uid: ProcessSlots::new(limits.max_per_uid, "max_connections_per_uid"),
        limits,
        entries,
        closing,
    };
    futures_util::stream::unfold(acceptor, |acceptor| async move {
        let item = acceptor.next().await?;
        Some((item, acceptor))
    })
}

/// The accept loop's state: the listener and the budgets it draws from.
struct Acceptor {
    listener: UnixListener,
    slots: Arc<Semaphore>,
    per_process: ProcessSlots<BudgetHolder>,
    per_uid: ProcessSlots<u32>,
    limits: ConnectionLimits,
    entries: Option<Registry>,
    closing: CancellationToken,
}

// === impl Acceptor ===

impl Acceptor {
    /// The next connection within the budgets; `None` once the
    /// connection budget is closed.
    async fn next(&self) -> Option<io::Result<PeerStream>> {
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(error = %crate::error::Chain(&error), "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    return Some(Err(error));
                }
            };
            // Accepted at once, whatever the budget: a client left waiting
            // in the backlog could exec another program before the agent
            // looked at it (issue 15, finding 4). Over the budget, it is
            // closed unread.
            let permit = match Arc::clone(&self.slots).try_acquire_owned() {
                Ok(permit) => permit,
                Err(TryAcquireError::NoPermits) => {
                    tracing::debug!("connection refused: max_connections connections are open");
                    continue;
                }
                Err(TryAcquireError::Closed) => return None,
            };
            let caller = Caller::from_stream(&stream).map_err(Arc::new);
            let (holder, uid) = match &caller {
                Ok(caller) => (BudgetHolder::Process(caller.key()), caller.uid()),
                Err(error) => {
                    tracing::debug!(error = %crate::error::Chain(&error), "could not identify a connecting process");
                    // The process is gone or unreadable; its uid is still
                    // the kernel's word.
                    let uid = stream.peer_cred().map_or(UNIDENTIFIED_UID, |c| c.uid());
                    (BudgetHolder::Unidentified, uid)
                }
            };
            // Closed unread when over either budget: the process (and its
            // uid) keep what they have.
            let slots = self.per_process.take(holder).and_then(|slot| {
                let (limit, setting) = self.uid_budget(uid);
                let uid_slot = self.per_uid.take_within(uid, limit, setting)?;
                Ok((slot, uid_slot))
            });
            let (slot, uid_slot) = match slots {
                Ok(slots) => slots,
                Err(exhausted) => {
                    let pid = match holder {
                        BudgetHolder::Process(process) => Some(process.pid()),
                        BudgetHolder::Unidentified => None,
                    };
                    tracing::debug!(pid, uid, %exhausted, "connection refused");
                    continue;
                }
            };
            let activity = Activity::new();
            return Some(Ok(PeerStream {
                stream,
                peer: PeerInfo {
                    caller,
                    activity: Arc::clone(&activity),
                },
                fix: AuthorityFix::default(),
                handshake: Some((
                    PREFACE_LEN,
                    Box::pin(tokio::time::sleep(self.limits.handshake_timeout)),
                )),
                activity,
                idle_timeout: self.limits.idle_timeout,
                idle_deadline: Box::pin(tokio::time::sleep(self.limits.idle_timeout)),
                closing: Box::pin(self.closing.clone().cancelled_owned()),
                _permit: permit,
                _slot: slot,
                _uid_slot: uid_slot,
            }));
        }
    }

    /// How many connections `uid`'s processes may hold together, and the
    /// setting that says so: the small budget when no registration entry
    /// can match the uid, as the entries are now.
    fn uid_budget(&self, uid: u32) -> (usize, &'static str) {
        match &self.entries {
            Some(entries) if !entries.snapshot().may_match_uid(uid) => (
                self.limits.max_per_unmatched_uid,
                "max_connections_per_unmatched_uid",
            ),
            _ => (self.limits.max_per_uid, "max_connections_per_uid"),
        }
    }
}

// === impl PeerStream ===

impl Connected for PeerStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

impl PeerStream {
    /// Reads from the socket, closing the connection (TimedOut) if the
    /// preface is not in by the handshake deadline, or once it has been
    /// idle for the idle timeout.
    fn poll_socket(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Poll::Ready(error) = self.poll_closing(cx) {
            return Poll::Ready(Err(error));
        }
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if let Some((due, _)) = &mut self.handshake {
                    *due = due.saturating_sub(buf.filled().len() - before);
                    if *due == 0 {
                        self.handshake = None;
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            // Only a peer that has sent nothing more is late: one whose
            // preface waits in the socket is read first.
            Poll::Pending => {
                let late = self
                    .handshake
                    .as_mut()
                    .is_some_and(|(_, deadline)| deadline.as_mut().poll(cx).is_ready());
                if late {
                    tracing::debug!(peer = ?self.peer.caller.as_ref().map(Caller::pid).ok(), "no HTTP/2 preface in time; closing");
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no HTTP/2 preface within the handshake timeout",
                    )));
                }
                if self.poll_idle(cx).is_ready() {
                    tracing::debug!(peer = ?self.peer.caller.as_ref().map(Caller::pid).ok(), "no request in flight for the idle timeout; closing");
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no request in flight within the idle timeout",
                    )));
                }
                Poll::Pending
            }
        }
    }

    /// Ready once the connection has had nothing in flight for the idle
    /// timeout; registers to be woken when that may be so otherwise.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.activity.idle_since() {
            Some(since) => {
                // A timeout past the clock's end never comes.
                let Some(deadline) = since.checked_add(self.idle_timeout) else {
                    return Poll::Pending;
                };
                if self.idle_deadline.deadline() != deadline {
                    self.idle_deadline.as_mut().reset(deadline);
                }
                self.idle_deadline.as_mut().poll(cx)
            }
            // Busy. Nothing wakes this read when the last request ends, so
            // look again a timeout from now: by then the connection has
            // turned idle (and the deadline moves to its idle time plus
            // the timeout) or is still busy.
            None => {
                if self.idle_deadline.as_mut().poll(cx).is_ready()
                    && let Some(next) = Instant::now().checked_add(self.idle_timeout)
                {
                    self.idle_deadline.as_mut().reset(next);
                    // Registers the waker for the new deadline.
                    let _ = self.idle_deadline.as_mut().poll(cx);
                }
                Poll::Pending
            }
        }
    }

    /// Ready with an error once the server has given up on its open
    /// connections; registers for that otherwise.
    fn poll_closing(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        self.closing.as_mut().poll(cx).map(|()| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the agent stopped; the connection outlived the drain",
            )
        })
    }
}

impl AsyncRead for PeerStream {
    /// Reads through [`AuthorityFix`] until it has decided the connection
    /// needs nothing, then straight from the socket.
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            let ready = this.fix.output();
            if !ready.is_empty() {
                let n = ready.len().min(buf.remaining());
                buf.put_slice(&ready[..n]);
                ready.drain(..n);
                return Poll::Ready(Ok(()));
            }
            if this.fix.is_passthrough() {
                return this.poll_socket(cx, buf);
            }
            let mut chunk = [0u8; 8192];
            let mut chunk_buf = ReadBuf::new(&mut chunk);
            match this.poll_socket(cx, &mut chunk_buf) {
                Poll::Ready(Ok(())) if chunk_buf.filled().is_empty() => {
                    this.fix.finish();
                    if this.fix.output().is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Ok(())) => this.fix.push(chunk_buf.filled())?,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Poll::Ready(error) = self.poll_closing(cx) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Poll::Ready(error) = self.poll_closing(cx) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[tokio::test]
    async fn stale_socket_is_replaced_live_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/agent.sock");
        let first = BoundSocket::bind(&path, 0o755, 0o777).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o777, "world-connectable");
        let err = BoundSocket::bind(&path, 0o755, 0o777).unwrap_err();
        assert!(matches!(err, BindError::InUse(_)), "{err}");

        // Simulate a crash: the listener closes but the file stays.
        let mut crashed = first;
        drop(crashed.take_listener());
        std::mem::forget(crashed);
        let second = BoundSocket::bind(&path, 0o755, 0o777).unwrap();
        drop(second);
        assert!(!path.exists(), "unlinked on drop");
    }

    #[tokio::test]
    async fn refuses_non_sockets_and_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"keep me").unwrap();
        assert!(matches!(
            BoundSocket::bind(&file, 0o755, 0o777),
            Err(BindError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(matches!(
            BoundSocket::bind(&link, 0o755, 0o777),
            Err(BindError::NotASocket(_))
        ));
    }

    #[tokio::test]
    async fn replaced_path_is_not_unlinked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let bound = BoundSocket::bind(&path, 0o755, 0o777).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"someone else's").unwrap();
        drop(bound);
        assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");
    }
}
