//! The fleet's task index in the server's store
//! (`ServerStore::begin_fleet_task` and the rest), one contract run against
//! both backends as `fleet_store` runs the store's: SQLite (two handles on
//! one file) and a real PostgreSQL (two replicas). A task is recorded by
//! its first begin and ended once, by its owner or the operator; ends take
//! growing revisions a reader pages through; pruning forgets tasks past
//! their deadline and never takes the revision back; values over their
//! bounds are refused before anything is written; and 8 racing end calls
//! across both replicas end each of 200 tasks exactly once, at distinct
//! revisions.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use spiffe::TrustDomain;
use tether::audit::{AuditConfig, AuditLog, SigningKey};
use tether::server::store::sqlite::SqliteStore;
use tether::server::store::{
    FleetTaskEnd, FleetTaskEndRequest, FleetTaskRow, NewFleetTask, ServerStore, ServerStoreError,
};

use tether::server::tasks::TaskIndex;

use crate::common::postgres::TestPostgres;
use crate::fleet_store::{Replicas, at, node, replica};

/// The deadline of tasks no prune here reaches.
const FAR: u64 = 3_600_000;

fn new_task(txn: &str, owner: &str, began: u64, deadline: u64) -> NewFleetTask {
    NewFleetTask {
        txn: txn.into(),
        owner_node: node(owner),
        spiffe_id: format!("spiffe://fleet.test/{owner}/agent"),
        began_at: at(began),
        deadline: at(deadline),
    }
}

/// The row a new task is stored as: live.
fn live(task: &NewFleetTask) -> FleetTaskRow {
    FleetTaskRow {
        txn: task.txn.clone(),
        owner_node: task.owner_node.clone(),
        spiffe_id: task.spiffe_id.clone(),
        began_at: task.began_at,
        deadline: task.deadline,
        ended: None,
    }
}

fn end(txn: &str, reason: &str, when: u64) -> FleetTaskEndRequest {
    FleetTaskEndRequest {
        txn: txn.into(),
        reason: reason.into(),
        at: at(when),
    }
}

async fn begin(store: &dyn ServerStore, task: &NewFleetTask) -> FleetTaskRow {
    store
        .begin_fleet_task(task.clone())
        .await
        .expect("the task is recorded")
}

async fn revision(store: &dyn ServerStore) -> u64 {
    store
        .fleet_task_ends_revision()
        .await
        .expect("the revision is read")
}

fn revision_of(row: &FleetTaskRow) -> u64 {
    row.ended.as_ref().expect("ended").revision
}

fn is_unstorable<T: std::fmt::Debug>(outcome: &Result<T, ServerStoreError>) -> bool {
    matches!(
        outcome,
        Err(ServerStoreError::Unstorable {
            table: "fleet_tasks",
            ..
        })
    )
}

// === the contract, for any backend ===

async fn contract(replicas: Replicas) {
    assert_eq!(revision(&*replicas.0).await, 0, "no end yet");
    begins(&replicas).await;
    ends_by_owner_and_operator(&replicas).await;
    listing_and_paging(&*replicas.0).await;
    bounds(&*replicas.0).await;
    racing_ends(&replicas).await;
    pruning(&replicas).await;
}

async fn begins((a, b): &Replicas) {
    let first = new_task("t-begin", "node-a", 1, FAR);
    assert_eq!(begin(&**a, &first).await, live(&first), "the new row");
    let other = new_task("t-begin", "node-b", 2, FAR + 1);
    assert_eq!(
        begin(&**b, &other).await,
        live(&first),
        "another node's begin of the same task gets the first owner's row"
    );
    assert_eq!(
        a.fleet_task("t-begin".into()).await.expect("read"),
        Some(live(&first)),
        "unchanged"
    );
    // The quota's count: the owner's rows, seen by either replica.
    let count = async |store: &dyn ServerStore, name: &str| {
        store.fleet_tasks_of(node(name)).await.expect("count")
    };
    assert_eq!(count(&**b, "node-a").await, 1);
    assert_eq!(
        count(&**a, "node-b").await,
        0,
        "the second begin made no row"
    );
    begin(&**a, &new_task("t-begin-2", "node-a", 3, FAR)).await;
    assert_eq!(count(&**b, "node-a").await, 2);
    // A node's live tasks, by id, paged by the limit.
    let live = async |store: &dyn ServerStore, name: &str, limit: u32| {
        store
            .live_fleet_tasks_of(node(name), limit)
            .await
            .expect("live tasks")
    };
    assert_eq!(live(&**b, "node-a", 10).await, ["t-begin", "t-begin-2"]);
    assert_eq!(live(&**a, "node-a", 1).await, ["t-begin"]);
    assert!(live(&**a, "node-b", 10).await.is_empty());
    for missing in ["t-none", "", "has\ttab", &"x".repeat(129)] {
        assert_eq!(
            b.fleet_task(missing.into()).await.expect("read"),
            None,
            "{missing:?}"
        );
    }
}

