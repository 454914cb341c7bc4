//! Unit tests of loading and validating the config file and its
//! environment overrides.

use super::*;
use crate::error::chain;

fn env() -> MapEnv {
    MapEnv {
        vars: [("HOME".to_owned(), "/home/u".to_owned())].into(),
        euid: 1000,
    }
}

#[test]
fn embedded_default_gives_the_user_an_identity() {
    let c = Config::load(None, &env()).unwrap();
    assert_eq!(c.source, ConfigSource::Embedded);
    assert_eq!(c.trust_domain.as_str(), "tether.local");
    assert_eq!(c.socket_path, PathBuf::from("/tmp/tether-1000/agent.sock"));
    assert_eq!(
        c.admin.socket_path,
        PathBuf::from("/tmp/tether-1000-admin/admin.sock")
    );
    assert_eq!(c.data_dir, PathBuf::from("/home/u/.local/share/tether"));
    assert_eq!(c.entries.len(), 1);
    assert_eq!(
        c.entries[0].spiffe_id.to_string(),
        "spiffe://tether.local/uid/1000"
    );
    assert_eq!(c.svid.x509_svid_ttl, Duration::from_secs(3600));
    assert_eq!(c.svid.jwt_svid_ttl, Duration::from_secs(300));
    assert_eq!(
        c.audit.dir,
        Some(PathBuf::from("/home/u/.local/share/tether/audit"))
    );
}

/// The shipped example documents every key with its default: it must
/// stay loadable, and its values must be the defaults it claims.
#[test]
fn the_example_file_is_valid_and_shows_the_defaults() {
    let example = include_str!("../../deploy/agent.example.toml");
    let c = Config::from_toml(example, &env()).unwrap();
    let d = Config::load(None, &env()).unwrap();
    assert_eq!(c.trust_domain, d.trust_domain);
    assert_eq!(c.svid.x509_svid_ttl, d.svid.x509_svid_ttl);
    assert_eq!(c.svid.jwt_svid_ttl, d.svid.jwt_svid_ttl);
    assert_eq!(c.audit.queue, d.audit.queue);
    assert_eq!(c.audit.flush_interval, d.audit.flush_interval);
    assert_eq!(c.audit.max_file_bytes, d.audit.max_file_bytes);
    assert_eq!(c.policy.poll_interval, d.policy.poll_interval);
    let (c_limits, d_limits) = (&c.workload_api.limits, &d.workload_api.limits);
    assert_eq!(
        c_limits.idle_connection_timeout,
        d_limits.idle_connection_timeout
    );
    assert_eq!(
        c_limits.max_connections_per_unmatched_uid,
        d_limits.max_connections_per_unmatched_uid
    );
    assert_eq!(c.entries.len(), 1);
}

