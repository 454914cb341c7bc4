//! Opening: schema versions and migrations, damaged or foreign databases
//! (refused untouched), file modes, and one connection shared by clones.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

use rusqlite::config::DbConfig;
use rusqlite::types::ValueRef;

use super::*;
use crate::store::entries::entry_params;
use crate::store::migrations;
use crate::store::rows::EncodedEntry;

#[test]
fn migrates_from_empty_and_reopens_idempotently() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.schema_version().unwrap(), migrations::LATEST);
    {
        let conn = store.conn();
        let pragma = |name: &str| -> String {
            conn.pragma_query_value(None, name, |r| {
                Ok(match r.get_ref(0)? {
                    ValueRef::Integer(n) => n.to_string(),
                    other => other.as_str().unwrap().to_owned(),
                })
            })
            .unwrap()
        };
        assert_eq!(pragma("journal_mode"), "wal");
        assert_eq!(pragma("synchronous"), "2", "FULL");
        assert_eq!(pragma("foreign_keys"), "1");
    }
    store
        .insert_entry(&entry("e1", "spiffe://example.org/a", &[]))
        .unwrap();
    drop(store);

    for _ in 0..2 {
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.schema_version().unwrap(), migrations::LATEST);
        assert_eq!(ids(&store.entries().unwrap()), ["e1"]);
    }
}

#[test]
fn a_newer_schema_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path()).unwrap());
    let newer = i64::from(migrations::LATEST) + 1;
    raw(dir.path())
        .pragma_update(None, "user_version", newer)
        .unwrap();
    let before = fs::read(dir.path().join(DB_FILE)).unwrap();

    let err = Store::open(dir.path()).unwrap_err();
    match &err {
        StoreError::NewerSchema { found, known, .. } => {
            assert_eq!(i64::from(*found), newer);
            assert_eq!(*known, migrations::LATEST);
        }
        other => panic!("expected NewerSchema, got {other}"),
    }
    assert!(err.to_string().contains("newer tether"), "{err}");
    assert_eq!(fs::read(dir.path().join(DB_FILE)).unwrap(), before);
}

#[test]
fn garbage_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DB_FILE);
    // Deterministic noise (xorshift), several pages of it.
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let garbage: Vec<u8> = (0..16 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .unwrap()
        .write_all(&garbage)
        .unwrap();

    let err = Store::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("restore it from a backup"), "{message}");
    assert_eq!(fs::read(&path).unwrap(), garbage);
}

#[test]
fn a_damaged_page_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    populated(dir.path(), 400);
    let path = dir.path().join(DB_FILE);
    let mut bytes = fs::read(&path).unwrap();
    let page_size = usize::from(u16::from_be_bytes([bytes[16], bytes[17]]));
    let pages = bytes.len() / page_size;
    assert!(
        pages >= 8,
        "only {pages} pages: make the test database bigger"
    );
    // Flip every bit of one page in the middle (never page 1, the header).
    let middle = pages / 2;
    for byte in &mut bytes[middle * page_size..(middle + 1) * page_size] {
        *byte ^= 0xff;
    }
    fs::write(&path, &bytes).unwrap();

    let err = Store::open(dir.path()).unwrap_err();
    match &err {
        StoreError::Corrupt { detail, .. } => {
            assert!(detail.starts_with("quick_check found: "), "{detail}");
            assert!(!detail.contains('\n'), "{detail}");
        }
        other => panic!("expected Corrupt, got {other}"),
    }
    assert_eq!(
        fs::read(&path).unwrap(),
        bytes,
        "the damaged file was modified"
    );
    // Refused again on the next start, not repaired in between.
    assert!(matches!(
        Store::open(dir.path()),
        Err(StoreError::Corrupt { .. })
    ));
}

