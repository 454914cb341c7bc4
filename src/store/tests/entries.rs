//! Entries: round trips, the duplicate rules, optimistic updates, and the
//! bounds on write and on read.

use super::*;
use crate::store::rows;

#[test]
fn entries_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert!(store.entries().unwrap().is_empty());

    let mut b = entry("b", "spiffe://example.org/b", &["unix:uid:1"]);
    b.created_at = at(5);
    b.process_bound = true;
    let mut a = entry("a", "spiffe://example.org/a", &["unix:uid:2", "unix:gid:2"]);
    a.created_at = at(5);
    a.process_bound = true;
    let mut first = entry("z", "spiffe://example.org/z", &[]);
    first.created_at = at(1);
    first.x509_svid_ttl = None;
    first.jwt_svid_ttl = Some(Duration::from_millis(300_250));
    first.hint = None;
    first.dns_names = vec![];
    first.federates_with = vec![];
    first.audiences = vec![];
    for row in [&b, &a, &first] {
        store.insert_entry(row).unwrap();
    }
    // Oldest first; equal times by id.
    let listed = store.entries().unwrap();
    assert_eq!(ids(&listed), ["z", "a", "b"]);
    assert_eq!(listed, [first.clone(), a.clone(), b.clone()]);
    assert_eq!(store.entry("a").unwrap(), Some(a.clone()));
    assert_eq!(store.entry("missing").unwrap(), None);

    let mut changed = a.clone();
    changed.selectors = vec!["unix:uid:3".into()];
    changed.spiffe_id = "spiffe://example.org/a2".into();
    changed.hint = None;
    changed.audiences = vec!["https://a.internal".into(), "https://b.internal".into()];
    changed.process_bound = false;
    changed.updated_at = at(9);
    changed.revision = 2;
    store.update_entry(&changed).unwrap();
    assert_eq!(store.entry("a").unwrap(), Some(changed.clone()));
    // And back: an update writes the flag both ways.
    changed.process_bound = true;
    changed.revision = 3;
    store.update_entry(&changed).unwrap();
    assert!(store.entry("a").unwrap().unwrap().process_bound);

    assert!(store.delete_entry("a").unwrap());
    assert!(!store.delete_entry("a").unwrap());
    assert_eq!(store.entry("a").unwrap(), None);
    assert_eq!(ids(&store.entries().unwrap()), ["z", "b"]);

    // And it is all still there after a restart, the flag included
    // (b's is set, first's is not).
    let mut first_bound = first.clone();
    first_bound.process_bound = true;
    first_bound.revision = 2;
    store.update_entry(&first_bound).unwrap();
    first_bound.process_bound = false;
    first_bound.revision = 3;
    store.update_entry(&first_bound).unwrap();
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.entries().unwrap(), [first_bound, b]);
}

