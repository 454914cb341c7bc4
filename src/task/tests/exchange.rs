//! Exchange never widens (tools only narrow, `sub` and `txn` kept, the
//! exchanger added to `act`) and never outlives (the subject token's `exp`,
//! the task's deadline).

use std::time::{Duration, SystemTime};

use super::harness::{Agent, NEXT_HOP_ID, OWNER_ID, SERVICE_ID, TOOLS, certificate, matched};
use super::secs;
use crate::task::claims::{Actor, TaskClaims, thumbprint};
use crate::task::{IssuedToken, TaskConfig, TaskError, TokenRejection};

/// A third workload, after the next hop.
const ARCHIVE_ID: &str = "spiffe://example.org/api/archive";

fn tools(tools: &[&str]) -> Vec<String> {
    tools.iter().map(|t| (*t).to_owned()).collect()
}

/// `subject`, exchanged by the workload `exchanger` for a token addressed
/// to `audience` with `tools`.
async fn exchange(
    agent: &Agent,
    subject: &str,
    exchanger: &str,
    audience: &str,
    wanted: &[&str],
) -> Result<IssuedToken, TaskError> {
    let plan = agent.tasks.prepare_exchange(
        subject,
        None,
        &[matched(exchanger)],
        audience,
        &tools(wanted),
        agent.bundle_for(),
    )?;
    agent.tasks.complete_exchange(plan, None, Vec::new()).await
}

/// The claims of `token`, validated for `audience`.
fn claims(agent: &Agent, token: &IssuedToken, audience: &str) -> TaskClaims {
    agent
        .validate(&token.token, audience, None, None)
        .unwrap()
        .claims
}

#[tokio::test]
async fn exchange_narrows_the_tools_changes_the_audience_and_keeps_sub_and_txn() {
    let agent = Agent::start(TaskConfig::default()).await;
    let (task, subject) = agent.begin().await;

    let token = exchange(
        &agent,
        &subject.token,
        SERVICE_ID,
        NEXT_HOP_ID,
        &["notes.read"],
    )
    .await
    .unwrap();

    let before = claims(&agent, &subject, SERVICE_ID);
    let after = claims(&agent, &token, NEXT_HOP_ID);
    assert_eq!(after.aud, NEXT_HOP_ID, "the audience asked for");
    assert_eq!(after.sub, OWNER_ID, "sub is the task owner's, unchanged");
    assert_eq!(after.sub, before.sub);
    assert_eq!(after.txn, task.id, "txn is the task's, unchanged");
    assert_eq!(after.scope, "notes.read");
    assert!(after.tools().all(|t| before.allows(t)), "a subset");
    assert_eq!(
        after.tctx, before.tctx,
        "the task context is fixed at begin"
    );
    assert_eq!(
        after.act,
        Some(Actor {
            sub: SERVICE_ID.into(),
            act: None
        })
    );
    assert_ne!(after.jti, before.jti);
    assert_eq!(
        task.tokens_issued(),
        2,
        "begin's token and the exchanged one"
    );

    // The narrowed token is good for its own audience and tools only.
    assert!(matches!(
        agent.validate(&token.token, NEXT_HOP_ID, Some("notes.write"), None),
        Err(TokenRejection::ToolNotAllowed(tool)) if tool == "notes.write"
    ));
    assert!(matches!(
        agent.validate(&token.token, SERVICE_ID, None, None),
        Err(TokenRejection::Jwt(_))
    ));
}

