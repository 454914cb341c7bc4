//! The SVID this process presents, and the slot that lets a renewed one
//! take over without rebuilding a TLS configuration.

use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::SystemTime;

use spiffe::SpiffeId;
use tokio_rustls::rustls::SignatureScheme;
use tokio_rustls::rustls::client::ResolvesClientCert;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use zeroize::Zeroizing;

use super::{MtlsError, provider, verify};

/// An X.509-SVID and its private key, ready to present in a handshake.
/// Cheap to clone.
#[derive(Clone)]
pub struct Identity {
    certified: Arc<CertifiedKey>,
    spiffe_id: SpiffeId,
    not_after: SystemTime,
}

/// The [`Identity`] presented now, shared by every TLS configuration that
/// was handed a clone: [`SwappableIdentity::set`] changes what the next
/// handshake presents. Cheap to clone.
#[derive(Clone)]
pub struct SwappableIdentity {
    current: Arc<RwLock<Identity>>,
}

// === impl Identity ===

impl Identity {
    /// An identity from its chain (the leaf first, then any intermediates,
    /// DER each) and the leaf's PKCS#8 private key. The leaf must be an
    /// X.509-SVID (one SPIFFE ID as its URI SAN) and certify the key.
    pub fn new(
        chain_der: Vec<Vec<u8>>,
        mut key_pkcs8_der: Zeroizing<Vec<u8>>,
    ) -> Result<Self, MtlsError> {
        let leaf = chain_der.first().ok_or(MtlsError::EmptyChain)?;
        let facts = verify::leaf_facts(leaf)?;
        // Moved, not copied: the provider parses it into its own key and
        // drops these bytes.
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(std::mem::take(
            &mut *key_pkcs8_der,
        )));
        let signing_key = provider()
            .key_provider
            .load_private_key(key)
            .map_err(MtlsError::Key)?;
        let chain = chain_der.into_iter().map(CertificateDer::from).collect();
        let certified = CertifiedKey::new(chain, signing_key);
        certified.keys_match().map_err(MtlsError::KeyMismatch)?;
        Ok(Self {
            certified: Arc::new(certified),
            spiffe_id: facts.spiffe_id,
            not_after: facts.not_after,
        })
    }

    /// The SPIFFE ID the leaf certifies.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    /// When the leaf expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key: the ID and the expiry say which SVID this is.
        f.debug_struct("Identity")
            .field("spiffe_id", &format_args!("{}", self.spiffe_id))
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

// === impl SwappableIdentity ===

impl SwappableIdentity {
    /// A slot presenting `identity` until [`set`](Self::set) replaces it.
    pub fn new(identity: Identity) -> Self {
        Self {
            current: Arc::new(RwLock::new(identity)),
        }
    }

    /// Presents `identity` from the next handshake on. Open connections
    /// keep the one they were made with.
    pub fn set(&self, identity: Identity) {
        // A poisoned lock still holds a whole `Identity` (the write is a
        // single move): take it over rather than stop presenting.
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = identity;
    }

    /// The identity presented now.
    pub fn current(&self) -> Identity {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn certified(&self) -> Arc<CertifiedKey> {
        Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .certified,
        )
    }
}

impl fmt::Debug for SwappableIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SwappableIdentity")
            .field(&self.current())
            .finish()
    }
}

impl ResolvesServerCert for SwappableIdentity {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.certified())
    }
}

impl ResolvesClientCert for SwappableIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let certified = self.certified();
        // rustls sends no certificate when the key cannot sign with any
        // scheme the server accepts; the server then sees no client SVID.
        certified
            .key
            .choose_scheme(sigschemes)
            .is_some()
            .then_some(certified)
    }

    fn has_certs(&self) -> bool {
        true
    }
}
