//! Schema steps: shipped steps are pinned, an appended step upgrades, and
//! a failing one changes nothing.

use rusqlite::Connection;

use crate::store::migrations::*;

fn table_names(conn: &Connection) -> Vec<String> {
    let mut stmt = conn
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")
        .unwrap();
    stmt.query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn shipped_steps_are_never_edited() {
    // Appending a step adds a line here; changing a line means a
    // released database would no longer match its version number.
    let pinned = [
        "267135485dbf667e8ca6c2be43aa625b86776c581fccc30455b5a8e79623d9c9",
        "7ab823e6b18a0017d8fe4e1cddc909e464855a6c23b7680b8eab5293820de21d",
    ];
    assert_eq!(STEPS.len(), pinned.len(), "pin the new step's SHA-256");
    for (step, want) in STEPS.iter().zip(pinned) {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, step.as_bytes());
        let got: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(got, want, "a shipped migration step was edited");
    }
}

#[test]
fn an_appended_step_upgrades_and_a_failing_one_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut conn = Connection::open(dir.path().join("m.db")).unwrap();
    assert_eq!(apply(&mut conn, &STEPS[..1]).unwrap(), 1);
    assert_eq!(table_names(&conn), ["entries", "issued_x509"]);
    let app_id: i64 = conn
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .unwrap();
    assert_eq!(app_id, APPLICATION_ID);

    assert_eq!(apply(&mut conn, STEPS).unwrap(), i64::from(LATEST));
    // Re-applying is a no-op, not a "table exists" error.
    assert_eq!(apply(&mut conn, STEPS).unwrap(), i64::from(LATEST));
    assert_eq!(
        table_names(&conn),
        ["entries", "issued_x509", "revoked_x509", "tasks"]
    );

    let next = "CREATE TABLE revocations (jti TEXT NOT NULL PRIMARY KEY) STRICT;";
    let broken = "CREATE TABLE later (x TEXT) STRICT; NOT SQL AT ALL;";
    let with_next: Vec<&str> = STEPS.iter().copied().chain([next]).collect();
    let with_broken: Vec<&str> = with_next.iter().copied().chain([broken]).collect();
    assert_eq!(apply(&mut conn, &with_next).unwrap(), i64::from(LATEST) + 1);
    assert!(apply(&mut conn, &with_broken).is_err());
    assert_eq!(user_version(&conn).unwrap(), i64::from(LATEST) + 1);
    assert_eq!(
        table_names(&conn),
        [
            "entries",
            "issued_x509",
            "revocations",
            "revoked_x509",
            "tasks"
        ]
    );
}