async fn ends_by_owner_and_operator((a, b): &Replicas) {
    let owned = new_task("t-owned", "node-a", 10, FAR);
    begin(&**a, &owned).await;
    let before = revision(&**a).await;

    // Another node's end is no end, and takes no revision.
    let by_other = b
        .end_fleet_tasks(vec![end("t-owned", "completed", 20)], Some(node("node-b")))
        .await
        .expect("ran");
    assert_eq!(by_other, [None]);
    assert_eq!(
        a.fleet_task("t-owned".into()).await.expect("read"),
        Some(live(&owned)),
        "still live"
    );
    assert_eq!(revision(&**a).await, before, "no revision burnt");

    // The owner's end ends it, once.
    let first = FleetTaskEnd {
        reason: "completed".into(),
        at: at(30),
        revision: before + 1,
    };
    let ended = FleetTaskRow {
        ended: Some(first.clone()),
        ..live(&owned)
    };
    let by_owner = b
        .end_fleet_tasks(vec![end("t-owned", "completed", 30)], Some(node("node-a")))
        .await
        .expect("ran");
    assert_eq!(by_owner, [Some(ended.clone())]);
    assert_eq!(revision(&**a).await, before + 1);
    for owner in [Some(node("node-a")), None] {
        let again = a
            .end_fleet_tasks(vec![end("t-owned", "revoked", 40)], owner)
            .await
            .expect("ran");
        assert_eq!(again, [None], "ended already: the first end stands");
    }
    assert_eq!(
        b.fleet_task("t-owned".into()).await.expect("read"),
        Some(ended)
    );
    assert_eq!(revision(&**b).await, before + 1);

    // The operator (no owner) ends any node's task. In one call: a missing
    // task, and a task named twice, ended by its first end.
    let other = new_task("t-other", "node-b", 50, FAR);
    let third = new_task("t-third", "node-c", 51, FAR);
    begin(&**b, &other).await;
    begin(&**b, &third).await;
    let by_operator = a
        .end_fleet_tasks(
            vec![
                end("t-other", "revoked", 60),
                end("t-none", "revoked", 60),
                end("t-other", "completed", 61),
                end("t-third", "entry removed", 62),
            ],
            None,
        )
        .await
        .expect("ran");
    let ended_at = |task: &NewFleetTask, reason: &str, when: u64, revision: u64| FleetTaskRow {
        ended: Some(FleetTaskEnd {
            reason: reason.into(),
            at: at(when),
            revision,
        }),
        ..live(task)
    };
    assert_eq!(
        by_operator,
        [
            Some(ended_at(&other, "revoked", 60, before + 2)),
            None,
            None,
            Some(ended_at(&third, "entry removed", 62, before + 3)),
        ]
    );
    assert_eq!(revision(&**a).await, before + 3);
    assert_eq!(
        a.end_fleet_tasks(Vec::new(), None).await.expect("ran"),
        [],
        "nothing to end"
    );
    assert_eq!(revision(&**a).await, before + 3);
}

