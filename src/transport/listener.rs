//! The workload socket: binding it safely, and accepting connections with
//! the caller identified from the kernel at accept time.
//!
//! Binding refuses to take over a path that is not a stale socket: a live
//! agent answering on it, a symlink, a regular file. The socket is made
//! world-connectable (0777) on purpose: attestation, not file permissions,
//! decides what each caller gets. The path is unlinked when the
//! [`BoundSocket`] is dropped, but only if it is still our socket.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::Connected;

use super::authority::AuthorityFix;
use crate::attestation::{AttestationError, Caller};

/// Pause after an accept failure such as EMFILE, so a full fd table does
/// not turn the accept loop into a busy loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

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
    /// The file system refused.
    #[error("{path}: {source}")]
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
    path: PathBuf,
    listener: Option<UnixListener>,
    inode: u64,
}

/// The identity of the peer of one connection, as request extensions see it.
#[derive(Debug, Clone)]
pub struct PeerInfo(pub Result<Caller, Arc<AttestationError>>);

/// An accepted connection and its peer.
#[derive(Debug)]
pub struct PeerStream {
    stream: UnixStream,
    peer: PeerInfo,
    fix: AuthorityFix,
    _permit: OwnedSemaphorePermit,
}

// === impl BoundSocket ===

impl BoundSocket {
    /// Binds `path` with the given mode, creating its directory (0755) and
    /// removing a stale socket left by a crash.
    pub fn bind(path: &Path, mode: u32) -> Result<Self, BindError> {
        let io_err = |source| BindError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent()
            && !dir.exists()
        {
            std::fs::create_dir_all(dir).map_err(io_err)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .map_err(io_err)?;
        }
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
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err)?;
        let inode = std::fs::symlink_metadata(path).map_err(io_err)?.ino();
        Ok(Self {
            path: path.to_owned(),
            listener: Some(listener),
            inode,
        })
    }

    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
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
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.file_type().is_socket() && meta.ino() == self.inode => {
                if let Err(error) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), %error, "could not remove socket");
                }
            }
            _ => {}
        }
    }
}

/// Accepts connections forever, identifying each peer, holding at most
/// `max_connections` open at once (further clients wait in the backlog).
pub fn incoming(
    listener: UnixListener,
    max_connections: usize,
) -> impl futures_util::Stream<Item = io::Result<PeerStream>> {
    let slots = Arc::new(Semaphore::new(max_connections));
    futures_util::stream::unfold((listener, slots), |(listener, slots)| async move {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return None;
        };
        let item = match listener.accept().await {
            Ok((stream, _)) => {
                let peer = PeerInfo(Caller::from_stream(&stream).map_err(Arc::new));
                if let Err(error) = &peer.0 {
                    tracing::debug!(%error, "could not identify a connecting process");
                }
                Ok(PeerStream {
                    stream,
                    peer,
                    fix: AuthorityFix::default(),
                    _permit: permit,
                })
            }
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                Err(error)
            }
        };
        Some((item, (listener, slots)))
    })
}

// === impl PeerStream ===

impl Connected for PeerStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
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
                return Pin::new(&mut this.stream).poll_read(cx, buf);
            }
            let mut chunk = [0u8; 8192];
            let mut chunk_buf = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.stream).poll_read(cx, &mut chunk_buf) {
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
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stale_socket_is_replaced_live_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/agent.sock");
        let first = BoundSocket::bind(&path, 0o777).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o777, "world-connectable");
        let err = BoundSocket::bind(&path, 0o777).unwrap_err();
        assert!(matches!(err, BindError::InUse(_)), "{err}");

        // Simulate a crash: the listener closes but the file stays.
        let mut crashed = first;
        drop(crashed.take_listener());
        std::mem::forget(crashed);
        let second = BoundSocket::bind(&path, 0o777).unwrap();
        drop(second);
        assert!(!path.exists(), "unlinked on drop");
    }

    #[tokio::test]
    async fn refuses_non_sockets_and_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"keep me").unwrap();
        assert!(matches!(
            BoundSocket::bind(&file, 0o777),
            Err(BindError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(matches!(
            BoundSocket::bind(&link, 0o777),
            Err(BindError::NotASocket(_))
        ));
    }

    #[tokio::test]
    async fn replaced_path_is_not_unlinked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let bound = BoundSocket::bind(&path, 0o777).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"someone else's").unwrap();
        drop(bound);
        assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");
    }
}
