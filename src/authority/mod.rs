//! Authority: the signing keys. The only module that touches CA or JWT
//! private keys.
//!
//! Owns the X.509 CAs ([`x509_ca`]) and JWT signing keys ([`jwt_keys`]) of
//! the trust domain, their files in `data_dir/authority/` ([`key_store`]),
//! and their rotation ([`rotation`]). Everyone else gets an [`Authority`]
//! handle: the active signer for each kind, and the trust bundle (published
//! on a `watch` whenever its content changes).
//!
//! Two kinds of X.509 authority (`[authority] kind`):
//! - `self_signed`: each CA is a self-signed root kept in the data dir, and
//!   the bundle holds those roots;
//! - `disk`: an upstream CA mounted by the operator ([`upstream`]) issues the
//!   agent's own intermediate CAs, and the bundle holds the upstream's trust
//!   anchor, so agents sharing one upstream trust each other's X.509-SVIDs.
//!   The intermediates rotate on the same schedule as self-signed roots
//!   without touching the bundle. The upstream files are re-read on every
//!   wake of the rotation loop (at least once a minute): a new upstream CA
//!   gets a new intermediate at once, and the old anchor stays in the bundle
//!   until the intermediates under it expire. JWT keys stay per agent: a
//!   JWT-SVID validates on another node only through federation or a shared
//!   JWT authority, which this module does not provide.
//!
//! A CA issued by another authority than the configured one (the upstream
//! changed, or `kind` did) signs no more; it stays until its `notAfter`, so
//! its anchor stays in the bundle for what it signed.
//!
//! Invariants:
//! - the anchor of every CA is in the published bundle before anything is
//!   signed with it, and stays there until everything it signed has expired
//!   (signatures are capped at the CA's expiry, an intermediate's at its
//!   upstream chain's);
//! - private keys live in files of mode 0600 (the upstream's: readable by its
//!   owner only) and in memory only inside this module; they are never logged
//!   (only `kid`s, CA ids and upstream serials are);
//! - a data dir written for another trust domain, a key that does not match
//!   its certificate, a key file others can read or an upstream CA that fails
//!   its checks stops the agent: it never starts empty over a damaged store.

pub mod jwt_keys;
pub mod key_store;
pub mod rotation;
pub mod upstream;
pub mod x509_ca;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rcgen::KeyPair;
use serde::{Deserialize, Serialize};
use spiffe::TrustDomain;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::bundle::TrustBundle;
pub use jwt_keys::JwtKey;
use key_store::KeyStoreError;
use rotation::Lifetime;
use upstream::{Fingerprint, Upstream, UpstreamError, UpstreamFiles};
pub use x509_ca::{LeafTemplate, SignedLeaf, X509Authority};

/// Newest version of `authority/state.json` this build reads and writes.
/// Version 2 records upstream chains; it is written only when a CA has one,
/// so a tether that predates them refuses the file instead of taking
/// intermediates for roots.
const STATE_VERSION: u32 = 2;
/// The version written when every CA is a self-signed root.
const STATE_VERSION_ROOTS_ONLY: u32 = 1;
/// How long the rotation loop waits after a failure before trying again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);
/// The rotation loop looks at the clock at least this often, so a wall
/// clock jump is noticed promptly.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Which authority signs for this agent (`[authority]` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthorityKind {
    /// A self-signed root created on first start and kept in the data dir.
    #[default]
    SelfSigned,
    /// The agent's own intermediate, issued by an upstream CA read from
    /// `cert_path` and `key_path`.
    Disk,
}

/// `[authority]` settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthorityConfig {
    /// Which authority signs.
    pub kind: AuthorityKind,
    /// `kind = "disk"`: the upstream CA certificate (PEM), optionally
    /// followed by its chain up to the trust anchor.
    pub cert_path: Option<PathBuf>,
    /// `kind = "disk"`: the upstream CA's private key (PEM, PKCS#8 or SEC1,
    /// P-256), readable by its owner only.
    pub key_path: Option<PathBuf>,
    /// Lifetime of each X.509 CA (with `kind = "disk"`, of each
    /// intermediate). X.509-SVIDs never outlive their CA.
    #[serde(with = "humantime_serde")]
    pub ca_ttl: Duration,
    /// Lifetime of each JWT signing key. JWT-SVIDs never outlive their key.
    #[serde(with = "humantime_serde")]
    pub jwt_key_ttl: Duration,
}