#[tokio::test]
async fn exchange_refuses_a_tool_the_subject_token_does_not_grant() {
    let agent = Agent::start(TaskConfig::default()).await;
    let (task, subject) = agent
        .begin_with(
            &["notes.read", "notes.search"],
            Duration::from_secs(600),
            None,
        )
        .await;

    // Refused as a whole, not narrowed to the tools it may have.
    let refused = exchange(
        &agent,
        &subject.token,
        SERVICE_ID,
        NEXT_HOP_ID,
        &["notes.read", "notes.write"],
    )
    .await;
    assert!(
        matches!(&refused, Err(TaskError::Exchange(why)) if why.contains("\"notes.write\"") && why.contains("only narrow")),
        "{refused:?}"
    );
    assert_eq!(task.tokens_issued(), 1, "nothing was signed");

    // A narrowed token cannot be widened back by exchanging it again.
    let narrowed = exchange(
        &agent,
        &subject.token,
        SERVICE_ID,
        NEXT_HOP_ID,
        &["notes.read"],
    )
    .await
    .unwrap();
    let again = exchange(
        &agent,
        &narrowed.token,
        NEXT_HOP_ID,
        ARCHIVE_ID,
        &["notes.search"],
    )
    .await;
    assert!(matches!(again, Err(TaskError::Exchange(_))), "{again:?}");
}

#[tokio::test]
async fn exchange_without_tools_keeps_the_subject_tokens_and_drops_repeats() {
    let agent = Agent::start(TaskConfig::default()).await;
    let (_task, subject) = agent.begin().await;

    let kept = exchange(&agent, &subject.token, SERVICE_ID, NEXT_HOP_ID, &[])
        .await
        .unwrap();
    assert_eq!(claims(&agent, &kept, NEXT_HOP_ID).scope, TOOLS.join(" "));

    let once = exchange(
        &agent,
        &subject.token,
        SERVICE_ID,
        NEXT_HOP_ID,
        &["notes.read", "notes.read"],
    )
    .await
    .unwrap();
    assert_eq!(claims(&agent, &once, NEXT_HOP_ID).scope, "notes.read");
}

#[tokio::test]
async fn each_exchange_adds_the_exchanger_to_the_actor_chain() {
    let agent = Agent::start(TaskConfig::default()).await;
    let (task, subject) = agent.begin().await;

    let first = exchange(&agent, &subject.token, SERVICE_ID, NEXT_HOP_ID, &[])
        .await
        .unwrap();
    let second = exchange(
        &agent,
        &first.token,
        NEXT_HOP_ID,
        ARCHIVE_ID,
        &["notes.read"],
    )
    .await
    .unwrap();

    let claims = claims(&agent, &second, ARCHIVE_ID);
    assert_eq!(claims.actors(), [NEXT_HOP_ID, SERVICE_ID], "newest first");
    assert_eq!(
        claims.act,
        Some(Actor {
            sub: NEXT_HOP_ID.into(),
            act: Some(Box::new(Actor {
                sub: SERVICE_ID.into(),
                act: None
            }))
        })
    );
    assert_eq!(
        (claims.sub.as_str(), claims.txn.as_str()),
        (OWNER_ID, task.id.as_str())
    );
}

#[tokio::test]
async fn only_the_subject_tokens_audience_may_exchange_it() {
    let agent = Agent::start(TaskConfig::default()).await;
    let (task, subject) = agent.begin().await;

    let refused = exchange(&agent, &subject.token, NEXT_HOP_ID, ARCHIVE_ID, &[]).await;
    assert!(
        matches!(&refused, Err(TaskError::Exchange(why)) if why.contains("not to the caller")),
        "{refused:?}"
    );
    assert_eq!(task.tokens_issued(), 1);
}