/// The `agent.toml` block scalar of a ConfigMap manifest (`agent.toml:
/// |`) or of a JSON patch replacing it (`value: |`), unindented.
fn configmap_agent_toml(manifest: &str) -> String {
    let mut lines = manifest
        .lines()
        .skip_while(|l| !matches!(l.trim(), "agent.toml: |" | "value: |"));
    lines.next();
    let block: Vec<&str> = lines
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .collect();
    let indent = block
        .iter()
        .find(|l| !l.is_empty())
        .map_or(0, |l| l.len() - l.trim_start().len());
    block
        .iter()
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The configurations the Kubernetes manifests ship are configurations
/// this agent accepts (keys, values, the admin socket's directory).
#[test]
fn the_kubernetes_configmaps_are_valid_agent_configs() {
    let mut node = env();
    node.vars.insert("NODE_NAME".into(), "node-a".into());
    for manifest in [
        include_str!("../../deploy/kubernetes/base/configmap.yaml"),
        include_str!("../../deploy/kubernetes/upstream-ca/configmap-patch.yaml"),
    ] {
        let text = configmap_agent_toml(manifest);
        assert!(text.contains("[attestor.k8s]"), "{text}");
        let c = Config::from_toml(&text, &node)
            .unwrap_or_else(|e| panic!("{e}\n--- agent.toml ---\n{text}"));
        assert!(c.attestor.k8s.enabled);
        assert_eq!(c.attestor.k8s.node_name.as_deref(), Some("node-a"));
        assert!(c.http.listen.is_some());
    }
}

#[test]
fn the_k8s_attestor_takes_its_node_from_the_downward_api() {
    let text = "[attestor.k8s]\nenabled = true\n";
    let missing = Config::from_toml(text, &env()).unwrap_err();
    assert!(chain(&missing).contains("NODE_NAME"), "{missing}");
    let mut with_node = env();
    with_node.vars.insert("NODE_NAME".into(), "node-a".into());
    let c = Config::from_toml(text, &with_node).unwrap();
    assert_eq!(c.attestor.k8s.node_name.as_deref(), Some("node-a"));
    let explicit = Config::from_toml(
        "[attestor.k8s]\nenabled = true\nnode_name = \"node-b\"\n",
        &with_node,
    )
    .unwrap();
    assert_eq!(explicit.attestor.k8s.node_name.as_deref(), Some("node-b"));
    let bad = Config::from_toml(
        "[attestor.k8s]\nenabled = true\nnode_name = \"n\"\nmax_poll_attempts = 0\n",
        &env(),
    )
    .unwrap_err();
    assert!(
        chain(&bad).contains("attestor.k8s.max_poll_attempts"),
        "{bad}"
    );
    // Unverified, the kubelet may only be this node's loopback.
    let remote = Config::from_toml(
        "[attestor.k8s]\nenabled = true\nnode_name = \"n\"\nkubelet_host = \"10.0.0.7\"\nskip_kubelet_verification = true\n",
        &env(),
    )
    .unwrap_err();
    assert!(chain(&remote).contains("loopback"), "{remote}");
    // Off, nothing is required.
    assert!(!Config::from_toml("", &env()).unwrap().attestor.k8s.enabled);
}

#[test]
fn an_intent_longer_than_the_store_keeps_is_refused_at_start() {
    // Accepted here, it failed every BeginTask with Unavailable.
    let long = Config::from_toml("[tasks]\nmax_intent_len = 65536\n", &env()).unwrap_err();
    assert!(
        chain(&long).contains("tasks.max_intent_len") && chain(&long).contains("4096"),
        "{long}"
    );
    Config::from_toml("[tasks]\nmax_intent_len = 4096\n", &env()).unwrap();
}

#[test]
fn the_idle_timeout_and_the_unmatched_uid_budget_are_read_and_checked() {
    let d = Config::from_toml("", &env()).unwrap().workload_api.limits;
    assert_eq!(d.idle_connection_timeout, Duration::from_secs(300));
    assert_eq!(d.max_connections_per_unmatched_uid, 64);
    let c = Config::from_toml(
        "[limits]\nidle_connection_timeout = \"90s\"\nmax_connections_per_unmatched_uid = 8",
        &env(),
    )
    .unwrap()
    .workload_api
    .limits;
    assert_eq!(c.idle_connection_timeout, Duration::from_secs(90));
    assert_eq!(c.max_connections_per_unmatched_uid, 8);
    assert_eq!(c.connections().idle_timeout, Duration::from_secs(90));
    assert_eq!(c.connections().max_per_unmatched_uid, 8);
    // The bounds themselves are accepted.
    for ok in ["1s", "24h"] {
        Config::from_toml(
            &format!("[limits]\nidle_connection_timeout = \"{ok}\""),
            &env(),
        )
        .unwrap();
    }
    Config::from_toml(
        "[limits]\nmax_connections_per_uid = 8\nmax_connections_per_unmatched_uid = 8",
        &env(),
    )
    .unwrap();
    let cases = [
        (
            "idle_connection_timeout = \"0s\"",
            "limits.idle_connection_timeout: must be between 1s and 24h",
        ),
        (
            "idle_connection_timeout = \"999ms\"",
            "limits.idle_connection_timeout: must be between 1s and 24h",
        ),
        (
            "idle_connection_timeout = \"25h\"",
            "limits.idle_connection_timeout: must be between 1s and 24h",
        ),
        (
            "idle_connection_timeout = \"soon\"",
            "idle_connection_timeout",
        ),
        (
            "max_connections_per_unmatched_uid = 0",
            "limits.max_connections_per_unmatched_uid: must be greater than zero",
        ),
        // Lowering the per-uid budget below the default small one
        // needs the small one lowered too: never fixed silently.
        (
            "max_connections_per_uid = 16",
            "limits.max_connections_per_unmatched_uid: must be greater than zero and at most max_connections_per_uid",
        ),
        (
            "max_connections_per_uid = 16\nmax_connections_per_unmatched_uid = 17",
            "at most max_connections_per_uid",
        ),
    ];
    for (text, want) in cases {
        let err = Config::from_toml(&format!("[limits]\n{text}"), &env()).unwrap_err();
        assert!(
            chain(&err).contains(want),
            "{text}\n=> {err}\n(wanted {want:?})"
        );
    }
}

#[test]
fn audit_dir_is_the_top_level_name_of_the_audit_directory() {
    let c = Config::from_toml("audit_dir = \"/srv/audit\"", &env()).unwrap();
    assert_eq!(c.audit.dir, Some(PathBuf::from("/srv/audit")));
    let both =
        Config::from_toml("audit_dir = \"/srv/a\"\n[audit]\ndir = \"/srv/b\"", &env()).unwrap_err();
    assert!(chain(&both).contains("not both"), "{both}");
    let relative = Config::from_toml("audit_dir = \"audit\"", &env()).unwrap_err();
    assert!(chain(&relative).contains("absolute"), "{relative}");
}

#[test]
fn the_audit_section_is_read_and_checked() {
    let c = Config::from_toml(
        "data_dir = \"/srv/t\"\n[audit]\nmax_file_bytes = 8192\nflush_interval = \"1s\"\nqueue = 10\nstdout = true",
        &env(),
    )
    .unwrap();
    assert_eq!(c.audit.dir, Some(PathBuf::from("/srv/t/audit")));
    assert_eq!(c.audit.max_file_bytes, 8192);
    assert_eq!(c.audit.flush_interval, Duration::from_secs(1));
    assert_eq!(c.audit.queue, 10);
    assert!(c.audit.stdout);
    let c = Config::from_toml("[audit]\ndir = \"/var/log/tether\"", &env()).unwrap();
    assert_eq!(c.audit.dir, Some(PathBuf::from("/var/log/tether")));
}

#[test]
fn root_gets_system_paths_and_env_overrides_win() {
    let root = MapEnv {
        vars: Default::default(),
        euid: 0,
    };
    let c = Config::from_toml("", &root).unwrap();
    assert_eq!(c.socket_path, PathBuf::from("/run/tether/agent.sock"));
    assert_eq!(c.data_dir, PathBuf::from("/var/lib/tether"));
    assert!(
        c.entries.is_empty(),
        "a config file has only the entries it names"
    );

    let mut e = env();
    e.vars
        .insert("XDG_RUNTIME_DIR".into(), "/run/user/1000".into());
    e.vars
        .insert("TETHER_DATA_DIR".into(), "/srv/tether".into());
    let c = Config::from_toml("data_dir = \"/elsewhere\"", &e).unwrap();
    assert_eq!(
        c.socket_path,
        PathBuf::from("/run/user/1000/tether/agent.sock")
    );
    assert_eq!(c.data_dir, PathBuf::from("/srv/tether"));
}

#[test]
fn the_issue_example_parses() {
    let text = r#"
trust_domain = "example.org"
socket_path = "/tmp/tether/agent.sock"
data_dir = "/tmp/tether/data"
x509_svid_ttl = "1h"
jwt_svid_ttl = "5m"

[[entries]]
spiffe_id = "spiffe://example.org/myservice"
selectors = ["unix:uid:1000"]
hint = "myservice"
dns_names = ["example.org"]
jwt_svid_ttl = "30s"
federates_with = ["example-federated.org"]

[[federation]]
trust_domain = "example-federated.org"
bundle_path = "/etc/tether/example-federated.org.json"
"#;
    let c = Config::from_toml(text, &env()).unwrap();
    assert_eq!(c.entries[0].jwt_svid_ttl, Some(Duration::from_secs(30)));
    assert_eq!(
        c.federation[0].trust_domain.as_str(),
        "example-federated.org"
    );
}

#[test]
fn bad_values_name_the_key() {
    let cases = [
        ("trust_domain = \"Bad Domain\"", "trust_domain"),
        ("trust_domain = \"EXAMPLE.org\"", "lowercase"),
        (
            "x509_svid_ttl = \"0s\"",
            "x509_svid_ttl = \"0s\": must be greater than zero",
        ),
        ("jwt_svid_ttl = \"2d\"", "jwt_svid_ttl"),
        ("x509_svid_ttl = \"soon\"", "x509_svid_ttl"),
        ("socket_path = \"relative.sock\"", "socket_path"),
        ("no_such_key = 1", "no_such_key"),
        (
            "trust_domain = \"a\"\n\n  bogus = 1",
            "<inline>:3:3: unknown field `bogus`",
        ),
        ("[authority]\nca_ttl = \"0s\"", "authority.ca_ttl"),
        ("[authority]\nkind = \"hsm\"", "kind"),
        (
            "[[entries]]\nspiffe_id = \"spiffe://tether.local/x\"\nselectors = [\"uid:1000\"]",
            "entries[0]",
        ),
        (
            "[[entries]]\nspiffe_id = \"spiffe://other.org/x\"\nselectors = [\"unix:uid:1\"]",
            "outside the agent's trust domain",
        ),
        (
            "[[entries]]\nspiffe_id = \"spiffe://tether.local/x\"\nselectors = [\"unix:uid:1\"]\nx509_svid_ttl = \"0s\"",
            "x509_svid_ttl must be greater than zero",
        ),
        (
            "[[entries]]\nspiffe_id = \"spiffe://tether.local/x\"\nselectors = [\"unix:uid:1\"]\nbogus = 1",
            "bogus",
        ),
        (
            "[[federation]]\ntrust_domain = \"tether.local\"\nbundle_path = \"/x\"",
            "own trust domain",
        ),
        (
            "[server]\naddress = \"127.0.0.1:1\"\n[bundle_endpoint]\nlisten = \"127.0.0.1:0\"\nprofile = \"https_spiffe\"",
            "the tether server serves it",
        ),
        (
            "[bundle_endpoint]\nlisten = \"127.0.0.1:0\"\nprofile = \"https_web\"",
            "bundle_endpoint.cert_path",
        ),
        (
            "[[federation]]\ntrust_domain = \"peer.example\"\nbundle_endpoint_url = \"http://peer.example/\"\nbundle_endpoint_profile = \"https_web\"",
            "federation[0].bundle_endpoint_url",
        ),
        ("[limits]\nmax_audiences = 0", "limits.max_audiences"),
        ("[audit]\nqueue = 0", "audit.queue"),
        ("[audit]\nmax_file_bytes = 100", "audit.max_file_bytes"),
        (
            "[audit]\ncaller_bytes_per_second = 0",
            "audit.caller_bytes_per_second",
        ),
        (
            "[audit]\ncaller_burst_bytes = 4096",
            "audit.caller_burst_bytes",
        ),
        ("[audit]\nflush_interval = \"0s\"", "audit.flush_interval"),
        (
            "[audit]\ndir = \"audit\"",
            "audit.dir = \"audit\": must be an absolute path",
        ),
        ("[audit]\nbogus = 1", "bogus"),
        ("admin_group = \"no-such-group-here\"", "admin_group"),
        (
            "socket_path = \"/tmp/x.sock\"\nadmin_socket_path = \"/tmp/y.sock\"",
            "another directory",
        ),
    ];
    for (text, want) in cases {
        let err = Config::from_toml(text, &env()).unwrap_err();
        assert!(
            chain(&err).contains(want),
            "{text}\n=> {err}\n(wanted {want:?})"
        );
    }
}

#[test]
fn a_missing_config_file_prints_the_path_and_the_os_error_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    let error = Config::load(Some(&path), &env()).unwrap_err();
    // What failed is the message, why is the source: never both.
    assert_eq!(error.to_string(), format!("config file {}", path.display()));
    let text = chain(&error);
    assert!(
        text.starts_with(&format!(
            "config file {}: No such file or directory",
            path.display()
        )),
        "{text}"
    );
    assert_eq!(text.matches("No such file").count(), 1, "{text}");
    assert_eq!(text.matches(path.to_str().unwrap()).count(), 1, "{text}");

    // A parse error is one line: the parser's message is in ours, and its
    // multi-line excerpt is not appended as a source.
    let error = Config::from_toml("unknown_key = true\n", &env()).unwrap_err();
    assert!(std::error::Error::source(&error).is_none(), "{error:?}");
    let text = chain(&error);
    assert!(text.contains("unknown field `unknown_key`"), "{text}");
    assert!(!text.contains('\n'), "{text}");
}

