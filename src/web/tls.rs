//! TLS below a listener's HTTP: where each handshake's configuration comes
//! from ([`TlsConfigSource`]), and the one source that reads a certificate
//! and key from files an operator provides ([`CertificateFiles`]; the
//! `https_web` profile, OIDC discovery over HTTPS).
//!
//! Invariant: a key file is trusted only as a secret (`trusted_fs`: owned
//! by the agent or root, one name, readable by its owner only), whatever
//! symlinks lead to it (a Kubernetes Secret volume's do).

use std::fs::File;
use std::io::{self, Read as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio_rustls::rustls::crypto::aws_lc_rs;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use zeroize::Zeroizing;

use crate::trusted_fs::{self, TrustedFsError};

/// The largest certificate or key file read (a chain of a few certificates
/// is a few KiB).
const MAX_PEM_FILE_LEN: u64 = 256 * 1024;
/// How often [`CertificateFiles`] looks at its files for a change.
const RECHECK_EVERY: Duration = Duration::from_secs(1);
/// The ALPN protocol offered: the kit speaks HTTP/1.1 only.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Whether a listener speaks TLS, and with which configuration.
#[derive(Clone)]
pub enum Tls {
    /// Plain HTTP (behind an ingress that terminates TLS, or loopback).
    Plain,
    /// HTTPS; the configuration is asked for at every handshake.
    Rustls(Arc<dyn TlsConfigSource>),
}

/// Where a listener's TLS configuration comes from.
pub trait TlsConfigSource: Send + Sync + 'static {
    /// The configuration for the next handshake. Called per connection, so
    /// a rotated certificate is presented from the next one on.
    fn server_config(&self) -> Result<Arc<ServerConfig>, WebError>;
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Plain => "Tls::Plain",
            Self::Rustls(_) => "Tls::Rustls",
        })
    }
}

/// A fixed configuration (one whose certificate resolver swaps the
/// certificate inside, as the SVID-based ones do).
impl TlsConfigSource for Arc<ServerConfig> {
    fn server_config(&self) -> Result<Arc<ServerConfig>, WebError> {
        Ok(Arc::clone(self))
    }
}

/// Why a TLS configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    /// A certificate or key file could not be read.
    #[error("reading {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A key file is not trusted as a secret.
    #[error("the TLS key file is not trusted")]
    Untrusted(#[source] TrustedFsError),
    /// A file is larger than any certificate chain or key.
    #[error("{} is over {MAX_PEM_FILE_LEN} bytes; it is not a certificate chain or a key", .0.display())]
    TooLarge(PathBuf),
    /// A certificate file holds no PEM certificate, or a broken one.
    #[error("{} holds no usable PEM certificate", path.display())]
    Certificates {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A key file holds no PEM private key, or a broken one.
    #[error("{} holds no usable PEM private key", path.display())]
    Key {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// rustls refused the pair (a key that is not the certificate's, or of
    /// a kind it cannot use).
    #[error("the certificate in {} and the key in {} do not make a TLS identity", cert_path.display(), key_path.display())]
    Pair {
        /// The certificate file.
        cert_path: PathBuf,
        /// The key file.
        key_path: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
}

/// A certificate chain and key from PEM files (`cert_path`, `key_path`),
/// re-read when either file changes (checked at most once a second, at a
/// handshake). A change that does not load is logged and the previous pair
/// stays in force.
pub struct CertificateFiles {
    cert_path: PathBuf,
    key_path: PathBuf,
    state: Mutex<Loaded>,
}

struct Loaded {
    config: Arc<ServerConfig>,
    stamp: Stamp,
    checked: Instant,
}

/// What tells a changed file: its identity, size and modification time,
/// for both files.
type Stamp = [(u64, u64, u64, i64, i64); 2];

// === impl CertificateFiles ===

impl std::fmt::Debug for CertificateFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateFiles")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl CertificateFiles {
    /// Reads the pair; an unreadable, untrusted or mismatched one is an
    /// error (the listener should not start with it).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, WebError> {
        let stamp = stamp(cert_path, key_path)?;
        let config = read_pair(cert_path, key_path)?;
        Ok(Self {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            state: Mutex::new(Loaded {
                config,
                stamp,
                checked: Instant::now(),
            }),
        })
    }
}

impl TlsConfigSource for CertificateFiles {
    fn server_config(&self) -> Result<Arc<ServerConfig>, WebError> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.checked.elapsed() >= RECHECK_EVERY {
            state.checked = Instant::now();
            match stamp(&self.cert_path, &self.key_path) {
                Ok(now) if now != state.stamp => match read_pair(&self.cert_path, &self.key_path) {
                    Ok(config) => {
                        state.config = config;
                        state.stamp = now;
                        tracing::info!(cert_path = %self.cert_path.display(), "TLS certificate reloaded");
                    }
                    Err(error) => {
                        tracing::warn!(error = %crate::error::Chain(&error), "the changed TLS certificate does not load; keeping the previous one");
                    }
                },
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(error = %crate::error::Chain(&error), "the TLS certificate files cannot be read; keeping the previous pair");
                }
            }
        }
        Ok(Arc::clone(&state.config))
    }
}

fn stamp(cert_path: &Path, key_path: &Path) -> Result<Stamp, WebError> {
    let one = |path: &Path| {
        std::fs::metadata(path)
            .map(|m| (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
            .map_err(|source| WebError::Read {
                path: path.to_owned(),
                source,
            })
    };
    Ok([one(cert_path)?, one(key_path)?])
}

/// The HTTPS configuration for a certificate chain and key read from
/// files: TLS 1.2 and 1.3 (relying parties are not all on 1.3), ALPN
/// `http/1.1`, no client certificates, no session resumption state kept.
fn read_pair(cert_path: &Path, key_path: &Path) -> Result<Arc<ServerConfig>, WebError> {
    let cert_pem = read_bounded(cert_path, false)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| WebError::Certificates {
            path: cert_path.to_owned(),
            source,
        })?;
    if chain.is_empty() {
        return Err(WebError::Certificates {
            path: cert_path.to_owned(),
            source: rustls::pki_types::pem::Error::NoItemsFound,
        });
    }
    let key_pem = read_bounded(key_path, true)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|source| WebError::Key {
        path: key_path.to_owned(),
        source,
    })?;
    let pair_error = |source| WebError::Pair {
        cert_path: cert_path.to_owned(),
        key_path: key_path.to_owned(),
        source,
    };
    let mut config = ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(pair_error)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(pair_error)?;
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    // No resumption: every client sees the pair in force at its handshake
    // (a reloaded certificate at once), and nothing is kept per client.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Reads an operator's file, following symlinks, at most
/// [`MAX_PEM_FILE_LEN`] bytes; a `secret` must be trusted as one.
fn read_bounded(path: &Path, secret: bool) -> Result<Zeroizing<Vec<u8>>, WebError> {
    let read_error = |source| WebError::Read {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(read_error)?;
    let meta = file.metadata().map_err(read_error)?;
    if secret {
        trusted_fs::check_file(path, &meta, true).map_err(WebError::Untrusted)?;
    }
    let mut bytes = Zeroizing::new(Vec::new());
    file.take(MAX_PEM_FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_PEM_FILE_LEN {
        return Err(WebError::TooLarge(path.to_owned()));
    }
    Ok(bytes)
}
