//! The local authority: first start, restart, damage, rotation.

use super::state::{to_pem, x509_key_path};
use super::*;
use crate::authority::Authority as _;
use rcgen::KeyPair;

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

#[test]
fn first_start_creates_keys_and_restart_reuses_them() {
    let dir = tempfile::tempdir().unwrap();
    let a = LocalAuthority::load_or_create(td(), AuthorityConfig::default(), dir.path()).unwrap();
    let bundle = a.bundle();
    assert_eq!(bundle.x509_authorities().len(), 1);
    assert_eq!(bundle.jwt_authorities().len(), 1);
    let kid = a.jwt_signer().unwrap().kid().to_owned();
    drop(a);

    let b = LocalAuthority::load_or_create(td(), AuthorityConfig::default(), dir.path()).unwrap();
    assert!(
        b.bundle().same_keys(&bundle),
        "restart keeps the trust bundle"
    );
    assert_eq!(b.jwt_signer().unwrap().kid(), kid);

    use std::os::unix::fs::MetadataExt;
    for entry in std::fs::read_dir(dir.path().join("authority/keys")).unwrap() {
        let meta = entry.unwrap().metadata().unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
    }
}

#[test]
fn backdated_certificates_do_not_shift_the_rotation_schedule() {
    // Regression: the schedule once started at the backdated notBefore,
    // so short-lived CAs rotated far too early.
    let dir = tempfile::tempdir().unwrap();
    let config = AuthorityConfig {
        ca_ttl: Duration::from_secs(12),
        ..AuthorityConfig::default()
    };
    let before = SystemTime::now();
    let a = LocalAuthority::load_or_create(td(), config, dir.path()).unwrap();
    let prepare_at = a.x509_signer().unwrap().lifetime().prepare_successor_at();
    assert!(
        prepare_at >= before + Duration::from_secs(5),
        "{prepare_at:?}"
    );
    drop(a);
    let b = LocalAuthority::load_or_create(td(), config_12s(), dir.path()).unwrap();
    let reloaded = b.x509_signer().unwrap().lifetime().prepare_successor_at();
    assert!(
        reloaded >= before + Duration::from_secs(5),
        "after a restart too"
    );
}

fn config_12s() -> AuthorityConfig {
    AuthorityConfig {
        ca_ttl: Duration::from_secs(12),
        ..AuthorityConfig::default()
    }
}

#[test]
fn other_trust_domain_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    LocalAuthority::load_or_create(td(), AuthorityConfig::default(), dir.path()).unwrap();
    let err = LocalAuthority::load_or_create(
        TrustDomain::new("other.org").unwrap(),
        AuthorityConfig::default(),
        dir.path(),
    )
    .unwrap_err();
    assert!(
        matches!(err, AuthorityError::OtherTrustDomain { .. }),
        "{err}"
    );
}

#[test]
fn damaged_state_is_refused_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    LocalAuthority::load_or_create(td(), AuthorityConfig::default(), dir.path()).unwrap();
    let state = dir.path().join("authority/state.json");
    std::fs::write(&state, b"{ not json").unwrap();
    let err =
        LocalAuthority::load_or_create(td(), AuthorityConfig::default(), dir.path()).unwrap_err();
    assert!(err.to_string().contains("damaged"), "{err}");
    assert_eq!(
        std::fs::read(&state).unwrap(),
        b"{ not json",
        "never overwritten"
    );
}

#[test]
fn mismatched_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = LocalAuthority::load_or_create(td(), AuthorityConfig::default(), dir.path()).unwrap();
    let id = a.x509_signer().unwrap().id().to_owned();
    drop(a);
    let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let path = x509_key_path(&dir.path().join("authority"), &id);
    key_store::write_secret(&path, &to_pem(&other.serialize_der())).unwrap();
    let err =
        LocalAuthority::load_or_create(td(), AuthorityConfig::default(), dir.path()).unwrap_err();
    assert!(err.to_string().contains("does not belong"), "{err}");
}

#[test]
fn rotation_publishes_before_signing_and_retires_after_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let config = AuthorityConfig {
        kind: AuthorityKind::SelfSigned,
        ca_ttl: Duration::from_secs(600),
        jwt_key_ttl: Duration::from_secs(600),
        ..AuthorityConfig::default()
    };
    let a = LocalAuthority::load_or_create(td(), config, dir.path()).unwrap();
    let first_ca = a.x509_signer().unwrap().id().to_owned();
    let first_kid = a.jwt_signer().unwrap().kid().to_owned();
    let mut bundles = a.subscribe_bundle();
    bundles.mark_unchanged();

    // Half life: successors are published but do not sign yet.
    let start = a.x509_signer().unwrap().lifetime().not_before;
    a.rotate_at(start + Duration::from_secs(301)).unwrap();
    assert!(bundles.has_changed().unwrap());
    let bundle = a.bundle();
    assert_eq!(bundle.x509_authorities().len(), 2);
    assert_eq!(bundle.jwt_authorities().len(), 2);
    let keys = a.keys();
    let lifetimes: Vec<Lifetime> = keys.x509.iter().map(|k| k.lifetime()).collect();
    let at = |secs| start + Duration::from_secs(secs);
    assert_eq!(
        rotation::active(&lifetimes, at(400)),
        Some(0),
        "old CA signs until 5/6"
    );
    assert_eq!(
        rotation::active(&lifetimes, at(501)),
        Some(1),
        "new CA signs after 5/6"
    );

    // Past the first keys' expiry they leave the bundle and the disk.
    a.rotate_at(at(601)).unwrap();
    let bundle = a.bundle();
    let first_cert = keys.x509[0].cert_der().to_vec();
    assert!(!bundle.x509_authorities().contains(&first_cert));
    assert!(bundle.jwt_authority(&first_kid).is_none());
    assert!(!x509_key_path(&dir.path().join("authority"), &first_ca).exists());
}

mod seam;