async fn listing_and_paging(store: &dyn ServerStore) {
    let tasks: Vec<_> = (0..5)
        .map(|i| new_task(&format!("t-list-{i}"), "node-a", 100 + i, FAR))
        .collect();
    for task in &tasks {
        begin(store, task).await;
    }
    let before = revision(store).await;
    store
        .end_fleet_tasks(
            vec![
                end("t-list-1", "deadline", 200),
                end("t-list-3", "completed", 201),
            ],
            Some(node("node-a")),
        )
        .await
        .expect("ran");

    // Newest first; live ones only unless asked.
    let all = store.fleet_tasks(true, 100).await.expect("listed");
    let began: Vec<_> = all.iter().map(|t| t.began_at).collect();
    assert!(began.windows(2).all(|w| w[0] >= w[1]), "newest first");
    let listed = |rows: &[FleetTaskRow]| -> Vec<String> {
        rows.iter()
            .filter(|t| t.txn.starts_with("t-list-"))
            .map(|t| t.txn.clone())
            .collect()
    };
    assert_eq!(
        listed(&all),
        ["t-list-4", "t-list-3", "t-list-2", "t-list-1", "t-list-0"]
    );
    let live_only = store.fleet_tasks(false, 100).await.expect("listed");
    assert!(live_only.iter().all(|t| t.ended.is_none()));
    assert_eq!(listed(&live_only), ["t-list-4", "t-list-2", "t-list-0"]);
    assert_eq!(
        store.fleet_tasks(true, 2).await.expect("listed"),
        all[..2],
        "at most limit, the newest"
    );
    assert!(store.fleet_tasks(true, 0).await.expect("listed").is_empty());
    assert_eq!(
        store.fleet_tasks(true, u32::MAX).await.expect("listed"),
        all,
        "a huge limit is clamped, not refused"
    );

    // Every end, in revision order, pages alike at any page size.
    let ends = store.fleet_task_ends(0, u32::MAX).await.expect("read");
    let revisions: Vec<u64> = ends.iter().map(revision_of).collect();
    assert!(revisions.windows(2).all(|w| w[0] < w[1]), "{revisions:?}");
    assert_eq!(revisions.last().copied(), Some(revision(store).await));
    assert_eq!(
        ends.iter()
            .skip_while(|t| revision_of(t) <= before)
            .map(|t| t.txn.as_str())
            .collect::<Vec<_>>(),
        ["t-list-1", "t-list-3"]
    );
    for page in [1, 2, 3] {
        let mut paged = Vec::new();
        let mut after = 0;
        loop {
            let next = store.fleet_task_ends(after, page).await.expect("read");
            assert!(next.len() <= page as usize);
            let Some(last) = next.last() else { break };
            after = revision_of(last);
            paged.extend(next);
        }
        assert_eq!(paged, ends, "pages of {page}");
    }
    assert!(
        store
            .fleet_task_ends(revision(store).await, 10)
            .await
            .expect("read")
            .is_empty()
    );
    assert!(
        store
            .fleet_task_ends(u64::MAX, 10)
            .await
            .expect("read")
            .is_empty()
    );
}

async fn bounds(store: &dyn ServerStore) {
    let stored = store.fleet_tasks(true, u32::MAX).await.expect("listed");
    let good = new_task("t-bounds", "node-a", 300, FAR);
    let refused_tasks = [
        NewFleetTask {
            txn: String::new(),
            ..good.clone()
        },
        NewFleetTask {
            txn: "new\nline".into(),
            ..good.clone()
        },
        NewFleetTask {
            txn: "caf\u{e9}".into(),
            ..good.clone()
        },
        NewFleetTask {
            txn: "x".repeat(129),
            ..good.clone()
        },
        NewFleetTask {
            spiffe_id: format!("spiffe://fleet.test/{}", "p".repeat(2048)),
            ..good.clone()
        },
        NewFleetTask {
            began_at: UNIX_EPOCH - Duration::from_secs(1),
            ..good.clone()
        },
        NewFleetTask {
            deadline: UNIX_EPOCH + Duration::from_secs(400_000_000_000),
            ..good.clone()
        },
    ];
    for task in refused_tasks {
        let refused = store.begin_fleet_task(task.clone()).await;
        assert!(is_unstorable(&refused), "{task:?}: {refused:?}");
    }
    assert_eq!(
        store.fleet_tasks(true, u32::MAX).await.expect("listed"),
        stored,
        "nothing written"
    );
    // The longest of each is kept.
    let longest = NewFleetTask {
        txn: "~".repeat(128),
        spiffe_id: format!("spiffe://{}", "p".repeat(2048 - 9)),
        ..good.clone()
    };
    assert_eq!(begin(store, &longest).await, live(&longest));
    begin(store, &good).await;

    // An end over its bounds refuses its whole call: `t-bounds` stays live.
    let before = revision(store).await;
    let too_many: Vec<_> = (0..1025)
        .map(|i| end(&format!("t-many-{i}"), "completed", 1))
        .collect();
    for ends in [
        vec![end("t-bounds", "completed", 1), end("", "completed", 1)],
        vec![
            end("t-bounds", "completed", 1),
            end("t-x", &"r".repeat(65), 1),
        ],
        vec![FleetTaskEndRequest {
            at: UNIX_EPOCH - Duration::from_millis(1),
            ..end("t-bounds", "completed", 1)
        }],
        too_many,
    ] {
        let refused = store.end_fleet_tasks(ends, None).await;
        assert!(is_unstorable(&refused), "{refused:?}");
    }
    assert_eq!(revision(store).await, before, "no revision taken");
    assert_eq!(
        store.fleet_task("t-bounds".into()).await.expect("read"),
        Some(live(&good))
    );
    let longest_reason = "r".repeat(64);
    let ended = store
        .end_fleet_tasks(vec![end("t-bounds", &longest_reason, 1)], None)
        .await
        .expect("ran");
    assert_eq!(
        ended[0].as_ref().and_then(|t| t.ended.as_ref()),
        Some(&FleetTaskEnd {
            reason: longest_reason,
            at: at(1),
            revision: before + 1,
        })
    );
}

