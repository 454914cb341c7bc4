//! Tasks across the fleet, on the agent's side: exchanging another node's
//! task token (claims from the subject token, the subject token shown to
//! the signer, refused once the task is known ended) and reporting this
//! node's ends to the fleet link.

use std::time::Duration;

use tokio::sync::mpsc::error::TryRecvError;

use super::harness::{Agent, NEXT_HOP_ID, OWNER_ID, SERVICE_ID, TOOLS, begin_on, matched};
use crate::task::claims::{Actor, TaskClaims};
use crate::task::{
    EndReason, ForeignEnd, ForeignTasks, IssuedToken, TaskConfig, TaskError, Tasks, TokenRejection,
};

/// Long enough that no test waits it out.
const LONG: Duration = Duration::from_secs(3600);

/// Caught up on a new stream, nothing ended.
fn fresh() -> ForeignTasks {
    let foreign = ForeignTasks::new(LONG, 100);
    foreign.stream_opened();
    foreign.heartbeat(0);
    foreign
}

/// `subject` exchanged on `tasks` by [`SERVICE_ID`] for [`NEXT_HOP_ID`]
/// with `wanted` tools.
async fn exchange(
    agent: &Agent,
    tasks: &Tasks,
    subject: &str,
    wanted: &[&str],
) -> Result<IssuedToken, TaskError> {
    let wanted: Vec<String> = wanted.iter().map(|t| (*t).to_owned()).collect();
    let plan = tasks.prepare_exchange(
        subject,
        None,
        &[matched(SERVICE_ID)],
        NEXT_HOP_ID,
        &wanted,
        agent.bundle_for(),
    )?;
    tasks.complete_exchange(plan, None, Vec::new()).await
}

fn claims_on(agent: &Agent, tasks: &Tasks, token: &str, audience: &str) -> TaskClaims {
    tasks
        .validate(token, audience, None, None, agent.bundle_for())
        .expect("valid")
        .claims
}

#[tokio::test]
async fn another_nodes_task_token_is_exchanged_from_its_own_claims() {
    // Node A owns the task; node B, the same fleet, knows only what the
    // server told it.
    let a = Agent::start(TaskConfig::default()).await;
    let (task, subject) = a.begin().await;
    let foreign = fresh();
    let b = a.node(&foreign);

    let plan = b
        .tasks
        .prepare_exchange(
            &subject.token,
            None,
            &[matched(SERVICE_ID)],
            NEXT_HOP_ID,
            &["notes.read".to_owned()],
            a.bundle_for(),
        )
        .expect("another node's live task may be exchanged");
    assert!(plan.task.is_none(), "not B's task");
    assert_eq!(plan.subject.txn, task.id);
    let token = b
        .tasks
        .complete_exchange(plan, None, Vec::new())
        .await
        .unwrap();

    let before = claims_on(&a, &b.tasks, &subject.token, SERVICE_ID);
    let after = claims_on(&a, &b.tasks, &token.token, NEXT_HOP_ID);
    assert_eq!(after.sub, OWNER_ID, "sub is the owner's on node A");
    assert_eq!(after.txn, task.id);
    assert_eq!(after.scope, "notes.read", "narrowed");
    assert_eq!(after.tctx, before.tctx);
    assert_eq!(after.rctx, before.rctx, "the requester on node A");
    assert_eq!(
        after.act,
        Some(Actor {
            sub: SERVICE_ID.into(),
            act: None
        })
    );
    assert!(after.exp <= before.exp, "never outlives its subject");
    assert_eq!(task.tokens_issued(), 1, "counted where the task lives");
    // The server is shown the subject token, to check the exchange itself.
    assert_eq!(b.signer.subject_tokens(), [Some(subject.token.clone())]);
    // A validates B's token too: the same task, still live.
    assert!(
        a.validate(&token.token, NEXT_HOP_ID, Some("notes.read"), None)
            .is_ok()
    );
}

#[tokio::test]
async fn once_another_nodes_task_is_known_ended_its_tokens_are_refused_and_not_exchanged() {
    let a = Agent::start(TaskConfig::default()).await;
    let (task, subject) = a.begin().await;
    let foreign = fresh();
    let b = a.node(&foreign);
    let exchanged = exchange(&a, &b.tasks, &subject.token, &[]).await.unwrap();
    // Checked while live; the end arrives before the signature.
    let plan = b
        .tasks
        .prepare_exchange(
            &subject.token,
            None,
            &[matched(SERVICE_ID)],
            NEXT_HOP_ID,
            &[],
            a.bundle_for(),
        )
        .unwrap();

    foreign.apply_ends([ForeignEnd {
        txn: task.id.clone(),
        reason: "owner exited".into(),
        deadline: task.deadline,
        revision: 1,
    }]);

    for (token, audience) in [(&subject, SERVICE_ID), (&exchanged, NEXT_HOP_ID)] {
        let refused = b
            .tasks
            .validate(&token.token, audience, None, None, a.bundle_for());
        assert!(
            matches!(&refused, Err(TokenRejection::Ended { txn, reason }) if *txn == task.id && reason == "owner exited"),
            "{refused:?}"
        );
    }
    let late = b.tasks.complete_exchange(plan, None, Vec::new()).await;
    assert!(
        matches!(&late, Err(TaskError::Ended { reason, .. }) if reason == "owner exited"),
        "{late:?}"
    );
    let again = exchange(&a, &b.tasks, &subject.token, &[]).await;
    assert!(
        matches!(&again, Err(TaskError::Token(TokenRejection::Ended { .. }))),
        "{again:?}"
    );
}

