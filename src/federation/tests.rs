use std::time::Duration;

use spiffe::TrustDomain;

use super::config::{BundleEndpointConfig, EndpointAuth, EndpointTls, FederationConfig};
use super::fetch::{self, FetchError, MIN_RETRY};
use crate::bundle::TrustBundle;

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).expect("a valid trust domain")
}

fn federation(extra: &str) -> Result<super::FederationSource, super::SettingProblem> {
    let text = format!("trust_domain = \"peer.example\"\n{extra}");
    let raw: FederationConfig = toml::from_str(&text).expect("parses");
    raw.validate(td("peer.example"))
}

#[test]
fn a_file_source_stays_as_it_was() {
    let source = federation("bundle_path = \"/etc/peer.json\"").expect("valid");
    assert!(source.endpoint.is_none());
    assert_eq!(
        source.bundle_path.as_deref(),
        Some(std::path::Path::new("/etc/peer.json"))
    );
}

#[test]
fn endpoint_sources_are_validated() {
    let web = federation(
        "bundle_endpoint_url = \"https://peer.example:8443/bundle\"\nbundle_endpoint_profile = \"https_web\"",
    )
    .expect("https_web from its URL alone");
    let endpoint = web.endpoint.expect("an endpoint");
    assert_eq!(
        (endpoint.host.as_str(), endpoint.port),
        ("peer.example", 8443)
    );
    assert_eq!(endpoint.auth, EndpointAuth::Web { ca_path: None });

    let spiffe = federation(
        "bundle_path = \"/etc/peer.json\"\nbundle_endpoint_url = \"https://[::1]/\"\n\
         bundle_endpoint_profile = \"https_spiffe\"\nendpoint_spiffe_id = \"spiffe://peer.example/tether/agent\"",
    )
    .expect("https_spiffe with its bootstrap bundle");
    let endpoint = spiffe.endpoint.expect("an endpoint");
    assert_eq!((endpoint.host.as_str(), endpoint.port), ("::1", 443));

    let cases = [
        (
            "",
            "bundle_path",
            "needs bundle_path or bundle_endpoint_url",
        ),
        (
            "bundle_endpoint_url = \"http://peer.example/\"\nbundle_endpoint_profile = \"https_web\"",
            "bundle_endpoint_url",
            "https",
        ),
        (
            "bundle_endpoint_url = \"https://user@peer.example/\"\nbundle_endpoint_profile = \"https_web\"",
            "bundle_endpoint_url",
            "user info",
        ),
        (
            "bundle_endpoint_url = \"https://peer.example/\"",
            "bundle_endpoint_profile",
            "how it is authenticated",
        ),
        (
            "bundle_endpoint_profile = \"https_web\"\nbundle_path = \"/x\"",
            "bundle_endpoint_url",
            "say where",
        ),
        (
            "bundle_path = \"/x\"\nbundle_endpoint_url = \"https://peer.example/\"\nbundle_endpoint_profile = \"https_web\"",
            "bundle_path",
            "not both",
        ),
        (
            "bundle_endpoint_url = \"https://peer.example/\"\nbundle_endpoint_profile = \"https_spiffe\"\n\
             endpoint_spiffe_id = \"spiffe://peer.example/x\"",
            "bundle_path",
            "bootstrap",
        ),
        (
            "bundle_path = \"/x\"\nbundle_endpoint_url = \"https://peer.example/\"\nbundle_endpoint_profile = \"https_spiffe\"",
            "endpoint_spiffe_id",
            "set endpoint_spiffe_id",
        ),
        (
            "bundle_path = \"/x\"\nbundle_endpoint_url = \"https://peer.example/\"\nbundle_endpoint_profile = \"https_spiffe\"\n\
             endpoint_spiffe_id = \"spiffe://other.example/x\"",
            "endpoint_spiffe_id",
            "not in the federated trust domain",
        ),
        (
            "bundle_endpoint_url = \"https://peer.example/\"\nbundle_endpoint_profile = \"https_web\"\n\
             endpoint_spiffe_id = \"spiffe://peer.example/x\"",
            "endpoint_spiffe_id",
            "only for",
        ),
        (
            "bundle_path = \"/x\"\nbundle_endpoint_url = \"https://peer.example/\"\nbundle_endpoint_profile = \"https_spiffe\"\n\
             endpoint_spiffe_id = \"spiffe://peer.example/x\"\nbundle_endpoint_ca_path = \"/ca.pem\"",
            "bundle_endpoint_ca_path",
            "only for https_web",
        ),
        (
            "bundle_endpoint_url = \"https://peer.example/\"\nbundle_endpoint_profile = \"https_web\"\n\
             bundle_endpoint_ca_path = \"ca.pem\"",
            "bundle_endpoint_ca_path",
            "absolute",
        ),
    ];
    for (text, key, problem) in cases {
        let refused = federation(text).expect_err(text);
        assert_eq!(refused.key, key, "{text}");
        assert!(
            refused.problem.contains(problem),
            "{text}: {}",
            refused.problem
        );
    }
}

