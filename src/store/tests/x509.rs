//! X.509-SVID records: issued ones listed while live and pruned after
//! expiry; revocations, whose first record wins, and their bounds.

use super::*;
use crate::store::rows;

#[test]
fn issued_records_list_live_ones_and_prune_expired_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    // serial, issued at, not after
    for (serial, issued_at, not_after) in [
        ("01", 0, 100),
        ("02", 10, 200),
        ("03", 20, 300),
        ("04", 30, 50),
    ] {
        store
            .record_x509_issued(&issued(serial, issued_at, not_after))
            .unwrap();
    }
    let serials = |records: Vec<IssuedX509>| -> Vec<String> {
        records.into_iter().map(|r| r.serial).collect()
    };
    // Newest first; "04" expired at 50, and "01" expires exactly at 100.
    assert_eq!(
        serials(store.live_x509(at(60)).unwrap()),
        ["03", "02", "01"]
    );
    assert_eq!(serials(store.live_x509(at(100)).unwrap()), ["03", "02"]);
    assert_eq!(store.live_x509(at(0)).unwrap()[0], issued("04", 30, 50));
    assert_eq!(
        store
            .live_x509(UNIX_EPOCH - Duration::from_secs(1))
            .unwrap()
            .len(),
        4
    );

    assert_eq!(
        store.prune_x509(at(100)).unwrap(),
        1,
        "only 04 expired before 100"
    );
    assert_eq!(store.prune_x509(at(100)).unwrap(), 0);
    assert_eq!(store.prune_x509(at(201)).unwrap(), 2);
    assert_eq!(serials(store.live_x509(at(0)).unwrap()), ["03"]);
}

#[test]
fn revocations_list_until_expiry_and_the_first_record_wins() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert!(store.revoked_x509(UNIX_EPOCH).unwrap().is_empty());
    // serial, revoked at, not after
    for (serial, revoked_at, not_after) in [
        ("0c", 20, 300),
        ("0b", 10, 200),
        ("0a", 10, 100),
        ("ff", 0, 50),
    ] {
        assert!(
            store
                .revoke_x509(&revoked(serial, revoked_at, not_after))
                .unwrap()
        );
    }
    let listed = |ms| serials(&store.revoked_x509(at(ms)).unwrap()).join(",");

    // Oldest revocation first, ties by serial.
    assert_eq!(listed(0), "ff,0a,0b,0c");
    assert_eq!(listed(49), "ff,0a,0b,0c");
    // A certificate expiring at `now` has expired.
    assert_eq!(listed(50), "0a,0b,0c");
    assert_eq!(listed(99), "0a,0b,0c");
    assert_eq!(listed(100), "0b,0c");
    assert_eq!(listed(299), "0c");
    assert_eq!(listed(300), "");
    assert_eq!(
        store
            .revoked_x509(UNIX_EPOCH - Duration::from_secs(1))
            .unwrap()
            .len(),
        4
    );

    // Revoking again keeps the first record whole: CA, time, expiry and
    // reason.
    let first = revoked("0b", 10, 200);
    let again = RevokedX509 {
        ca_id: "ca-2".into(),
        revoked_at: at(15),
        not_after: at(900),
        reason: "operator".into(),
        ..first.clone()
    };
    assert!(!store.revoke_x509(&again).unwrap());
    assert!(!store.revoke_x509(&first).unwrap());
    assert_eq!(listed(150), "0b,0c");
    assert_eq!(store.revoked_x509(at(150)).unwrap()[0], first);
    // Serials are text: another case is another serial.
    assert!(store.revoke_x509(&revoked("0B", 30, 200)).unwrap());
    assert_eq!(listed(150), "0b,0c,0B");

    // And all of it survives a restart.
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    let listed = |ms| serials(&store.revoked_x509(at(ms)).unwrap()).join(",");
    assert_eq!(listed(0), "ff,0a,0b,0c,0B");
    assert_eq!(store.revoked_x509(at(150)).unwrap()[0], first);

    // Strictly before: a certificate expiring at `before` is kept.
    assert_eq!(store.prune_revoked_x509(at(50)).unwrap(), 0);
    assert_eq!(store.prune_revoked_x509(at(51)).unwrap(), 1);
    assert_eq!(store.prune_revoked_x509(at(51)).unwrap(), 0);
    assert_eq!(listed(0), "0a,0b,0c,0B");
    assert_eq!(store.prune_revoked_x509(at(201)).unwrap(), 3);
    assert_eq!(listed(0), "0c");
    // A pruned serial's record is gone: revoking it again records anew.
    assert!(store.revoke_x509(&revoked("ff", 60, 70)).unwrap());
    assert_eq!(listed(0), "0c,ff");
}

