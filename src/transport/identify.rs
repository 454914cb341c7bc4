//! Who is calling: the connection's peer (from the kernel, at accept),
//! attested now. Shared by every service on the workload socket, with the
//! one mapping of attestation failures to gRPC codes.

use tonic::{Request, Status};

use super::PeerInfo;
use crate::attestation::{AttestationError, Attested, Attestor, Caller};

/// The caller of `request`, attested.
pub async fn identify<T>(
    attestor: &Attestor,
    request: &Request<T>,
) -> Result<(Caller, Attested), Status> {
    let peer = request
        .extensions()
        .get::<PeerInfo>()
        .ok_or_else(|| Status::internal("connection carries no peer credentials"))?;
    let caller = peer
        .caller
        .as_ref()
        .map_err(|e| attestation_status(e))?
        .clone();
    let started = std::time::Instant::now();
    let attested = attestor.attest(&caller).await;
    crate::telemetry::metrics().observe_attestation(started.elapsed());
    let attested = attested.map_err(|e| attestation_status(&e))?;
    Ok((caller, attested))
}

/// Attestation failed: the caller's own doing is Unauthenticated (with the
/// reason), an agent-side fault is Unavailable (details in the log), except
/// for a pod the kubelet could not tell about, where the reason (kubelet
/// down, pod not listed yet) is what the workload needs to know and holds
/// nothing secret.
pub fn attestation_status(error: &AttestationError) -> Status {
    if let AttestationError::Kubernetes { .. } = error {
        tracing::warn!(%error, "pod attestation failed");
        return Status::unavailable(format!("could not attest the calling process: {error}"));
    }
    // Not transient: retrying would not help.
    if let AttestationError::Cgroup { .. } = error {
        tracing::warn!(%error, "pod attestation refused");
        return Status::permission_denied(format!("could not attest the calling process: {error}"));
    }
    if error.is_caller_fault() {
        tracing::info!(%error, "caller refused during attestation");
        Status::unauthenticated(format!("could not verify the calling process: {error}"))
    } else {
        tracing::warn!(%error, "workload attestation failed");
        Status::unavailable("workload attestation failed; see the agent log")
    }
}