#[test]
fn an_invalid_value_names_the_key_then_the_reason_once() {
    let error = Config::from_toml("trust_domain = \"Not A Domain\"\n", &env()).unwrap_err();
    let text = chain(&error);
    assert!(
        text.starts_with("trust_domain = \"Not A Domain\": "),
        "{text}"
    );
    let reason = &text["trust_domain = \"Not A Domain\": ".len()..];
    assert!(!reason.is_empty(), "{text}");
    assert_eq!(text.matches(reason).count(), 1, "{text}");
}

#[test]
fn oidc_sets_the_issuer_of_the_tokens_signed_here() {
    let c = Config::from_toml("", &env()).unwrap();
    assert!(c.oidc.is_none());
    assert_eq!(c.authority.issuer, None, "no [oidc]: no issuer");

    let c = Config::from_toml(
        "[oidc]\nlisten = \"127.0.0.1:8443\"\nissuer = \"https://oidc.example.com/td/\"\n\
         cert_path = \"/etc/tether/oidc.pem\"\nkey_path = \"/etc/tether/oidc.key\"\n",
        &env(),
    )
    .unwrap();
    let oidc = c.oidc.as_ref().unwrap();
    assert_eq!(oidc.issuer, "https://oidc.example.com/td", "one form");
    assert_eq!(oidc.listen.port(), 8443);
    assert!(oidc.is_https());
    assert_eq!(
        c.authority.issuer.as_deref(),
        Some("https://oidc.example.com/td")
    );
}