#[test]
fn duplicates_by_id_and_by_selector_set() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = "spiffe://example.org/a";
    store
        .insert_entry(&entry("e1", a, &["unix:uid:1", "unix:gid:1"]))
        .unwrap();

    let err = store
        .insert_entry(&entry("e1", "spiffe://example.org/other", &["x:y"]))
        .unwrap_err();
    assert!(matches!(err, StoreError::Duplicate { .. }), "{err}");
    assert!(err.to_string().contains("\"e1\""), "{err}");

    // Same SPIFFE ID and selector set, in another order and repeated.
    let err = store
        .insert_entry(&entry("e2", a, &["unix:gid:1", "unix:uid:1", "unix:gid:1"]))
        .unwrap_err();
    assert!(matches!(err, StoreError::Duplicate { .. }), "{err}");
    assert!(err.to_string().contains("(entry \"e1\")"), "{err}");
    // Nor do other audiences make another entry.
    let mut other_audiences = entry("e2", a, &["unix:uid:1", "unix:gid:1"]);
    other_audiences.audiences = vec!["https://elsewhere.internal".into()];
    let err = store.insert_entry(&other_audiences).unwrap_err();
    assert!(matches!(err, StoreError::Duplicate { .. }), "{err}");
    // Nor does process binding.
    let mut process_bound = entry("e2", a, &["unix:uid:1", "unix:gid:1"]);
    process_bound.process_bound = true;
    let err = store.insert_entry(&process_bound).unwrap_err();
    assert!(matches!(err, StoreError::Duplicate { .. }), "{err}");

    // A different SPIFFE ID or a different set is another entry.
    let other = "spiffe://example.org/b";
    store
        .insert_entry(&entry("e3", other, &["unix:uid:1", "unix:gid:1"]))
        .unwrap();
    store
        .insert_entry(&entry("e4", a, &["unix:uid:1"]))
        .unwrap();
    assert_eq!(store.entries().unwrap().len(), 3);

    // An update may not take another entry's identity...
    let mut e4 = entry("e4", a, &["unix:gid:1", "unix:uid:1"]);
    e4.revision = 2;
    let err = store.update_entry(&e4).unwrap_err();
    assert!(matches!(err, StoreError::Duplicate { .. }), "{err}");
    // ...but keeping its own identity, reordered, is no duplicate.
    let mut e1 = entry("e1", a, &["unix:gid:1", "unix:uid:1"]);
    e1.revision = 2;
    store.update_entry(&e1).unwrap();

    let err = store
        .record_x509_issued(&issued("0a", 0, 10))
        .and_then(|()| store.record_x509_issued(&issued("0a", 1, 11)));
    assert!(matches!(err, Err(StoreError::Duplicate { .. })), "{err:?}");
}

#[test]
fn updates_need_the_next_revision_of_an_existing_entry() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut row = entry("e1", "spiffe://example.org/a", &["unix:uid:1"]);

    row.revision = 2;
    let err = store.update_entry(&row).unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound { ref id } if id == "e1"),
        "{err}"
    );

    row.revision = 1;
    store.insert_entry(&row).unwrap();
    row.revision = 2;
    store.update_entry(&row).unwrap();

    // A second writer that also read revision 1.
    let err = store.update_entry(&row).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                expected: 1,
                found: 2,
                ..
            }
        ),
        "{err}"
    );
    row.revision = 7;
    let err = store.update_entry(&row).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                expected: 6,
                found: 2,
                ..
            }
        ),
        "{err}"
    );
    row.revision = 0;
    let err = store.update_entry(&row).unwrap_err();
    assert!(matches!(err, StoreError::Unstorable { .. }), "{err}");
    assert_eq!(store.entry("e1").unwrap().unwrap().revision, 2);
}

