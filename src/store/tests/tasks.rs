//! Tasks: stored active, the first end wins, batches are whole or nothing,
//! listed until their deadline, and the bounds on write and on read.

use super::*;
use crate::store::rows;

#[test]
fn a_task_is_stored_active_and_its_first_end_wins() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut t1 = task("t1", 0, 60_000);
    t1.owner_executable = None;
    t1.owner_exe_sha256 = None;
    t1.bind_x5t = None;
    t1.tools = vec![];
    t1.tokens_issued = 2;
    store.insert_task(&t1).unwrap();
    assert_eq!(store.task("t1").unwrap(), Some(t1.clone()));
    assert_eq!(store.task("missing").unwrap(), None);

    let err = store.insert_task(&task("t1", 5, 10)).unwrap_err();
    assert!(matches!(err, StoreError::Duplicate { .. }), "{err}");
    assert!(err.to_string().contains("task \"t1\""), "{err}");

    // An end arrives only through end_task.
    let mut born_ended = task("t2", 0, 60_000);
    born_ended.ended = Some(end(1, "completed"));
    match store.insert_task(&born_ended) {
        Err(StoreError::Unstorable {
            table: "tasks",
            problem,
            ..
        }) => assert!(problem.starts_with("ended: "), "{problem}"),
        other => panic!("expected Unstorable, got {other:?}"),
    }
    assert_eq!(store.task("t2").unwrap(), None);

    assert!(store.end_task("t1", &end(30, "completed"), 7).unwrap());
    let ended = TaskRow {
        ended: Some(end(30, "completed")),
        tokens_issued: 7,
        ..t1.clone()
    };
    assert_eq!(store.task("t1").unwrap(), Some(ended.clone()));
    // A later end changes nothing: not the time, the reason or the count.
    assert!(!store.end_task("t1", &end(40, "owner exited"), 9).unwrap());
    assert_eq!(store.task("t1").unwrap(), Some(ended.clone()));
    assert!(!store.end_task("missing", &end(40, "completed"), 0).unwrap());
    // An ended task's id stays taken, so it cannot be restarted active.
    assert!(matches!(
        store.insert_task(&t1),
        Err(StoreError::Duplicate { .. })
    ));

    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.task("t1").unwrap(), Some(ended));
}

#[test]
fn a_batch_of_tasks_is_stored_whole_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.insert_tasks(&[]).unwrap();

    // A duplicate inside the batch: neither copy, nor the rows before it.
    let err = store
        .insert_tasks(&[task("a", 0, 10), task("b", 0, 10), task("a", 1, 10)])
        .unwrap_err();
    assert!(matches!(err, StoreError::Duplicate { .. }), "{err}");
    assert!(err.to_string().contains("task \"a\""), "{err}");
    assert!(store.tasks_until(UNIX_EPOCH).unwrap().is_empty());

    store
        .insert_tasks(&[task("a", 0, 10), task("b", 1, 10)])
        .unwrap();
    // A duplicate of a stored task, last in the batch.
    let err = store
        .insert_tasks(&[task("c", 2, 10), task("d", 3, 10), task("b", 4, 10)])
        .unwrap_err();
    assert!(err.to_string().contains("task \"b\""), "{err}");
    // One row that cannot be stored refuses the batch before any write.
    let mut bad = task("e", 5, 10);
    bad.owner_pid = 0;
    let err = store.insert_tasks(&[task("c", 2, 10), bad]).unwrap_err();
    assert!(matches!(err, StoreError::Unstorable { .. }), "{err}");
    assert_eq!(
        task_ids(&store.tasks_until(UNIX_EPOCH).unwrap()),
        ["a", "b"]
    );
    assert_eq!(store.task("b").unwrap(), Some(task("b", 1, 10)));
}

