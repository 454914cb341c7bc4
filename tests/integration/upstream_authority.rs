//! `[authority] kind = "disk"`: agents sign through their own intermediate
//! under a shared upstream CA, and the unmodified `spiffe` crate client gets
//! SVIDs that path-validate to the upstream root in the bundle.

use crate::common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use common::{PATIENCE, TestAgent, entry_for_me};
use futures_util::StreamExt as _;
use spiffe::{JwtSvid, SpiffeId, TrustDomain, X509Context};
use x509_parser::prelude::*;

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

/// An upstream CA on disk, as an operator would mount it.
struct UpstreamCa {
    der: Vec<u8>,
    _dir: tempfile::TempDir,
    cert_path: PathBuf,
    key_path: PathBuf,
}

impl UpstreamCa {
    fn new() -> Self {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fleet upstream CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = (now + Duration::from_secs(30 * 24 * 3600)).into();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://example.org".try_into().unwrap(),
        )];
        let cert = params.self_signed(&key).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let cert_path = dir.path().join("tls.crt");
        let key_path = dir.path().join("tls.key");
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o400)).unwrap();
        Self {
            der: cert.der().to_vec(),
            _dir: dir,
            cert_path,
            key_path,
        }
    }

    /// The `[authority]` section pointing at this CA.
    fn section(&self, extra: &str) -> String {
        format!(
            "[authority]\nkind = \"disk\"\ncert_path = \"{}\"\nkey_path = \"{}\"\n{extra}",
            self.cert_path.display(),
            self.key_path.display()
        )
    }
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    let (rest, cert) = X509Certificate::from_der(der).expect("DER certificate");
    assert!(rest.is_empty());
    cert
}

/// Path validation as a relying party does it, from the leaf to an anchor
/// of `bundle`: every certificate valid now; each signed by the next (issuer
/// name and signature); every issuer a CA with keyCertSign whose pathLen
/// allows the CAs below it; the last signed by a bundle anchor. Returns the
/// leaf's SPIFFE ID, its one URI SAN.
fn validate_path(chain: &[Vec<u8>], bundle: &[Vec<u8>]) -> Result<SpiffeId, String> {
    let certs: Vec<X509Certificate<'_>> = chain.iter().map(|d| parse(d)).collect();
    let anchors: Vec<X509Certificate<'_>> = bundle.iter().map(|d| parse(d)).collect();
    let leaf = certs.first().ok_or("empty chain")?;
    if leaf.is_ca() {
        return Err("the leaf is a CA".into());
    }
    for cert in &certs {
        if !cert.validity().is_valid() {
            return Err(format!("{} is not valid now", cert.subject()));
        }
    }
    let check_issuer = |child: &X509Certificate<'_>,
                        issuer: &X509Certificate<'_>,
                        cas_below: u32|
     -> Result<(), String> {
        if child.issuer() != issuer.subject() {
            return Err(format!(
                "{} is not issued by {}",
                child.subject(),
                issuer.subject()
            ));
        }
        child
            .verify_signature(Some(issuer.public_key()))
            .map_err(|e| {
                format!(
                    "{} not signed by {}: {e}",
                    child.subject(),
                    issuer.subject()
                )
            })?;
        let bc = issuer
            .basic_constraints()
            .unwrap()
            .ok_or("issuer without basicConstraints")?;
        if !bc.value.ca {
            return Err(format!("{} is no CA", issuer.subject()));
        }
        if bc
            .value
            .path_len_constraint
            .is_some_and(|len| len < cas_below)
        {
            return Err(format!("{} pathLen exceeded", issuer.subject()));
        }
        let ku = issuer
            .key_usage()
            .unwrap()
            .ok_or("issuer without keyUsage")?;
        if !ku.value.key_cert_sign() {
            return Err(format!("{} lacks keyCertSign", issuer.subject()));
        }
        Ok(())
    };
    for (i, pair) in certs.windows(2).enumerate() {
        check_issuer(&pair[0], &pair[1], i as u32)?;
    }
    let last = certs.last().unwrap();
    let cas_below = certs.len() as u32 - 1;
    if !anchors
        .iter()
        .any(|anchor| check_issuer(last, anchor, cas_below).is_ok())
    {
        return Err(format!(
            "{} chains to no anchor of the bundle",
            last.subject()
        ));
    }
    let san = leaf
        .subject_alternative_name()
        .unwrap()
        .ok_or("leaf without subjectAltName")?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    let [uri] = uris.as_slice() else {
        return Err(format!("leaf has {} URI SANs", uris.len()));
    };
    SpiffeId::new(uri).map_err(|e| e.to_string())
}

/// The default SVID's chain and the own trust domain's X.509 bundle.
fn chain_and_bundle(ctx: &X509Context) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let svid = ctx.default_svid().expect("a default SVID");
    let chain = svid
        .cert_chain()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    let bundle = ctx
        .bundle_set()
        .get(&td())
        .expect("own bundle")
        .authorities()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    (chain, bundle)
}

