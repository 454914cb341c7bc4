//! What needs no PostgreSQL: URLs refused before connecting (TLS asked
//! for, not a URL), the defaults added to an accepted one, and the shipped
//! schema steps pinned. The store against a real PostgreSQL is
//! `tests/integration/fleet_store.rs`.

use super::*;

#[test]
fn a_url_asking_for_tls_is_refused_naming_the_mode() {
    for (url, mode) in [
        (
            "postgres://tether@db.internal/tether?sslmode=require",
            "require",
        ),
        (
            "postgresql://tether:pw@db.internal/tether?connect_timeout=3&sslmode=verify-full",
            "verify-full",
        ),
        (
            "postgres://db.internal/tether?sslmode=VERIFY-CA",
            "verify-ca",
        ),
        ("postgres://db.internal/tether?sslmode=requir%65", "require"),
    ] {
        match check_url(url) {
            Err(PostgresError::TlsUnsupported { sslmode }) => assert_eq!(sslmode, mode, "{url}"),
            other => panic!("{url}: expected TlsUnsupported, got {other:?}"),
        }
    }
    let shown = check_url("postgres://h/db?sslmode=require")
        .expect_err("refused")
        .to_string();
    assert!(shown.contains("not supported yet"), "{shown}");
    assert!(shown.contains("Unix socket"), "{shown}");
}

#[test]
fn a_url_without_tls_is_accepted_with_the_servers_defaults() {
    for url in [
        "postgres://tether@127.0.0.1:5432/tether",
        "postgresql://tether:pw@db.internal/tether?sslmode=disable",
        "postgres://tether@db.internal/tether?sslmode=prefer",
        "postgres://tether@%2Frun%2Fpostgresql/tether",
    ] {
        check_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
    }
    let config = url::parse("postgres://t@h/db").expect("parsed");
    assert_eq!(config.get_connect_timeout(), Some(&url::CONNECT_TIMEOUT));
    assert_eq!(config.get_application_name(), Some("tether-server"));
    let config =
        url::parse("postgres://t@h/db?connect_timeout=2&application_name=x").expect("parsed");
    assert_eq!(config.get_connect_timeout(), Some(&Duration::from_secs(2)));
    assert_eq!(config.get_application_name(), Some("x"));
}

#[test]
fn what_is_not_a_postgres_url_is_refused() {
    assert!(matches!(
        check_url("mysql://h/db"),
        Err(PostgresError::NotAUrl)
    ));
    assert!(matches!(
        check_url("host=h sslmode=disable"),
        Err(PostgresError::NotAUrl)
    ));
    assert!(matches!(
        check_url("postgres://h/db?no_such_option=1"),
        Err(PostgresError::Url(_))
    ));
    let long = format!("postgres://h/{}", "d".repeat(5000));
    assert!(matches!(
        check_url(&long),
        Err(PostgresError::UrlTooLong { .. })
    ));
}

#[test]
fn the_debug_form_never_shows_the_password() {
    let config = url::parse("postgres://tether:hunter2@db.internal:5433/fleet").expect("parsed");
    let store = PostgresStore {
        shared: Arc::new(Shared {
            config,
            slot: Mutex::new(Slot::default()),
        }),
    };
    let shown = format!("{store:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(
        shown.contains("db.internal") && shown.contains("fleet"),
        "{shown}"
    );
}

#[test]
fn shipped_steps_are_never_edited() {
    // Appending a step adds a line here; changing a line means a released
    // database would no longer match its version number.
    let pinned = [
        "f68646b158043884e6816ef862b7509eaa3b9cdaea32e3351abf30b503486642",
        "edbe33bd3383337653ecd1561f4276aaf0239fd40464f3880c0536957db4fa16",
    ];
    assert_eq!(
        schema::STEPS.len(),
        pinned.len(),
        "pin the new step's SHA-256"
    );
    for (step, want) in schema::STEPS.iter().zip(pinned) {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, step.as_bytes());
        let got: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(got, want, "a shipped migration step was edited");
    }
}