#[test]
fn a_batch_of_ends_is_one_transaction_and_first_ends_win() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store
        .insert_tasks(&[task("a", 0, 100), task("b", 1, 100), task("c", 2, 100)])
        .unwrap();
    assert!(store.end_task("b", &end(5, "completed"), 1).unwrap());
    assert_eq!(store.end_tasks(&[]).unwrap(), 0);

    // One end that cannot be stored refuses the batch: "a" stays active.
    let err = store
        .end_tasks(&[
            ("a".into(), end(6, "owner exited"), 3),
            ("c".into(), end(6, &"r".repeat(rows::MAX_REASON_LEN + 1)), 0),
        ])
        .unwrap_err();
    match err {
        StoreError::Unstorable { id, problem, .. } => {
            assert_eq!(id, "\"c\"");
            assert!(problem.starts_with("ended.reason: "), "{problem}");
        }
        other => panic!("expected Unstorable, got {other:?}"),
    }
    assert_eq!(store.task("a").unwrap().unwrap().ended, None);

    let changed = store
        .end_tasks(&[
            ("a".into(), end(7, "owner exited"), 3),
            ("b".into(), end(7, "revoked"), 9),
            ("missing".into(), end(7, "revoked"), 0),
            ("a".into(), end(8, "deadline"), 4),
        ])
        .unwrap();
    assert_eq!(changed, 1, "only a was active");
    let a = store.task("a").unwrap().unwrap();
    assert_eq!(
        (a.ended, a.tokens_issued),
        (Some(end(7, "owner exited")), 3)
    );
    let b = store.task("b").unwrap().unwrap();
    assert_eq!((b.ended, b.tokens_issued), (Some(end(5, "completed")), 1));
    assert_eq!(store.task("c").unwrap().unwrap().ended, None);
}

#[test]
fn tasks_list_until_their_deadline_and_prune_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    // id, created at, deadline
    for (id, created_at, deadline) in [
        ("late", 30, 300),
        ("b", 10, 200),
        ("a", 10, 100),
        ("first", 0, 50),
    ] {
        store.insert_task(&task(id, created_at, deadline)).unwrap();
    }
    assert!(store.end_task("b", &end(20, "completed"), 1).unwrap());
    let until = |ms| task_ids(&store.tasks_until(at(ms)).unwrap()).join(",");

    // Oldest first, ties by id; ended tasks too, until their deadline.
    assert_eq!(until(0), "first,a,b,late");
    assert_eq!(until(49), "first,a,b,late");
    // A deadline equal to `now` has passed.
    assert_eq!(until(50), "a,b,late");
    assert_eq!(until(99), "a,b,late");
    assert_eq!(until(100), "b,late");
    assert_eq!(until(199), "b,late");
    assert_eq!(until(200), "late");
    assert_eq!(until(300), "");
    assert_eq!(
        store.tasks_until(at(150)).unwrap()[0],
        TaskRow {
            ended: Some(end(20, "completed")),
            tokens_issued: 1,
            ..task("b", 10, 200)
        }
    );
    assert_eq!(
        store
            .tasks_until(UNIX_EPOCH - Duration::from_secs(1))
            .unwrap()
            .len(),
        4
    );

    // Strictly before: a deadline equal to `before` is kept.
    assert_eq!(store.prune_tasks(at(50)).unwrap(), 0);
    assert_eq!(store.prune_tasks(at(51)).unwrap(), 1);
    assert_eq!(store.prune_tasks(at(51)).unwrap(), 0);
    // Ended or not.
    assert_eq!(store.prune_tasks(at(250)).unwrap(), 2);
    assert_eq!(until(0), "late");
    assert_eq!(store.task("b").unwrap(), None);
    assert!(!store.end_task("b", &end(260, "completed"), 0).unwrap());
}