fn endpoint(text: &str) -> Result<super::BundleEndpoint, super::SettingProblem> {
    let raw: BundleEndpointConfig = toml::from_str(text).expect("parses");
    raw.validate()
}

#[test]
fn the_served_endpoint_is_validated() {
    let spiffe = endpoint("listen = \"127.0.0.1:0\"\nprofile = \"https_spiffe\"").expect("valid");
    assert_eq!(spiffe.tls, EndpointTls::Spiffe);
    assert_eq!(spiffe.refresh_hint, Duration::from_secs(300));
    let web = endpoint(
        "listen = \"127.0.0.1:0\"\nprofile = \"https_web\"\ncert_path = \"/c.pem\"\nkey_path = \"/k.pem\"\nrefresh_hint = \"1m\"",
    )
    .expect("valid");
    assert!(matches!(web.tls, EndpointTls::Web { .. }));
    assert_eq!(web.refresh_hint, Duration::from_secs(60));
    let cases = [
        ("profile = \"https_web\"", "cert_path"),
        (
            "profile = \"https_web\"\ncert_path = \"/c.pem\"",
            "key_path",
        ),
        (
            "profile = \"https_spiffe\"\ncert_path = \"/c.pem\"",
            "cert_path",
        ),
        (
            "profile = \"https_spiffe\"\nrefresh_hint = \"1s\"",
            "refresh_hint",
        ),
        (
            "profile = \"https_spiffe\"\nrefresh_hint = \"30d\"",
            "refresh_hint",
        ),
    ];
    for (text, key) in cases {
        let refused = endpoint(&format!("listen = \"127.0.0.1:0\"\n{text}")).expect_err(text);
        assert_eq!(refused.key, key, "{text}");
    }
}

fn jwt_only(sequence: u64, kid: &str) -> TrustBundle {
    let point = {
        use ::aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _};
        let rng = ::aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).expect("a key");
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref())
            .expect("the key")
            .public_key()
            .as_ref()
            .to_vec()
    };
    let authority =
        crate::bundle::JwtAuthority::from_p256_point(kid.into(), &point).expect("a JWT authority");
    TrustBundle::new(td("peer.example"), Vec::new(), vec![authority], sequence)
}

#[test]
fn a_fetched_bundle_needs_keys_and_a_sequence_that_does_not_go_back() {
    let last = jwt_only(5, "a");
    assert!(fetch::accept(jwt_only(5, "b"), Some(&last)).is_ok());
    assert!(fetch::accept(jwt_only(6, "b"), Some(&last)).is_ok());
    assert!(matches!(
        fetch::accept(jwt_only(4, "b"), Some(&last)),
        Err(FetchError::SequenceWentBack { got: 4, last: 5 })
    ));
    let empty = TrustBundle::new(td("peer.example"), Vec::new(), Vec::new(), 9);
    assert!(matches!(
        fetch::accept(empty, Some(&last)),
        Err(FetchError::NoKeys)
    ));
}

#[test]
fn the_refresh_hint_round_trips_and_retries_back_off() {
    let served = jwt_only(3, "a").with_refresh_hint(Duration::from_secs(42));
    let json = served.to_spiffe_json().expect("serialises");
    let back = TrustBundle::from_spiffe_json(td("peer.example"), json.as_bytes()).expect("parses");
    assert_eq!(back.refresh_hint(), Some(Duration::from_secs(42)));
    assert_eq!(back.sequence(), 3);

    let pace = Duration::from_secs(300);
    assert_eq!(fetch::retry_after(1, pace), MIN_RETRY);
    assert_eq!(fetch::retry_after(2, pace), MIN_RETRY * 2);
    assert_eq!(fetch::retry_after(30, pace), pace);
    assert!(fetch::retry_after(1, Duration::ZERO) >= MIN_RETRY);
}

