//! Other nodes' tasks ([`ForeignTasks`]): accepted only while this agent
//! is caught up and has heard from the server lately, refused once known
//! ended, the ends forgotten after their deadline, and the bounded set
//! failing closed. And [`Tasks::check_task`] with it: this node's own
//! tasks keep validating from local state whatever the link's state.
//!
//! [`Tasks::check_task`]: crate::task::Tasks::check_task

use std::time::{Duration, SystemTime};

use super::harness::{Agent, SERVICE_ID};
use crate::task::{ForeignEnd, ForeignTasks, SKEW_MARGIN, TaskConfig, TokenRejection};

/// Long enough that no test waits it out.
const LONG: Duration = Duration::from_secs(3600);

fn end(txn: &str, reason: &str, deadline: SystemTime, revision: u64) -> ForeignEnd {
    ForeignEnd {
        txn: txn.into(),
        reason: reason.into(),
        deadline,
        revision,
    }
}

/// Caught up on a new stream.
fn fresh(staleness: Duration, max_ends: usize) -> ForeignTasks {
    let foreign = ForeignTasks::new(staleness, max_ends);
    foreign.stream_opened();
    foreign.heartbeat(0);
    foreign
}

fn is_stale(result: Result<(), TokenRejection>, words: &str) -> bool {
    matches!(&result, Err(TokenRejection::Stale { txn, detail }) if txn == "t1" && detail.contains(words))
}

#[test]
fn other_nodes_tasks_are_accepted_only_after_the_first_heartbeat() {
    let foreign = ForeignTasks::new(LONG, 100);
    assert!(is_stale(foreign.check("t1"), "since it started"));
    assert_eq!(foreign.last_heard_age(), None);

    foreign.stream_opened();
    // A snapshot of ends is not yet "every end": only the heartbeat says so.
    foreign.apply_ends([end("old", "completed", SystemTime::now() + LONG, 3)]);
    assert!(is_stale(foreign.check("t1"), "not caught up"));
    assert!(foreign.problem().is_some());
    assert_eq!(foreign.last_heard_age(), None, "ends are no heartbeat");

    foreign.heartbeat(7);
    assert!(foreign.check("t1").is_ok());
    assert_eq!(foreign.problem(), None);
    assert_eq!(foreign.watermark(), 7, "every end up to the heartbeat's");
}

#[test]
fn a_lost_stream_refuses_until_the_next_one_catches_up() {
    let foreign = fresh(LONG, 100);
    foreign.stream_lost();
    assert!(is_stale(foreign.check("t1"), "since it reconnected"));

    foreign.stream_opened();
    assert!(is_stale(foreign.check("t1"), "since it reconnected"));
    foreign.heartbeat(0);
    assert!(foreign.check("t1").is_ok());
}

#[test]
fn past_the_staleness_bound_other_nodes_tasks_are_refused_until_heard_again() {
    let foreign = fresh(Duration::from_millis(50), 100);
    assert!(foreign.check("t1").is_ok());

    std::thread::sleep(Duration::from_millis(100));

    let refused = foreign.check("t1");
    assert!(
        is_stale(
            refused,
            "this agent has not heard from the tether server for"
        ),
        "{:?}",
        foreign.check("t1")
    );
    let problem = foreign.problem().expect("stale");
    assert!(
        problem.contains("server.revocation_staleness is 50ms"),
        "{problem}"
    );
    let message = foreign.check("t1").unwrap_err().to_string();
    assert!(
        message.starts_with("task t1 is another node's, and this agent has not heard"),
        "{message}"
    );

    // Review finding: any message (a snapshot, a page of ends) made the
    // agent fresh again, so a replica that could not read the store (and
    // so sent no heartbeat) kept its nodes accepting other nodes' tasks
    // for as long as entries or the bundle changed. Only a heartbeat does.
    foreign.apply_ends([end("t9", "completed", SystemTime::now() + LONG, 9)]);
    assert!(is_stale(
        foreign.check("t1"),
        "this agent has not heard from the tether server for"
    ));
    foreign.heartbeat(9);
    assert!(foreign.check("t1").is_ok());
}

#[test]
fn a_heartbeat_below_the_watermark_moves_it_back_so_no_end_is_skipped() {
    // Review finding: the watermark only grew. After the server's task
    // index was reset or restored from an older copy, its revisions start
    // again below this agent's; the server sends every end from the start
    // and says where this agent is, but the agent kept asking from its old
    // watermark on each reconnect, skipping the new ends numbered up to it.
    let foreign = fresh(LONG, 100);
    foreign.apply_ends([end("old", "completed", SystemTime::now() + LONG, 40)]);
    foreign.heartbeat(40);
    assert_eq!(foreign.watermark(), 40);

    foreign.stream_lost();
    foreign.stream_opened();
    foreign.apply_ends([end("new", "revoked", SystemTime::now() + LONG, 2)]);
    assert_eq!(
        foreign.watermark(),
        40,
        "within a stream, ends only raise it"
    );
    foreign.heartbeat(2);
    assert_eq!(
        foreign.watermark(),
        2,
        "the next stream asks for the ends after 2, as the server numbers them now"
    );
    assert!(matches!(
        foreign.check("new"),
        Err(TokenRejection::Ended { .. })
    ));
    assert!(matches!(
        foreign.check("old"),
        Err(TokenRejection::Ended { .. })
    ));
}

