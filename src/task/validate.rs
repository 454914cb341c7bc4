//! Task-token validation: [`crate::svid::jwt::validate`] (signature,
//! audience, expiry) and then the task rules: exactly one audience, a known
//! `tctx` version, a bounded lifetime, the task known and not ended (fail
//! closed for a token signed here; in fleet mode, another node's task
//! accepted only while this agent is fresh), the tool in `scope`, and the
//! `cnf` binding to the presenter's certificate.

use std::sync::Arc;

use spiffe::{SpiffeId, TrustDomain};

use super::claims::{self, Confirmation, TCTX_VERSION, TaskClaims};
use super::{Tasks, TokenRejection};
use crate::bundle::TrustBundle;
use crate::svid::jwt as jwt_svid;

/// A token that passed validation.
#[derive(Debug, Clone)]
pub struct ValidatedTaskToken {
    /// `sub`.
    pub spiffe_id: SpiffeId,
    /// The typed claims.
    pub claims: TaskClaims,
    /// Every claim, as JSON.
    pub raw_claims: serde_json::Map<String, serde_json::Value>,
}

// === impl Tasks ===

impl Tasks {
    /// Validates a task token for `audience` (and `tool`, and the
    /// presenter's certificate when the token is bound).
    pub fn validate(
        &self,
        token: &str,
        audience: &str,
        tool: Option<&str>,
        presenter_cert: Option<&[u8]>,
        bundle_for: impl Fn(&TrustDomain) -> Option<Arc<TrustBundle>>,
    ) -> Result<ValidatedTaskToken, TokenRejection> {
        let validated = self.validate_unbound(token, audience, bundle_for)?;
        let claims = &validated.claims;
        if let Some(tool) = tool
            && !claims.allows(tool)
        {
            return Err(TokenRejection::ToolNotAllowed(tool.to_owned()));
        }
        if let Some(Confirmation { x5t_s256 }) = &claims.cnf {
            let Some(cert) = presenter_cert else {
                return Err(TokenRejection::Binding(
                    "the token is bound to a certificate (cnf); present the certificate it is bound to",
                ));
            };
            if claims::thumbprint(cert) != *x5t_s256 {
                return Err(TokenRejection::Binding(
                    "the presented certificate is not the one the token is bound to",
                ));
            }
        }
        Ok(validated)
    }

    /// Validates a task token for `audience` as [`Tasks::validate`] does,
    /// but neither for a tool nor against a presenter's certificate: for a
    /// relying party that checks `cnf` against its own TLS peer
    /// (introspection, RFC 8705 section 3.2, answers with the `cnf`).
    pub fn validate_unbound(
        &self,
        token: &str,
        audience: &str,
        bundle_for: impl Fn(&TrustDomain) -> Option<Arc<TrustBundle>>,
    ) -> Result<ValidatedTaskToken, TokenRejection> {
        let validated = jwt_svid::validate(token, audience, bundle_for)?;
        if validated
            .claims
            .get("aud")
            .and_then(|a| a.as_array())
            .is_none_or(|a| a.len() != 1)
        {
            return Err(TokenRejection::NotATaskToken(
                "a task token has exactly one audience".into(),
            ));
        }
        // `validate` reports `aud` as an array; the typed claims hold one.
        let mut raw = validated.claims.clone();
        if let Some(serde_json::Value::Array(one)) = raw.get("aud").cloned() {
            raw.insert("aud".into(), one.into_iter().next().unwrap_or_default());
        }
        let claims: TaskClaims = serde_json::from_value(serde_json::Value::Object(raw))
            .map_err(|e| TokenRejection::NotATaskToken(e.to_string()))?;
        if claims.tctx.ver != TCTX_VERSION {
            return Err(TokenRejection::NotATaskToken(format!(
                "unknown tctx version {}",
                claims.tctx.ver
            )));
        }
        let lifetime = claims.exp.saturating_sub(claims.iat);
        let max = self.inner.config.max_token_ttl.as_secs();
        if lifetime > max {
            return Err(TokenRejection::TooLong(lifetime, max));
        }
        let own_domain = validated.spiffe_id.trust_domain() == self.trust_domain();
        self.check_task_of(&claims.txn, token, own_domain)?;
        Ok(ValidatedTaskToken {
            spiffe_id: validated.spiffe_id,
            claims,
            raw_claims: validated.claims,
        })
    }

    /// Rejects a token of an ended task. For a task this agent does not
    /// know: in fleet mode ([`Tasks::with_foreign`]), a token of this
    /// trust domain is another node's, accepted only while
    /// [`super::ForeignTasks::check`] allows it; otherwise a token signed
    /// here is refused (fail closed), and tokens signed elsewhere are
    /// judged by their signature alone.
    pub fn check_task(&self, txn: &str, token: &str) -> Result<(), TokenRejection> {
        let own_domain =
            peek_subject(token).is_some_and(|sub| sub.trust_domain() == self.trust_domain());
        self.check_task_of(txn, token, own_domain)
    }

    /// [`Tasks::check_task`], told whether the token's (verified) `sub` is
    /// in this agent's trust domain.
    fn check_task_of(
        &self,
        txn: &str,
        token: &str,
        own_domain: bool,
    ) -> Result<(), TokenRejection> {
        match self.get(txn) {
            Some(task) => match task.ended() {
                Some((reason, _)) => Err(TokenRejection::Ended {
                    txn: txn.to_owned(),
                    reason: reason.to_string(),
                }),
                // A task of this node the fleet ended (an operator's
                // `tether server task revoke`): refused from the moment
                // the end arrives, before the link ends it here too.
                None => match self.foreign().and_then(|f| f.ended(txn)) {
                    Some(reason) => Err(TokenRejection::Ended {
                        txn: txn.to_owned(),
                        reason,
                    }),
                    None => Ok(()),
                },
            },
            None => match self.foreign() {
                // Another node's task: its end reaches this agent through
                // the server. (Another trust domain's tasks are not the
                // server's: their signature is all there is to check.)
                Some(foreign) if own_domain => foreign.check(txn),
                _ => {
                    let kid = peek_kid(token).unwrap_or_default();
                    if self.inner.authority.is_own_jwt_key(&kid) {
                        Err(TokenRejection::UnknownTask(txn.chars().take(80).collect()))
                    } else {
                        Ok(())
                    }
                }
            },
        }
    }
}

/// The token's `sub`, unverified.
fn peek_subject(token: &str) -> Option<SpiffeId> {
    #[derive(serde::Deserialize)]
    struct Peek {
        sub: String,
    }
    let peek: Peek = jsonwebtoken::dangerous::insecure_decode_claims(token).ok()?;
    SpiffeId::new(&peek.sub).ok()
}

/// The token's `kid`, unverified.
fn peek_kid(token: &str) -> Option<String> {
    jsonwebtoken::decode_header(token).ok()?.kid
}