#[tokio::test]
async fn a_stale_node_does_not_exchange_another_nodes_task() {
    let a = Agent::start(TaskConfig::default()).await;
    let (_task, subject) = a.begin().await;
    // Never caught up.
    let b = a.node(&ForeignTasks::new(LONG, 100));

    let refused = exchange(&a, &b.tasks, &subject.token, &[]).await;
    assert!(
        matches!(
            &refused,
            Err(TaskError::Token(TokenRejection::Stale { .. }))
        ),
        "{refused:?}"
    );
    assert!(b.signer.subject_tokens().is_empty(), "nothing signed");
}

#[tokio::test]
async fn a_local_exchange_shows_the_signer_its_subject_token_too() {
    let a = Agent::start(TaskConfig::default()).await;
    let b = a.node(&fresh());
    let (task, subject) = begin_on(&b.tasks, &a.caller, &TOOLS, LONG / 6, None).await;

    let token = exchange(&a, &b.tasks, &subject.token, &["notes.read"])
        .await
        .unwrap();

    assert_eq!(
        b.signer.subject_tokens(),
        [None, Some(subject.token.clone())],
        "begin shows none; the exchange its subject"
    );
    assert_eq!(task.tokens_issued(), 2);
    assert_eq!(
        claims_on(&a, &b.tasks, &token.token, NEXT_HOP_ID).txn,
        task.id
    );
}

#[tokio::test]
async fn a_standalone_agent_still_refuses_to_exchange_a_task_it_does_not_know() {
    let a = Agent::start(TaskConfig::default()).await;
    let (task, subject) = a.begin().await;
    let (_dir, standalone) = a.stranger();

    let refused = exchange(&a, &standalone, &subject.token, &[]).await;
    assert!(
        matches!(&refused, Err(TaskError::Token(TokenRejection::UnknownTask(txn))) if *txn == task.id),
        "{refused:?}"
    );
}

#[tokio::test]
async fn ends_are_reported_once_installed_and_listed_while_their_tokens_live() {
    let agent = Agent::start(TaskConfig::default()).await;
    let (before, _) = agent.begin().await;
    agent.tasks.revoke(&before.id).await.unwrap();

    let mut ends = agent.tasks.report_ends();
    assert!(
        matches!(ends.try_recv(), Err(TryRecvError::Empty)),
        "nothing queued before the link listened"
    );

    let (completed, _) = agent.begin().await;
    let (revoked, _) = agent.begin().await;
    agent.tasks.end(&agent.caller, &completed.id).await.unwrap();
    agent.tasks.revoke(&revoked.id).await.unwrap();
    // Ending again reports nothing: the first end stands.
    agent.tasks.revoke(&revoked.id).await.unwrap();

    let first = ends.try_recv().expect("EndTask reported");
    assert_eq!(
        (first.txn.as_str(), first.reason),
        (completed.id.as_str(), EndReason::Completed)
    );
    assert_eq!(first.deadline, completed.deadline);
    assert_eq!(Some(first.at), completed.ended().map(|(_, at)| at));
    let second = ends.try_recv().expect("revoke reported");
    assert_eq!(
        (second.txn.as_str(), second.reason),
        (revoked.id.as_str(), EndReason::Revoked)
    );
    assert!(matches!(ends.try_recv(), Err(TryRecvError::Empty)));

    let mut listed: Vec<_> = agent
        .tasks
        .ended_tasks()
        .into_iter()
        .map(|end| (end.txn, end.reason))
        .collect();
    listed.sort_by(|x, y| x.0.cmp(&y.0));
    let mut expected = vec![
        (before.id.clone(), EndReason::Revoked),
        (completed.id.clone(), EndReason::Completed),
        (revoked.id.clone(), EndReason::Revoked),
    ];
    expected.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(listed, expected, "every end, reported or not");
}

#[tokio::test]
async fn an_exchanged_token_keeps_the_trust_domain_as_iss_never_the_oidc_issuer() {
    // Node B's own tokens carry the fleet's OIDC issuer; the token its
    // service exchanges them for names the owner as `sub` while the
    // service holds it, so it stays under `spiffe://<td>`, which no OIDC
    // relying party (blind to `act`) accepts.
    let a = Agent::start(TaskConfig::default()).await;
    let foreign = fresh();
    let b = a.node_issuing(&foreign, Some("https://oidc.example.org"));
    let (_task, subject) = begin_on(&b.tasks, &a.caller, &TOOLS, LONG, None).await;
    let own = claims_on(&a, &b.tasks, &subject.token, SERVICE_ID);
    assert_eq!(own.iss, "https://oidc.example.org", "the owner's token");

    let exchanged = exchange(&a, &b.tasks, &subject.token, &["notes.read"])
        .await
        .unwrap();
    let after = claims_on(&a, &b.tasks, &exchanged.token, NEXT_HOP_ID);
    assert_eq!(after.iss, "spiffe://example.org");
    assert!(after.act.is_some());
}

#[tokio::test]
async fn another_nodes_token_under_an_earlier_issuer_is_still_exchanged() {
    // Node A signed under an issuer the fleet has since changed (or
    // dropped): its live tokens are the fleet's all the same.
    let a = Agent::start(TaskConfig::default()).await;
    let (task, subject) = a.begin().await;
    let mut claims = a
        .validate(&subject.token, SERVICE_ID, None, None)
        .unwrap()
        .claims;
    claims.iss = "https://old.example.org".into();
    let earlier = a.sign(&claims);
    let foreign = fresh();
    for now in [None, Some("https://new.example.org")] {
        let b = a.node_issuing(&foreign, now);
        let token = exchange(&a, &b.tasks, &earlier, &["notes.read"])
            .await
            .unwrap_or_else(|e| panic!("exchanged under {now:?}: {e}"));
        let after = claims_on(&a, &b.tasks, &token.token, NEXT_HOP_ID);
        assert_eq!(after.txn, task.id);
    }
}
