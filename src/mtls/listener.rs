//! The server's accept stream: TCP connections, each handshaken in its own
//! job under a timeout, yielded to tonic with the peer's verified SVID.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use spiffe::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use super::{MtlsError, verify};

/// How long the accept loop waits after a failed accept (out of file
/// descriptors, say) before it tries again, so it does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Bounds on the handshakes the accept stream runs.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeLimits {
    /// A connection that has not completed its TLS handshake by then is
    /// closed.
    pub timeout: Duration,
    /// At most this many handshakes run at once; further connections wait
    /// in the kernel's listen queue until one ends. At least 1 (0 is taken
    /// as 1, so the listener never stops accepting for good).
    pub max_in_flight: usize,
}

/// The peer of one mTLS connection, as request extensions carry it
/// ([`peer_svid`]).
#[derive(Debug, Clone)]
pub struct PeerSvid {
    /// The peer's TCP address.
    pub remote_addr: SocketAddr,
    /// The SPIFFE ID of the client certificate, verified at the handshake;
    /// `None` when the client sent none.
    pub spiffe_id: Option<SpiffeId>,
    /// The client certificate's serial, lowercase hex of its big-endian
    /// bytes (as the authority prints serials).
    pub serial_hex: Option<String>,
    /// When the client certificate expires. A connection outlives its
    /// certificate unless a service checks this per call.
    pub not_after: Option<SystemTime>,
    /// When the client certificate starts to be valid (a server compares
    /// it with when the peer was last admitted).
    pub not_before: Option<SystemTime>,
}

/// One accepted, handshaken connection: TLS over TCP, with its peer.
#[derive(Debug)]
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    peer: PeerSvid,
}

/// The accept loop's state.
struct Acceptor {
    listener: TcpListener,
    tls: TlsAcceptor,
    limits: HandshakeLimits,
    /// The handshakes running now; dropped (and so aborted) with the
    /// stream.
    handshakes: JoinSet<Option<TlsConn>>,
}

/// Accepts connections on `listener` forever and yields each once its
/// handshake has succeeded, for
/// `tonic::transport::Server::serve_with_incoming_shutdown`. A failed or
/// timed-out handshake is logged at debug with the peer's address and
/// dropped; it never ends the stream, and the stream never yields an
/// error. Dropping the stream aborts the handshakes under way.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    limits: HandshakeLimits,
) -> impl futures_util::Stream<Item = io::Result<TlsConn>> + Send + 'static {
    let acceptor = Acceptor {
        listener,
        tls: TlsAcceptor::from(config),
        limits,
        handshakes: JoinSet::new(),
    };
    futures_util::stream::unfold(acceptor, |mut acceptor| async move {
        let conn = acceptor.next().await;
        Some((Ok(conn), acceptor))
    })
}

/// The verified peer of `request`'s connection, when it came through
/// [`incoming`].
pub fn peer_svid<T>(request: &tonic::Request<T>) -> Option<&PeerSvid> {
    request.extensions().get::<PeerSvid>()
}

// === impl HandshakeLimits ===

impl Default for HandshakeLimits {
    /// Ten seconds per handshake, 64 at once.
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            max_in_flight: 64,
        }
    }
}

// === impl Acceptor ===

impl Acceptor {
    /// The next connection whose handshake succeeded.
    async fn next(&mut self) -> TlsConn {
        let max_in_flight = self.limits.max_in_flight.max(1);
        loop {
            let room = self.handshakes.len() < max_in_flight;
            // One of the two branches is always enabled: without room,
            // handshakes are running.
            tokio::select! {
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    match done {
                        Ok(Some(conn)) => return conn,
                        Ok(None) => {}
                        Err(error) => {
                            tracing::warn!(error = %crate::error::Chain(&error), "a TLS handshake job failed");
                        }
                    }
                }
                accepted = self.listener.accept(), if room => match accepted {
                    Ok((tcp, remote_addr)) => {
                        // gRPC's small frames are latency-bound.
                        if let Err(error) = tcp.set_nodelay(true) {
                            tracing::debug!(%remote_addr, error = %crate::error::Chain(&error), "could not set TCP_NODELAY");
                        }
                        let tls = self.tls.clone();
                        let timeout = self.limits.timeout;
                        self.handshakes.spawn(handshake(tls, tcp, remote_addr, timeout));
                    }
                    Err(error) => {
                        tracing::warn!(error = %crate::error::Chain(&error), "accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
            }
        }
    }
}

/// One connection's handshake, under `timeout`; `None` (logged) when it
/// fails.
async fn handshake(
    tls: TlsAcceptor,
    tcp: TcpStream,
    remote_addr: SocketAddr,
    timeout: Duration,
) -> Option<TlsConn> {
    let stream = match tokio::time::timeout(timeout, tls.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            tracing::debug!(%remote_addr, error = %crate::error::Chain(&error), "TLS handshake failed");
            return None;
        }
        Err(_elapsed) => {
            tracing::debug!(%remote_addr, ?timeout, "TLS handshake timed out");
            return None;
        }
    };
    match PeerSvid::of(remote_addr, &stream) {
        Ok(peer) => Some(TlsConn { stream, peer }),
        Err(error) => {
            // The verifier parsed the same certificate: not expected.
            tracing::warn!(%remote_addr, error = %crate::error::Chain(&error), "a verified client certificate cannot be read");
            None
        }
    }
}

// === impl PeerSvid ===

impl PeerSvid {
    /// The peer of a handshaken connection: the client certificate's facts
    /// when it sent one (already verified by the handshake).
    fn of(remote_addr: SocketAddr, stream: &TlsStream<TcpStream>) -> Result<Self, MtlsError> {
        let leaf = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first());
        let Some(leaf) = leaf else {
            return Ok(Self {
                remote_addr,
                spiffe_id: None,
                serial_hex: None,
                not_after: None,
                not_before: None,
            });
        };
        let facts = verify::leaf_facts(leaf)?;
        Ok(Self {
            remote_addr,
            spiffe_id: Some(facts.spiffe_id),
            serial_hex: Some(facts.serial_hex),
            not_after: Some(facts.not_after),
            not_before: Some(facts.not_before),
        })
    }
}

// === impl TlsConn ===

impl TlsConn {
    /// The connection's peer.
    pub fn peer(&self) -> &PeerSvid {
        &self.peer
    }
}

impl Connected for TlsConn {
    type ConnectInfo = PeerSvid;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
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