#[test]
fn bad_oidc_settings_name_the_key() {
    for (text, want) in [
        (
            "[oidc]\nlisten = \"127.0.0.1:0\"\nissuer = \"http://oidc.example.com\"",
            "oidc.issuer = \"http://oidc.example.com\": must be an https:// URL",
        ),
        (
            "[oidc]\nlisten = \"127.0.0.1:0\"\nissuer = \"https://oidc.example.com?x=1\"",
            "no query",
        ),
        (
            "[oidc]\nlisten = \"127.0.0.1:0\"\nissuer = \"https://oidc.example.com\"\ncert_path = \"/c.pem\"",
            "oidc.key_path: is required with oidc.cert_path",
        ),
        ("[oidc]\nissuer = \"https://oidc.example.com\"", "listen"),
        (
            "[oidc]\nlisten = \"somewhere\"\nissuer = \"https://o.example\"",
            "listen",
        ),
        (
            "[oidc]\nlisten = \"127.0.0.1:0\"\nissuer = \"https://o.example\"\nbogus = 1",
            "bogus",
        ),
    ] {
        let err = Config::from_toml(text, &env()).unwrap_err();
        assert!(
            chain(&err).contains(want),
            "{text}\n=> {}\n(wanted {want:?})",
            chain(&err)
        );
    }
}