#[tokio::test]
async fn the_endpoint_answers_get_of_slash_only() {
    use http_body_util::BodyExt as _;

    use super::endpoint::BundleRoutes;
    use crate::web::{Routes as _, WebRequest};

    let bundle = std::sync::Arc::new(jwt_only(7, "k1"));
    let (_keep, watched) = tokio::sync::watch::channel(bundle);
    let routes = BundleRoutes::new(watched, Duration::from_secs(120));
    let request = |method: http::Method, path: &str| WebRequest {
        method,
        path: path.into(),
        query: None,
        headers: http::HeaderMap::new(),
        body: bytes::Bytes::new(),
        remote_addr: "127.0.0.1:1".parse().expect("an address"),
        peer_certificates: Vec::new(),
    };
    let ok = routes.answer(request(http::Method::GET, "/")).await;
    assert_eq!(ok.status(), http::StatusCode::OK);
    assert_eq!(
        ok.headers()
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.as_bytes()),
        Some(&b"application/json"[..])
    );
    let body = ok.into_body().collect().await.expect("a body").to_bytes();
    let served =
        TrustBundle::from_spiffe_json(td("peer.example"), &body).expect("a bundle document");
    assert_eq!(served.sequence(), 7);
    assert_eq!(served.refresh_hint(), Some(Duration::from_secs(120)));
    assert!(served.jwt_authority("k1").is_some());

    let missing = routes.answer(request(http::Method::GET, "/bundle")).await;
    assert_eq!(missing.status(), http::StatusCode::NOT_FOUND);
    let post = routes.answer(request(http::Method::POST, "/")).await;
    assert_eq!(post.status(), http::StatusCode::METHOD_NOT_ALLOWED);
}

/// Regression (issue 19 review): a fetch that ended after a reload had
/// dropped its domain (or replaced its endpoint) published its bundle
/// into the reloaded set, where it stayed in force with no source.
#[test]
fn a_fetch_that_ends_after_a_reload_does_not_bring_its_source_back() {
    let web = |url: &str| {
        federation(&format!(
            "bundle_endpoint_url = \"{url}\"\nbundle_endpoint_profile = \"https_web\""
        ))
        .expect("valid")
    };
    let source = web("https://peer.example/");
    let federation = super::Federation::load(vec![source.clone()]).expect("loads");
    let fetcher = |source: &super::FederationSource| super::Fetcher {
        source: source.clone(),
        endpoint: source.endpoint.clone().expect("an endpoint"),
        sources: federation.sources.subscribe(),
        bundles: std::sync::Arc::clone(&federation.bundles),
        statuses: std::sync::Arc::clone(&federation.statuses),
    };
    let old = fetcher(&source);
    old.publish(jwt_only(1, "a"), None);
    assert!(federation.current().contains_key(&td("peer.example")));

    // The domain dropped by a reload: the late fetch publishes nothing.
    federation.apply(federation.prepare(Vec::new()).expect("prepares"));
    old.publish(jwt_only(2, "b"), None);
    assert!(
        federation.current().is_empty(),
        "a dropped domain came back"
    );

    // Its endpoint replaced: only the new source's fetcher publishes.
    let moved = web("https://moved.peer.example/");
    federation.apply(federation.prepare(vec![moved.clone()]).expect("prepares"));
    old.publish(jwt_only(3, "c"), None);
    assert!(
        federation.current().is_empty(),
        "the old endpoint published"
    );
    fetcher(&moved).publish(jwt_only(4, "d"), None);
    let current = federation.current();
    let bundle = current
        .get(&td("peer.example"))
        .expect("the new endpoint's");
    assert!(bundle.jwt_authority("d").is_some());
}

/// Regression (issue 19 review): the parser's errors quote what the
/// endpoint sent, and the whole text went into every warning and into
/// readiness (`/readyz`, `tether healthcheck`): a megabyte each time.
#[test]
fn a_hostile_document_is_quoted_in_bounded_words() {
    let long = "k".repeat(400 * 1024);
    // The same key twice under a long kid.
    let twice = {
        let one = jwt_only(1, &long).to_spiffe_json().expect("serialises");
        let mut doc: serde_json::Value = serde_json::from_str(&one).expect("JSON");
        let key = doc["keys"][0].clone();
        doc["keys"] = serde_json::json!([key.clone(), key]);
        doc.to_string()
    };
    let documents = [format!(r#"{{"keys":"{long}"}}"#), twice];
    for document in documents {
        let refused = TrustBundle::from_spiffe_json(td("peer.example"), document.as_bytes())
            .expect_err("not a bundle");
        let whole = crate::error::Chain(&refused).to_string();
        let text = fetch::error_text(&FetchError::Document(refused));
        assert!(text.len() < 1024, "{} bytes", text.len());
        assert!(whole.len() > 100 * 1024, "the case quotes the document");
    }
}
