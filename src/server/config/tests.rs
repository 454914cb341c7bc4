//! The server's config: the contract's keys, their defaults, and what is
//! refused with which key named.

use std::collections::HashMap;
use std::path::Path;

use super::*;
use crate::config::MapEnv;
use crate::error::Chain;

fn root() -> MapEnv {
    MapEnv {
        vars: HashMap::new(),
        euid: 0,
    }
}

fn parse(text: &str) -> Result<ServerConfig, ConfigError> {
    ServerConfig::parse(Path::new("/etc/tether/server.toml"), text, &root())
}

fn refused(text: &str) -> String {
    Chain(&parse(text).unwrap_err()).to_string()
}

#[test]
fn an_empty_file_gives_the_documented_defaults() {
    let config = parse("").unwrap();
    assert_eq!(config.trust_domain.as_str(), "tether.local");
    assert_eq!(config.data_dir, Path::new("/var/lib/tether-server"));
    assert_eq!(
        config.admin_socket_path,
        Path::new("/run/tether-admin/server.sock")
    );
    assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!(
        config.store,
        StoreLocation::Sqlite("/var/lib/tether-server/server.db".into())
    );
    assert!(config.entries.is_empty());
    assert_eq!(
        config.max_task_ttl,
        crate::server::node_api::DEFAULT_MAX_TASK_TTL
    );
    assert_eq!(
        parse("max_task_ttl = \"2h\"").unwrap().max_task_ttl,
        Duration::from_secs(7200)
    );
}

#[test]
fn the_contract_keys_are_read() {
    let config = parse(
        r#"
        trust_domain = "fleet.test"
        data_dir = "/srv/tether"
        listen = "[::]:9443"
        admin_socket_path = "/run/ts/admin.sock"
        store = "postgres://tether:s3cret@db.internal:5432/tether"

        [authority]
        ca_ttl = "12h"

        [[entries]]
        spiffe_id = "spiffe://fleet.test/batch"
        selectors = ["unix:uid:1000"]
        nodes = ["node-a", "node-b"]

        [[entries]]
        spiffe_id = "spiffe://fleet.test/ns/{k8s:ns}/sa/{k8s:sa}"
        selectors = ["k8s:pod-label:tether:yes"]
        "#,
    )
    .unwrap();
    assert_eq!(config.trust_domain.as_str(), "fleet.test");
    assert_eq!(config.listen.to_string(), "[::]:9443");
    assert_eq!(config.authority.ca_ttl.as_secs(), 12 * 3600);
    assert_eq!(config.entries.len(), 2);
    let named: Vec<&str> = config.entries[0]
        .nodes
        .iter()
        .map(NodeName::as_str)
        .collect();
    assert_eq!(named, ["node-a", "node-b"]);
    assert!(config.entries[1].nodes.is_empty());
    // The password never reaches a log line.
    let shown = format!("{:?} {}", config.store, config.store);
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(
        shown.contains("postgres://tether:***@db.internal:5432/tether"),
        "{shown}"
    );
}

#[test]
fn the_environment_overrides_the_file() {
    let env = MapEnv {
        vars: HashMap::from([
            ("TETHER_SERVER_ADMIN_SOCKET".into(), "/run/x/s.sock".into()),
            ("TETHER_SERVER_DATA_DIR".into(), "/srv/x".into()),
            ("TETHER_SERVER_STORE".into(), "postgresql://h/db".into()),
        ]),
        euid: 0,
    };
    let config = ServerConfig::parse(
        Path::new("/s.toml"),
        "data_dir = \"/srv/y\"\nadmin_socket_path = \"/run/y.sock\"\n",
        &env,
    )
    .unwrap();
    assert_eq!(config.admin_socket_path, Path::new("/run/x/s.sock"));
    assert_eq!(config.data_dir, Path::new("/srv/x"));
    assert_eq!(
        config.store,
        StoreLocation::Postgres("postgresql://h/db".into())
    );
}

