//! Who is calling: the connection's peer (from the kernel, at accept),
//! attested now. Shared by every service on the workload socket; its
//! failures map to gRPC codes in [`super::status::attestation`].

use tonic::{Request, Status};

use super::status;
use crate::attestation::{Attested, Attestor, Caller};
use crate::transport::PeerInfo;

/// The caller of `request`, attested.
pub async fn identify<T>(
    attestor: &Attestor,
    request: &Request<T>,
) -> Result<(Caller, Attested), Status> {
    let peer = request
        .extensions()
        .get::<PeerInfo>()
        .ok_or_else(status::no_peer)?;
    let caller = peer
        .caller
        .as_ref()
        .map_err(|e| status::attestation(e))?
        .clone();
    let started = std::time::Instant::now();
    let attested = attestor.attest(&caller).await;
    crate::telemetry::metrics().observe_attestation(started.elapsed());
    let attested = attested.map_err(|e| status::attestation(&e))?;
    Ok((caller, attested))
}