#[test]
fn a_damaged_database_with_pending_commits_is_not_checkpointed() {
    let dir = tempfile::tempdir().unwrap();
    populated(dir.path(), 400);
    // Commits left in the -wal, as after a crash: another connection
    // that never checkpoints.
    let conn = raw(dir.path());
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
        .unwrap();
    conn.execute_batch(
        "PRAGMA wal_autocheckpoint = 0; \
         INSERT INTO entries SELECT 'zzz', 'spiffe://example.org/zzz', selectors, \
         selector_key, x509_svid_ttl_ms, jwt_svid_ttl_ms, dns_names, hint, \
         federates_with, created_at_ms + 100000, updated_at_ms, revision, audiences, \
         process_bound FROM entries WHERE id = 'entry-00000';",
    )
    .unwrap();
    drop(conn);
    let path = dir.path().join(DB_FILE);
    let wal = dir.path().join("tether.db-wal");
    let wal_before = fs::read(&wal).unwrap();
    assert!(!wal_before.is_empty(), "no pending commits to protect");

    let mut bytes = fs::read(&path).unwrap();
    let page_size = usize::from(u16::from_be_bytes([bytes[16], bytes[17]]));
    // Damage a page the -wal does not hold a newer copy of, or readers
    // would never see the damage. A WAL frame is a 24-byte header (page
    // number first) and a page, after a 32-byte file header.
    let in_wal: Vec<usize> = wal_before[32..]
        .chunks(24 + page_size)
        .map(|frame| u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize - 1)
        .collect();
    let pages = bytes.len() / page_size;
    let damaged = (pages / 2..pages)
        .find(|p| !in_wal.contains(p))
        .expect("every later page is in the -wal");
    for byte in &mut bytes[damaged * page_size..(damaged + 1) * page_size] {
        *byte ^= 0xff;
    }
    fs::write(&path, &bytes).unwrap();

    let result = Store::open(dir.path());
    assert!(
        matches!(result, Err(StoreError::Corrupt { .. })),
        "{result:?}"
    );
    // Closing normally would have copied the -wal into the damaged file
    // and removed it: both are kept as found, for whoever investigates.
    assert_eq!(
        fs::read(&path).unwrap(),
        bytes,
        "the damaged file was modified"
    );
    assert_eq!(fs::read(&wal).unwrap(), wal_before, "the -wal was modified");
}

#[test]
fn another_programs_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DB_FILE);
    File::create(&path).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    raw(dir.path())
        .execute_batch("CREATE TABLE accounts (name TEXT);")
        .unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");

    raw(dir.path())
        .execute_batch("PRAGMA user_version = 1;")
        .unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("application_id"), "{err}");
}

#[test]
fn files_are_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store
        .insert_entry(&entry("e1", "spiffe://example.org/a", &[]))
        .unwrap();
    for name in [DB_FILE, "tether.db-wal", "tether.db-shm"] {
        assert_eq!(mode(&dir.path().join(name)), 0o600, "{name}");
    }
    drop(store);

    let path = dir.path().join(DB_FILE);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    assert!(
        matches!(err, StoreError::Permissive { mode: 0o644, .. }),
        "{err}"
    );
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();

    // A leftover WAL others could write would let them inject rows.
    let wal = dir.path().join("tether.db-wal");
    File::create(&wal).unwrap();
    fs::set_permissions(&wal, fs::Permissions::from_mode(0o666)).unwrap();
    assert!(matches!(
        Store::open(dir.path()),
        Err(StoreError::Untrusted(TrustedFsError::Mode {
            mode: 0o666,
            ..
        }))
    ));
    fs::remove_file(&wal).unwrap();

    fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(dir.path().join("elsewhere"), &path).unwrap();
    assert!(matches!(
        Store::open(dir.path()),
        Err(StoreError::Untrusted(TrustedFsError::Symlink(_)))
    ));
}