#[test]
fn revocation_values_outside_the_bounds_are_refused_on_write_and_bad_rows_on_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let long = |n: usize| "x".repeat(n);
    let last = UNIX_EPOCH + Duration::from_millis(rows::MAX_MILLIS as u64);

    // Every bound, at its limit, round trips.
    let widest = RevokedX509 {
        serial: long(MAX_ID_LEN),
        ca_id: long(MAX_ID_LEN),
        revoked_at: UNIX_EPOCH,
        not_after: last,
        reason: long(rows::MAX_REASON_LEN),
    };
    assert!(store.revoke_x509(&widest).unwrap());
    assert_eq!(store.revoked_x509(UNIX_EPOCH).unwrap(), [widest]);
    assert_eq!(store.prune_revoked_x509(last).unwrap(), 0);
    store
        .conn()
        .execute("DELETE FROM revoked_x509", [])
        .unwrap();

    // One past each bound is refused, naming the field.
    type Damage = fn(&mut RevokedX509);
    let refused: [(&str, Damage); 6] = [
        ("serial", |r| r.serial = "x".repeat(MAX_ID_LEN + 1)),
        ("ca_id", |r| r.ca_id = "x".repeat(MAX_ID_LEN + 1)),
        ("revoked_at", |r| {
            r.revoked_at = UNIX_EPOCH - Duration::from_millis(1)
        }),
        ("not_after", |r| {
            r.not_after = UNIX_EPOCH - Duration::from_millis(1)
        }),
        ("not_after", |r| {
            r.not_after = UNIX_EPOCH + Duration::from_millis(rows::MAX_MILLIS as u64 + 1)
        }),
        ("reason", |r| {
            r.reason = "x".repeat(rows::MAX_REASON_LEN + 1)
        }),
    ];
    for (field, damage) in refused {
        let mut record = revoked("0a", 0, 100);
        damage(&mut record);
        match store.revoke_x509(&record) {
            Err(StoreError::Unstorable {
                table: "revoked_x509",
                id,
                problem,
            }) => {
                assert!(problem.starts_with(&format!("{field}: ")), "{problem}");
                assert!(id.len() < 100, "error quotes the whole serial: {id}");
            }
            other => panic!("{field}: expected Unstorable, got {other:?}"),
        }
    }
    assert!(store.revoked_x509(UNIX_EPOCH).unwrap().is_empty());

    // Damage that keeps the file structurally sound (STRICT still holds
    // the types): values no write could have produced.
    assert!(store.revoke_x509(&revoked("good", 0, 100)).unwrap());
    let conn = raw(dir.path());
    let ext = |n: usize| format!("hex(zeroblob({}))", n.div_ceil(2));
    for (assignments, column) in [
        (format!("ca_id = {}", ext(MAX_ID_LEN + 1)), "ca_id"),
        ("revoked_at_ms = -1".to_owned(), "revoked_at_ms"),
        (
            format!("not_after_ms = {}", rows::MAX_MILLIS + 1),
            "not_after_ms",
        ),
        (
            format!("reason = {}", ext(rows::MAX_REASON_LEN + 1)),
            "reason",
        ),
        ("reason = CAST(x'ff' AS TEXT)".into(), "reason"),
    ] {
        conn.execute_batch(&format!(
            "INSERT INTO revoked_x509 SELECT 'bad', ca_id, revoked_at_ms + 1, \
             not_after_ms, reason FROM revoked_x509 WHERE serial = 'good'; \
             UPDATE revoked_x509 SET {assignments} WHERE serial = 'bad';"
        ))
        .unwrap();
        match store.revoked_x509(UNIX_EPOCH) {
            Err(StoreError::BadRow {
                table, id, problem, ..
            }) => {
                assert_eq!(table, "revoked_x509");
                assert_eq!(id, "\"bad\"");
                assert!(
                    problem.starts_with(&format!("{column}: ")),
                    "{assignments}: {problem}"
                );
            }
            other => panic!("{assignments}: expected BadRow, got {other:?}"),
        }
        conn.execute("DELETE FROM revoked_x509 WHERE serial = 'bad'", [])
            .unwrap();
    }
    assert_eq!(
        store.revoked_x509(UNIX_EPOCH).unwrap(),
        [revoked("good", 0, 100)]
    );

    // A serial that cannot be read is named by its rowid.
    conn.execute(
        &format!(
            "UPDATE revoked_x509 SET serial = {} WHERE serial = 'good'",
            ext(MAX_ID_LEN + 1)
        ),
        [],
    )
    .unwrap();
    match store.revoked_x509(UNIX_EPOCH) {
        Err(StoreError::BadRow { table, id, .. }) => {
            assert_eq!(table, "revoked_x509");
            assert!(id.starts_with("at rowid"), "{id}");
        }
        other => panic!("expected BadRow, got {other:?}"),
    }
}