/// Why the authority could not load, sign or rotate.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    /// Reading or writing a key or the state file failed.
    #[error(transparent)]
    Store(#[from] KeyStoreError),
    /// The stored state cannot be trusted.
    #[error(
        "authority state in the data dir is damaged: {0}; refusing to start with it (restore the data dir from a backup, or move it away to start a new trust domain)"
    )]
    Corrupt(String),
    /// The data dir holds the keys of another trust domain.
    #[error(
        "the data dir holds the keys of trust domain {stored:?}, but trust_domain is {configured:?}; use another data_dir or the matching trust_domain"
    )]
    OtherTrustDomain {
        /// From the state file.
        stored: String,
        /// From the config.
        configured: String,
    },
    /// The state file was written by a newer tether.
    #[error("authority state version {0} is newer than this tether understands ({STATE_VERSION})")]
    NewerState(u32),
    /// No key is active (a rotation failure left none usable).
    #[error("no active {0} signing key")]
    NoActiveKey(&'static str),
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Rcgen(#[source] rcgen::Error),
    /// JWT signing failed.
    #[error("JWT signing: {0}")]
    Jwt(#[source] jsonwebtoken::errors::Error),
    /// The system random number generator failed.
    #[error("system random number generator failed")]
    Random,
    /// The upstream CA files were refused.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The configuration is incomplete (see [`AuthorityConfig::validate`]).
    #[error("{0}: {1}")]
    Config(&'static str, String),
}

/// The trust domain's keys at one instant.
#[derive(Debug)]
struct KeySet {
    /// CAs of the configured authority: they sign, per the schedule.
    x509: Vec<Arc<X509Authority>>,
    /// CAs of another authority (an older upstream, another `kind`): they
    /// sign no more and stay until their `notAfter`, with their anchors in
    /// the bundle.
    retiring: Vec<Arc<X509Authority>>,
    jwt: Vec<Arc<JwtKey>>,
    /// The bundle's sequence number: grows with every change of its content.
    sequence: u64,
}

/// Handle to the trust domain's signing keys. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Authority {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    trust_domain: TrustDomain,
    config: AuthorityConfig,
    dir: PathBuf,
    keys: watch::Sender<Arc<KeySet>>,
    bundle: watch::Sender<Arc<TrustBundle>>,
    /// Serialises rotations (the loop and start-up) and holds what only they
    /// use; signing never takes it.
    rotating: Mutex<RotationState>,
}

/// What the rotation loop keeps between wakes.
#[derive(Debug, Default)]
struct RotationState {
    /// `kind = "disk"`: the upstream CA in use.
    upstream: Option<Upstream>,
    /// Upstream files already refused, so each bad version is reported once.
    refused: Option<Fingerprint>,
    /// The last upstream read failure reported, so repeats drop to debug.
    read_failure: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredState {
    version: u32,
    trust_domain: String,
    sequence: u64,
    x509: Vec<StoredX509>,
    jwt: Vec<StoredJwt>,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredX509 {
    id: String,
    certificate: String,
    /// The certificates above it up to the anchor (PEM), for an intermediate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    upstream_chain: Vec<String>,
    issued_at: u64,
    activates_at: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredJwt {
    kid: String,
    not_before: u64,
    not_after: u64,
    activates_at: u64,
}

// === impl AuthorityConfig ===

impl Default for AuthorityConfig {
    fn default() -> Self {
        Self {
            kind: AuthorityKind::SelfSigned,
            cert_path: None,
            key_path: None,
            ca_ttl: Duration::from_secs(24 * 3600),
            jwt_key_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

impl AuthorityConfig {
    /// Checks what needs no I/O; returns the offending key
    /// (`authority.cert_path`, ...) and the problem. The files themselves
    /// are checked when the authority loads.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.ca_ttl.is_zero() {
            return Err(("authority.ca_ttl", "must be greater than zero".into()));
        }
        if self.jwt_key_ttl.is_zero() {
            return Err(("authority.jwt_key_ttl", "must be greater than zero".into()));
        }
        let paths = [
            ("authority.cert_path", &self.cert_path),
            ("authority.key_path", &self.key_path),
        ];
        for (key, path) in paths {
            match (self.kind, path) {
                (AuthorityKind::Disk, None) => {
                    return Err((key, "is required with kind = \"disk\"".into()));
                }
                (AuthorityKind::Disk, Some(path)) if !path.is_absolute() => {
                    return Err((key, format!("{} must be an absolute path", path.display())));
                }
                (AuthorityKind::SelfSigned, Some(_)) => {
                    // A path without `kind = "disk"` is a half-done setup:
                    // signing with a self-signed root instead would be silent.
                    return Err((key, "is only used with kind = \"disk\"".into()));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

// === impl Authority ===

impl Authority {
    /// Loads the keys kept in `data_dir/authority`, creating the trust
    /// domain's first keys on first start, and brings them up to date with
    /// the rotation schedule. Blocking file I/O: call before serving.
    pub fn load_or_create(
        trust_domain: TrustDomain,
        config: AuthorityConfig,
        data_dir: &Path,
    ) -> Result<Self, AuthorityError> {
        config
            .validate()
            .map_err(|(key, problem)| AuthorityError::Config(key, problem))?;
        let upstream = match (config.kind, &config.cert_path, &config.key_path) {
            (AuthorityKind::Disk, Some(cert_path), Some(key_path)) => {
                let upstream =
                    Upstream::load(cert_path, key_path, &trust_domain, SystemTime::now())?;
                tracing::info!(subject = upstream.subject(), serial = upstream.serial(), not_after = %humantime::format_rfc3339_seconds(upstream.not_after()), "loaded the upstream CA");
                Some(upstream)
            }
            _ => None,
        };
        let dir = data_dir.join("authority");
        key_store::ensure_private_dir(&dir)?;
        key_store::ensure_private_dir(&dir.join("keys"))?;
        let keys = load(&dir, &trust_domain)?;
        let bundle = Arc::new(bundle_of(&trust_domain, &keys));
        let authority = Self {
            inner: Arc::new(Inner {
                trust_domain,
                config,
                dir,
                keys: watch::channel(Arc::new(keys)).0,
                bundle: watch::channel(bundle).0,
                rotating: Mutex::new(RotationState {
                    upstream,
                    ..RotationState::default()
                }),
            }),
        };
        authority.rotate_at(SystemTime::now())?;
        Ok(authority)
    }

    /// The trust domain these keys sign for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.inner.trust_domain
    }

    /// The CA that signs X.509-SVIDs now.
    pub fn x509_signer(&self) -> Result<Arc<X509Authority>, AuthorityError> {
        let keys = self.inner.keys.borrow().clone();
        let lifetimes: Vec<Lifetime> = keys.x509.iter().map(|k| k.lifetime()).collect();
        rotation::active(&lifetimes, SystemTime::now())
            .map(|i| Arc::clone(&keys.x509[i]))
            .ok_or(AuthorityError::NoActiveKey("X.509"))
    }

    /// The key that signs JWTs now.
    pub fn jwt_signer(&self) -> Result<Arc<JwtKey>, AuthorityError> {
        let keys = self.inner.keys.borrow().clone();
        let lifetimes: Vec<Lifetime> = keys.jwt.iter().map(|k| k.lifetime()).collect();
        rotation::active(&lifetimes, SystemTime::now())
            .map(|i| Arc::clone(&keys.jwt[i]))
            .ok_or(AuthorityError::NoActiveKey("JWT"))
    }

    /// True when `cert_der` is a certificate one of this agent's CAs
    /// (signing or retiring) signed: an X.509-SVID this agent issued.
    pub fn issued_here(&self, cert_der: &[u8]) -> bool {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(cert_der) else {
            return false;
        };
        let keys = self.inner.keys.borrow().clone();
        keys.x509.iter().chain(keys.retiring.iter()).any(|ca| {
            x509_parser::parse_x509_certificate(ca.cert_der())
                .is_ok_and(|(_, ca)| cert.verify_signature(Some(ca.public_key())).is_ok())
        })
    }

    /// Signs a CRL for the CA `ca_id` (signing or retiring) listing
    /// `revoked` (serial bytes, revocation time). `None` when that CA is
    /// gone (its certificates have expired, and so need no CRL).
    pub fn sign_crl(
        &self,
        ca_id: &str,
        revoked: &[(Vec<u8>, SystemTime)],
        crl_number: u64,
        next_update: SystemTime,
    ) -> Result<Option<Vec<u8>>, AuthorityError> {
        let keys = self.inner.keys.borrow().clone();
        let Some(ca) = keys
            .x509
            .iter()
            .chain(keys.retiring.iter())
            .find(|ca| ca.id() == ca_id)
        else {
            return Ok(None);
        };
        let now = SystemTime::now();
        ca.sign_crl(
            revoked,
            crl_number,
            now,
            next_update
                .min(ca.lifetime().not_after)
                .max(now + Duration::from_secs(1)),
        )
        .map(Some)
    }

    /// True when `kid` names one of this agent's JWT signing keys.
    pub fn is_own_jwt_key(&self, kid: &str) -> bool {
        self.inner.keys.borrow().jwt.iter().any(|k| k.kid() == kid)
    }

    /// The trust domain's bundle as it is now.
    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.inner.bundle.borrow().clone()
    }

    /// Wakes whenever the bundle's content changes (a root or JWT key added
    /// or retired; not an intermediate rotating under the same anchor).
    pub fn subscribe_bundle(&self) -> watch::Receiver<Arc<TrustBundle>> {
        self.inner.bundle.subscribe()
    }

    /// The rotation loop: applies the schedule whenever something is due.
    pub async fn run(self, cancel: CancellationToken) {
        let mut last_failure: Option<String> = None;
        loop {
            let now = SystemTime::now();
            let authority = self.clone();
            let wait = match tokio::task::spawn_blocking(move || authority.rotate_at(now)).await {
                Ok(Ok(next)) => {
                    last_failure = None;
                    next.duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO)
                }
                Ok(Err(error)) => {
                    let message = error.to_string();
                    if last_failure.as_deref() == Some(message.as_str()) {
                        tracing::debug!(%error, "key rotation failed again; retrying");
                    } else {
                        tracing::error!(%error, "key rotation failed; retrying");
                    }
                    last_failure = Some(message);
                    RETRY_AFTER_FAILURE
                }
                Err(error) => {
                    tracing::error!(%error, "key rotation job failed; retrying");
                    RETRY_AFTER_FAILURE
                }
            };
            let wait = wait.clamp(Duration::from_millis(50), MAX_SLEEP);
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Applies the rotation schedule at `now`: picks up a changed upstream
    /// CA, retires expired keys, prepares successors, persists, publishes.
    /// Returns when to look again.
    fn rotate_at(&self, now: SystemTime) -> Result<SystemTime, AuthorityError> {
        let mut state = self
            .inner
            .rotating
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.refresh_upstream(&mut state, now);
        let upstream = state.upstream.as_ref();
        let signing_chain: &[Vec<u8>] = upstream.map_or(&[], Upstream::chain);
        let current = self.inner.keys.borrow().clone();

        // Only CAs of the configured authority sign. The others stay until
        // their notAfter, for their anchors; one that never activated signed
        // nothing and goes at once.
        let mut reclassified = false;
        let mut x509 = Vec::with_capacity(current.x509.len() + 1);
        let mut retiring = Vec::new();
        let mut gone: Vec<Arc<X509Authority>> = Vec::new();
        let everything = current.x509.iter().map(|ca| (ca, true));
        for (ca, was_signing) in everything.chain(current.retiring.iter().map(|ca| (ca, false))) {
            let signs = ca.upstream_chain() == signing_chain;
            reclassified |= signs != was_signing;
            if signs {
                x509.push(Arc::clone(ca));
            } else if ca.lifetime().activates_at > now {
                tracing::info!(
                    ca_id = ca.id(),
                    "dropped an unused X.509 CA issued by another authority"
                );
                gone.push(Arc::clone(ca));
            } else if ca.lifetime().not_after <= now {
                tracing::info!(ca_id = ca.id(), "retired expired X.509 CA");
                gone.push(Arc::clone(ca));
            } else {
                if was_signing {
                    tracing::info!(ca_id = ca.id(), until = %humantime::format_rfc3339_seconds(ca.lifetime().not_after), "X.509 CA issued by another authority signs no more; its anchor stays in the bundle until it expires");
                }
                retiring.push(Arc::clone(ca));
            }
        }

        let x509_lifetimes: Vec<Lifetime> = x509.iter().map(|k| k.lifetime()).collect();
        let jwt_lifetimes: Vec<Lifetime> = current.jwt.iter().map(|k| k.lifetime()).collect();
        let x509_plan = rotation::plan(&x509_lifetimes, now);
        let jwt_plan = rotation::plan(&jwt_lifetimes, now);
        let prepare_x509 = x509_plan
            .prepare
            .filter(|_| self.successor_outlives_active(upstream, &x509_lifetimes, now));

        let changed = reclassified
            || !gone.is_empty()
            || prepare_x509.is_some()
            || jwt_plan.prepare.is_some()
            || !x509_plan.expired.is_empty()
            || !jwt_plan.expired.is_empty();
        if !changed {
            return Ok(x509_plan.next_check.min(jwt_plan.next_check));
        }

        for &i in &x509_plan.expired {
            tracing::info!(ca_id = x509[i].id(), "retired expired X.509 CA");
            gone.push(Arc::clone(&x509[i]));
        }
        let mut x509 = without(&x509, &x509_plan.expired);
        let mut jwt = without(&current.jwt, &jwt_plan.expired);

        // New keys reach the disk before the state file names them, so a
        // crash in between leaves an unused key file, never a missing one.
        if let Some(activates_at) = prepare_x509 {
            let ttl = self.inner.config.ca_ttl;
            let td = &self.inner.trust_domain;
            let (ca, key) = match upstream {
                None => X509Authority::generate_self_signed(td, now, ttl, activates_at)?,
                Some(upstream) => {
                    X509Authority::generate_intermediate(td, upstream, now, ttl, activates_at)?
                }
            };
            key_store::write_secret(&x509_key_path(&self.inner.dir, ca.id()), &to_pem(&key.0))?;
            tracing::info!(ca_id = ca.id(), intermediate = upstream.is_some(), not_after = %humantime::format_rfc3339_seconds(ca.lifetime().not_after), activates_at = %humantime::format_rfc3339_seconds(activates_at), "prepared X.509 CA");
            x509.push(Arc::new(ca));
        }
        if let Some(activates_at) = jwt_plan.prepare {
            let lifetime = Lifetime::starting(now, self.inner.config.jwt_key_ttl, activates_at);
            let (key, der) = JwtKey::generate(lifetime)?;
            key_store::write_secret(&jwt_key_path(&self.inner.dir, key.kid()), &to_pem(&der))?;
            tracing::info!(kid = key.kid(), activates_at = %humantime::format_rfc3339_seconds(activates_at), "prepared JWT signing key");
            jwt.push(Arc::new(key));
        }

        let mut next = KeySet {
            x509,
            retiring,
            jwt,
            sequence: current.sequence,
        };
        // An intermediate rotating under the same anchor changes no bundle:
        // nobody is woken for it.
        let published = self.inner.bundle.borrow().clone();
        let bundle_changed = !bundle_of(&self.inner.trust_domain, &next).same_keys(&published);
        if bundle_changed {
            next.sequence += 1;
        }
        store(&self.inner.dir, &self.inner.trust_domain, &next)?;
        for old in &gone {
            key_store::remove(&x509_key_path(&self.inner.dir, old.id()))?;
        }
        for &i in &jwt_plan.expired {
            let old = &current.jwt[i];
            tracing::info!(kid = old.kid(), "retired expired JWT signing key");
            key_store::remove(&jwt_key_path(&self.inner.dir, old.kid()))?;
        }

        // Bundle first, then signers: whoever sees a new signer can already
        // see its anchor in the bundle.
        if bundle_changed {
            self.inner
                .bundle
                .send_replace(Arc::new(bundle_of(&self.inner.trust_domain, &next)));
        }
        self.inner.keys.send_replace(Arc::new(next));
        // Something changed: look again right away, the plan may go on
        // (an expired key removed and a successor due in the same instant).
        Ok(now)
    }

    /// A successor is worth preparing unless it would expire no later than
    /// the active CA: an intermediate cut short at its upstream's expiry
    /// cannot be outlived, and preparing ever shorter successors would only
    /// churn keys. Only renewing the upstream CA helps then.
    fn successor_outlives_active(
        &self,
        upstream: Option<&Upstream>,
        lifetimes: &[Lifetime],
        now: SystemTime,
    ) -> bool {
        let (Some(upstream), Some(active)) = (upstream, rotation::active(lifetimes, now)) else {
            return true;
        };
        let successor_not_after = (now + self.inner.config.ca_ttl).min(upstream.not_after());
        let worthwhile = successor_not_after > lifetimes[active].not_after;
        if !worthwhile {
            tracing::debug!(upstream_not_after = %humantime::format_rfc3339_seconds(upstream.not_after()), "no successor intermediate: it could not outlive the active one before the upstream CA expires");
        }
        worthwhile
    }

    /// `kind = "disk"`: re-reads the upstream files and switches to them
    /// when their content changed and passes every check. A file that fails
    /// is reported (once per version) and ignored: the old upstream stays.
    fn refresh_upstream(&self, state: &mut RotationState, now: SystemTime) {
        let (Some(current), Some(cert_path), Some(key_path)) = (
            state.upstream.as_ref(),
            self.inner.config.cert_path.as_deref(),
            self.inner.config.key_path.as_deref(),
        ) else {
            return;
        };
        let files = match UpstreamFiles::read(cert_path, key_path) {
            Ok(files) => files,
            Err(error) => {
                let message = error.to_string();
                if state.read_failure.as_deref() == Some(message.as_str()) {
                    tracing::debug!(%error, "upstream CA files still unreadable; keeping the upstream CA in use");
                } else {
                    tracing::warn!(%error, "cannot re-read the upstream CA files; keeping the upstream CA in use");
                }
                state.read_failure = Some(message);
                return;
            }
        };
        state.read_failure = None;
        let fingerprint = files.fingerprint();
        if fingerprint == current.fingerprint() || state.refused == Some(fingerprint) {
            return;
        }
        match Upstream::from_files(&files, &self.inner.trust_domain, now) {
            Ok(next) => {
                if next.chain() != current.chain() {
                    tracing::info!(
                        old_subject = current.subject(),
                        old_serial = current.serial(),
                        subject = next.subject(),
                        serial = next.serial(),
                        not_after = %humantime::format_rfc3339_seconds(next.not_after()),
                        "the upstream CA changed on disk; issuing a new intermediate from it"
                    );
                }
                state.upstream = Some(next);
                state.refused = None;
            }
            Err(error) => {
                tracing::warn!(%error, "the upstream CA files changed but were refused; keeping the upstream CA in use");
                state.refused = Some(fingerprint);
            }
        }
    }
}

/// `keys` minus the ones at the `expired` indexes.
fn without<T>(keys: &[Arc<T>], expired: &[usize]) -> Vec<Arc<T>> {
    keys.iter()
        .enumerate()
        .filter(|(i, _)| !expired.contains(i))
        .map(|(_, k)| Arc::clone(k))
        .collect()
}

/// The bundle: the anchors of every CA, oldest first and each once, and
/// every JWT key.
fn bundle_of(trust_domain: &TrustDomain, keys: &KeySet) -> TrustBundle {
    let mut cas: Vec<&Arc<X509Authority>> = keys.x509.iter().chain(&keys.retiring).collect();
    cas.sort_by_key(|ca| ca.lifetime().not_before);
    let mut anchors: Vec<Vec<u8>> = Vec::with_capacity(cas.len());
    for ca in cas {
        if !anchors.iter().any(|a| a.as_slice() == ca.anchor_der()) {
            anchors.push(ca.anchor_der().to_vec());
        }
    }
    TrustBundle::new(
        trust_domain.clone(),
        anchors,
        keys.jwt.iter().map(|k| k.public().clone()).collect(),
        keys.sequence,
    )
}

fn state_path(dir: &Path) -> PathBuf {
    dir.join("state.json")
}

fn x509_key_path(dir: &Path, id: &str) -> PathBuf {
    dir.join("keys").join(format!("x509-{id}.pem"))
}

fn jwt_key_path(dir: &Path, kid: &str) -> PathBuf {
    dir.join("keys").join(format!("jwt-{kid}.pem"))
}

fn to_pem(der: &[u8]) -> Vec<u8> {
    pem::encode(&pem::Pem::new("PRIVATE KEY", der)).into_bytes()
}

fn from_pem(path: &Path, bytes: &[u8]) -> Result<zeroize::Zeroizing<Vec<u8>>, AuthorityError> {
    let parsed = pem::parse(bytes)
        .map_err(|e| AuthorityError::Corrupt(format!("{}: {e}", path.display())))?;
    if parsed.tag() != "PRIVATE KEY" {
        return Err(AuthorityError::Corrupt(format!(
            "{}: expected a PKCS#8 PRIVATE KEY, found {}",
            path.display(),
            parsed.tag()
        )));
    }
    Ok(zeroize::Zeroizing::new(parsed.into_contents()))
}

fn load(dir: &Path, trust_domain: &TrustDomain) -> Result<KeySet, AuthorityError> {
    let path = state_path(dir);
    let Some(bytes) = key_store::read_public(&path)? else {
        return Ok(KeySet {
            x509: Vec::new(),
            retiring: Vec::new(),
            jwt: Vec::new(),
            sequence: 0,
        });
    };
    let state: StoredState = serde_json::from_slice(&bytes)
        .map_err(|e| AuthorityError::Corrupt(format!("{}: {e}", path.display())))?;
    if state.version > STATE_VERSION {
        return Err(AuthorityError::NewerState(state.version));
    }
    if state.trust_domain != trust_domain.as_str() {
        return Err(AuthorityError::OtherTrustDomain {
            stored: state.trust_domain,
            configured: trust_domain.to_string(),
        });
    }
    let mut x509 = Vec::with_capacity(state.x509.len());
    for stored in state.x509 {
        check_file_id(&stored.id)?;
        let key_path = x509_key_path(dir, &stored.id);
        let der = from_pem(&key_path, &key_store::read_secret(&key_path)?)?;
        let key = KeyPair::try_from(der.as_slice())
            .map_err(|e| AuthorityError::Corrupt(format!("{}: {e}", key_path.display())))?;
        let cert = pem::parse(&stored.certificate)
            .map_err(|e| AuthorityError::Corrupt(format!("CA {}: certificate: {e}", stored.id)))?;
        let upstream_chain = stored
            .upstream_chain
            .iter()
            .map(|c| pem::parse(c).map(pem::Pem::into_contents))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                AuthorityError::Corrupt(format!("CA {}: upstream chain: {e}", stored.id))
            })?;
        // Every CA loads as a signer; the first rotation sets aside those of
        // another authority than the configured one.
        x509.push(Arc::new(X509Authority::from_parts(
            stored.id,
            cert.into_contents(),
            upstream_chain,
            key,
            from_unix(stored.issued_at),
            from_unix(stored.activates_at),
        )?));
    }
    let mut jwt = Vec::with_capacity(state.jwt.len());
    for stored in state.jwt {
        check_file_id(&stored.kid)?;
        let key_path = jwt_key_path(dir, &stored.kid);
        let der = from_pem(&key_path, &key_store::read_secret(&key_path)?)?;
        let lifetime = Lifetime {
            not_before: from_unix(stored.not_before),
            not_after: from_unix(stored.not_after),
            activates_at: from_unix(stored.activates_at),
        };
        jwt.push(Arc::new(JwtKey::from_pkcs8(stored.kid, &der, lifetime)?));
    }
    Ok(KeySet {
        x509,
        retiring: Vec::new(),
        jwt,
        sequence: state.sequence,
    })
}

fn store(dir: &Path, trust_domain: &TrustDomain, keys: &KeySet) -> Result<(), AuthorityError> {
    let certificate = |der: &[u8]| pem::encode(&pem::Pem::new("CERTIFICATE", der));
    let cas = || keys.x509.iter().chain(&keys.retiring);
    let chained = cas().any(|k| !k.upstream_chain().is_empty());
    let state = StoredState {
        version: if chained {
            STATE_VERSION
        } else {
            STATE_VERSION_ROOTS_ONLY
        },
        trust_domain: trust_domain.to_string(),
        sequence: keys.sequence,
        x509: cas()
            .map(|k| StoredX509 {
                id: k.id().to_owned(),
                certificate: certificate(k.cert_der()),
                upstream_chain: k.upstream_chain().iter().map(|c| certificate(c)).collect(),
                issued_at: to_unix(k.lifetime().not_before),
                activates_at: to_unix(k.lifetime().activates_at),
            })
            .collect(),
        jwt: keys
            .jwt
            .iter()
            .map(|k| StoredJwt {
                kid: k.kid().to_owned(),
                not_before: to_unix(k.lifetime().not_before),
                not_after: to_unix(k.lifetime().not_after),
                activates_at: to_unix(k.lifetime().activates_at),
            })
            .collect(),
    };
    let json = serde_json::to_vec_pretty(&state)
        .map_err(|e| AuthorityError::Corrupt(format!("serialising state: {e}")))?;
    key_store::write_public(&state_path(dir), &json)?;
    Ok(())
}

/// Ids become file names: only what [`random_id`] produces is accepted.
fn check_file_id(id: &str) -> Result<(), AuthorityError> {
    if !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(())
    } else {
        Err(AuthorityError::Corrupt(format!(
            "key id {id:?} is not one tether wrote"
        )))
    }
}

fn to_unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn from_unix(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// 128 random bits, base64url: CA ids and `kid`s.
pub(crate) fn random_id() -> Result<String, AuthorityError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| AuthorityError::Random)?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// A positive 128-bit serial number (top bit clear, so DER needs no sign
/// byte). Random serials are unique with overwhelming probability and leak
/// nothing about issuance volume.
pub(crate) fn random_serial() -> Result<rcgen::SerialNumber, AuthorityError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| AuthorityError::Random)?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01 << 6; // never a leading zero byte: a fixed 16-byte length
    Ok(rcgen::SerialNumber::from_slice(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    #[test]
    fn first_start_creates_keys_and_restart_reuses_them() {
        let dir = tempfile::tempdir().unwrap();
        let a = Authority::load_or_create(td(), AuthorityConfig::default(), dir.path()).unwrap();
        let bundle = a.bundle();
        assert_eq!(bundle.x509_authorities().len(), 1);
        assert_eq!(bundle.jwt_authorities().len(), 1);
        let kid = a.jwt_signer().unwrap().kid().to_owned();
        drop(a);

        let b = Authority::load_or_create(td(), AuthorityConfig::default(), dir.path()).unwrap();
        assert!(
            b.bundle().same_keys(&bundle),
            "restart keeps the trust bundle"
        );
        assert_eq!(b.jwt_signer().unwrap().kid(), kid);

        use std::os::unix::fs::MetadataExt;
        for entry in std::fs::read_dir(dir.path().join("authority/keys")).unwrap() {
            let meta = entry.unwrap().metadata().unwrap();
            assert_eq!(meta.mode() & 0o777, 0o600);
        }
    }

    #[test]
    fn backdated_certificates_do_not_shift_the_rotation_schedule() {
        // Regression: the schedule once started at the backdated notBefore,
        // so short-lived CAs rotated far too early.
        let dir = tempfile::tempdir().unwrap();
        let config = AuthorityConfig {
            ca_ttl: Duration::from_secs(12),
            ..AuthorityConfig::default()
        };
        let before = SystemTime::now();
        let a = Authority::load_or_create(td(), config, dir.path()).unwrap();
        let prepare_at = a.x509_signer().unwrap().lifetime().prepare_successor_at();
        assert!(
            prepare_at >= before + Duration::from_secs(5),
            "{prepare_at:?}"
        );
        drop(a);
        let b = Authority::load_or_create(td(), config_12s(), dir.path()).unwrap();
        let reloaded = b.x509_signer().unwrap().lifetime().prepare_successor_at();
        assert!(
            reloaded >= before + Duration::from_secs(5),
            "after a restart too"
        );
    }

    fn config_12s() -> AuthorityConfig {
        AuthorityConfig {
            ca_ttl: Duration::from_secs(12),
            ..AuthorityConfig::default()
        }
    }

    #[test]
    fn other_trust_domain_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        Authority::load_or_create(td(), AuthorityConfig::default(), dir.path()).unwrap();
        let err = Authority::load_or_create(
            TrustDomain::new("other.org").unwrap(),
            AuthorityConfig::default(),
            dir.path(),
        )
        .unwrap_err();
        assert!(
            matches!(err, AuthorityError::OtherTrustDomain { .. }),
            "{err}"
        );
    }

    #[test]
    fn damaged_state_is_refused_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        Authority::load_or_create(td(), AuthorityConfig::default(), dir.path()).unwrap();
        let state = dir.path().join("authority/state.json");
        std::fs::write(&state, b"{ not json").unwrap();
        let err =
            Authority::load_or_create(td(), AuthorityConfig::default(), dir.path()).unwrap_err();
        assert!(err.to_string().contains("damaged"), "{err}");
        assert_eq!(
            std::fs::read(&state).unwrap(),
            b"{ not json",
            "never overwritten"
        );
    }

    #[test]
    fn mismatched_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = Authority::load_or_create(td(), AuthorityConfig::default(), dir.path()).unwrap();
        let id = a.x509_signer().unwrap().id().to_owned();
        drop(a);
        let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let path = x509_key_path(&dir.path().join("authority"), &id);
        key_store::write_secret(&path, &to_pem(&other.serialize_der())).unwrap();
        let err =
            Authority::load_or_create(td(), AuthorityConfig::default(), dir.path()).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
    }

    #[test]
    fn rotation_publishes_before_signing_and_retires_after_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let config = AuthorityConfig {
            kind: AuthorityKind::SelfSigned,
            ca_ttl: Duration::from_secs(600),
            jwt_key_ttl: Duration::from_secs(600),
            ..AuthorityConfig::default()
        };
        let a = Authority::load_or_create(td(), config, dir.path()).unwrap();
        let first_ca = a.x509_signer().unwrap().id().to_owned();
        let first_kid = a.jwt_signer().unwrap().kid().to_owned();
        let mut bundles = a.subscribe_bundle();
        bundles.mark_unchanged();

        // Half life: successors are published but do not sign yet.
        let start = a.x509_signer().unwrap().lifetime().not_before;
        a.rotate_at(start + Duration::from_secs(301)).unwrap();
        assert!(bundles.has_changed().unwrap());
        let bundle = a.bundle();
        assert_eq!(bundle.x509_authorities().len(), 2);
        assert_eq!(bundle.jwt_authorities().len(), 2);
        let keys = a.inner.keys.borrow().clone();
        let lifetimes: Vec<Lifetime> = keys.x509.iter().map(|k| k.lifetime()).collect();
        let at = |secs| start + Duration::from_secs(secs);
        assert_eq!(
            rotation::active(&lifetimes, at(400)),
            Some(0),
            "old CA signs until 5/6"
        );
        assert_eq!(
            rotation::active(&lifetimes, at(501)),
            Some(1),
            "new CA signs after 5/6"
        );

        // Past the first keys' expiry they leave the bundle and the disk.
        a.rotate_at(at(601)).unwrap();
        let bundle = a.bundle();
        let first_cert = keys.x509[0].cert_der().to_vec();
        assert!(!bundle.x509_authorities().contains(&first_cert));
        assert!(bundle.jwt_authority(&first_kid).is_none());
        assert!(!x509_key_path(&dir.path().join("authority"), &first_ca).exists());
    }
}
