//! Token exchange (RFC 8693 in spirit): a service that was handed a task
//! token trades it for one addressed to the next hop. Two steps, so policy
//! can decide on the checked plan in between: [`Tasks::prepare_exchange`]
//! checks, [`Tasks::complete_exchange`] signs and records.
//!
//! Never widens: the same `sub` and `txn`, tools only narrow (a tool the
//! subject token lacks is refused, not dropped), `exp` never after the
//! subject token's, the exchanger prepended to `act`, and only the subject
//! token's audience may exchange it. The new token's claims come from the
//! subject token, so the task may be this agent's or, in fleet mode,
//! another node's (this agent holds no row of it; the server, which sees
//! the subject token, checks the exchange again before it signs).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use serde::Deserialize;
use spiffe::{SpiffeId, TrustDomain};

use super::claims::{self, Actor, Confirmation, TaskClaims};
use super::request::{check_audience, check_tools, dedup};
use super::token::Draft;
use super::{IssuedToken, Task, TaskError, Tasks, TokenRejection, task_event};
use crate::audit::{AuditEvent, EventKind, Outcome};
use crate::bundle::TrustBundle;
use crate::registration::Match;
use crate::telemetry::metrics::{Kind, metrics};

/// An exchange that passed every check but policy.
#[derive(Debug)]
pub struct Exchange {
    /// The task of the subject token, when it is this agent's; `None`: it
    /// is another node's (fleet mode).
    pub task: Option<Arc<Task>>,
    /// The exchanging identity (the new actor).
    pub actor: SpiffeId,
    /// The new actor chain, newest first.
    pub actors: Vec<String>,
    /// The new audience.
    pub audience: String,
    /// The tools of the new token.
    pub tools: Vec<String>,
    /// The subject token's claims.
    pub subject: TaskClaims,
    /// The subject token itself, shown to the signer.
    subject_token: SubjectToken,
}

/// A subject token, kept out of logs.
struct SubjectToken(String);

impl fmt::Debug for SubjectToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SubjectToken(..)")
    }
}

// === impl Tasks ===

impl Tasks {
    /// Checks an exchange of `subject` (a task token addressed to the
    /// caller) for a token addressed to `audience`, with `tools` (a subset;
    /// empty keeps them). `identities` are the caller's matched identities:
    /// the subject token must be addressed to one of their SPIFFE IDs or
    /// declared audiences, and that identity becomes the new actor. A bound
    /// subject token (`cnf`) is accepted only with `subject_presenter`, the
    /// certificate the caller says it was presented with, and only if that
    /// is the one it is bound to (the caller's statement: it keeps an honest
    /// service from exchanging a copied token). The task is this agent's
    /// or, in fleet mode ([`Tasks::with_foreign`]), another node's of this
    /// trust domain that this agent does not know ended. Nothing is issued
    /// until [`Tasks::complete_exchange`], so policy can decide on the
    /// checked plan in between.
    pub fn prepare_exchange(
        &self,
        subject: &str,
        subject_presenter: Option<&[u8]>,
        identities: &[Match],
        audience: &str,
        tools: &[String],
        bundle_for: impl Fn(&TrustDomain) -> Option<Arc<TrustBundle>>,
    ) -> Result<Exchange, TaskError> {
        check_audience("audience", audience, &self.inner.config)?;
        check_tools(tools, &self.inner.config)?;
        // The subject token must be addressed to the caller: find its
        // audience among the caller's names, then validate it for that.
        let unverified_aud = peek_audience(subject).ok_or_else(|| {
            TaskError::Exchange("the subject token has no single audience".into())
        })?;
        let actor = identities
            .iter()
            .find(|m| m.spiffe_id.to_string() == unverified_aud)
            .or_else(|| identities.iter().find(|m| m.entry.audiences.contains(&unverified_aud)))
            .map(|m| m.spiffe_id.clone())
            .ok_or_else(|| {
                TaskError::Exchange(format!(
                    "the subject token is addressed to {unverified_aud:?}, not to the caller; only a token's audience may exchange it"
                ))
            })?;
        let subject_token = SubjectToken(subject.to_owned());
        let subject = self.validate(
            subject,
            &unverified_aud,
            None,
            subject_presenter,
            bundle_for,
        )?;
        let task = match self.get(&subject.claims.txn) {
            Some(task) => {
                if let Some((reason, _)) = task.ended() {
                    return Err(TaskError::Ended {
                        id: task.id.clone(),
                        reason: reason.to_string(),
                    });
                }
                Some(task)
            }
            // Another node's task: `validate` found it not ended and this
            // agent fresh. Only this trust domain's tasks are the fleet's
            // (its keys signed it for a `sub` of this trust domain; its
            // `iss` may be an issuer the fleet has since changed or
            // dropped, and the server checks the exchange again).
            None if self.foreign().is_some()
                && subject.spiffe_id.trust_domain() == self.trust_domain() =>
            {
                None
            }
            None => {
                return Err(TaskError::Exchange(format!(
                    "task {} is not known to this agent",
                    subject.claims.txn.chars().take(80).collect::<String>()
                )));
            }
        };
        let granted: Vec<String> = subject.claims.tools().map(str::to_owned).collect();
        let tools = if tools.is_empty() {
            granted
        } else {
            if let Some(extra) = tools.iter().find(|t| !granted.contains(t)) {
                return Err(TaskError::Exchange(format!(
                    "tool {extra:?} is not in the subject token's scope; an exchange can only narrow"
                )));
            }
            dedup(tools.to_vec())
        };
        if subject.claims.actors().len() + 1 > claims::MAX_ACTOR_DEPTH {
            return Err(TaskError::Exchange(format!(
                "the actor chain would exceed {} actors",
                claims::MAX_ACTOR_DEPTH
            )));
        }
        let mut actors = vec![actor.to_string()];
        actors.extend(subject.claims.actors());
        Ok(Exchange {
            task,
            actor,
            actors,
            audience: audience.to_owned(),
            tools,
            subject: subject.claims,
            subject_token,
        })
    }

