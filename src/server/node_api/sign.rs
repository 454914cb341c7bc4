//! Signing for a node: every item is checked against the node's scope
//! (`server::scope::authorize_any` over the server's entries) before the
//! authority signs it; a refusal is recorded with the node's SPIFFE ID and
//! refuses the whole request (PermissionDenied).
//!
//! A JWT's claims are the node's to write, but not those that name an
//! identity: `sub` and every actor of an `act` chain (a task token's
//! exchangers, each matched on the node that holds the task) must be
//! identities the node may serve, and `iss`, when present, is the trust
//! domain's (`spiffe://<td>` or the fleet's OIDC issuer; `spiffe://<td>`
//! only with `act`). So a rooted node cannot mint a token saying that a
//! workload of another node acted, nor one claiming another issuer, nor
//! an exchanged token an OIDC relying party would take for its owner's.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use spiffe::{SpiffeId, TrustDomain};
use tonic::Status;

use super::{CallingNode, NodeApi, tasks, unix_ms};
use crate::audit::{AuditEvent, EventKind, Outcome};
use crate::authority::{JwtRequest, X509SvidRequest};
use crate::edge::status;
use crate::proto::server as pb;
use crate::server::scope::{self, Credential, Refusal, SignRequest};

/// Most X.509-SVIDs one request may ask for.
pub const MAX_BATCH: usize = 64;
/// Largest CSR, in bytes.
const MAX_CSR_LEN: usize = 4096;
/// Largest SPIFFE ID, in bytes (the SPIFFE spec's bound).
const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Most DNS names per SVID, and the longest name.
const MAX_DNS_NAMES: usize = 32;
const MAX_DNS_NAME_LEN: usize = 253;
/// Largest JWT claims object, in bytes.
const MAX_CLAIMS_LEN: usize = 16 * 1024;
/// Deepest `act` chain a JWT may carry: a task token's limit
/// (`task::claims::MAX_ACTOR_DEPTH`, which `server` may not name).
const MAX_ACTORS: usize = 8;
/// Longest `jti` a JWT may carry, in bytes (it is the audit record's
/// `token_id`; agents make 32 hex digits).
const MAX_JTI_LEN: usize = 256;

/// Signs each X.509-SVID of `request`, in order, or refuses them all.
pub(super) async fn x509_svids(
    api: &NodeApi,
    node: &CallingNode,
    request: pb::SignX509SvidsRequest,
) -> Result<pb::SignX509SvidsResponse, Status> {
    if request.requests.len() > MAX_BATCH {
        return Err(status::invalid(
            "requests",
            format!(
                "{} SVIDs asked for; at most {MAX_BATCH} per request",
                request.requests.len()
            ),
        ));
    }
    let mut checked = Vec::with_capacity(request.requests.len());
    for item in request.requests {
        status::bounded_bytes("csr", item.csr.len(), MAX_CSR_LEN)?;
        if item.dns_names.len() > MAX_DNS_NAMES {
            return Err(status::invalid(
                "dns_names",
                format!("at most {MAX_DNS_NAMES} names"),
            ));
        }
        for name in &item.dns_names {
            status::bounded("dns_names", name, MAX_DNS_NAME_LEN, "RFC 1035")?;
        }
        let spiffe_id = parse_id(api, &item.spiffe_id)?;
        let ttl = Duration::from_millis(item.ttl_ms);
        if ttl.is_zero() {
            return Err(status::invalid("ttl_ms", "must be more than zero"));
        }
        authorize(
            api,
            node,
            &SignRequest {
                spiffe_id: &spiffe_id,
                credential: Credential::X509,
                ttl,
                dns_names: &item.dns_names,
            },
        )?;
        checked.push(X509SvidRequest {
            csr: item.csr,
            spiffe_id,
            dns_names: item.dns_names,
            ttl,
        });
    }
    let mut svids = Vec::with_capacity(checked.len());
    for request in checked {
        let spiffe_id = request.spiffe_id.to_string();
        let signed = api
            .inner
            .authority
            .sign_x509_svid(request)
            .await
            .map_err(|e| status::authority(&e))?;
        api.record(AuditEvent {
            spiffe_id: Some(spiffe_id),
            node: Some(node.spiffe_id.to_string()),
            token_id: Some(signed.serial_hex()),
            ..AuditEvent::new(EventKind::IssueX509, Outcome::Allow)
        })?;
        svids.push(pb::SignedX509Svid {
            cert_chain: signed.chain.clone(),
            ca_id: signed.ca_id.clone(),
            serial: signed.serial.clone(),
            not_before_ms: unix_ms(signed.not_before),
            not_after_ms: unix_ms(signed.not_after),
        });
    }
    Ok(pb::SignX509SvidsResponse { svids })
}