#[test]
fn task_values_outside_the_bounds_are_refused_on_write_and_bad_rows_on_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let long = |n: usize| "x".repeat(n);

    // Every bound, at its limit, round trips.
    let widest = TaskRow {
        id: long(MAX_ID_LEN),
        owner_pid: i32::MAX,
        owner_start_time: i64::MAX as u64,
        owner_uid: u32::MAX,
        owner_executable: Some(long(rows::MAX_PATH_LEN)),
        owner_exe_sha256: Some(long(MAX_ID_LEN)),
        spiffe_id: long(rows::MAX_SPIFFE_ID_LEN),
        entry_id: long(MAX_ID_LEN),
        audience: long(rows::MAX_SPIFFE_ID_LEN),
        intent: long(MAX_INTENT_LEN),
        tools: (0..rows::MAX_LIST_ITEMS).map(|i| i.to_string()).collect(),
        bind_x5t: Some(long(MAX_ID_LEN)),
        created_at: UNIX_EPOCH,
        deadline: UNIX_EPOCH + Duration::from_millis(rows::MAX_MILLIS as u64),
        ended: None,
        tokens_issued: i64::MAX as u64,
        scope_descendants: true,
    };
    store.insert_task(&widest).unwrap();
    let reason = long(rows::MAX_REASON_LEN);
    let last = UNIX_EPOCH + Duration::from_millis(rows::MAX_MILLIS as u64);
    let widest_end = TaskEnd { at: last, reason };
    assert!(
        store
            .end_task(&widest.id, &widest_end, i64::MAX as u64)
            .unwrap()
    );
    let stored = store.task(&widest.id).unwrap().unwrap();
    assert_eq!(stored.ended, Some(widest_end));
    assert_eq!(
        stored,
        TaskRow {
            ended: stored.ended.clone(),
            ..widest.clone()
        }
    );
    assert_eq!(store.prune_tasks(last).unwrap(), 0);
    store.conn().execute("DELETE FROM tasks", []).unwrap();

    // One past each bound is refused, naming the field.
    type Damage = fn(&mut TaskRow);
    let refused: [(&str, Damage); 17] = [
        ("id", |t| t.id = "x".repeat(MAX_ID_LEN + 1)),
        ("owner_pid", |t| t.owner_pid = 0),
        ("owner_pid", |t| t.owner_pid = -1),
        ("owner_start_time", |t| {
            t.owner_start_time = i64::MAX as u64 + 1
        }),
        ("owner_executable", |t| {
            t.owner_executable = Some("x".repeat(rows::MAX_PATH_LEN + 1))
        }),
        ("owner_exe_sha256", |t| {
            t.owner_exe_sha256 = Some("x".repeat(MAX_ID_LEN + 1))
        }),
        ("spiffe_id", |t| {
            t.spiffe_id = "x".repeat(rows::MAX_SPIFFE_ID_LEN + 1)
        }),
        ("entry_id", |t| t.entry_id = "x".repeat(MAX_ID_LEN + 1)),
        ("audience", |t| {
            t.audience = "x".repeat(rows::MAX_SPIFFE_ID_LEN + 1)
        }),
        ("intent", |t| t.intent = "x".repeat(MAX_INTENT_LEN + 1)),
        ("tools", |t| {
            t.tools = (0..=rows::MAX_LIST_ITEMS).map(|i| i.to_string()).collect()
        }),
        ("tools", |t| {
            t.tools = vec!["x".repeat(rows::MAX_LIST_ITEM_LEN + 1)]
        }),
        ("bind_x5t", |t| {
            t.bind_x5t = Some("x".repeat(MAX_ID_LEN + 1))
        }),
        ("created_at", |t| {
            t.created_at = UNIX_EPOCH - Duration::from_millis(1)
        }),
        ("deadline", |t| {
            t.deadline = UNIX_EPOCH + Duration::from_millis(rows::MAX_MILLIS as u64 + 1)
        }),
        ("tokens_issued", |t| t.tokens_issued = u64::MAX),
        ("ended", |t| t.ended = Some(end(1, "completed"))),
    ];
    for (field, damage) in refused {
        let mut row = task("t", 0, 100);
        damage(&mut row);
        for result in [
            store.insert_task(&row),
            store.insert_tasks(&[task("ok", 0, 100), row.clone()]),
        ] {
            match result {
                Err(StoreError::Unstorable {
                    table: "tasks",
                    problem,
                    ..
                }) => assert!(problem.starts_with(&format!("{field}: ")), "{problem}"),
                other => panic!("{field}: expected Unstorable, got {other:?}"),
            }
        }
    }
    assert!(store.tasks_until(UNIX_EPOCH).unwrap().is_empty());

    store.insert_task(&task("good", 0, 100)).unwrap();
    for (field, bad_end, tokens) in [
        ("tokens_issued", end(0, "completed"), u64::MAX),
        ("ended.reason", end(0, &long(rows::MAX_REASON_LEN + 1)), 0),
        (
            "ended.at",
            TaskEnd {
                at: UNIX_EPOCH - Duration::from_millis(1),
                reason: "completed".into(),
            },
            0,
        ),
    ] {
        for result in [
            store.end_task("good", &bad_end, tokens).map(|_| ()),
            store
                .end_tasks(&[("good".into(), bad_end.clone(), tokens)])
                .map(|_| ()),
        ] {
            match result {
                Err(StoreError::Unstorable { problem, .. }) => {
                    assert!(problem.starts_with(&format!("{field}: ")), "{problem}")
                }
                other => panic!("{field}: expected Unstorable, got {other:?}"),
            }
        }
    }
    assert_eq!(store.task("good").unwrap(), Some(task("good", 0, 100)));

    // Damage that keeps the file structurally sound (STRICT still holds
    // the types): values no write could have produced.
    let conn = raw(dir.path());
    let ext = |n: usize| format!("hex(zeroblob({}))", n.div_ceil(2));
    for (assignments, column) in [
        ("owner_pid = 0".to_owned(), "owner_pid"),
        ("owner_pid = 2147483648".into(), "owner_pid"),
        ("owner_start_time = -1".into(), "owner_start_time"),
        ("owner_uid = -1".into(), "owner_uid"),
        ("owner_uid = 4294967296".into(), "owner_uid"),
        (
            format!("owner_executable = {}", ext(rows::MAX_PATH_LEN + 1)),
            "owner_executable",
        ),
        (
            format!("owner_exe_sha256 = {}", ext(MAX_ID_LEN + 1)),
            "owner_exe_sha256",
        ),
        (
            format!("spiffe_id = {}", ext(rows::MAX_SPIFFE_ID_LEN + 1)),
            "spiffe_id",
        ),
        (format!("entry_id = {}", ext(MAX_ID_LEN + 1)), "entry_id"),
        (
            format!("audience = {}", ext(rows::MAX_SPIFFE_ID_LEN + 1)),
            "audience",
        ),
        (format!("intent = {}", ext(MAX_INTENT_LEN + 1)), "intent"),
        ("tools = '[\"jira.search\", 1]'".into(), "tools"),
        ("tools = 'jira.search'".into(), "tools"),
        (format!("bind_x5t = {}", ext(MAX_ID_LEN + 1)), "bind_x5t"),
        ("created_at_ms = -5".into(), "created_at_ms"),
        (
            format!("deadline_ms = {}", rows::MAX_MILLIS + 1),
            "deadline_ms",
        ),
        // An end half written: either half alone is damage.
        ("ended_at_ms = 5".into(), "end_reason"),
        ("end_reason = 'completed'".into(), "ended_at_ms"),
        (
            "ended_at_ms = -1, end_reason = 'completed'".into(),
            "ended_at_ms",
        ),
        (
            format!(
                "ended_at_ms = 5, end_reason = {}",
                ext(rows::MAX_REASON_LEN + 1)
            ),
            "end_reason",
        ),
        ("tokens_issued = -1".into(), "tokens_issued"),
        ("scope_descendants = 2".into(), "scope_descendants"),
    ] {
        conn.execute_batch(&format!(
            "INSERT INTO tasks SELECT 'bad', owner_pid, owner_start_time, owner_uid, \
             owner_executable, owner_exe_sha256, spiffe_id, entry_id, audience, intent, \
             tools, bind_x5t, created_at_ms + 1, deadline_ms, ended_at_ms, end_reason, \
             tokens_issued, scope_descendants FROM tasks WHERE id = 'good'; \
             UPDATE tasks SET {assignments} WHERE id = 'bad';"
        ))
        .unwrap();
        let listed = store
            .tasks_until(UNIX_EPOCH - Duration::from_secs(1))
            .map(|_| ());
        for result in [listed, store.task("bad").map(|_| ())] {
            match result {
                Err(StoreError::BadRow {
                    table, id, problem, ..
                }) => {
                    assert_eq!(table, "tasks");
                    assert_eq!(id, "\"bad\"");
                    assert!(
                        problem.starts_with(&format!("{column}: ")),
                        "{assignments}: {problem}"
                    );
                }
                other => panic!("{assignments}: expected BadRow, got {other:?}"),
            }
        }
        assert!(store.task("good").unwrap().is_some());
        conn.execute("DELETE FROM tasks WHERE id = 'bad'", [])
            .unwrap();
    }

    // An id that cannot be read is named by its rowid.
    conn.execute(
        &format!(
            "UPDATE tasks SET id = {} WHERE id = 'good'",
            ext(MAX_ID_LEN + 1)
        ),
        [],
    )
    .unwrap();
    match store.tasks_until(UNIX_EPOCH) {
        Err(StoreError::BadRow { table, id, .. }) => {
            assert_eq!(table, "tasks");
            assert!(id.starts_with("at rowid"), "{id}");
        }
        other => panic!("expected BadRow, got {other:?}"),
    }
}