#[test]
fn a_fleet_agent_with_oidc_is_refused_the_server_serves_it() {
    let err = Config::from_toml(
        "[server]\naddress = \"server:8081\"\nbootstrap_bundle = \"/b.json\"\njoin_token = \"t\"\n\
         [oidc]\nlisten = \"127.0.0.1:0\"\nissuer = \"https://o.example\"\n",
        &env(),
    )
    .unwrap_err();
    let err = chain(&err);
    assert!(
        err.contains("oidc") && err.contains("served by the tether server"),
        "{err}"
    );
}

#[test]
fn introspection_is_a_standalone_agents_and_bounded() {
    let c = Config::from_toml("[introspection]\nlisten = \"127.0.0.1:8443\"\n", &env()).unwrap();
    let introspection = c.introspection.expect("[introspection]");
    assert_eq!(introspection.listen.port(), 8443);
    assert_eq!(
        introspection.requests_per_second,
        crate::introspect::DEFAULT_REQUESTS_PER_SECOND
    );
    let error = Config::from_toml(
        "[introspection]\nlisten = \"127.0.0.1:8443\"\nburst = 0\n",
        &env(),
    )
    .unwrap_err();
    assert!(chain(&error).starts_with("introspection.burst"), "{error}");
    let error = Config::from_toml(
        "[server]\naddress = \"server.example:8081\"\njoin_token = \"t\"\n\
         [introspection]\nlisten = \"127.0.0.1:8443\"\n",
        &env(),
    )
    .unwrap_err();
    let text = chain(&error);
    assert!(
        text.starts_with("introspection") && text.contains("the tether server serves it"),
        "{text}"
    );
}
