//! `tether api`'s parsing of the agent's answers, its files and its flags.

use std::os::unix::fs::PermissionsExt as _;

use prost_types::value::Kind;
use serde_json::json;

use super::files::write_x509_files;
use super::report::{bundles_report, token_expiry, x509_report};
use super::*;

fn value(kind: Kind) -> prost_types::Value {
    prost_types::Value { kind: Some(kind) }
}

#[test]
fn claims_struct_to_json() {
    let nested = prost_types::Struct {
        fields: [("k".to_owned(), value(Kind::BoolValue(true)))].into(),
    };
    let claims = prost_types::Struct {
        fields: [
            (
                "sub".to_owned(),
                value(Kind::StringValue("spiffe://a/b".into())),
            ),
            ("exp".to_owned(), value(Kind::NumberValue(1_700_000_000.0))),
            ("ratio".to_owned(), value(Kind::NumberValue(0.5))),
            ("nan".to_owned(), value(Kind::NumberValue(f64::NAN))),
            ("huge".to_owned(), value(Kind::NumberValue(1e300))),
            ("none".to_owned(), value(Kind::NullValue(0))),
            ("unset".to_owned(), prost_types::Value { kind: None }),
            (
                "aud".to_owned(),
                value(Kind::ListValue(prost_types::ListValue {
                    values: vec![value(Kind::StringValue("x".into()))],
                })),
            ),
            ("nested".to_owned(), value(Kind::StructValue(nested))),
        ]
        .into(),
    };
    assert_eq!(
        struct_to_json(&claims),
        json!({
            "sub": "spiffe://a/b",
            "exp": 1_700_000_000,
            "ratio": 0.5,
            "nan": null,
            "huge": 1e300,
            "none": null,
            "unset": null,
            "aud": ["x"],
            "nested": {"k": true},
        })
    );
}

fn test_certificate() -> (Vec<u8>, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["svc.example.org".to_owned()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    (cert.der().to_vec(), key.serialize_der())
}

fn svid_response(key: Vec<u8>, cert: &[u8]) -> pb::X509svidResponse {
    pb::X509svidResponse {
        svids: vec![pb::X509svid {
            spiffe_id: "spiffe://example.org/a".into(),
            x509_svid: cert.to_vec(),
            x509_svid_key: key,
            bundle: [cert, cert].concat(),
            hint: "a".into(),
        }],
        crl: Vec::new(),
        federated_bundles: [("spiffe://partner.example".to_owned(), cert.to_vec())].into(),
    }
}

#[test]
fn write_creates_private_key_files_and_parsable_pem() {
    let (cert, key) = test_certificate();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("creds");
    let mut response = svid_response(key.clone(), &cert);
    let report = x509_report(&response).unwrap();
    assert_eq!(report.svids[0].dns_names, ["svc.example.org"]);
    assert_eq!(report.trust_domain_cas, 1, "the same CA twice counts once");
    assert_eq!(report.federated_bundles[0].trust_domain, "partner.example");

    let written = write_x509_files(&out, &mut response).unwrap();
    let names: Vec<_> = written
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        names,
        [
            "svid.0.pem",
            "svid.0.key",
            "bundle.0.pem",
            "federated_bundle.partner.example.pem"
        ]
    );
    let mode = |name: &str| {
        std::fs::metadata(out.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("svid.0.key"), 0o600);
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let key_pem = pem::parse(std::fs::read(out.join("svid.0.key")).unwrap()).unwrap();
    assert_eq!(key_pem.tag(), "PRIVATE KEY");
    assert_eq!(key_pem.contents(), key);
    let bundle = pem::parse_many(std::fs::read(out.join("bundle.0.pem")).unwrap()).unwrap();
    assert_eq!(bundle.len(), 2);
    assert!(
        bundle
            .iter()
            .all(|p| p.tag() == "CERTIFICATE" && p.contents() == cert)
    );
    assert!(response.svids[0].x509_svid_key.is_empty(), "key moved out");

    // Again over the same files, with a stale temporary file in the
    // way: replaced, still 0600, nothing left over.
    std::fs::write(
        out.join(format!(".svid.0.key.tmp-{}", std::process::id())),
        "x",
    )
    .unwrap();
    let mut again = svid_response(key, &cert);
    write_x509_files(&out, &mut again).unwrap();
    assert_eq!(mode("svid.0.key"), 0o600);
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 4);
}

#[test]
fn malformed_answers_are_errors_not_panics() {
    let (cert, key) = test_certificate();
    let mut truncated = svid_response(key.clone(), &cert);
    truncated.svids[0].x509_svid.truncate(cert.len() / 2);
    assert!(matches!(
        x509_report(&truncated),
        Err(ApiError::Certificate { .. })
    ));
    let mut trailing = svid_response(key.clone(), &cert);
    trailing.svids[0].bundle.push(0x30);
    assert!(matches!(
        x509_report(&trailing),
        Err(ApiError::Certificate { .. })
    ));
    let mut empty = svid_response(key.clone(), &cert);
    empty.svids[0].x509_svid.clear();
    assert!(matches!(
        x509_report(&empty),
        Err(ApiError::IncompleteSvid { .. })
    ));
    let mut traversal = svid_response(key.clone(), &cert);
    traversal.federated_bundles = [("../../etc/passwd".to_owned(), cert.clone())].into();
    assert!(matches!(
        x509_report(&traversal),
        Err(ApiError::TrustDomain { .. })
    ));
    let dir = tempfile::tempdir().unwrap();
    assert!(write_x509_files(dir.path(), &mut traversal).is_err());

    let jwt = pb::JwtBundlesResponse {
        bundles: [("spiffe://example.org".to_owned(), b"{not json".to_vec())].into(),
    };
    let x509 = pb::X509BundlesResponse::default();
    assert!(matches!(
        bundles_report(&x509, &jwt),
        Err(ApiError::JwtBundle { .. })
    ));
}

#[test]
fn bundles_merge_by_trust_domain() {
    let (cert, _) = test_certificate();
    let x509 = pb::X509BundlesResponse {
        crl: Vec::new(),
        bundles: [("spiffe://example.org".to_owned(), cert)].into(),
    };
    let jwt = pb::JwtBundlesResponse {
        bundles: [
            (
                "spiffe://example.org".to_owned(),
                br#"{"keys":[{"kty":"EC","kid":"k1","crv":"P-256"}]}"#.to_vec(),
            ),
            (
                "spiffe://partner.example".to_owned(),
                b"{\"keys\":[]}".to_vec(),
            ),
        ]
        .into(),
    };
    let report = serde_json::to_value(bundles_report(&x509, &jwt).unwrap()).unwrap();
    assert_eq!(report["bundles"][0]["trust_domain"], "example.org");
    assert_eq!(
        report["bundles"][0]["jwt_authorities"][0],
        json!({"kid": "k1", "key_type": "EC"})
    );
    assert_eq!(
        report["bundles"][0]["x509_authorities"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(report["bundles"][1]["trust_domain"], "partner.example");
}

#[test]
fn token_expiry_is_read_for_display() {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let token = format!(
        "{}.{}.sig",
        b64(r#"{"alg":"ES256","typ":"JWT"}"#),
        b64(r#"{"sub":"spiffe://a/b","exp":1700000000}"#)
    );
    assert_eq!(token_expiry(&token), Timestamp::from_unix(1_700_000_000));
    assert_eq!(token_expiry("not a token"), None);
}

#[test]
fn timeouts_must_be_positive_durations() {
    let parse = super::super::flags::parse_timeout;
    assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
    assert!(parse("0s").is_err());
    assert!(parse("soon").is_err());
}
