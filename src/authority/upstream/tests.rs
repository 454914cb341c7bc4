//! The upstream CA: its checks, and intermediates under it.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyUsagePurpose, SanType,
};
use tempfile::TempDir;

use super::*;
use crate::authority::{
    Authority as _, AuthorityConfig, AuthorityKind, LeafTemplate, LocalAuthority, X509Authority,
    rotation,
};

const HOUR: Duration = Duration::from_secs(3600);

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

/// A test CA: its certificate, its key as PEM, and an issuer for
/// certificates below it.
struct TestCa {
    der: Vec<u8>,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn params(cn: &str, uri: Option<&str>) -> CertificateParams {
    let now = SystemTime::now();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::OrganizationName, "fleet");
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = (now - HOUR).into();
    p.not_after = (now + 30 * 24 * HOUR).into();
    if let Some(uri) = uri {
        p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    }
    p
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap()
}

impl TestCa {
    fn new(params: CertificateParams, key: KeyPair, parent: Option<&TestCa>) -> Self {
        let cert = match parent {
            None => params.self_signed(&key).unwrap(),
            Some(parent) => params.signed_by(&key, &parent.issuer).unwrap(),
        };
        let der = cert.der().to_vec();
        let key_pem = key.serialize_pem();
        let issuer = Issuer::from_ca_cert_der(&der.as_slice().into(), key).unwrap();
        Self {
            der,
            key_pem,
            issuer,
        }
    }

    /// A self-signed upstream CA with the trust domain's SPIFFE ID.
    fn root(cn: &str) -> Self {
        Self::new(params(cn, Some("spiffe://example.org")), p256(), None)
    }
}

/// Where an agent keeps its data and finds its upstream CA files.
struct Setup {
    dir: TempDir,
    cert_path: PathBuf,
    key_path: PathBuf,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cert_path = dir.path().join("upstream/tls.crt");
        let key_path = dir.path().join("upstream/tls.key");
        std::fs::create_dir(dir.path().join("upstream")).unwrap();
        Self {
            dir,
            cert_path,
            key_path,
        }
    }

    fn with(certs: &[&[u8]], key_pem: &str) -> Self {
        let setup = Self::new();
        setup.write(certs, key_pem);
        setup
    }

    fn write(&self, certs: &[&[u8]], key_pem: &str) {
        let pems: Vec<pem::Pem> = certs
            .iter()
            .map(|der| pem::Pem::new("CERTIFICATE", der.to_vec()))
            .collect();
        key_store::write_public(&self.cert_path, pem::encode_many(&pems).as_bytes()).unwrap();
        key_store::write_secret(&self.key_path, key_pem.as_bytes()).unwrap();
    }

    fn config(&self) -> AuthorityConfig {
        AuthorityConfig {
            kind: AuthorityKind::Disk,
            cert_path: Some(self.cert_path.clone()),
            key_path: Some(self.key_path.clone()),
            ..AuthorityConfig::default()
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn load(&self) -> Result<LocalAuthority, AuthorityError> {
        self.load_with(self.config())
    }

    fn load_with(&self, config: AuthorityConfig) -> Result<LocalAuthority, AuthorityError> {
        LocalAuthority::load_or_create(td(), config, &self.data())
    }
}

use super::super::AuthorityError;

fn cert(der: &[u8]) -> X509Certificate<'_> {
    x509_parser::parse_x509_certificate(der).unwrap().1
}

fn sign_leaf(ca: &X509Authority, now: SystemTime) -> Vec<Vec<u8>> {
    let template = LeafTemplate {
        uri: "spiffe://example.org/svc".into(),
        dns_names: Vec::new(),
        ttl: HOUR,
    };
    ca.sign_leaf(&template, &p256(), now).unwrap().chain
}

