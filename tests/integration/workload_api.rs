//! The SPIFFE Workload API, driven by the unmodified Rust `spiffe` crate and
//! by raw gRPC where exact status codes matter.

use crate::common;

use std::collections::HashSet;

use common::{ForeignDomain, PATIENCE, TestAgent, entry_for_me, eventually, uid, unix_now};
use futures_util::StreamExt as _;
use spiffe::{JwtSvid, SpiffeId, TrustDomain};
use tether::proto::workload as pb;
use tonic::Code;
use x509_parser::prelude::*;

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

/// An agent whose one entry (for this process) federates with
/// `example-federated.org`, whose bundle is `foreign`'s, in a file re-read
/// every 100ms. With a `marker`, the entry also federates with
/// `marker.example`, whose bundle is `marker`'s in `marker.json` beside
/// the first, read after it on each refresh. Keep the returned directory
/// alive as long as the agent.
async fn federated_agent(
    foreign: &ForeignDomain,
    marker: Option<&ForeignDomain>,
) -> (TestAgent, tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let bundle_path = dir.path().join("federated.json");
    std::fs::write(&bundle_path, foreign.bundle_json("fed-key", 1)).unwrap();
    let federation = |td: &str, path: &std::path::Path| {
        format!(
            "[[federation]]\ntrust_domain = \"{td}\"\nbundle_path = \"{}\"\nrefresh_interval = \"100ms\"\n",
            path.display()
        )
    };
    let mut federates_with = vec!["\"example-federated.org\""];
    let mut federations = federation("example-federated.org", &bundle_path);
    if let Some(marker) = marker {
        let marker_path = dir.path().join("marker.json");
        std::fs::write(&marker_path, marker.bundle_json("marker-key", 1)).unwrap();
        federates_with.push("\"marker.example\"");
        federations.push_str(&federation("marker.example", &marker_path));
    }
    let extra = format!(
        "{}federates_with = [{}]\n{federations}",
        entry_for_me("svc", "main"),
        federates_with.join(", ")
    );
    let agent = TestAgent::start(&extra).await;
    (agent, dir, bundle_path)
}

#[tokio::test]
async fn x509_svid_follows_the_spec_and_chains_to_the_bundle() {
    let extra = format!(
        "{}dns_names = [\"svc.example.org\", \"svc.local\"]\n",
        entry_for_me("svc", "main")
    );
    let agent = TestAgent::start(&extra).await;
    let client = agent.spiffe_client().await;

    let ctx = client.fetch_x509_context().await.expect("x509 context");
    let svid = ctx.default_svid().expect("a default SVID");
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/svc");
    assert_eq!(svid.hint(), Some("main"));

    let bundle = ctx.bundle_set().get(&td()).expect("own bundle");
    let ca_der = bundle.authorities()[0].as_ref().to_vec();
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
    let leaf_der = svid.leaf().as_ref().to_vec();
    let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();

    // Chain: the leaf is signed by the bundle's CA.
    assert_eq!(leaf.issuer(), ca.subject());
    leaf.verify_signature(Some(ca.public_key()))
        .expect("leaf signed by the bundle CA");
    assert!(ca.is_ca());

    // X509-SVID spec: one URI SAN, not a CA, digitalSignature, no cert signing.
    let san = leaf.subject_alternative_name().unwrap().unwrap().value;
    let uris: Vec<_> = san
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    assert_eq!(uris, ["spiffe://example.org/svc"]);
    let dns: Vec<_> = san
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(*d),
            _ => None,
        })
        .collect();
    assert_eq!(dns, ["svc.example.org", "svc.local"]);
    assert!(!leaf.is_ca());
    let ku = leaf.key_usage().unwrap().expect("key usage present");
    assert!(ku.critical, "key usage is critical");
    assert!(ku.value.digital_signature());
    assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
    let bc = leaf
        .basic_constraints()
        .unwrap()
        .expect("basic constraints present");
    assert!(!bc.value.ca);
    let eku = leaf
        .extended_key_usage()
        .unwrap()
        .expect("eku present")
        .value;
    assert!(eku.server_auth && eku.client_auth);
    let now = ASN1Time::now();
    assert!(leaf.validity().is_valid_at(now));
    assert!(leaf.validity().not_after <= ca.validity().not_after);

    agent.stop().await;
}