#[test]
fn an_ended_task_is_refused_with_its_reason_whatever_the_link_state() {
    let foreign = fresh(LONG, 100);
    let deadline = SystemTime::now() + LONG;
    foreign.apply_ends([
        end("t1", "owner exited", deadline, 4),
        end("t2", "revoked", deadline, 5),
    ]);
    // A later end of the same task does not replace the first.
    foreign.apply_ends([end("t1", "revoked", deadline, 6)]);
    assert_eq!(foreign.len(), 2);
    assert_eq!(foreign.watermark(), 6);

    for state in ["fresh", "lost"] {
        if state == "lost" {
            foreign.stream_lost();
        }
        assert!(
            matches!(foreign.check("t1"), Err(TokenRejection::Ended { txn, reason }) if txn == "t1" && reason == "owner exited"),
            "{state}"
        );
        assert!(
            matches!(foreign.check("t2"), Err(TokenRejection::Ended { reason, .. }) if reason == "revoked"),
            "{state}"
        );
    }
}

#[test]
fn ends_are_forgotten_once_their_tokens_have_all_expired() {
    let foreign = fresh(LONG, 100);
    let now = SystemTime::now();
    foreign.apply_ends([
        // Kept 50 ms more: its deadline plus the clock-skew margin.
        end(
            "soon",
            "completed",
            now - SKEW_MARGIN + Duration::from_millis(50),
            1,
        ),
        end("later", "completed", now + LONG, 2),
        // Already past: only the watermark moves.
        end(
            "gone",
            "completed",
            now - SKEW_MARGIN - Duration::from_secs(1),
            3,
        ),
    ]);
    assert_eq!(foreign.len(), 2);
    assert_eq!(foreign.watermark(), 3);
    assert!(matches!(
        foreign.check("soon"),
        Err(TokenRejection::Ended { .. })
    ));

    std::thread::sleep(Duration::from_millis(100));
    foreign.prune();

    assert_eq!(foreign.len(), 1);
    assert!(foreign.check("soon").is_ok(), "its tokens have expired");
    assert!(foreign.check("later").is_err());
}

#[test]
fn a_full_set_refuses_every_other_nodes_task_until_the_lost_end_has_expired() {
    let foreign = fresh(LONG, 2);
    let now = SystemTime::now();
    let soon = now - SKEW_MARGIN + Duration::from_millis(50);
    foreign.apply_ends([
        end("a", "completed", soon, 1),
        end("b", "completed", soon, 2),
        // No room: not kept, so no other node's task can be vouched for.
        end("c", "revoked", soon, 3),
    ]);
    assert_eq!(foreign.len(), 2);
    assert!(foreign.problem().is_some_and(|p| p.contains("full")));
    assert!(is_stale(foreign.check("t1"), "full"));
    assert!(matches!(
        foreign.check("c"),
        Err(TokenRejection::Stale { .. })
    ));
    assert!(matches!(
        foreign.check("a"),
        Err(TokenRejection::Ended { .. })
    ));

    // Once the lost end's tokens have expired (and room freed), accepted again.
    std::thread::sleep(Duration::from_millis(100));
    foreign.prune();
    assert!(foreign.is_empty());
    assert_eq!(foreign.problem(), None);
    assert!(foreign.check("t1").is_ok());
}

#[tokio::test]
async fn this_nodes_own_tasks_keep_validating_when_the_link_is_stale() {
    let agent = Agent::start(TaskConfig::default()).await;
    // Never caught up: every other node's task is refused.
    let foreign = ForeignTasks::new(LONG, 100);
    let tasks = agent.tasks.clone().with_foreign(foreign.clone());
    let (task, token) = agent.begin().await;

    let valid = agent
        .validate(&token.token, SERVICE_ID, Some("notes.read"), None)
        .expect("its own task validates from local state");
    assert_eq!(valid.claims.txn, task.id);
    assert!(tasks.check_task(&task.id, &token.token).is_ok());

    // Its end is local too, and stands whatever the fleet says.
    agent.tasks.revoke(&task.id).await.unwrap();
    foreign.stream_opened();
    foreign.heartbeat(0);
    assert!(matches!(
        agent.validate(&token.token, SERVICE_ID, None, None),
        Err(TokenRejection::Ended { reason, .. }) if reason == "revoked"
    ));
}

#[tokio::test]
async fn in_fleet_mode_an_unknown_task_is_judged_by_the_fleets_word_not_the_key() {
    let agent = Agent::start(TaskConfig::default()).await;
    let (task, token) = agent.begin().await;
    let foreign = ForeignTasks::new(LONG, 100);
    // Signed with the same keys (the server signs for every node), but
    // not this node's task.
    let (_dir, other) = agent.stranger();
    let other = other.with_foreign(foreign.clone());
    let validate = || other.validate(&token.token, SERVICE_ID, None, None, agent.bundle_for());

    let refused = validate();
    assert!(
        matches!(&refused, Err(TokenRejection::Stale { txn, .. }) if *txn == task.id),
        "{refused:?}"
    );
    foreign.stream_opened();
    foreign.heartbeat(0);
    assert_eq!(validate().expect("fresh and not ended").claims.txn, task.id);

    foreign.apply_ends([end(&task.id, "owner exited", task.deadline, 1)]);
    assert!(matches!(
        validate(),
        Err(TokenRejection::Ended { reason, .. }) if reason == "owner exited"
    ));
}