/// Path validation as a verifier does it: each certificate is signed by
/// the next (issuer name and signature), every certificate above the
/// leaf is a CA, and the last is signed by one of `anchors`.
fn assert_chains_to(chain: &[Vec<u8>], anchors: &[Vec<u8>]) {
    let parsed: Vec<X509Certificate<'_>> = chain.iter().map(|d| cert(d)).collect();
    assert!(!parsed[0].is_ca(), "the leaf is no CA");
    for pair in parsed.windows(2) {
        assert_eq!(pair[0].issuer(), pair[1].subject());
        pair[0]
            .verify_signature(Some(pair[1].public_key()))
            .expect("each certificate is signed by the next");
        assert!(pair[1].is_ca());
    }
    let last = parsed.last().unwrap();
    let anchored = anchors.iter().any(|a| {
        let anchor = cert(a);
        last.issuer() == anchor.subject()
            && last.verify_signature(Some(anchor.public_key())).is_ok()
    });
    assert!(anchored, "the chain ends under an anchor of the bundle");
}

fn keys(a: &LocalAuthority) -> std::sync::Arc<crate::authority::local::KeySet> {
    a.keys()
}

#[test]
fn the_agent_signs_through_its_own_intermediate_under_the_upstream_root() {
    let upstream = TestCa::root("fleet root");
    let setup = Setup::with(&[&upstream.der], &upstream.key_pem);
    let a = setup.load().unwrap();

    let bundle = a.bundle();
    assert_eq!(
        bundle.x509_authorities(),
        std::slice::from_ref(&upstream.der),
        "the bundle holds the upstream root only"
    );
    assert_eq!(
        bundle.jwt_authorities().len(),
        1,
        "JWT keys stay the agent's own"
    );

    let signer = a.x509_signer().unwrap();
    let chain = sign_leaf(&signer, SystemTime::now());
    assert_eq!(chain.len(), 2, "leaf and intermediate");
    assert_eq!(chain[1], signer.cert_der());
    assert_chains_to(&chain, bundle.x509_authorities());

    let intermediate = cert(&chain[1]);
    let bc = intermediate.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(0));
    let ku = intermediate.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign());
    let sans = &intermediate
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    assert_eq!(sans, &[GeneralName::URI("spiffe://example.org")]);
    let leaf = cert(&chain[0]);
    assert!(leaf.validity().not_after <= intermediate.validity().not_after);
    assert!(intermediate.validity().not_after <= cert(&upstream.der).validity().not_after);

    // A restart keeps the intermediate; its key is private.
    let id = signer.id().to_owned();
    drop((signer, a));
    let b = setup.load().unwrap();
    assert_eq!(b.x509_signer().unwrap().id(), id);
    assert!(b.bundle().same_keys(&bundle));
    let key = crate::authority::local::state::x509_key_path(&setup.data().join("authority"), &id);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(key).unwrap().mode() & 0o777, 0o600);
    let state = std::fs::read_to_string(setup.data().join("authority/state.json")).unwrap();
    assert!(state.contains("\"version\": 2"), "{state}");
}

#[test]
fn an_upstream_below_a_root_puts_the_root_in_the_bundle_and_itself_in_the_chain() {
    // An upstream without a URI SAN, issued by a root: both accepted.
    let root = TestCa::new(params("fleet root", None), p256(), None);
    let upstream = TestCa::new(params("fleet issuing CA", None), p256(), Some(&root));
    let setup = Setup::with(&[&upstream.der, &root.der], &upstream.key_pem);
    let a = setup.load().unwrap();
    assert_eq!(
        a.bundle().x509_authorities(),
        std::slice::from_ref(&root.der)
    );
    let chain = sign_leaf(&a.x509_signer().unwrap(), SystemTime::now());
    assert_eq!(
        chain.len(),
        3,
        "leaf, intermediate, upstream; never the root"
    );
    assert_eq!(chain[2], upstream.der);
    assert_chains_to(&chain, a.bundle().x509_authorities());
}