/// Signs the claims of `request` as a JWT, when `sub` is an identity the
/// node may serve and `aud` is present.
pub(super) async fn jwt(
    api: &NodeApi,
    node: &CallingNode,
    request: pb::SignJwtRequest,
) -> Result<pb::SignJwtResponse, Status> {
    status::bounded_bytes("claims_json", request.claims_json.len(), MAX_CLAIMS_LEN)?;
    let claims: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&request.claims_json)
            .map_err(|e| status::invalid("claims_json", format!("not a JSON object: {e}")))?;
    let sub = claims
        .get("sub")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| status::invalid("claims_json", "sub (a SPIFFE ID) is required"))?;
    let spiffe_id = parse_id(api, sub)?;
    let has_audience = match claims.get("aud") {
        Some(serde_json::Value::String(a)) => !a.is_empty(),
        Some(serde_json::Value::Array(a)) => !a.is_empty(),
        _ => false,
    };
    if !has_audience {
        return Err(status::invalid("claims_json", "aud is required"));
    }
    check_issuer(api, &claims)?;
    let actors = actors_of(api, &claims)?;
    // The token's id in the trail, as on the agent's: the `jti`, never the
    // signing key's `kid` (which every token of a key shares).
    let jti = match claims.get("jti") {
        None => None,
        Some(serde_json::Value::String(jti)) => {
            status::bounded("jti", jti, MAX_JTI_LEN, "the node API's jti limit")?;
            Some(jti.clone())
        }
        Some(_) => return Err(status::invalid("claims_json", "jti must be a string")),
    };
    let mut not_after =
        UNIX_EPOCH + Duration::from_millis(u64::try_from(request.not_after_ms).unwrap_or_default());
    let ttl = not_after
        .duration_since(SystemTime::now())
        .map_err(|_| status::invalid("not_after_ms", "is in the past"))?;
    let txn = tasks::txn_of(&claims)?;
    let task = match &txn {
        // An exchange of a task token: `sub` may be another node's
        // workload; the exchange rule decides (`tasks`).
        Some(txn) if !actors.is_empty() => {
            Some(tasks::exchange(api, node, &claims, txn, &actors, &request.subject_token).await?)
        }
        _ => {
            authorize(
                api,
                node,
                &SignRequest {
                    spiffe_id: &spiffe_id,
                    credential: Credential::Jwt,
                    ttl,
                    dns_names: &[],
                },
            )?;
            for actor in &actors {
                authorize(api, node, &actor_request(actor))?;
            }
            match &txn {
                Some(txn) => {
                    Some(tasks::begin_or_renew(api, node, &claims, txn, &spiffe_id).await?)
                }
                None => None,
            }
        }
    };
    if let Some(task) = &task {
        not_after = not_after.min(task.not_after);
    }
    let signed = api
        .inner
        .authority
        .sign_jwt(JwtRequest {
            claims,
            not_after,
            subject_token: None,
        })
        .await
        .map_err(|e| status::authority(&e))?;
    api.record(AuditEvent {
        spiffe_id: Some(spiffe_id.to_string()),
        node: Some(node.spiffe_id.to_string()),
        token_id: jti,
        task_id: task.as_ref().map(|t| t.txn.clone()),
        actors: actors.iter().map(ToString::to_string).collect(),
        ..AuditEvent::new(
            task.as_ref().map_or(EventKind::IssueJwt, |t| t.event),
            Outcome::Allow,
        )
    })?;
    Ok(pb::SignJwtResponse {
        token: signed.token,
        kid: signed.kid,
        expires_at_ms: unix_ms(signed.expires_at),
    })
}

/// `iss`, when present, must name this trust domain: `spiffe://<td>`, or
/// the fleet's issuer (`[oidc] issuer`). Both, so that a node that has
/// not yet heard of a new issuer (or of its removal) on the sync stream
/// still gets its tokens signed.
fn check_issuer(
    api: &NodeApi,
    claims: &serde_json::Map<String, serde_json::Value>,
) -> Result<(), Status> {
    issuer_allowed(
        &api.inner.trust_domain,
        api.inner.authority.issuer(),
        claims,
    )
    .map_err(|problem| status::invalid("claims_json", problem))
}

/// [`check_issuer`]'s rule for the trust domain `trust_domain` and the
/// fleet's `issuer`. A token with `act` (an exchanged task token: its
/// `sub` is the task owner, its holder the newest actor) may carry
/// `spiffe://<td>` only, never the OIDC issuer: a relying party that
/// knows only OIDC ignores `act` and would take the holder for the owner.
fn issuer_allowed(
    trust_domain: &TrustDomain,
    issuer: Option<String>,
    claims: &serde_json::Map<String, serde_json::Value>,
) -> Result<(), String> {
    let trust_domain = trust_domain.id_string();
    let delegated = claims.contains_key("act");
    match claims.get("iss") {
        None => Ok(()),
        Some(serde_json::Value::String(iss)) if *iss == trust_domain => Ok(()),
        Some(serde_json::Value::String(iss)) if !delegated && issuer.as_ref() == Some(iss) => {
            Ok(())
        }
        Some(_) if delegated => Err(format!(
            "iss, when present, must be {trust_domain} in a token with act (an OIDC relying party would not see the actor)"
        )),
        Some(_) => Err(match issuer {
            Some(issuer) => format!("iss, when present, must be {issuer} or {trust_domain}"),
            None => format!("iss, when present, must be {trust_domain}"),
        }),
    }
}

