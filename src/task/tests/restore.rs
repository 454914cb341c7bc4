//! Restore after a restart: what was active is active again, with its
//! deadline; what ended stays ended; nothing is resurrected.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::harness::{Agent, OWNER_ID, SERVICE_ID, matched};
use super::test_row;
use crate::attestation::ProcessKey;
use crate::store::Store;
use crate::task::{BeginRequest, EndReason, Task, TaskConfig, TokenRejection};

fn millis(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).unwrap().as_millis()
}

fn ids(tasks: &[Arc<Task>]) -> Vec<&str> {
    let mut ids: Vec<_> = tasks.iter().map(|t| t.id.as_str()).collect();
    ids.sort_unstable();
    ids
}

#[tokio::test]
async fn active_tasks_stay_active_and_ended_ones_stay_ended_across_a_restart() {
    let agent = Agent::start(TaskConfig::default()).await;
    let (live, live_token) = agent.begin().await;
    let (completed, completed_token) = agent.begin().await;
    let (revoked, revoked_token) = agent.begin().await;
    agent.tasks.end(&agent.caller, &completed.id).await.unwrap();
    agent.tasks.revoke(&revoked.id).await.unwrap();
    let owner = live.owner.process;

    let (agent, watched) = agent.restart();

    assert_eq!(watched, 1, "only the live task is watched again");
    let restored = agent.tasks.get(&live.id).unwrap();
    assert_eq!(restored.ended(), None);
    assert_eq!(
        millis(restored.deadline),
        millis(live.deadline),
        "deadline kept"
    );
    assert_eq!(
        (&restored.audience, &restored.tools, &restored.spiffe_id),
        (&live.audience, &live.tools, &live.spiffe_id)
    );
    assert_eq!(ids(&agent.tasks.active_of(owner)), [live.id.as_str()]);
    assert_eq!(ids(&agent.tasks.list(false)), [live.id.as_str()]);
    let mut all = vec![live.id.as_str(), completed.id.as_str(), revoked.id.as_str()];
    all.sort_unstable();
    assert_eq!(ids(&agent.tasks.list(true)), all);

    // The live task's tokens still validate, and it can be renewed.
    agent
        .validate(&live_token.token, SERVICE_ID, Some("notes.read"), None)
        .unwrap();
    agent.tasks.token_for(&restored, Vec::new()).await.unwrap();

    // The ended ones keep their reason, and their tokens stay refused.
    for (task, token, reason) in [
        (&completed, &completed_token, EndReason::Completed),
        (&revoked, &revoked_token, EndReason::Revoked),
    ] {
        let restored = agent.tasks.get(&task.id).unwrap();
        assert_eq!(restored.ended().map(|(why, _)| why), Some(reason));
        let refused = agent.validate(&token.token, SERVICE_ID, None, None);
        assert!(
            matches!(&refused, Err(TokenRejection::Ended { reason: why, .. }) if why == reason.as_str()),
            "{refused:?}"
        );
        assert!(agent.tasks.token_for(&restored, Vec::new()).await.is_err());
    }
}

#[tokio::test]
async fn a_task_whose_owner_is_gone_is_ended_at_restore_and_stays_ended() {
    let agent = Agent::start(TaskConfig::default()).await;
    // Owned by a process that had this pid before: another start time.
    let mut gone = agent.owner();
    gone.process = ProcessKey::new(gone.process.pid(), gone.process.start_time() + 1);
    let (task, token) = agent
        .tasks
        .begin(
            &agent.caller,
            gone,
            &matched(OWNER_ID),
            BeginRequest {
                audience: SERVICE_ID.into(),
                intent: "outlive my owner".into(),
                tools: vec!["notes.read".into()],
                ttl: Some(Duration::from_secs(600)),
                bind_x5t: None,
                scope_descendants: false,
                decided_by: Vec::new(),
            },
        )
        .await
        .unwrap();

    let (agent, watched) = agent.restart();
    assert_eq!(watched, 0);
    let restored = agent.tasks.get(&task.id).unwrap();
    assert_eq!(
        restored.ended().map(|(why, _)| why),
        Some(EndReason::OwnerExited)
    );
    // Restored before any fleet link listens: listed for it to send.
    assert!(
        agent
            .tasks
            .ended_tasks()
            .iter()
            .any(|end| end.txn == task.id && end.reason == EndReason::OwnerExited)
    );
    assert!(matches!(
        agent.validate(&token.token, SERVICE_ID, None, None),
        Err(TokenRejection::Ended { .. })
    ));

    // The end was stored: the next restart reads it, it does not decide it again.
    let (agent, watched) = agent.restart();
    assert_eq!(watched, 0);
    assert_eq!(
        agent
            .tasks
            .get(&task.id)
            .unwrap()
            .ended()
            .map(|(why, _)| why),
        Some(EndReason::OwnerExited)
    );
}

#[tokio::test]
async fn a_task_past_its_deadline_is_not_restored() {
    let agent = Agent::start(TaskConfig::default()).await;
    let owner = agent.owner();
    // Stored active by a run that stopped before its deadline came.
    let mut row = test_row("0b7e9c1a-past-deadline", owner.process, false);
    row.created_at = SystemTime::now() - Duration::from_secs(120);
    row.deadline = SystemTime::now() - Duration::from_secs(60);
    Store::open(agent.dir.path())
        .unwrap()
        .insert_tasks(&[row])
        .unwrap();

    let (agent, watched) = agent.restart();

    assert_eq!(watched, 0);
    assert!(agent.tasks.get("0b7e9c1a-past-deadline").is_none());
    assert!(agent.tasks.active_of(owner.process).is_empty());
}