#[test]
fn sec1_keys_after_ec_parameters_are_accepted() {
    use aws_lc_rs::encoding::{AsDer, EcPrivateKeyRfc5915Der};
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
    let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
    let sec1: EcPrivateKeyRfc5915Der<'_> = pair.private_key().as_der().unwrap();
    let key = KeyPair::try_from(sec1.as_ref()).unwrap();
    let upstream = TestCa::new(params("fleet root", None), key, None);
    // `openssl ecparam -name prime256v1 -genkey` output.
    let key_pem = pem::encode_many(&[
        pem::Pem::new(
            "EC PARAMETERS",
            vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
        ),
        pem::Pem::new("EC PRIVATE KEY", sec1.as_ref().to_vec()),
    ]);
    let setup = Setup::with(&[&upstream.der], &key_pem);
    let a = setup.load().unwrap();
    assert_chains_to(
        &sign_leaf(&a.x509_signer().unwrap(), SystemTime::now()),
        &[upstream.der],
    );
}

/// A refused upstream: what it is, the cert file's certificates, the key
/// file, words the error must hold, and whether it names the key file.
type Case<'a> = (&'a str, Vec<&'a [u8]>, &'a str, &'a str, bool);

#[test]
fn bad_upstream_files_stop_the_start_with_the_path_and_the_reason() {
    let now = SystemTime::now();
    let good = TestCa::root("fleet root");
    let with = |f: &dyn Fn(&mut CertificateParams)| {
        let mut p = params("fleet root", Some("spiffe://example.org"));
        f(&mut p);
        TestCa::new(p, p256(), None)
    };
    let not_ca = with(&|p| p.is_ca = IsCa::ExplicitNoCa);
    let no_cert_sign = with(&|p| p.key_usages = vec![KeyUsagePurpose::DigitalSignature]);
    let path_len_0 = with(&|p| p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0)));
    let expired = with(&|p| {
        p.not_before = (now - 48 * HOUR).into();
        p.not_after = (now - HOUR).into();
    });
    let future = with(&|p| p.not_before = (now + HOUR).into());
    let other_td = with(&|p| {
        p.subject_alt_names = vec![SanType::URI("spiffe://other.org".try_into().unwrap())];
    });
    let with_path = with(&|p| {
        p.subject_alt_names = vec![SanType::URI(
            "spiffe://example.org/ns/x".try_into().unwrap(),
        )];
    });
    let p384 = TestCa::new(
        params("fleet root", None),
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap(),
        None,
    );
    let unrelated = TestCa::root("another root");
    let other_key = p256().serialize_pem();
    let both = format!("{}{}", good.key_pem, other_key);

    let cases: Vec<Case<'_>> = vec![
        (
            "mismatch",
            vec![&good.der],
            &other_key,
            "is not the private key of the first certificate",
            true,
        ),
        (
            "not a CA",
            vec![&not_ca.der],
            &not_ca.key_pem,
            "is not a CA certificate",
            false,
        ),
        (
            "no keyCertSign",
            vec![&no_cert_sign.der],
            &no_cert_sign.key_pem,
            "keyCertSign",
            false,
        ),
        (
            "pathlen 0",
            vec![&path_len_0.der],
            &path_len_0.key_pem,
            "pathLenConstraint 0",
            false,
        ),
        (
            "expired",
            vec![&expired.der],
            &expired.key_pem,
            "expired at",
            false,
        ),
        (
            "not yet valid",
            vec![&future.der],
            &future.key_pem,
            "is not valid before",
            false,
        ),
        (
            "other trust domain",
            vec![&other_td.der],
            &other_td.key_pem,
            "\"spiffe://other.org\"",
            false,
        ),
        (
            "SPIFFE ID with a path",
            vec![&with_path.der],
            &with_path.key_pem,
            "(no path)",
            false,
        ),
        (
            "P-384",
            vec![&p384.der],
            &p384.key_pem,
            "an EC P-384 key",
            true,
        ),
        (
            "broken chain",
            vec![&good.der, &unrelated.der],
            &good.key_pem,
            "is not issued by the certificate after it",
            false,
        ),
        (
            "no certificate",
            vec![],
            &good.key_pem,
            "holds no CERTIFICATE block",
            false,
        ),
        ("two keys", vec![&good.der], &both, "2 private keys", true),
    ];
    for (what, certs, key, want, names_key) in cases {
        let setup = Setup::with(&certs, key);
        let err = setup.load().unwrap_err().to_string();
        assert!(err.contains(want), "{what}: {err}\n(wanted {want:?})");
        let path = if names_key {
            &setup.key_path
        } else {
            &setup.cert_path
        };
        assert!(
            err.contains(&path.display().to_string()),
            "{what}: {err} names the file"
        );
        assert!(
            !setup.data().join("authority/state.json").exists(),
            "{what}: nothing is created"
        );
    }

    // A key in the certificate file is never read as public.
    let setup = Setup::new();
    let mixed = format!(
        "{}{}",
        pem::encode(&pem::Pem::new("CERTIFICATE", good.der.clone())),
        good.key_pem
    );
    key_store::write_public(&setup.cert_path, mixed.as_bytes()).unwrap();
    key_store::write_secret(&setup.key_path, good.key_pem.as_bytes()).unwrap();
    let err = setup.load().unwrap_err().to_string();
    assert!(err.contains("holds a private key"), "{err}");
}