/// Stores `row` as a v1 build did: every v1 column, no audiences and no
/// process binding.
fn insert_v1_entry(store: &Store, row: &EntryRow) {
    let encoded = EncodedEntry::new(row).unwrap();
    let params: Vec<_> = entry_params(&encoded)
        .into_iter()
        .filter(|(name, _)| ![":audiences", ":process_bound"].contains(name))
        .collect();
    store
        .conn()
        .execute(
            "INSERT INTO entries (id, spiffe_id, selectors, selector_key, x509_svid_ttl_ms, \
             jwt_svid_ttl_ms, dns_names, hint, federates_with, created_at_ms, updated_at_ms, \
             revision) VALUES (:id, :spiffe_id, :selectors, :selector_key, \
             :x509_svid_ttl_ms, :jwt_svid_ttl_ms, :dns_names, :hint, :federates_with, \
             :created_at_ms, :updated_at_ms, :revision)",
            params.as_slice(),
        )
        .unwrap();
}

#[test]
fn a_v1_database_upgrades_keeping_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = &migrations::STEPS[..1];
    let mut a = entry("a", "spiffe://example.org/a", &["unix:uid:1"]);
    a.audiences = vec![];
    let mut b = entry("b", "spiffe://example.org/b", &["unix:uid:2"]);
    b.audiences = vec![];
    b.created_at = at(1);
    {
        // What a v1 build wrote: no audiences or process_bound column, no
        // tasks or revoked_x509 table.
        let store = Store::open_with(dir.path(), v1).unwrap();
        assert_eq!(store.schema_version().unwrap(), 1);
        insert_v1_entry(&store, &a);
        insert_v1_entry(&store, &b);
        store.record_x509_issued(&issued("01", 0, 100)).unwrap();
    }
    // A v1 build reopens its own database (and nothing upgraded it).
    assert_eq!(
        Store::open_with(dir.path(), v1)
            .unwrap()
            .schema_version()
            .unwrap(),
        1
    );

    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.schema_version().unwrap(), 2);
    // Every v1 row reads back whole, with no audiences, and not process
    // bound: v1 entries shared one SVID per entry.
    assert!(!a.process_bound && !b.process_bound);
    assert_eq!(store.entries().unwrap(), [a.clone(), b]);
    assert_eq!(store.live_x509(at(0)).unwrap(), [issued("01", 0, 100)]);
    assert!(store.tasks_until(UNIX_EPOCH).unwrap().is_empty());
    assert!(store.revoked_x509(UNIX_EPOCH).unwrap().is_empty());

    // And the upgraded rows take audiences, process binding, tasks and
    // revocations like new ones.
    a.audiences = vec!["https://mcp.jira.internal".into()];
    a.process_bound = true;
    a.revision = 2;
    store.update_entry(&a).unwrap();
    assert_eq!(store.entry("a").unwrap(), Some(a.clone()));
    store.insert_task(&task("t1", 0, 100)).unwrap();
    assert!(store.revoke_x509(&revoked("01", 50, 100)).unwrap());
    drop(store);

    // A v1 build now refuses the database rather than misread it.
    match Store::open_with(dir.path(), v1) {
        Err(StoreError::NewerSchema {
            found: 2, known: 1, ..
        }) => {}
        other => panic!("expected NewerSchema, got {other:?}"),
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.task("t1").unwrap(), Some(task("t1", 0, 100)));
    assert_eq!(store.entry("a").unwrap(), Some(a));
    assert_eq!(store.revoked_x509(at(0)).unwrap(), [revoked("01", 50, 100)]);
}

#[test]
fn clones_share_one_connection_across_threads() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    std::thread::scope(|s| {
        for t in 0..4 {
            let store = store.clone();
            s.spawn(move || {
                for i in 0..25 {
                    let id = format!("t{t}-{i}");
                    store
                        .insert_entry(&entry(&id, &format!("spiffe://example.org/{id}"), &[]))
                        .unwrap();
                }
            });
        }
    });
    assert_eq!(store.entries().unwrap().len(), 100);
}