#[tokio::test]
async fn two_entries_give_two_svids_and_the_first_is_the_default() {
    let extra = format!(
        "{}{}",
        entry_for_me("first", "one"),
        entry_for_me("second", "two")
    );
    let agent = TestAgent::start(&extra).await;
    let client = agent.spiffe_client().await;

    let all = client.fetch_all_x509_svids().await.unwrap();
    let got: Vec<_> = all
        .iter()
        .map(|s| (s.spiffe_id().to_string(), s.hint().map(str::to_owned)))
        .collect();
    assert_eq!(
        got,
        [
            (
                "spiffe://example.org/first".to_owned(),
                Some("one".to_owned())
            ),
            (
                "spiffe://example.org/second".to_owned(),
                Some("two".to_owned())
            ),
        ]
    );
    let default = client.fetch_x509_svid().await.unwrap();
    assert_eq!(
        default.spiffe_id().to_string(),
        "spiffe://example.org/first"
    );

    // One JWT-SVID per entry too, or the one asked for.
    let second = SpiffeId::new("spiffe://example.org/second").unwrap();
    let jwt = client.fetch_jwt_svid(["api"], Some(&second)).await.unwrap();
    assert_eq!(jwt.spiffe_id(), &second);
    let all_jwt = client.fetch_all_jwt_svids(["api"], None).await.unwrap();
    assert_eq!(all_jwt.len(), 2);

    agent.stop().await;
}

