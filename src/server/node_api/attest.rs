//! `AttestNode`: a node without an SVID proves who it is and gets one.
//!
//! - A join token is consumed once (the store's atomic update) and admits
//!   the node it was created for.
//! - A projected service account token (`k8s_psat`) is reviewed by the
//!   Kubernetes API server (`server::k8s`); the node is the `spec.nodeName`
//!   of the pod the token is bound to, as the API has it. It is not single
//!   use: a node whose SVID expired attests again with its current token.
//!
//! Every admission and every refusal is in the server's audit trail; a
//! token is never recorded or logged.

use std::time::SystemTime;

use tonic::Status;

use super::{NodeApi, node_spiffe_id, node_svid_message, whole_seconds};
use crate::audit::{AuditEvent, EventKind, Outcome};
use crate::edge::status;
use crate::error::Chain;
use crate::proto::server as pb;
use crate::proto::server::attest_node_request::Credential;
use crate::server::join_token::{TokenHash, TokenRefusal};
use crate::server::k8s::{MAX_PSAT_LEN, PsatError};
use crate::server::scope::NodeName;
use crate::server::store::NodeRow;

/// A node admitted, and how.
struct Admitted {
    name: NodeName,
    attestation: &'static str,
    reason: String,
}

/// Admits the node `request` proves, and signs its SVID.
pub(super) async fn attest_node(
    api: &NodeApi,
    request: pb::AttestNodeRequest,
) -> Result<pb::AttestNodeResponse, Status> {
    let admitted = match request.credential {
        Some(Credential::JoinToken(token)) => by_join_token(api, &token).await?,
        Some(Credential::Psat(token)) => by_psat(api, &token).await?,
        None => {
            return Err(status::invalid(
                "credential",
                "a join token (node_attestation = \"join_token\") or a projected service account \
                 token (node_attestation = \"k8s_psat\") is required",
            ));
        }
    };
    let name = admitted.name;
    let svid = api.sign_node_svid(&name, request.csr).await?;
    let spiffe_id = node_spiffe_id(&api.inner.trust_domain, &name)
        .map_err(|e| status::internal("naming the node", &e))?;
    api.record(AuditEvent {
        node: Some(spiffe_id.to_string()),
        token_id: Some(svid.serial_hex()),
        reason: Some(admitted.reason),
        ..AuditEvent::new(EventKind::NodeAttest, Outcome::Allow)
    })?;
    api.inner
        .store
        .put_node(NodeRow {
            name: name.clone(),
            attestation: admitted.attestation.into(),
            // The certificate carries whole seconds: what a later call's
            // `not_before` is compared with.
            attested_at: whole_seconds(svid.not_before),
            svid_serial: svid.serial_hex(),
            svid_expires_at: svid.not_after,
            evicted: false,
        })
        .await
        .map_err(|e| status::agent_fault("recording the node", &e))?;
    tracing::info!(node = %name, attestation = admitted.attestation, serial = %svid.serial_hex(), "node attested");
    Ok(pb::AttestNodeResponse {
        node_name: name.to_string(),
        svid: Some(node_svid_message(&svid)),
        bundle: Some(api.bundle()?),
    })
}

/// Consumes the join token (once).
async fn by_join_token(api: &NodeApi, token: &str) -> Result<Admitted, Status> {
    let hash = TokenHash::of_presented(token).map_err(|e| refuse_token(api, None, &e))?;
    let now = SystemTime::now();
    let admission = api
        .inner
        .store
        .consume_join_token(hash, now)
        .await
        .map_err(|e| status::agent_fault("reading the join tokens", &e))?
        .ok_or(TokenRefusal::Unknown)
        .map_err(|e| refuse_token(api, None, &e))?;
    let name = admission
        .admit(now)
        .map_err(|e| refuse_token(api, Some(&admission.node), &e))?
        .clone();
    Ok(Admitted {
        name,
        attestation: "join_token",
        reason: "admitted by a join token".into(),
    })
}

/// Has the projected service account token reviewed by the API server.
async fn by_psat(api: &NodeApi, token: &str) -> Result<Admitted, Status> {
    let Some(kubernetes) = &api.inner.kubernetes else {
        return Err(status::failed_precondition(
            "this server has no [kubernetes] section, so it cannot check projected service \
             account tokens (k8s_psat); use a join token",
        ));
    };
    status::bounded_bytes("psat", token.len(), MAX_PSAT_LEN)?;
    if token.is_empty() {
        return Err(status::invalid("psat", "is empty"));
    }
    match kubernetes.review(token).await {
        Ok(pod) => Ok(Admitted {
            name: pod.node.clone(),
            attestation: "k8s_psat",
            reason: format!("admitted by the k8s_psat of {pod}"),
        }),
        Err(error) if error.is_refusal() => Err(refuse_psat(api, &error)),
        Err(error) => {
            tracing::warn!(error = %Chain(&error), "could not check a node's service account token");
            Err(status::unavailable(format!(
                "the server could not check the token: {}",
                Chain(&error)
            )))
        }
    }
}

/// Records a refused join token (never the token) and says why.
fn refuse_token(api: &NodeApi, node: Option<&NodeName>, refusal: &TokenRefusal) -> Status {
    let node_id = node.and_then(|n| node_spiffe_id(&api.inner.trust_domain, n).ok());
    if let Err(e) = api.inner.audit.record(AuditEvent {
        node: node_id.map(|id| id.to_string()),
        reason: Some(format!("join token refused: {refusal}")),
        ..AuditEvent::new(EventKind::NodeAttest, Outcome::Deny)
    }) {
        return status::audit(&e);
    }
    tracing::warn!(node = ?node.map(NodeName::as_str), "join token refused: {refusal}");
    status::unauthenticated(format!("join token refused: {refusal}"))
}

/// Records a refused service account token (never the token) and says
/// why.
fn refuse_psat(api: &NodeApi, refusal: &PsatError) -> Status {
    let reason = format!("k8s_psat refused: {}", Chain(refusal));
    if let Err(e) = api.inner.audit.record(AuditEvent {
        reason: Some(reason.clone()),
        ..AuditEvent::new(EventKind::NodeAttest, Outcome::Deny)
    }) {
        return status::audit(&e);
    }
    tracing::warn!("{reason}");
    status::unauthenticated(reason)
}