#[test]
fn values_outside_the_bounds_are_refused_on_write_and_bad_rows_on_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut row = entry("e1", "spiffe://example.org/a", &[]);
    row.selectors = (0..10_000).map(|i| format!("unix:uid:{i}")).collect();
    let err = store.insert_entry(&row).unwrap_err();
    assert!(matches!(err, StoreError::Unstorable { .. }), "{err}");
    let mut row = entry(&"x".repeat(100_000), "spiffe://example.org/a", &[]);
    let err = store.insert_entry(&row).unwrap_err();
    assert!(
        err.to_string().len() < 500,
        "error quotes the whole id: {err}"
    );
    row.id = "e1".into();
    row.created_at = UNIX_EPOCH - Duration::from_millis(1);
    assert!(matches!(
        store.insert_entry(&row),
        Err(StoreError::Unstorable { .. })
    ));
    let mut row = entry("e1", "spiffe://example.org/a", &[]);
    row.audiences = vec!["x".repeat(rows::MAX_LIST_ITEM_LEN + 1)];
    match store.insert_entry(&row) {
        Err(StoreError::Unstorable { problem, .. }) => {
            assert!(problem.starts_with("audiences: "), "{problem}")
        }
        other => panic!("expected Unstorable, got {other:?}"),
    }
    row.audiences = (0..=rows::MAX_LIST_ITEMS).map(|i| i.to_string()).collect();
    assert!(matches!(
        store.insert_entry(&row),
        Err(StoreError::Unstorable { .. })
    ));
    row.audiences = vec![];
    store.insert_entry(&row).unwrap();
    row.revision = 2;
    row.audiences = vec!["x".repeat(rows::MAX_LIST_ITEM_LEN + 1)];
    assert!(matches!(
        store.update_entry(&row),
        Err(StoreError::Unstorable { .. })
    ));
    assert!(store.delete_entry("e1").unwrap());
    assert!(matches!(
        store.record_x509_issued(&IssuedX509 {
            not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(u64::MAX / 2),
            ..issued("01", 0, 1)
        }),
        Err(StoreError::Unstorable { .. })
    ));
    assert!(store.entries().unwrap().is_empty());

    // Damage that keeps the file structurally sound: values no write
    // could have produced.
    store
        .insert_entry(&entry("good", "spiffe://example.org/good", &[]))
        .unwrap();
    store.record_x509_issued(&issued("0b", 0, 10)).unwrap();
    let conn = raw(dir.path());
    for (column, value) in [
        ("selectors", "'{\"not\": \"a list\"}'"),
        ("dns_names", "'[1, 2]'"),
        ("federates_with", "'[\"' || hex(zeroblob(300000)) || '\"]'"),
        ("created_at_ms", "-5"),
        ("revision", "-1"),
        ("x509_svid_ttl_ms", "9223372036854775807"),
        ("hint", "hex(zeroblob(5000))"),
        ("audiences", "'[\"https://a.internal\", 7]'"),
        // 257 items: one more than a write may store.
        (
            "audiences",
            "'[' || substr(replace(hex(zeroblob(257)), '00', '\"a\",'), 1, 1027) || ']'",
        ),
        // A flag is 0 or 1, strictly: no other value means "set".
        ("process_bound", "2"),
        ("process_bound", "-1"),
    ] {
        conn.execute_batch(&format!(
            "INSERT INTO entries SELECT 'bad', spiffe_id || '/bad', selectors, \
             selector_key, x509_svid_ttl_ms, jwt_svid_ttl_ms, dns_names, hint, \
             federates_with, created_at_ms + 1, updated_at_ms, revision, audiences, \
             process_bound FROM entries WHERE id = 'good'; \
             UPDATE entries SET {column} = {value} WHERE id = 'bad';"
        ))
        .unwrap();
        for result in [store.entries().map(|_| ()), store.entry("bad").map(|_| ())] {
            match result {
                Err(StoreError::BadRow {
                    table, id, problem, ..
                }) => {
                    assert_eq!(table, "entries");
                    assert_eq!(id, "\"bad\"");
                    assert!(problem.starts_with(column), "{column}: {problem}");
                }
                other => panic!("{column}: expected BadRow, got {other:?}"),
            }
        }
        assert!(store.entry("good").unwrap().is_some());
        conn.execute("DELETE FROM entries WHERE id = 'bad'", [])
            .unwrap();
    }

    // An id that cannot be read is named by its rowid.
    conn.execute(
        "UPDATE entries SET id = hex(zeroblob(1000)) WHERE id = 'good'",
        [],
    )
    .unwrap();
    match store.entries() {
        Err(StoreError::BadRow { id, .. }) => assert!(id.starts_with("at rowid"), "{id}"),
        other => panic!("expected BadRow, got {other:?}"),
    }
    conn.execute(
        "UPDATE issued_x509 SET not_after_ms = ?1",
        [rows::MAX_MILLIS + 1],
    )
    .unwrap();
    assert!(matches!(
        store.live_x509(UNIX_EPOCH - Duration::from_secs(1)),
        Err(StoreError::BadRow {
            table: "issued_x509",
            ..
        })
    ));
}