#[tokio::test]
async fn jwt_fetch_then_validate_online_and_offline() {
    let agent = TestAgent::start(&entry_for_me("svc", "main")).await;
    let client = agent.spiffe_client().await;

    let jwt = client.fetch_jwt_svid(["payments"], None).await.unwrap();
    assert_eq!(jwt.spiffe_id().to_string(), "spiffe://example.org/svc");
    assert_eq!(jwt.audience(), ["payments"]);

    // Online, through the agent.
    let validated = client
        .validate_jwt_token("payments", jwt.token())
        .await
        .unwrap();
    assert_eq!(
        validated.spiffe_id().to_string(),
        "spiffe://example.org/svc"
    );

    // The raw response carries every claim.
    let mut raw = agent.raw_client(true).await;
    let resp = raw
        .validate_jwtsvid(pb::ValidateJwtsvidRequest {
            audience: "payments".into(),
            svid: jwt.token().into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.spiffe_id, "spiffe://example.org/svc");
    let claims = resp.claims.unwrap().fields;
    for claim in ["sub", "aud", "exp", "iat", "jti"] {
        assert!(claims.contains_key(claim), "claim {claim} returned");
    }

    // Offline, with the JWT bundles the agent serves: the bundle is usable by
    // a strict client (every key has a kid, header has only alg/kid/typ).
    let bundles = client.fetch_jwt_bundles().await.unwrap();
    let offline = JwtSvid::parse_and_validate(jwt.token(), &bundles, &["payments"]).unwrap();
    assert_eq!(offline.spiffe_id(), jwt.spiffe_id());
    assert!(bundles.get(&td()).is_some());

    // Wrong audience: InvalidArgument with the reason.
    let err = raw
        .validate_jwtsvid(pb::ValidateJwtsvidRequest {
            audience: "other".into(),
            svid: jwt.token().into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("udience"), "{}", err.message());

    agent.stop().await;
}

#[tokio::test]
async fn bundles_are_served_in_workload_api_form() {
    let agent = TestAgent::start(&entry_for_me("svc", "main")).await;
    let client = agent.spiffe_client().await;
    let x509 = client.fetch_x509_bundles().await.unwrap();
    let own = x509.get(&td()).expect("own X.509 bundle");
    assert_eq!(own.authorities().len(), 1);

    let mut raw = agent.raw_client(true).await;
    let mut stream = raw
        .fetch_jwt_bundles(pb::JwtBundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let jwks: serde_json::Value =
        serde_json::from_slice(&first.bundles["spiffe://example.org"]).unwrap();
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert!(keys[0]["kid"].is_string());
    assert!(keys[0].get("use").is_none(), "plain JWKS, no use member");
    assert!(keys[0].get("d").is_none(), "never a private key");
    agent.stop().await;
}

#[tokio::test]
async fn caller_without_an_entry_gets_permission_denied() {
    let other_uid = if uid() == 4242 { 4243 } else { 4242 };
    let extra = format!(
        "[[entries]]\nspiffe_id = \"spiffe://example.org/other\"\nselectors = [\"unix:uid:{other_uid}\"]\n"
    );
    let agent = TestAgent::start(&extra).await;
    let mut raw = agent.raw_client(true).await;
    let err = raw
        .fetch_x509svid(pb::X509svidRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("no identity issued"));
    let err = raw
        .fetch_jwtsvid(pb::JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = raw
        .fetch_x509_bundles(pb::X509BundlesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // The spiffe crate reports it as "no identity issued".
    let client = agent.spiffe_client().await;
    let err = client.fetch_x509_svid().await.unwrap_err();
    assert!(
        err.to_string().contains("no identity") || err.to_string().contains("ermission"),
        "{err}"
    );
    agent.stop().await;
}

#[tokio::test]
async fn unregistered_caller_may_verify_when_configured() {
    let agent = TestAgent::start("allow_unauthenticated_verifiers = true\n").await;
    let client = agent.spiffe_client().await;
    let bundles = client.fetch_x509_bundles().await.unwrap();
    assert!(bundles.get(&td()).is_some());
    assert!(client.fetch_x509_svid().await.is_err(), "but still no SVID");
    agent.stop().await;
}

#[tokio::test]
async fn missing_or_wrong_security_header_is_refused() {
    let agent = TestAgent::start(&entry_for_me("svc", "main")).await;
    let mut raw = agent.raw_client(false).await;
    let err = raw
        .fetch_x509svid(pb::X509svidRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("security header"));
    let err = raw
        .validate_jwtsvid(pb::ValidateJwtsvidRequest {
            audience: "a".into(),
            svid: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    agent.stop().await;
}

#[tokio::test]
async fn wit_profile_is_unimplemented() {
    let agent = TestAgent::start(&entry_for_me("svc", "main")).await;
    let mut raw = agent.raw_client(true).await;
    let err = raw
        .fetch_witsvid(pb::WitsvidRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    agent.stop().await;
}

#[tokio::test]
async fn garbage_and_oversized_requests_get_invalid_argument_and_the_agent_keeps_serving() {
    let agent = TestAgent::start(&entry_for_me("svc", "main")).await;
    let mut raw = agent.raw_client(true).await;
    let jwt = |audience: Vec<String>, spiffe_id: &str| pb::JwtsvidRequest {
        audience,
        spiffe_id: spiffe_id.into(),
    };
    let cases = vec![
        (jwt(vec![], ""), "audience must be specified"),
        (
            jwt((0..300).map(|i| format!("aud{i}")).collect(), ""),
            "300 audiences",
        ),
        (jwt(vec!["a".repeat(1024 * 1024)], ""), "the limit is"),
        (jwt(vec![String::new()], ""), "empty"),
        // A newline or an escape sequence in an audience (issue 15's rerun:
        // it reached the token and the audit trail).
        (
            jwt(vec!["a\ntask ended task_id=FAKE".into()], ""),
            "control characters",
        ),
        (jwt(vec!["a\u{1b}[31m".into()], ""), "control characters"),
        (jwt(vec!["a".into()], "not a spiffe id"), "not a SPIFFE ID"),
        (
            jwt(
                vec!["a".into()],
                &format!("spiffe://example.org/{}", "x".repeat(3000)),
            ),
            "the limit is",
        ),
    ];
    for (request, want) in cases {
        let err = raw.fetch_jwtsvid(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(
            err.message().contains(want),
            "{} (wanted {want})",
            err.message()
        );
    }
    let validate = |audience: &str, svid: String| pb::ValidateJwtsvidRequest {
        audience: audience.into(),
        svid,
    };
    let cases = vec![
        (validate("", "x".into()), "audience must be specified"),
        (validate("a", String::new()), "svid must be specified"),
        (validate("a", "not.a.jwt".into()), "malformed"),
        (validate("a", "x".repeat(1024 * 1024)), "the limit is"),
        (validate("a", "a.b.c.d".into()), "malformed"),
        (validate(&"a".repeat(5000), "x".into()), "the limit is"),
    ];
    for (request, want) in cases {
        let err = raw.validate_jwtsvid(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(
            err.message().contains(want),
            "{} (wanted {want})",
            err.message()
        );
    }
    // A request above the transport limit is refused before decoding.
    let huge = jwt(vec!["a".repeat(5 * 1024 * 1024)], "");
    let err = raw.fetch_jwtsvid(huge).await.unwrap_err();
    assert_ne!(err.code(), Code::Ok);

    // Still serving, on the same connection and on a new one.
    raw.fetch_jwtsvid(jwt(vec!["a".into()], "")).await.unwrap();
    let client = agent.spiffe_client().await;
    client.fetch_x509_svid().await.unwrap();
    agent.stop().await;
}

#[tokio::test]
async fn serial_numbers_are_unique() {
    let extra: String = (0..40)
        .map(|i| entry_for_me(&format!("svc{i}"), &format!("h{i}")))
        .collect();
    let agent = TestAgent::start(&extra).await;
    let client = agent.spiffe_client().await;
    let svids = client.fetch_all_x509_svids().await.unwrap();
    assert_eq!(svids.len(), 40);
    let serials: HashSet<Vec<u8>> = svids
        .iter()
        .map(|s| {
            let (_, c) = X509Certificate::from_der(s.leaf().as_ref()).unwrap();
            c.raw_serial().to_vec()
        })
        .collect();
    assert_eq!(serials.len(), 40);
    agent.stop().await;
}

#[tokio::test]
async fn rotation_pushes_a_new_svid_on_the_open_stream() {
    // Renewal at about half of 4s: a new message arrives on the same stream.
    let extra = format!("x509_svid_ttl = \"4s\"\n{}", entry_for_me("svc", "main"));
    let agent = TestAgent::start(&extra).await;
    let client = agent.spiffe_client().await;
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    let first_leaf = first.default_svid().unwrap().leaf().as_ref().to_vec();
    let next = tokio::time::timeout(PATIENCE, async {
        loop {
            let ctx = stream.next().await.unwrap().unwrap();
            let leaf = ctx.default_svid().unwrap().leaf().as_ref().to_vec();
            if leaf != first_leaf {
                return leaf;
            }
        }
    })
    .await
    .expect("a renewed SVID is pushed");
    let (_, old) = X509Certificate::from_der(&first_leaf).unwrap();
    let (_, new) = X509Certificate::from_der(&next).unwrap();
    assert_ne!(old.raw_serial(), new.raw_serial());
    // Renewed before the old one expired: the client never held an expired SVID.
    assert!(new.validity().not_before <= old.validity().not_after);
    agent.stop().await;
}

/// Regression: after a renewal the rotation loop slept its 30 s maximum
/// (its own renewal's change was marked seen), so the second renewal of a
/// short-lived SVID came long after the first had expired.
#[tokio::test]
async fn successive_renewals_leave_no_gap_in_validity() {
    let extra = format!("x509_svid_ttl = \"6s\"\n{}", entry_for_me("svc", "main"));
    let agent = TestAgent::start(&extra).await;
    let client = agent.spiffe_client().await;
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    let mut leaf = first.default_svid().unwrap().leaf().as_ref().to_vec();
    for _ in 0..3 {
        let next = loop {
            let ctx = stream.next().await.unwrap().unwrap();
            let next = ctx.default_svid().unwrap().leaf().as_ref().to_vec();
            if next != leaf {
                break next;
            }
        };
        let (_, old) = X509Certificate::from_der(&leaf).unwrap();
        let (_, new) = X509Certificate::from_der(&next).unwrap();
        // Issued (not before plus the 10 s backdating) before the last
        // one expired.
        let issued = new.validity().not_before.timestamp() + 10;
        assert!(
            issued <= old.validity().not_after.timestamp(),
            "renewed at {issued} after the last SVID expired at {}",
            old.validity().not_after
        );
        leaf = next;
    }
    agent.stop().await;
}

#[tokio::test]
async fn ca_rotation_publishes_the_new_root_before_it_signs() {
    // A 12s CA: the successor is published at 6s and signs from 10s.
    let extra = format!(
        "x509_svid_ttl = \"2s\"\njwt_svid_ttl = \"2s\"\n[authority]\nca_ttl = \"12s\"\njwt_key_ttl = \"12s\"\n{}",
        entry_for_me("svc", "main")
    );
    let agent = TestAgent::start(&extra).await;
    let client = agent.spiffe_client().await;
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let mut seen_two_roots = false;
    let outcome = tokio::time::timeout(PATIENCE, async {
        loop {
            let ctx = stream.next().await.unwrap().unwrap();
            let bundle = ctx.bundle_set().get(&td()).unwrap();
            let roots: Vec<Vec<u8>> = bundle
                .authorities()
                .iter()
                .map(|c| c.as_ref().to_vec())
                .collect();
            let leaf_der = ctx.default_svid().unwrap().leaf().as_ref().to_vec();
            let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
            // Every message is self-consistent: the SVID's issuer is in its bundle.
            let issuer_in_bundle = roots.iter().any(|r| {
                let (_, ca) = X509Certificate::from_der(r).unwrap();
                leaf.verify_signature(Some(ca.public_key())).is_ok()
            });
            assert!(
                issuer_in_bundle,
                "SVID signed by a CA missing from its bundle"
            );
            if roots.len() >= 2 {
                seen_two_roots = true;
            }
            // Signed by the newest root: the rotation completed.
            if seen_two_roots {
                let (_, newest) = X509Certificate::from_der(roots.last().unwrap()).unwrap();
                if leaf.verify_signature(Some(newest.public_key())).is_ok() {
                    return;
                }
            }
        }
    })
    .await;
    assert!(outcome.is_ok(), "the new CA was published, then used");
    agent.stop().await;
}

#[tokio::test]
async fn restart_keeps_the_trust_bundle() {
    let extra = entry_for_me("svc", "main");
    let mut agent = TestAgent::start(&extra).await;
    let before = agent
        .spiffe_client()
        .await
        .fetch_x509_bundles()
        .await
        .unwrap();
    let token = agent
        .spiffe_client()
        .await
        .fetch_jwt_svid(["a"], None)
        .await
        .unwrap();
    agent.restart(&extra).await;
    let client = agent.spiffe_client().await;
    let after = client.fetch_x509_bundles().await.unwrap();
    assert_eq!(
        before.get(&td()).unwrap().authorities(),
        after.get(&td()).unwrap().authorities()
    );
    // A token issued before the restart still validates after it.
    client.validate_jwt_token("a", token.token()).await.unwrap();
    agent.stop().await;
}

#[tokio::test]
async fn federated_bundles_are_served_and_trusted_and_reloaded() {
    let foreign = ForeignDomain::new();
    let (agent, dir, bundle_path) = federated_agent(&foreign, Some(&ForeignDomain::new())).await;
    let client = agent.spiffe_client().await;
    let fed_td = TrustDomain::new("example-federated.org").unwrap();

    let ctx = client.fetch_x509_context().await.unwrap();
    let fed = ctx
        .bundle_set()
        .get(&fed_td)
        .expect("federated bundle in X509SVIDResponse");
    assert_eq!(fed.authorities()[0].as_ref(), foreign.ca_der.as_slice());
    let x509_bundles = client.fetch_x509_bundles().await.unwrap();
    assert!(x509_bundles.get(&fed_td).is_some());
    let jwt_bundles = client.fetch_jwt_bundles().await.unwrap();
    assert!(jwt_bundles.get(&fed_td).is_some());

    // A token from the federated domain validates.
    let token = foreign.sign_jwt(
        "fed-key",
        "spiffe://example-federated.org/peer",
        "me",
        unix_now() + 60,
    );
    let ok = client.validate_jwt_token("me", &token).await.unwrap();
    assert_eq!(
        ok.spiffe_id().to_string(),
        "spiffe://example-federated.org/peer"
    );

    // The file changes: the open stream gets the new bundle.
    let mut stream = client.stream_x509_contexts().await.unwrap();
    stream.next().await.unwrap().unwrap();
    let rotated = ForeignDomain::new();
    std::fs::write(&bundle_path, rotated.bundle_json("fed-key-2", 2)).unwrap();
    tokio::time::timeout(PATIENCE, async {
        loop {
            let ctx = stream.next().await.unwrap().unwrap();
            if ctx.bundle_set().get(&fed_td).unwrap().authorities()[0].as_ref()
                == rotated.ca_der.as_slice()
            {
                return;
            }
        }
    })
    .await
    .expect("federated bundle update pushed");

    // A broken file keeps the last good bundle. Each refresh reads the
    // files in turn, this one first: once the marker domain's file has
    // changed twice after the broken write and both changes were pushed,
    // a whole refresh has read the broken file since (the first change
    // may come from a refresh that read it just before).
    std::fs::write(&bundle_path, b"{ broken").unwrap();
    let marker_td = TrustDomain::new("marker.example").unwrap();
    let mut pushed = None;
    for sequence in [2, 3] {
        let marker = ForeignDomain::new();
        std::fs::write(
            dir.path().join("marker.json"),
            marker.bundle_json("marker-key", sequence),
        )
        .unwrap();
        pushed = Some(
            tokio::time::timeout(PATIENCE, async {
                loop {
                    let ctx = stream.next().await.unwrap().unwrap();
                    if ctx.bundle_set().get(&marker_td).unwrap().authorities()[0].as_ref()
                        == marker.ca_der.as_slice()
                    {
                        return ctx;
                    }
                }
            })
            .await
            .expect("the marker's bundle update is pushed"),
        );
    }
    let after_refresh = pushed.unwrap();
    let fetched = client.fetch_x509_context().await.unwrap();
    for ctx in [&after_refresh, &fetched] {
        assert_eq!(
            ctx.bundle_set().get(&fed_td).unwrap().authorities()[0].as_ref(),
            rotated.ca_der.as_slice()
        );
    }
    agent.stop().await;
}

#[tokio::test]
async fn tokens_from_unfederated_or_unknown_domains_are_refused() {
    let foreign = ForeignDomain::new();
    let agent = TestAgent::start(&entry_for_me("svc", "main")).await;
    let mut raw = agent.raw_client(true).await;
    let token = foreign.sign_jwt("k", "spiffe://elsewhere.org/x", "me", unix_now() + 60);
    let err = raw
        .validate_jwtsvid(pb::ValidateJwtsvidRequest {
            audience: "me".into(),
            svid: token,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("no trust bundle"),
        "{}",
        err.message()
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_client_that_hangs_up_frees_its_stream() {
    let agent = TestAgent::start(&entry_for_me("svc", "main")).await;
    {
        let client = agent.spiffe_client().await;
        let mut a = client.stream_x509_contexts().await.unwrap();
        let mut b = client.stream_x509_contexts().await.unwrap();
        a.next().await.unwrap().unwrap();
        b.next().await.unwrap().unwrap();
        let running = agent.running();
        eventually("two open streams", async || running.open_streams() == 2).await;
    }
    let running = agent.running();
    eventually("streams freed after hang-up", async || {
        running.open_streams() == 0
    })
    .await;
    // And the agent still serves.
    agent.spiffe_client().await.fetch_x509_svid().await.unwrap();
    agent.stop().await;
}

#[tokio::test]
async fn stopping_ends_streams_with_unavailable_and_removes_the_socket() {
    let agent = TestAgent::start(&entry_for_me("svc", "main")).await;
    let mut raw = agent.raw_client(true).await;
    let mut stream = raw
        .fetch_x509svid(pb::X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    let socket = agent.socket.clone();
    let stop = tokio::spawn(agent.stop());
    let end = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("stream ends");
    match end {
        Err(status) => assert_eq!(status.code(), Code::Unavailable),
        Ok(None) => {}
        Ok(Some(_)) => panic!("no more messages after shutdown"),
    }
    stop.await.unwrap();
    assert!(!socket.exists(), "socket unlinked");
}

#[tokio::test]
async fn entry_changes_reach_open_streams_and_losing_every_identity_ends_them() {
    let agent = TestAgent::start(&entry_for_me("svc", "main")).await;
    let client = agent.spiffe_client().await;
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.svids().len(), 1);

    // A second entry appears: the stream carries both.
    let registry = agent.running().registry();
    let mut entries: Vec<_> = registry.snapshot().iter().map(|e| (**e).clone()).collect();
    let config = tether::config::Config::from_toml(
        &format!(
            "trust_domain = \"example.org\"\n{}",
            entry_for_me("extra", "extra")
        ),
        &tether::config::MapEnv::default(),
    )
    .unwrap();
    entries.extend(config.entries);
    registry
        .replace_config(entries, Default::default())
        .await
        .unwrap();
    let update = tokio::time::timeout(PATIENCE, stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(update.svids().len(), 2);

    // Every entry removed: PermissionDenied ends the stream.
    registry
        .replace_config(Vec::new(), Default::default())
        .await
        .unwrap();
    let mut raw_end = None;
    let end = tokio::time::timeout(PATIENCE, async {
        while let Some(item) = stream.next().await {
            if let Err(e) = item {
                raw_end = Some(e.to_string());
                break;
            }
        }
    })
    .await;
    assert!(end.is_ok(), "stream ended");
    let message = raw_end.expect("ended with an error");
    assert!(
        message.contains("no identity") || message.contains("ermission"),
        "{message}"
    );
    agent.stop().await;
}

#[tokio::test]
async fn validation_refuses_expired_immature_and_forged_tokens() {
    let foreign = ForeignDomain::new();
    let (agent, _dir, _bundle_path) = federated_agent(&foreign, None).await;
    let mut raw = agent.raw_client(true).await;
    let sub = "spiffe://example-federated.org/peer";
    let sign = |claims: serde_json::Value,
                alg: jsonwebtoken::Algorithm,
                key: &jsonwebtoken::EncodingKey| {
        let mut header = jsonwebtoken::Header::new(alg);
        header.kid = Some("fed-key".into());
        jsonwebtoken::encode(&header, &claims, key).unwrap()
    };
    let ec_key = jsonwebtoken::EncodingKey::from_ec_der(&foreign.jwt_key.serialize_der());
    let now = unix_now();
    let es256 = jsonwebtoken::Algorithm::ES256;
    let cases = [
        (
            "expired by a second",
            sign(
                serde_json::json!({"sub": sub, "aud": ["me"], "exp": now - 1}),
                es256,
                &ec_key,
            ),
        ),
        (
            "not yet valid",
            sign(
                serde_json::json!({"sub": sub, "aud": ["me"], "exp": now + 600, "nbf": now + 300}),
                es256,
                &ec_key,
            ),
        ),
        (
            "no exp",
            sign(
                serde_json::json!({"sub": sub, "aud": ["me"]}),
                es256,
                &ec_key,
            ),
        ),
        (
            "HS256 keyed with the public key",
            sign(
                serde_json::json!({"sub": sub, "aud": ["me"], "exp": now + 60}),
                jsonwebtoken::Algorithm::HS256,
                &jsonwebtoken::EncodingKey::from_secret(foreign.jwt_key.public_key_raw()),
            ),
        ),
        (
            "signed by another key under the same kid",
            sign(
                serde_json::json!({"sub": sub, "aud": ["me"], "exp": now + 60}),
                es256,
                &jsonwebtoken::EncodingKey::from_ec_der(
                    &ForeignDomain::new().jwt_key.serialize_der(),
                ),
            ),
        ),
    ];
    for (what, token) in cases {
        let err = raw
            .validate_jwtsvid(pb::ValidateJwtsvidRequest {
                audience: "me".into(),
                svid: token,
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{what}: {}",
            err.message()
        );
    }
    // alg: none, hand-assembled.
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let none = format!(
        "{}.{}.",
        b64.encode(r#"{"alg":"none","kid":"fed-key"}"#),
        b64.encode(serde_json::json!({"sub": sub, "aud": ["me"], "exp": now + 60}).to_string())
    );
    let err = raw
        .validate_jwtsvid(pb::ValidateJwtsvidRequest {
            audience: "me".into(),
            svid: none,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("alg"), "{}", err.message());

    // And a good one still passes.
    let good = sign(
        serde_json::json!({"sub": sub, "aud": ["me"], "exp": now + 60}),
        es256,
        &ec_key,
    );
    raw.validate_jwtsvid(pb::ValidateJwtsvidRequest {
        audience: "me".into(),
        svid: good,
    })
    .await
    .unwrap();
    agent.stop().await;
}