    /// Issues the token of a checked exchange, bound to `bind_x5t` when
    /// given, recording which policies allowed it. Its claims are the
    /// subject token's but for the audience, the narrowed tools, the actor
    /// chain and the binding; the signer is shown the subject token. A task
    /// that ended since the exchange was checked (here, or on its own node
    /// as far as this agent has heard) gets nothing.
    pub async fn complete_exchange(
        &self,
        exchange: Exchange,
        bind_x5t: Option<String>,
        decided_by: Vec<String>,
    ) -> Result<IssuedToken, TaskError> {
        let Exchange {
            task,
            actor,
            actors,
            audience,
            tools,
            subject,
            subject_token,
        } = exchange;
        // Ended since the check? Then nothing is signed.
        match &task {
            Some(task) => {
                if let Some((reason, _)) = task.ended() {
                    return Err(TaskError::Ended {
                        id: task.id.clone(),
                        reason: reason.to_string(),
                    });
                }
            }
            None => match self.foreign() {
                Some(foreign) => {
                    foreign
                        .check(&subject.txn)
                        .map_err(|rejection| match rejection {
                            TokenRejection::Ended { txn, reason } => {
                                TaskError::Ended { id: txn, reason }
                            }
                            other => TaskError::Token(other),
                        })?
                }
                None => {
                    return Err(TaskError::Exchange(format!(
                        "task {} is not known to this agent",
                        subject.txn.chars().take(80).collect::<String>()
                    )));
                }
            },
        }
        let subject_exp = UNIX_EPOCH + Duration::from_secs(subject.exp);
        let deadline = UNIX_EPOCH + Duration::from_secs(subject.tctx.deadline);
        let mut not_after = subject_exp.min(deadline);
        if let Some(task) = &task {
            not_after = not_after.min(task.deadline);
        }
        let draft = Draft {
            sub: subject.sub.clone(),
            txn: subject.txn.clone(),
            tctx: subject.tctx.clone(),
            rctx: subject.rctx.clone(),
            audience: audience.clone(),
            tools: tools.clone(),
            act: Some(Actor {
                sub: actor.to_string(),
                act: subject.act.clone().map(Box::new),
            }),
            cnf: bind_x5t.map(|x5t_s256| Confirmation { x5t_s256 }),
            not_after,
            subject_token: Some(subject_token.0),
        };
        let token = self.sign_draft(draft).await?;
        let event = match &task {
            Some(task) => {
                task.state().tokens_issued += 1;
                task_event(task, EventKind::Exchange, Outcome::Allow)
            }
            // Another node's task: its owner is not here to name.
            None => AuditEvent {
                spiffe_id: Some(subject.sub.clone()),
                task_id: Some(subject.txn.clone()),
                intent: Some(subject.tctx.intent.clone()),
                ..AuditEvent::new(EventKind::Exchange, Outcome::Allow)
            },
        };
        tracing::info!(
            task_id = %subject.txn,
            actor = %actor,
            audience,
            tools = ?tools,
            foreign = task.is_none(),
            "task token exchanged"
        );
        self.inner.audit.record(AuditEvent {
            audience: Some(audience),
            tools,
            actors,
            token_id: Some(token.jti.clone()),
            policy_ids: decided_by,
            ..event
        })?;
        metrics()
            .task_tokens_issued
            .get_or_create(&Kind { kind: "exchange" })
            .inc();
        Ok(token)
    }
}

/// The token's single `aud`, unverified: only used to pick what to verify it for.
fn peek_audience(token: &str) -> Option<String> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Aud {
        One(String),
        Many(Vec<String>),
    }
    #[derive(Deserialize)]
    struct Peek {
        aud: Aud,
    }
    let peek: Peek = jsonwebtoken::dangerous::insecure_decode_claims(token).ok()?;
    match peek.aud {
        Aud::One(a) => Some(a),
        Aud::Many(mut v) if v.len() == 1 => v.pop(),
        Aud::Many(_) => None,
    }
}
