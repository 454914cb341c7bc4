//! The process's own X.509-SVID, for the listeners that present one: the
//! server's node API and HTTPS endpoints (`spiffe://<td>/tether/server`),
//! and a standalone agent's `https_spiffe` bundle endpoint and
//! introspection listener ([`agent_spiffe_id`]).
//!
//! The key is made here and never leaves memory; the SVID is signed by the
//! process's own authority and renewed at half its remaining life into the
//! same [`SwappableIdentity`], so every TLS configuration holding it
//! presents the renewed one from its next handshake.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use spiffe::{SpiffeId, TrustDomain};
use tokio_util::sync::CancellationToken;

use crate::authority::{Authority, X509SvidRequest};
use crate::error::Chain;
use crate::mtls::{Identity, SwappableIdentity};

/// How long a retry waits after a failed renewal.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// The SPIFFE ID a standalone agent presents on its HTTPS listeners.
pub fn agent_spiffe_id(trust_domain: &TrustDomain) -> anyhow::Result<SpiffeId> {
    SpiffeId::new(format!("spiffe://{trust_domain}/tether/agent"))
        .context("naming the agent's own SVID")
}

/// Signs a first SVID for `spiffe_id`, living `ttl`; returns it and when it
/// expires.
pub async fn own_svid(
    authority: &Arc<dyn Authority>,
    spiffe_id: &SpiffeId,
    ttl: Duration,
) -> anyhow::Result<(SwappableIdentity, SystemTime)> {
    let (identity, expires) = sign(authority, spiffe_id, ttl).await?;
    Ok((SwappableIdentity::new(identity), expires))
}

async fn sign(
    authority: &Arc<dyn Authority>,
    spiffe_id: &SpiffeId,
    ttl: Duration,
) -> anyhow::Result<(Identity, SystemTime)> {
    let (key, csr) = tokio::task::spawn_blocking(crate::authority::key_and_csr)
        .await
        .with_context(|| format!("making the key of {spiffe_id}"))?
        .with_context(|| format!("making the key of {spiffe_id}"))?;
    let signed = authority
        .sign_x509_svid(X509SvidRequest {
            csr,
            spiffe_id: spiffe_id.clone(),
            dns_names: Vec::new(),
            ttl,
        })
        .await
        .with_context(|| format!("signing the SVID of {spiffe_id}"))?;
    let identity = Identity::new(signed.chain, key)
        .with_context(|| format!("loading the SVID of {spiffe_id}"))?;
    Ok((identity, signed.not_after))
}

/// Renews `identity` at half its remaining life until `cancel`; a failure
/// is retried every 10 s while the old SVID lasts.
pub async fn renew_own_svid(
    authority: Arc<dyn Authority>,
    spiffe_id: SpiffeId,
    ttl: Duration,
    identity: SwappableIdentity,
    mut expires: SystemTime,
    cancel: CancellationToken,
) {
    loop {
        let left = expires
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(left / 2) => {}
        }
        match sign(&authority, &spiffe_id, ttl).await {
            Ok((renewed, until)) => {
                identity.set(renewed);
                expires = until;
                tracing::info!(%spiffe_id, "own SVID renewed");
            }
            Err(error) => {
                tracing::error!(%spiffe_id, error = %Chain(error.as_ref()), "could not renew the process's own SVID; retrying in 10 s");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(RETRY_AFTER) => {}
                }
            }
        }
    }
}