#[tokio::test]
async fn svids_chain_through_the_agents_intermediate_to_the_upstream_root() {
    let upstream = UpstreamCa::new();
    let agent = TestAgent::start(&format!(
        "{}{}",
        entry_for_me("svc", "main"),
        upstream.section("")
    ))
    .await;
    let client = agent.spiffe_client().await;
    let ctx = client.fetch_x509_context().await.expect("x509 context");
    let (chain, bundle) = chain_and_bundle(&ctx);

    assert_eq!(chain.len(), 2, "leaf and the agent's intermediate");
    assert_eq!(
        bundle,
        std::slice::from_ref(&upstream.der),
        "the bundle is the upstream root"
    );
    let id = validate_path(&chain, &bundle).expect("the SVID validates to the root");
    assert_eq!(id.to_string(), "spiffe://example.org/svc");
    let intermediate = parse(&chain[1]);
    assert_ne!(chain[1], upstream.der);
    assert!(intermediate.validity().not_after <= parse(&upstream.der).validity().not_after);

    // JWT-SVIDs stay the agent's own: signed by its key, in its JWT bundle.
    let jwt = client.fetch_jwt_svid(["payments"], None).await.unwrap();
    let jwt_bundles = client.fetch_jwt_bundles().await.unwrap();
    JwtSvid::parse_and_validate(jwt.token(), &jwt_bundles, &["payments"]).unwrap();
    agent.stop().await;
}

#[tokio::test]
async fn agents_sharing_an_upstream_trust_each_others_svids() {
    let upstream = UpstreamCa::new();
    let config = format!("{}{}", entry_for_me("svc", "main"), upstream.section(""));
    let one = TestAgent::start(&config).await;
    let two = TestAgent::start(&config).await;
    let (chain_one, bundle_one) = chain_and_bundle(
        &one.spiffe_client()
            .await
            .fetch_x509_context()
            .await
            .unwrap(),
    );
    let (chain_two, bundle_two) = chain_and_bundle(
        &two.spiffe_client()
            .await
            .fetch_x509_context()
            .await
            .unwrap(),
    );

    assert_ne!(
        chain_one[1], chain_two[1],
        "each agent has its own intermediate"
    );
    assert_eq!(bundle_one, bundle_two, "one trust domain, one anchor");
    validate_path(&chain_one, &bundle_two).expect("one's SVID validates with two's bundle");
    validate_path(&chain_two, &bundle_one).expect("two's SVID validates with one's bundle");
    one.stop().await;
    two.stop().await;
}

#[tokio::test]
async fn intermediate_rotation_keeps_every_message_self_consistent() {
    // A 12s intermediate: its successor is prepared at 6s and signs from 10s.
    let upstream = UpstreamCa::new();
    let extra = format!(
        "x509_svid_ttl = \"2s\"\njwt_svid_ttl = \"2s\"\n{}{}",
        upstream.section("ca_ttl = \"12s\"\njwt_key_ttl = \"12s\"\n"),
        entry_for_me("svc", "main")
    );
    let agent = TestAgent::start(&extra).await;
    let client = agent.spiffe_client().await;
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let mut intermediates = HashSet::new();
    let outcome = tokio::time::timeout(PATIENCE, async {
        while intermediates.len() < 2 {
            let ctx = stream.next().await.expect("stream open").expect("message");
            let (chain, bundle) = chain_and_bundle(&ctx);
            assert_eq!(
                bundle,
                std::slice::from_ref(&upstream.der),
                "the bundle never changes"
            );
            assert_eq!(chain.len(), 2);
            if let Err(problem) = validate_path(&chain, &bundle) {
                panic!("a message whose SVID does not chain to its bundle: {problem}");
            }
            intermediates.insert(chain[1].clone());
        }
    })
    .await;
    assert!(outcome.is_ok(), "SVIDs moved to the successor intermediate");

    // JWT keys rotated on the same schedule: a fresh token still validates
    // with the bundle served alongside it.
    let jwt = client.fetch_jwt_svid(["payments"], None).await.unwrap();
    let jwt_bundles = client.fetch_jwt_bundles().await.unwrap();
    JwtSvid::parse_and_validate(jwt.token(), &jwt_bundles, &["payments"]).unwrap();
    agent.stop().await;
}

#[tokio::test]
async fn a_bad_upstream_stops_the_start_with_the_path() {
    let upstream = UpstreamCa::new();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&upstream.key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = common::start_in(dir.path(), &upstream.section(""))
        .await
        .expect_err("a world-readable upstream key is refused");
    let message = format!("{err:#}");
    assert!(
        message.contains(&upstream.key_path.display().to_string()),
        "{message}"
    );
    assert!(message.contains("defaultMode: 0400"), "{message}");
}

#[test]
fn the_config_names_a_missing_upstream_path() {
    use tether::config::{Config, MapEnv};
    let err = Config::from_toml("[authority]\nkind = \"disk\"\n", &MapEnv::default())
        .expect_err("disk needs its files");
    assert!(err.to_string().contains("authority.cert_path"), "{err}");
    let err = Config::from_toml(
        "[authority]\nkind = \"disk\"\ncert_path = \"/c.pem\"\nkey_path = \"k.pem\"\n",
        &MapEnv::default(),
    )
    .expect_err("relative paths are refused");
    assert!(err.to_string().contains("authority.key_path"), "{err}");
}