/// The SPIFFE IDs of the `act` chain (RFC 8693: each actor an object with
/// `sub`, the one before it nested as its `act`), outermost first.
fn actors_of(
    api: &NodeApi,
    claims: &serde_json::Map<String, serde_json::Value>,
) -> Result<Vec<SpiffeId>, Status> {
    let mut actors = Vec::new();
    let mut next = claims.get("act");
    while let Some(actor) = next {
        let serde_json::Value::Object(actor) = actor else {
            return Err(status::invalid("claims_json", "act must be an object"));
        };
        if actors.len() == MAX_ACTORS {
            return Err(status::invalid(
                "claims_json",
                format!("act is deeper than {MAX_ACTORS} actors"),
            ));
        }
        let sub = actor
            .get("sub")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| status::invalid("claims_json", "every act has a sub (a SPIFFE ID)"))?;
        actors.push(parse_id(api, sub)?);
        next = actor.get("act");
    }
    Ok(actors)
}

fn parse_id(api: &NodeApi, value: &str) -> Result<SpiffeId, Status> {
    status::bounded(
        "spiffe_id",
        value,
        MAX_SPIFFE_ID_LEN,
        "the SPIFFE ID standard",
    )?;
    let id = SpiffeId::new(value).map_err(|e| status::invalid("spiffe_id", e))?;
    if id.trust_domain() != &api.inner.trust_domain {
        return Err(status::invalid(
            "spiffe_id",
            format!("{id} is not in trust domain {}", api.inner.trust_domain),
        ));
    }
    Ok(id)
}

/// What naming `actor` in a JWT asks of the node's scope: any JWT
/// lifetime of its entry will do (the token is the subject's, the actor is
/// only named in it).
pub(super) fn actor_request(actor: &SpiffeId) -> SignRequest<'_> {
    SignRequest {
        spiffe_id: actor,
        credential: Credential::Jwt,
        ttl: Duration::ZERO,
        dns_names: &[],
    }
}

/// The node-scope check of one request; a refusal is recorded and
/// returned as PermissionDenied.
pub(super) fn authorize(
    api: &NodeApi,
    node: &CallingNode,
    request: &SignRequest<'_>,
) -> Result<(), Status> {
    let entries = api.inner.registry.snapshot();
    let pods = api.pods();
    match scope::authorize_any(&entries.entries, &node.name, pods.on(&node.name), request) {
        Ok(_) => Ok(()),
        Err(refusal) => Err(refuse(api, node, request, &refusal)),
    }
}

fn refuse(
    api: &NodeApi,
    node: &CallingNode,
    request: &SignRequest<'_>,
    refusal: &Refusal,
) -> Status {
    let kind = match request.credential {
        Credential::X509 => EventKind::IssueX509,
        Credential::Jwt => EventKind::IssueJwt,
    };
    if let Err(e) = api.record(AuditEvent {
        spiffe_id: Some(request.spiffe_id.to_string()),
        node: Some(node.spiffe_id.to_string()),
        reason: Some(refusal.to_string()),
        ..AuditEvent::new(kind, Outcome::Deny)
    }) {
        return e;
    }
    tracing::warn!(node = %node.name, spiffe_id = %request.spiffe_id, "signing refused: {refusal}");
    status::denied(refusal.to_string())
}

#[cfg(test)]
mod tests {
    use serde_json::{Map, Value, json};
    use spiffe::TrustDomain;

    use super::issuer_allowed;

    fn claims(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }

    #[test]
    fn an_exchanged_token_never_carries_the_oidc_issuer() {
        let td = TrustDomain::new("fleet.test").expect("trust domain");
        let issuer = Some("https://oidc.fleet.test".to_owned());
        let act = json!({ "sub": "spiffe://fleet.test/b" });
        // A token without act: the trust domain or the fleet's issuer.
        for iss in ["spiffe://fleet.test", "https://oidc.fleet.test"] {
            assert!(issuer_allowed(&td, issuer.clone(), &claims(json!({ "iss": iss }))).is_ok());
        }
        // With act: the trust domain only, which no OIDC relying party
        // accepts; so the holder is never taken for the owner there.
        let refused = issuer_allowed(
            &td,
            issuer.clone(),
            &claims(json!({ "iss": "https://oidc.fleet.test", "act": act })),
        )
        .expect_err("an exchanged token under the OIDC issuer");
        assert!(refused.contains("spiffe://fleet.test"), "{refused}");
        assert!(
            issuer_allowed(
                &td,
                issuer.clone(),
                &claims(json!({ "iss": "spiffe://fleet.test", "act": act }))
            )
            .is_ok()
        );
        // Another issuer, either way: refused.
        for extra in [json!({}), json!({ "act": act })] {
            let mut c = claims(extra);
            c.insert("iss".into(), "https://evil.test".into());
            assert!(issuer_allowed(&td, issuer.clone(), &c).is_err());
        }
    }
}
