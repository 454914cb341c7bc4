//! Signing task tokens: the one place a token's claims are assembled. Its
//! `exp` is capped by the token lifetime, the task's deadline, the signing
//! key's own expiry and, for an exchange, the subject token's `exp`.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::claims::{Actor, Confirmation, RequesterContext, TCTX_VERSION, TaskClaims, TaskContext};
use super::{Task, TaskError, Tasks, task_event};
use crate::audit::{AuditEvent, EventKind, Outcome};
use crate::authority::{AuthorityError, JwtRequest};
use crate::telemetry::metrics::{Kind, metrics};

/// A signed task token.
#[derive(Clone)]
pub struct IssuedToken {
    /// The compact JWS.
    pub token: String,
    /// Its `jti` (what the audit trail names, never the token).
    pub jti: String,
    /// Its `exp`.
    pub expires_at: SystemTime,
}

// === impl Task ===

impl Task {
    fn context(&self) -> TaskContext {
        TaskContext {
            ver: TCTX_VERSION,
            intent: self.intent.clone(),
            tools: self.tools.clone(),
            deadline: unix(self.deadline),
        }
    }

    pub(super) fn requester(&self) -> RequesterContext {
        RequesterContext {
            authn: "unix-peercred".into(),
            pid: self.owner.process.pid(),
            pid_start: self.owner.process.start_time(),
            uid: self.owner.uid,
            exe_sha256: self.owner.exe_sha256.clone(),
        }
    }
}

// === impl IssuedToken ===

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedToken")
            .field(
                "expires_at",
                &humantime::format_rfc3339_seconds(self.expires_at),
            )
            .finish_non_exhaustive()
    }
}

// === impl Tasks ===

impl Tasks {
    /// A fresh token for `task` (its own audience and tools), if it lives,
    /// recording which policies allowed the renewal.
    pub async fn token_for(
        &self,
        task: &Task,
        decided_by: Vec<String>,
    ) -> Result<IssuedToken, TaskError> {
        if let Some((reason, _)) = task.ended() {
            return Err(TaskError::Ended {
                id: task.id.clone(),
                reason: reason.to_string(),
            });
        }
        let token = self.issue_own(task).await?;
        self.inner.audit.record(AuditEvent {
            token_id: Some(token.jti.clone()),
            policy_ids: decided_by,
            ..task_event(task, EventKind::TaskRenew, Outcome::Allow)
        })?;
        metrics()
            .task_tokens_issued
            .get_or_create(&Kind { kind: "renew" })
            .inc();
        Ok(token)
    }

    /// A token of `task` as its owner gets it (begin, renew): the task's
    /// own audience, tools and binding, no actor.
    pub(super) async fn issue_own(&self, task: &Task) -> Result<IssuedToken, TaskError> {
        self.issue(
            task,
            &task.audience,
            &task.tools,
            None,
            task.bind_x5t.clone(),
            None,
            task.requester(),
        )
        .await
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "the claims that vary between begin, renew and exchange"
    )]
    pub(super) async fn issue(
        &self,
        task: &Task,
        audience: &str,
        tools: &[String],
        act: Option<Actor>,
        bind_x5t: Option<String>,
        not_after: Option<SystemTime>,
        rctx: RequesterContext,
    ) -> Result<IssuedToken, TaskError> {
        let now = SystemTime::now();
        let mut exp = (now + self.inner.config.token_ttl).min(task.deadline);
        if let Some(cap) = not_after {
            exp = exp.min(cap);
        }
        let claims = TaskClaims {
            iss: self.trust_domain().id_string(),
            sub: task.spiffe_id.to_string(),
            aud: audience.to_owned(),
            // Set by the authority, capped at its key's expiry.
            exp: 0,
            iat: unix(now),
            nbf: unix(now),
            jti: random_b64(16)?,
            txn: task.id.clone(),
            scope: tools.join(" "),
            tctx: task.context(),
            rctx,
            act,
            cnf: bind_x5t.map(|x5t_s256| Confirmation { x5t_s256 }),
        };
        let serde_json::Value::Object(mut body) =
            serde_json::to_value(&claims).map_err(|e| AuthorityError::BadRequest(e.to_string()))?
        else {
            return Err(
                AuthorityError::BadRequest("task claims are not a JSON object".into()).into(),
            );
        };
        body.remove("exp");
        let signed = self
            .inner
            .authority
            .sign_jwt(JwtRequest {
                claims: body,
                not_after: exp,
                subject_token: None,
            })
            .await?;
        task.state().tokens_issued += 1;
        Ok(IssuedToken {
            token: signed.token,
            jti: claims.jti,
            expires_at: signed.expires_at,
        })
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn random_b64(len: usize) -> Result<String, TaskError> {
    let mut bytes = vec![0u8; len];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| TaskError::Sign(AuthorityError::Random))?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}
