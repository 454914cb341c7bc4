//! The task rules of validation, one refusal each, and the token that
//! passes them all.

use std::time::{Duration, SystemTime};

use super::harness::{Agent, NEXT_HOP_ID, OWNER_ID, SERVICE_ID, TOOLS, certificate};
use crate::svid::jwt::JwtValidationError;
use crate::task::claims::{Confirmation, thumbprint};
use crate::task::{TaskConfig, TaskError, TokenRejection};

#[tokio::test]
async fn a_live_token_for_its_audience_and_a_tool_in_scope_is_accepted() {
    let agent = Agent::start(TaskConfig::default()).await;
    let (task, token) = agent.begin().await;

    let valid = agent
        .validate(&token.token, SERVICE_ID, Some("notes.read"), None)
        .unwrap();

    assert_eq!(valid.spiffe_id.to_string(), OWNER_ID);
    assert_eq!(valid.claims.txn, task.id);
    assert_eq!(valid.claims.aud, SERVICE_ID);
    assert_eq!(valid.claims.scope, TOOLS.join(" "));
    assert_eq!(valid.claims.cnf, None);
    assert_eq!(valid.raw_claims["txn"], task.id.as_str());
}

#[tokio::test]
async fn a_token_for_another_audience_is_refused() {
    let agent = Agent::start(TaskConfig::default()).await;
    let (_task, token) = agent.begin().await;

    let refused = agent.validate(&token.token, NEXT_HOP_ID, None, None);
    assert!(
        matches!(&refused, Err(TokenRejection::Jwt(JwtValidationError::Invalid(why))) if why.contains("audience")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_tool_outside_the_scope_is_refused() {
    let agent = Agent::start(TaskConfig::default()).await;
    let (_task, token) = agent
        .begin_with(&["notes.read"], Duration::from_secs(600), None)
        .await;

    let refused = agent.validate(&token.token, SERVICE_ID, Some("notes.write"), None);
    assert!(
        matches!(&refused, Err(TokenRejection::ToolNotAllowed(tool)) if tool == "notes.write"),
        "{refused:?}"
    );
    // A prefix of a granted tool is another tool.
    assert!(matches!(
        agent.validate(&token.token, SERVICE_ID, Some("notes"), None),
        Err(TokenRejection::ToolNotAllowed(_))
    ));
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let agent = Agent::start(TaskConfig::default()).await;
    let (task, _) = agent.begin().await;
    // Signed for the live task, but its exp a minute ago.
    let expired = agent
        .token_expiring(&task, SystemTime::now() - Duration::from_secs(60))
        .await;

    let refused = agent.validate(&expired.token, SERVICE_ID, None, None);
    assert!(
        matches!(&refused, Err(TokenRejection::Jwt(JwtValidationError::Invalid(why))) if why.contains("expired")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_token_that_lives_longer_than_tokens_may_is_refused() {
    let agent = Agent::start(TaskConfig::default()).await;
    let (_task, token) = agent.begin().await;
    let mut claims = agent
        .validate(&token.token, SERVICE_ID, None, None)
        .unwrap()
        .claims;
    let max = TaskConfig::default().max_token_ttl.as_secs();
    claims.exp = claims.iat + max + 1;
    let long = agent.sign(&claims);

    let refused = agent.validate(&long, SERVICE_ID, None, None);
    assert!(
        matches!(refused, Err(TokenRejection::TooLong(lifetime, limit)) if lifetime == max + 1 && limit == max),
        "{refused:?}"
    );
}

#[tokio::test]
async fn tokens_of_an_ended_or_revoked_task_are_refused() {
    let agent = Agent::start(TaskConfig::default()).await;
    let (completed, completed_token) = agent.begin().await;
    let renewed = agent.tasks.token_for(&completed, Vec::new()).await.unwrap();
    let (revoked, revoked_token) = agent.begin().await;

    agent.tasks.end(&agent.caller, &completed.id).await.unwrap();
    agent.tasks.revoke(&revoked.id).await.unwrap();

    for (token, reason) in [
        (&completed_token, "completed"),
        (&renewed, "completed"),
        (&revoked_token, "revoked"),
    ] {
        let refused = agent.validate(&token.token, SERVICE_ID, None, None);
        assert!(
            matches!(&refused, Err(TokenRejection::Ended { reason: why, .. }) if why == reason),
            "{refused:?}"
        );
    }
    // And no new token is issued for it.
    assert!(matches!(
        agent.tasks.token_for(&revoked, Vec::new()).await,
        Err(TaskError::Ended { .. })
    ));
}

#[tokio::test]
async fn a_token_signed_here_for_a_task_unknown_here_is_refused() {
    let agent = Agent::start(TaskConfig::default()).await;
    let (task, token) = agent.begin().await;
    // Same keys, another store: the task is unknown there.
    let (_dir, stranger) = agent.stranger();

    let refused = stranger.validate(&token.token, SERVICE_ID, None, None, agent.bundle_for());
    assert!(
        matches!(&refused, Err(TokenRejection::UnknownTask(txn)) if *txn == task.id),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_bound_token_is_accepted_only_from_the_certificate_it_is_bound_to() {
    let agent = Agent::start(TaskConfig::default()).await;
    let cert = certificate("agent.example.org");
    let other = certificate("agent.example.org");
    assert_ne!(
        thumbprint(&cert),
        thumbprint(&other),
        "two keys, two certificates"
    );
    let (_task, token) = agent
        .begin_with(&TOOLS, Duration::from_secs(600), Some(thumbprint(&cert)))
        .await;

    let without = agent.validate(&token.token, SERVICE_ID, None, None);
    assert!(
        matches!(&without, Err(TokenRejection::Binding(why)) if why.contains("present the certificate")),
        "{without:?}"
    );
    let wrong = agent.validate(&token.token, SERVICE_ID, None, Some(&other));
    assert!(
        matches!(&wrong, Err(TokenRejection::Binding(why)) if why.contains("not the one")),
        "{wrong:?}"
    );
    let valid = agent
        .validate(&token.token, SERVICE_ID, Some("notes.read"), Some(&cert))
        .unwrap();
    assert_eq!(
        valid.claims.cnf,
        Some(Confirmation {
            x5t_s256: thumbprint(&cert)
        })
    );
}