#[test]
fn bad_values_are_refused_naming_the_key() {
    let cases = [
        ("listen = \"server:8081\"", "listen = \"server:8081\""),
        ("store = \"mysql://h/db\"", "store = \"mysql://h/db\""),
        ("store = \"postgres://\"", "store"),
        (
            "store = \"postgres://tether@db/tether?sslmode=require\"",
            "TLS to PostgreSQL is not supported yet",
        ),
        ("data_dir = \"relative\"", "data_dir"),
        ("unknown_key = 1", "unknown field `unknown_key`"),
        (
            "node_svid_ttl = \"5s\"",
            "node_svid_ttl = \"5s\": must be at least 10s",
        ),
        ("node_svid_ttl = \"48h\"", "node_svid_ttl = \"2days\""),
        ("node_requests_per_second = 0", "node_requests_per_second"),
        (
            "max_task_ttl = \"0s\"",
            "max_task_ttl = \"0s\": must be greater than zero",
        ),
        ("max_tasks_per_node = 0", "max_tasks_per_node"),
        ("max_tasks_per_node = 2000000", "max_tasks_per_node"),
        (
            "[[entries]]\nspiffe_id = \"spiffe://tether.local/a\"\nselectors = [\"unix:uid:1\"]\nnodes = [\"Node_A\"]",
            "entries[0].nodes = \"Node_A\"",
        ),
        (
            "[[entries]]\nspiffe_id = \"spiffe://tether.local/a\"\nselectors = [\"unix:uid:1\"]\nnodes = [\"a\", \"a\"]",
            "is listed twice",
        ),
        (
            "[[entries]]\nspiffe_id = \"spiffe://other.test/a\"\nselectors = [\"unix:uid:1\"]",
            "entries[0]",
        ),
        (
            "[[entries]]\nspiffe_id = \"spiffe://tether.local/a\"\nselectors = [\"unix:uid:1\"]\nnot_a_key = true",
            "unknown field `not_a_key`",
        ),
        (
            "[[entries]]\nspiffe_id = \"spiffe://tether.local/a\"\nselectors = [\"unix:uid:1\"]\n[[entries]]\nspiffe_id = \"spiffe://tether.local/a\"\nselectors = [\"unix:uid:1\"]",
            "entries",
        ),
        ("[authority]\nca_ttl = \"0s\"", "authority.ca_ttl"),
    ];
    for (text, want) in cases {
        let shown = refused(text);
        assert!(shown.contains(want), "{text:?}: {shown}");
    }
}

#[test]
fn a_password_in_a_refused_url_is_not_printed() {
    let shown = refused(r#"store = "postgres://u:hunter2@h/db with a space""#);
    assert!(shown.starts_with("store = "), "{shown}");
    assert!(!shown.contains("hunter2"), "{shown}");
}

#[test]
fn oidc_names_the_fleets_issuer() {
    assert_eq!(parse("").unwrap().authority.issuer, None);
    let config =
        parse("[oidc]\nlisten = \"0.0.0.0:8443\"\nissuer = \"https://oidc.example.com/\"\n")
            .unwrap();
    assert_eq!(
        config.oidc.as_ref().map(|o| o.issuer.as_str()),
        Some("https://oidc.example.com")
    );
    assert_eq!(
        config.authority.issuer.as_deref(),
        Some("https://oidc.example.com")
    );
    let refusal = refused("[oidc]\nlisten = \"0.0.0.0:8443\"\nissuer = \"https://a@b\"\n");
    assert!(
        refusal.contains("oidc.issuer") && refusal.contains("user info"),
        "{refusal}"
    );
}

#[test]
fn introspection_is_read_and_bounded() {
    assert!(parse("").unwrap().introspection.is_none());
    let config = parse("[introspection]\nlisten = \"127.0.0.1:0\"\nburst = 7\n").unwrap();
    let introspection = config.introspection.expect("[introspection]");
    assert_eq!(introspection.burst, 7);
    let text = refused("[introspection]\nlisten = \"127.0.0.1:0\"\nrequests_per_second = 0\n");
    assert!(
        text.starts_with("introspection.requests_per_second"),
        "{text}"
    );
}
