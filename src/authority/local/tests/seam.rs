//! The seam as its callers see it: what `sign_x509_svid` and `sign_jwt`
//! certify, cap and refuse.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ED25519, SanType};
use spiffe::{SpiffeId, TrustDomain};
use x509_parser::extensions::GeneralName;

use crate::authority::{
    Authority, AuthorityConfig, AuthorityError, JwtRequest, LocalAuthority, X509SvidRequest,
};

fn authority(dir: &tempfile::TempDir) -> LocalAuthority {
    let td = TrustDomain::new("example.org").unwrap();
    LocalAuthority::load_or_create(td, AuthorityConfig::default(), dir.path()).unwrap()
}

/// A CSR signed by `key` that asks for `asked` as its URI SAN.
fn csr(key: &KeyPair, asked: &str) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(asked.try_into().unwrap())];
    params.serialize_request(key).unwrap().der().to_vec()
}

fn request(csr: Vec<u8>, id: &str) -> X509SvidRequest {
    X509SvidRequest {
        csr,
        spiffe_id: SpiffeId::new(id).unwrap(),
        dns_names: vec!["svc.internal".into()],
        ttl: Duration::from_secs(300),
    }
}

#[tokio::test]
async fn the_certificate_names_the_requested_identity_and_the_csr_key_not_the_csr_names() {
    let dir = tempfile::tempdir().unwrap();
    let a = authority(&dir);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let signed = a
        .sign_x509_svid(request(
            csr(&key, "spiffe://example.org/admin"),
            "spiffe://example.org/svc",
        ))
        .await
        .unwrap();

    let (_, leaf) = x509_parser::parse_x509_certificate(&signed.chain[0]).unwrap();
    let sans = leaf.subject_alternative_name().unwrap().unwrap();
    let uris: Vec<_> = sans
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    assert_eq!(
        uris,
        ["spiffe://example.org/svc"],
        "the CSR's name is ignored"
    );
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw(),
        "the CSR's key is certified"
    );
    assert!(a.issued_here(&signed.chain[0]));
    assert!(signed.not_after <= SystemTime::now() + Duration::from_secs(300));
    assert_eq!(signed.serial_hex().len(), 32);
}

#[tokio::test]
async fn a_csr_with_a_broken_signature_or_another_key_type_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = authority(&dir);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut broken = csr(&key, "spiffe://example.org/svc");
    let last = broken.len() - 1;
    broken[last] ^= 0x01;
    let refused = a
        .sign_x509_svid(request(broken, "spiffe://example.org/svc"))
        .await;
    assert!(
        matches!(&refused, Err(AuthorityError::BadRequest(why)) if why.contains("CSR")),
        "{refused:?}"
    );

    let ed25519 = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let refused = a
        .sign_x509_svid(request(
            csr(&ed25519, "spiffe://example.org/svc"),
            "spiffe://example.org/svc",
        ))
        .await;
    assert!(
        matches!(&refused, Err(AuthorityError::BadRequest(why)) if why.contains("P-256")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn an_identity_of_another_trust_domain_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = authority(&dir);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let refused = a
        .sign_x509_svid(request(
            csr(&key, "spiffe://other.org/svc"),
            "spiffe://other.org/svc",
        ))
        .await;
    assert!(
        matches!(&refused, Err(AuthorityError::BadRequest(why)) if why.contains("other.org")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_jwt_never_outlives_its_key_and_its_exp_is_the_authoritys() {
    let dir = tempfile::tempdir().unwrap();
    let a = authority(&dir);
    let key_expiry = a.jwt_signer().unwrap().latest_expiry();
    let mut claims = serde_json::Map::new();
    claims.insert("sub".into(), "spiffe://example.org/svc".into());
    let signed = a
        .sign_jwt(JwtRequest {
            claims: claims.clone(),
            not_after: key_expiry + Duration::from_secs(3600),
            subject_token: None,
        })
        .await
        .unwrap();
    let exp_of_key = key_expiry.duration_since(UNIX_EPOCH).unwrap().as_secs();
    assert_eq!(
        signed.expires_at,
        UNIX_EPOCH + Duration::from_secs(exp_of_key)
    );
    assert!(a.is_own_jwt_key(&signed.kid));
    // Verified with the public key the bundle publishes, `exp` as returned.
    let bundle = a.bundle();
    let public = bundle.jwt_authority(&signed.kid).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.validate_aud = false;
    let verified = jsonwebtoken::decode::<serde_json::Value>(
        &signed.token,
        public.decoding_key(),
        &validation,
    )
    .unwrap();
    assert_eq!(verified.claims["exp"], exp_of_key);
    assert_eq!(verified.claims["sub"], "spiffe://example.org/svc");

    claims.insert("exp".into(), 1.into());
    let refused = a
        .sign_jwt(JwtRequest {
            claims,
            not_after: SystemTime::now(),
            subject_token: None,
        })
        .await;
    assert!(
        matches!(&refused, Err(AuthorityError::BadRequest(why)) if why.contains("exp")),
        "{refused:?}"
    );
}