#[test]
fn a_key_others_can_read_is_refused_with_the_kubernetes_fix() {
    let upstream = TestCa::root("fleet root");
    let setup = Setup::with(&[&upstream.der], &upstream.key_pem);
    std::fs::set_permissions(&setup.key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = setup.load().unwrap_err().to_string();
    assert!(err.contains(&setup.key_path.display().to_string()), "{err}");
    assert!(err.contains("mode 0644"), "{err}");
    assert!(err.contains("defaultMode: 0400"), "{err}");
}

#[test]
fn a_secret_volume_of_symlinks_is_read() {
    let upstream = TestCa::root("fleet root");
    let setup = Setup::new();
    let data = setup.dir.path().join("upstream/..2024_01_01");
    std::fs::create_dir(&data).unwrap();
    key_store::write_public(
        &data.join("tls.crt"),
        pem::encode(&pem::Pem::new("CERTIFICATE", upstream.der.clone())).as_bytes(),
    )
    .unwrap();
    key_store::write_secret(&data.join("tls.key"), upstream.key_pem.as_bytes()).unwrap();
    std::os::unix::fs::symlink("..2024_01_01", setup.dir.path().join("upstream/..data")).unwrap();
    std::os::unix::fs::symlink("..data/tls.crt", &setup.cert_path).unwrap();
    std::os::unix::fs::symlink("..data/tls.key", &setup.key_path).unwrap();
    setup.load().unwrap();
}

#[test]
fn an_intermediate_rotating_under_the_same_upstream_keeps_the_bundle() {
    let upstream = TestCa::root("fleet root");
    let setup = Setup::with(&[&upstream.der], &upstream.key_pem);
    let config = AuthorityConfig {
        ca_ttl: Duration::from_secs(600),
        jwt_key_ttl: 48 * HOUR,
        ..setup.config()
    };
    let a = setup.load_with(config).unwrap();
    let first = a.x509_signer().unwrap();
    let start = first.lifetime().not_before;
    let at = |secs| start + Duration::from_secs(secs);
    let mut bundles = a.subscribe_bundle();
    bundles.mark_unchanged();
    let bundle = a.bundle();

    // Half life: a successor intermediate is prepared; the bundle stays.
    a.rotate_at(at(301)).unwrap();
    let ks = keys(&a);
    assert_eq!(ks.x509.len(), 2);
    assert!(
        !bundles.has_changed().unwrap(),
        "no bundle change is pushed"
    );
    assert_eq!(
        a.bundle().x509_authorities(),
        std::slice::from_ref(&upstream.der)
    );
    let lifetimes: Vec<_> = ks.x509.iter().map(|k| k.lifetime()).collect();
    assert_eq!(rotation::active(&lifetimes, at(400)), Some(0));
    assert_eq!(
        rotation::active(&lifetimes, at(501)),
        Some(1),
        "the successor signs from 5/6"
    );
    let second = &ks.x509[1];
    assert_ne!(second.id(), first.id());
    assert_chains_to(&sign_leaf(second, at(501)), a.bundle().x509_authorities());

    // Past the first intermediate's expiry it is gone; the bundle is not.
    a.rotate_at(at(601)).unwrap();
    let ks = keys(&a);
    assert!(ks.x509.iter().all(|k| k.id() != first.id()));
    assert!(
        !crate::authority::local::state::x509_key_path(&setup.data().join("authority"), first.id())
            .exists()
    );
    assert!(!bundles.has_changed().unwrap());
    assert!(a.bundle().same_keys(&bundle));
}

#[test]
fn an_upstream_close_to_expiry_caps_the_intermediate_and_gets_no_shorter_successors() {
    let now = SystemTime::now();
    let mut p = params("fleet root", None);
    p.not_after = (now + HOUR).into();
    let upstream = TestCa::new(p, p256(), None);
    let setup = Setup::with(&[&upstream.der], &upstream.key_pem);
    let a = setup.load().unwrap();
    let signer = a.x509_signer().unwrap();
    let upstream_end = cert(&upstream.der).validity().not_after.timestamp();
    assert_eq!(
        cert(signer.cert_der()).validity().not_after.timestamp(),
        upstream_end
    );
    let half = signer.lifetime().prepare_successor_at() + Duration::from_secs(1);
    a.rotate_at(half).unwrap();
    assert_eq!(keys(&a).x509.len(), 1, "a successor could not outlive it");
    let leaf = sign_leaf(&signer, SystemTime::now());
    assert!(cert(&leaf[0]).validity().not_after.timestamp() <= upstream_end);
}

#[test]
fn a_new_upstream_on_disk_gets_a_new_intermediate_and_both_roots_until_the_old_expire() {
    let old = TestCa::root("fleet root 1");
    let setup = Setup::with(&[&old.der], &old.key_pem);
    let config = AuthorityConfig {
        ca_ttl: Duration::from_secs(600),
        jwt_key_ttl: 48 * HOUR,
        ..setup.config()
    };
    let a = setup.load_with(config).unwrap();
    let first = a.x509_signer().unwrap();
    let start = first.lifetime().not_before;
    let at = |secs| start + Duration::from_secs(secs);
    let mut bundles = a.subscribe_bundle();
    bundles.mark_unchanged();

    // A broken new version is ignored: the old upstream keeps signing.
    std::fs::write(
        &setup.cert_path,
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    a.rotate_at(at(50)).unwrap();
    assert!(!bundles.has_changed().unwrap());
    assert_eq!(keys(&a).x509.len(), 1);
    assert_eq!(keys(&a).x509[0].id(), first.id());

    // The Secret is rotated to a new root: a new intermediate at once.
    let new = TestCa::root("fleet root 2");
    setup.write(&[&new.der], &new.key_pem);
    a.rotate_at(at(100)).unwrap();
    assert!(
        bundles.has_changed().unwrap(),
        "the bundle change is pushed"
    );
    bundles.mark_unchanged();
    assert_eq!(
        a.bundle().x509_authorities(),
        [old.der.clone(), new.der.clone()]
    );
    let ks = keys(&a);
    assert_eq!(ks.x509.len(), 1);
    assert_eq!(ks.retiring.len(), 1);
    assert_eq!(
        ks.retiring[0].id(),
        first.id(),
        "the old intermediate signs no more"
    );
    let lifetimes: Vec<_> = ks.x509.iter().map(|k| k.lifetime()).collect();
    assert_eq!(rotation::active(&lifetimes, at(100)), Some(0));
    assert_chains_to(
        &sign_leaf(&ks.x509[0], at(100)),
        std::slice::from_ref(&new.der),
    );

    // Once the old intermediate (and all it signed) expired: new root only.
    a.rotate_at(at(601)).unwrap();
    assert!(bundles.has_changed().unwrap());
    assert_eq!(
        a.bundle().x509_authorities(),
        std::slice::from_ref(&new.der)
    );
    assert!(keys(&a).retiring.is_empty());
}

#[test]
fn stored_intermediates_of_another_upstream_are_replaced_at_start() {
    let old = TestCa::root("fleet root 1");
    let setup = Setup::with(&[&old.der], &old.key_pem);
    let first = setup.load().unwrap().x509_signer().unwrap().id().to_owned();

    let new = TestCa::root("fleet root 2");
    setup.write(&[&new.der], &new.key_pem);
    let a = setup.load().unwrap();
    let signer = a.x509_signer().unwrap();
    assert_ne!(signer.id(), first, "a new intermediate, not the stored one");
    assert_chains_to(
        &sign_leaf(&signer, SystemTime::now()),
        std::slice::from_ref(&new.der),
    );
    assert_eq!(
        a.bundle().x509_authorities(),
        [old.der.clone(), new.der.clone()],
        "the old root stays for what the old intermediate signed"
    );
}

#[test]
fn switching_from_self_signed_keeps_the_old_root_until_it_expires() {
    let upstream = TestCa::root("fleet root");
    let setup = Setup::with(&[&upstream.der], &upstream.key_pem);
    let self_signed = setup.load_with(AuthorityConfig::default()).unwrap();
    let old_root = self_signed.bundle().x509_authorities()[0].clone();
    drop(self_signed);

    let a = setup.load().unwrap();
    assert_eq!(
        a.bundle().x509_authorities(),
        [old_root, upstream.der.clone()]
    );
    assert_chains_to(
        &sign_leaf(&a.x509_signer().unwrap(), SystemTime::now()),
        &[upstream.der],
    );
}

#[test]
fn config_validation_names_the_key() {
    let disk = |cert: Option<&str>, key: Option<&str>| AuthorityConfig {
        kind: AuthorityKind::Disk,
        cert_path: cert.map(PathBuf::from),
        key_path: key.map(PathBuf::from),
        ..AuthorityConfig::default()
    };
    assert!(AuthorityConfig::default().validate().is_ok());
    assert!(disk(Some("/c.pem"), Some("/k.pem")).validate().is_ok());
    let cases = [
        (
            disk(None, Some("/k.pem")),
            "authority.cert_path",
            "required",
        ),
        (disk(Some("/c.pem"), None), "authority.key_path", "required"),
        (
            disk(Some("c.pem"), Some("/k.pem")),
            "authority.cert_path",
            "absolute",
        ),
        (
            disk(Some("/c.pem"), Some("k.pem")),
            "authority.key_path",
            "absolute",
        ),
        (
            AuthorityConfig {
                cert_path: Some("/c.pem".into()),
                ..AuthorityConfig::default()
            },
            "authority.cert_path",
            "only used with kind = \"disk\"",
        ),
        (
            AuthorityConfig {
                ca_ttl: Duration::ZERO,
                ..AuthorityConfig::default()
            },
            "authority.ca_ttl",
            "greater than zero",
        ),
        (
            AuthorityConfig {
                jwt_key_ttl: Duration::ZERO,
                ..AuthorityConfig::default()
            },
            "authority.jwt_key_ttl",
            "greater than zero",
        ),
    ];
    for (config, want_key, want) in cases {
        let (key, problem) = config.validate().unwrap_err();
        assert_eq!(key, want_key);
        assert!(problem.contains(want), "{key}: {problem}");
    }
}