/// 8 end calls, half on each replica, end overlapping slices of 200 tasks
/// (each task is in two calls; half the calls as its owner, half as the
/// operator): each task is ended exactly once, at distinct revisions.
async fn racing_ends((a, b): &Replicas) {
    const TASKS: usize = 200;
    let txn = |i: usize| format!("t-race-{i:03}");
    for i in 0..TASKS {
        begin(&**a, &new_task(&txn(i), "node-r", 400, FAR)).await;
    }
    let before = revision(&**a).await;
    let calls: Vec<_> = (0..8usize)
        .map(|call| {
            let store = if call % 2 == 0 { a.clone() } else { b.clone() };
            let ends: Vec<_> = (call * 25..call * 25 + 50)
                .map(|i| end(&txn(i % TASKS), &format!("call {call}"), 500))
                .collect();
            let owner = (call % 4 < 2).then(|| node("node-r"));
            tokio::spawn(async move { store.end_fleet_tasks(ends, owner).await })
        })
        .collect();
    let mut ended: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for call in calls {
        let rows = call.await.expect("the call ran").expect("ended");
        assert_eq!(rows.len(), 50);
        for row in rows.into_iter().flatten() {
            ended
                .entry(row.txn.clone())
                .or_default()
                .push(revision_of(&row));
        }
    }
    assert_eq!(ended.len(), TASKS, "every task ended");
    assert!(
        ended.values().all(|revisions| revisions.len() == 1),
        "each task ended once"
    );
    let revisions: BTreeSet<u64> = ended.values().flatten().copied().collect();
    assert_eq!(revisions.len(), TASKS, "distinct revisions");
    assert!(revisions.iter().all(|r| *r > before));
    assert_eq!(revision(&**b).await, before + TASKS as u64);

    // What a reader pages through is what the calls returned.
    let read = b.fleet_task_ends(before, u32::MAX).await.expect("read");
    let read: Vec<(String, u64)> = read
        .iter()
        .map(|t| (t.txn.clone(), revision_of(t)))
        .collect();
    assert!(read.windows(2).all(|w| w[0].1 < w[1].1), "revision order");
    let mut returned: Vec<(String, u64)> = ended
        .into_iter()
        .map(|(txn, revisions)| (txn, revisions[0]))
        .collect();
    returned.sort_by_key(|(_, revision)| *revision);
    assert_eq!(read, returned);
}

