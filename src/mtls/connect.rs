//! The agent's dialler: a tonic channel whose every (re)connection dials
//! the server's addresses in turn and runs the TLS handshake below HTTP/2.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::rustls::pki_types::ServerName;
use tonic::transport::{Channel, Endpoint, Uri};

use super::MtlsError;

/// tonic needs an HTTP URI to build requests; the connector ignores it and
/// dials the configured addresses. `http`: TLS is below the connector.
const PLACEHOLDER_URI: &str = "http://tether-server";
/// Most socket addresses tried for one host name: a name that resolves to
/// hundreds of records does not turn one dial into hundreds.
const MAX_RECORDS_PER_ADDRESS: usize = 16;

/// What each connection attempt of the channel needs.
#[derive(Clone)]
struct Dialer {
    addresses: Arc<[String]>,
    tls: TlsConnector,
    connect_timeout: Duration,
}

/// A channel to the server at the first of `addresses` (`host:port` each;
/// a host name is resolved and every record tried) that completes a TCP
/// connection and a TLS handshake under `config`, each attempt within
/// `connect_timeout`. The channel dials the same way again whenever it
/// reconnects, so a server that moved between the addresses is found.
///
/// When no address answers, the error is the last address's failure
/// (each one is logged at debug). A server that refuses this client's
/// certificate is seen at the first call, not here: in TLS 1.3 the client
/// finishes its handshake before the server has judged its certificate.
pub async fn connect(
    addresses: &[String],
    config: Arc<ClientConfig>,
    connect_timeout: Duration,
) -> Result<Channel, MtlsError> {
    if addresses.is_empty() {
        return Err(MtlsError::NoAddresses);
    }
    let dialer = Dialer {
        addresses: addresses.into(),
        tls: TlsConnector::from(config),
        connect_timeout,
    };
    // The first connection is dialled here, so its failure is ours to
    // report as it is (tonic would wrap it); tonic's reconnections dial
    // afresh.
    let first = Arc::new(Mutex::new(Some(dialer.dial().await?)));
    let connector = tower::service_fn(move |_: Uri| {
        let dialer = dialer.clone();
        let first = first.lock().unwrap_or_else(PoisonError::into_inner).take();
        async move {
            match first {
                Some(stream) => Ok(stream),
                None => dialer.dial().await,
            }
        }
    });
    Endpoint::from_static(PLACEHOLDER_URI)
        .connect_with_connector(connector)
        .await
        .map_err(MtlsError::Channel)
}

// === impl Dialer ===

impl Dialer {
    /// The first connection that completes its handshake; the last
    /// failure when none does (each is logged at debug).
    async fn dial(&self) -> Result<TokioIo<TlsStream<TcpStream>>, MtlsError> {
        let mut last = MtlsError::NoAddresses;
        for address in self.addresses.iter() {
            let records = match tokio::net::lookup_host(address.as_str()).await {
                Ok(records) => records.take(MAX_RECORDS_PER_ADDRESS).collect::<Vec<_>>(),
                Err(source) => {
                    last = MtlsError::Resolve {
                        address: address.clone(),
                        source,
                    };
                    tracing::debug!(error = %crate::error::Chain(&last), "server address skipped");
                    continue;
                }
            };
            if records.is_empty() {
                last = MtlsError::NoRecords(address.clone());
                continue;
            }
            for record in records {
                match self.dial_one(record).await {
                    Ok(stream) => return Ok(TokioIo::new(stream)),
                    Err(error) => {
                        tracing::debug!(error = %crate::error::Chain(&error), "server address failed");
                        last = error;
                    }
                }
            }
        }
        Err(last)
    }

    /// TCP and TLS to one socket address, within the connect timeout.
    async fn dial_one(&self, address: SocketAddr) -> Result<TlsStream<TcpStream>, MtlsError> {
        let attempt = async {
            let tcp = TcpStream::connect(address)
                .await
                .map_err(|source| MtlsError::Dial { address, source })?;
            // gRPC's small frames are latency-bound.
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%address, error = %crate::error::Chain(&error), "could not set TCP_NODELAY");
            }
            // The verifier ignores the name: the server is known by its
            // SPIFFE ID.
            let name = ServerName::IpAddress(address.ip().into());
            self.tls
                .connect(name, tcp)
                .await
                .map_err(|source| MtlsError::Handshake { address, source })
        };
        tokio::time::timeout(self.connect_timeout, attempt)
            .await
            .map_err(|_elapsed| MtlsError::Timeout {
                address,
                timeout: self.connect_timeout,
            })?
    }
}