#[tokio::test]
async fn a_bound_subject_token_is_exchanged_only_with_its_certificate() {
    let agent = Agent::start(TaskConfig::default()).await;
    let cert = certificate("agent.example.org");
    let (_task, subject) = agent
        .begin_with(&TOOLS, Duration::from_secs(600), Some(thumbprint(&cert)))
        .await;
    let prepare = |presenter: Option<&[u8]>| {
        agent.tasks.prepare_exchange(
            &subject.token,
            presenter,
            &[matched(SERVICE_ID)],
            NEXT_HOP_ID,
            &[],
            agent.bundle_for(),
        )
    };

    assert!(matches!(
        prepare(None),
        Err(TaskError::Token(TokenRejection::Binding(_)))
    ));
    let other = certificate("other.example.org");
    assert!(matches!(
        prepare(Some(other.as_slice())),
        Err(TaskError::Token(TokenRejection::Binding(_)))
    ));
    let plan = prepare(Some(cert.as_slice())).unwrap();
    let token = agent
        .tasks
        .complete_exchange(plan, None, Vec::new())
        .await
        .unwrap();
    assert_eq!(
        claims(&agent, &token, NEXT_HOP_ID).cnf,
        None,
        "unbound unless asked"
    );
}

#[tokio::test]
async fn a_token_of_an_ended_task_is_not_exchanged() {
    let agent = Agent::start(TaskConfig::default()).await;
    let (task, subject) = agent.begin().await;
    agent.tasks.revoke(&task.id).await.unwrap();

    let refused = exchange(&agent, &subject.token, SERVICE_ID, NEXT_HOP_ID, &[]).await;
    assert!(
        matches!(&refused, Err(TaskError::Token(TokenRejection::Ended { reason, .. })) if reason == "revoked"),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_task_that_ends_between_the_check_and_the_signature_gets_no_token() {
    // Regression: the exchange was checked while the task lived, then the
    // task ended (its owner exited) before the token was signed.
    let agent = Agent::start(TaskConfig::default()).await;
    let (task, subject) = agent.begin().await;
    let plan = agent
        .tasks
        .prepare_exchange(
            &subject.token,
            None,
            &[matched(SERVICE_ID)],
            NEXT_HOP_ID,
            &tools(&[]),
            agent.bundle_for(),
        )
        .unwrap();
    agent.tasks.revoke(&task.id).await.unwrap();

    let refused = agent.tasks.complete_exchange(plan, None, Vec::new()).await;
    assert!(
        matches!(&refused, Err(TaskError::Ended { reason, .. }) if reason == "revoked"),
        "{refused:?}"
    );
}

#[tokio::test]
async fn the_exchanged_token_expires_no_later_than_its_subject() {
    // Tokens live two minutes; the subject has thirty seconds left.
    let agent = Agent::start(TaskConfig::default()).await;
    let (task, _) = agent.begin().await;
    let subject = agent
        .token_expiring(&task, SystemTime::now() + Duration::from_secs(30))
        .await;
    let subject_exp = claims(&agent, &subject, SERVICE_ID).exp;

    let token = exchange(&agent, &subject.token, SERVICE_ID, NEXT_HOP_ID, &[])
        .await
        .unwrap();

    let exp = claims(&agent, &token, NEXT_HOP_ID).exp;
    assert_eq!(
        exp, subject_exp,
        "capped at the subject's exp, not now + token_ttl"
    );
    assert_eq!(secs(token.expires_at), exp);
}

#[tokio::test]
async fn the_exchanged_token_expires_no_later_than_the_task_deadline() {
    let agent = Agent::start(TaskConfig::default()).await;
    let (task, begun) = agent
        .begin_with(&TOOLS, Duration::from_secs(30), None)
        .await;
    let deadline = secs(task.deadline);
    assert!(claims(&agent, &begun, SERVICE_ID).exp <= deadline);

    // A subject token that outlives its task: never issued so, but signed
    // with this agent's key, so only the deadline can stop it.
    let mut outliving = claims(&agent, &begun, SERVICE_ID);
    outliving.exp = deadline + 120;
    outliving.jti = "outliving".into();
    let signed = agent.sign(&outliving);

    let token = exchange(&agent, &signed, SERVICE_ID, NEXT_HOP_ID, &[])
        .await
        .unwrap();

    let exp = claims(&agent, &token, NEXT_HOP_ID).exp;
    assert!(
        exp <= deadline,
        "exp {exp} is after the task deadline {deadline}"
    );
}