async fn pruning((a, b): &Replicas) {
    let short = |i: u64| new_task(&format!("t-short-{i}"), "node-p", 600, 1000 + i);
    for i in 0..3 {
        begin(&**a, &short(i)).await;
    }
    let ended = a
        .end_fleet_tasks(vec![end("t-short-0", "completed", 700)], None)
        .await
        .expect("ran");
    let pruned_end = revision_of(ended[0].as_ref().expect("ended"));
    let before = revision(&**a).await;

    // Deadlines before the bound: t-short-0 (ended) and t-short-1 (live).
    assert_eq!(b.prune_fleet_tasks(at(1002)).await.expect("pruned"), 2);
    assert_eq!(b.prune_fleet_tasks(at(1002)).await.expect("pruned"), 0);
    for (i, kept) in [(0, false), (1, false), (2, true)] {
        let found = a.fleet_task(format!("t-short-{i}")).await.expect("read");
        assert_eq!(found.is_some(), kept, "t-short-{i}");
    }
    assert!(
        a.fleet_task("t-begin".into())
            .await
            .expect("read")
            .is_some(),
        "a later deadline is kept"
    );
    assert_eq!(revision(&**a).await, before, "pruning keeps the revision");
    assert!(
        a.fleet_task_ends(0, u32::MAX)
            .await
            .expect("read")
            .iter()
            .all(|t| revision_of(t) != pruned_end),
        "a pruned task's end is gone"
    );

    // Everything pruned: the revision still stands, and the next end
    // takes the one after it.
    assert!(b.prune_fleet_tasks(at(FAR + 10)).await.expect("pruned") > 0);
    assert!(
        a.fleet_tasks(true, u32::MAX)
            .await
            .expect("listed")
            .is_empty()
    );
    assert!(
        a.fleet_task_ends(0, u32::MAX)
            .await
            .expect("read")
            .is_empty()
    );
    assert_eq!(revision(&**b).await, before);
    begin(&**b, &new_task("t-after", "node-p", 800, FAR)).await;
    let after = a
        .end_fleet_tasks(vec![end("t-after", "completed", 900)], Some(node("node-p")))
        .await
        .expect("ran");
    assert_eq!(revision_of(after[0].as_ref().expect("ended")), before + 1);
    assert_eq!(revision(&**a).await, before + 1);
}

// === SQLite ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sqlite_store_keeps_the_task_index_contract() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("server.db");
    let open = || {
        let path = path.clone();
        async move {
            tokio::task::spawn_blocking(move || SqliteStore::open(&path))
                .await
                .expect("opened")
                .expect("the store opens")
        }
    };
    // Two connections to one file, as two handles of one replica.
    contract((Arc::new(open().await), Arc::new(open().await))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_ahead_of_a_reset_task_index_is_sent_every_end_from_the_start() {
    // Review finding: a node's stream started after the revision the node
    // asked for, whatever the store held. After the index was reset (a new
    // SQLite file, a restored backup), its new ends take revisions the
    // node had passed already, and were never sent to it: their tokens
    // stayed valid on that node until they expired.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("server.db");
    let store: Arc<dyn ServerStore> = Arc::new(
        tokio::task::spawn_blocking(move || SqliteStore::open(&path))
            .await
            .expect("opened")
            .expect("the store opens"),
    );
    for (i, txn) in ["t-r1", "t-r2", "t-r3"].into_iter().enumerate() {
        begin(&*store, &new_task(txn, "node-a", 1, FAR)).await;
        store
            .end_fleet_tasks(vec![end(txn, "completed", 10 + i as u64)], None)
            .await
            .expect("ended");
    }
    assert_eq!(revision(&*store).await, 3);
    let (audit, writer) = AuditLog::open(
        &dir.path().join("audit"),
        &AuditConfig::default(),
        Arc::new(SigningKey::generate().expect("a key").0),
    )
    .expect("the trail opens");
    let stop = tokio_util::sync::CancellationToken::new();
    let writing = tokio::spawn(writer.run(stop.clone()));
    let index = TaskIndex::open(
        Arc::clone(&store),
        TrustDomain::new("fleet.test").expect("td"),
        audit,
    )
    .await
    .expect("the index opens");

    for asked in [0, 2, 3] {
        assert_eq!(
            index.resume_after(asked).await.expect("read"),
            asked,
            "a node behind or level with the index resumes where it asked"
        );
    }
    assert_eq!(
        index.resume_after(40).await.expect("read"),
        0,
        "a node ahead of every stored end gets every end from the start"
    );
    let all: Vec<String> = index
        .ends_after(0)
        .await
        .expect("read")
        .into_iter()
        .map(|row| row.txn)
        .collect();
    assert_eq!(all, ["t-r1", "t-r2", "t-r3"]);
    stop.cancel();
    writing.await.expect("the writer stops");
}

// === PostgreSQL ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root and PostgreSQL: scripts/test runs it"]
async fn the_postgres_store_keeps_the_task_index_contract_across_two_replicas() {
    let pg = TestPostgres::start();
    contract((replica(&pg).await, replica(&pg).await)).await;
}
