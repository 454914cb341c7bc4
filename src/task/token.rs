//! Signing task tokens: the one place a token's claims are signed. A
//! `Draft` holds them: a token of this agent's own task draws them from
//! the task (`Tasks::issue`); an exchanged token draws them from its
//! subject token (`exchange.rs`), whichever node's task it is. Its `exp`
//! is capped by the token lifetime, the task's deadline, the signing key's
//! own expiry and, for an exchange, the subject token's `exp`.

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

    /// A token of this agent's `task`, its claims from the task itself.
    #[expect(
        clippy::too_many_arguments,
        reason = "the claims that vary between begin, renew and the tests' tokens"
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
        let draft = Draft {
            sub: task.spiffe_id.to_string(),
            txn: task.id.clone(),
            tctx: task.context(),
            rctx,
            audience: audience.to_owned(),
            tools: tools.to_vec(),
            act,
            cnf: bind_x5t.map(|x5t_s256| Confirmation { x5t_s256 }),
            not_after: not_after.map_or(task.deadline, |cap| cap.min(task.deadline)),
            subject_token: None,
        };
        let token = self.sign_draft(draft).await?;
        task.state().tokens_issued += 1;
        Ok(token)
    }

    /// The `iss` of this agent's task tokens: the OIDC issuer when one is
    /// configured (the fleet's, on a fleet agent), else `spiffe://<td>`;
    /// always `spiffe://<td>` for an exchanged token (`act`). Its `sub` is
    /// the task owner while another workload holds it: a relying party
    /// that knows only OIDC would ignore `act` and take the holder for the
    /// owner, so an exchanged token is never one such a relying party
    /// accepts. Only tether's validators (which read `act`) take it.
    pub(super) fn issuer(&self, exchanged: bool) -> String {
        let own = || self.trust_domain().id_string();
        if exchanged {
            return own();
        }
        self.inner.authority.issuer().unwrap_or_else(own)
    }

    /// Signs `draft`: `iss` is [`Self::issuer`], `jti`, `iat` and `nbf`
    /// are fresh, and `exp` is capped by the token lifetime, the draft's
    /// `not_after` and the signing key's own expiry.
    pub(super) async fn sign_draft(&self, draft: Draft) -> Result<IssuedToken, TaskError> {
        let now = SystemTime::now();
        let exp = (now + self.inner.config.token_ttl).min(draft.not_after);
        let claims = TaskClaims {
            iss: self.issuer(draft.act.is_some()),
            sub: draft.sub,
            aud: draft.audience,
            // Set by the authority, capped at its key's expiry.
            exp: 0,
            iat: unix(now),
            nbf: unix(now),
            jti: random_b64(16)?,
            txn: draft.txn,
            scope: draft.tools.join(" "),
            tctx: draft.tctx,
            rctx: draft.rctx,
            act: draft.act,
            cnf: draft.cnf,
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
                subject_token: draft.subject_token,
            })
            .await?;
        Ok(IssuedToken {
            token: signed.token,
            jti: claims.jti,
            expires_at: signed.expires_at,
        })
    }
}

/// The claims of a token to sign, but for those the signing sets (`iss`,
/// `exp`, `iat`, `nbf`, `jti`).
pub(super) struct Draft {
    /// The task owner's SPIFFE ID.
    pub(super) sub: String,
    /// The task.
    pub(super) txn: String,
    /// The task context, fixed at begin.
    pub(super) tctx: TaskContext,
    /// The attested requester.
    pub(super) rctx: RequesterContext,
    /// The one audience.
    pub(super) audience: String,
    /// The tools (`scope`).
    pub(super) tools: Vec<String>,
    /// The actor chain.
    pub(super) act: Option<Actor>,
    /// The binding.
    pub(super) cnf: Option<Confirmation>,
    /// The latest `exp` (the task's deadline, the subject token's `exp`).
    pub(super) not_after: SystemTime,
    /// The subject token of an exchange, shown to the signer.
    pub(super) subject_token: Option<String>,
}

pub(super) fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn random_b64(len: usize) -> Result<String, TaskError> {
    let mut bytes = vec![0u8; len];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| TaskError::Sign(AuthorityError::Random))?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}
