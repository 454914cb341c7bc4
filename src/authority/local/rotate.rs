//! The rotation schedule applied: upstream changes picked up, expired keys
//! retired, successors prepared, the state persisted and the bundle
//! published before any new key signs.

use std::sync::Arc;
use std::time::SystemTime;

use spiffe::TrustDomain;

use super::state::{self, jwt_key_path, to_pem, x509_key_path};
use super::{KeySet, LocalAuthority, RotationState};
use crate::authority::rotation::{self, Lifetime};
use crate::authority::upstream::{Upstream, UpstreamFiles};
use crate::authority::{AuthorityError, JwtKey, X509Authority, key_store};
use crate::bundle::TrustBundle;

// === impl LocalAuthority ===

impl LocalAuthority {
    /// Applies the rotation schedule at `now`: picks up a changed upstream
    /// CA, retires expired keys, prepares successors, persists, publishes.
    /// Returns when to look again.
    pub(in crate::authority) fn rotate_at(
        &self,
        now: SystemTime,
    ) -> Result<SystemTime, AuthorityError> {
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
        state::store(&self.inner.dir, &self.inner.trust_domain, &next)?;
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
                let message = crate::error::chain(&error);
                if state.read_failure.as_deref() == Some(message.as_str()) {
                    tracing::debug!(error = %crate::error::Chain(&error), "upstream CA files still unreadable; keeping the upstream CA in use");
                } else {
                    tracing::warn!(error = %crate::error::Chain(&error), "cannot re-read the upstream CA files; keeping the upstream CA in use");
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
                tracing::warn!(error = %crate::error::Chain(&error), "the upstream CA files changed but were refused; keeping the upstream CA in use");
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
pub(super) fn bundle_of(trust_domain: &TrustDomain, keys: &KeySet) -> TrustBundle {
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
