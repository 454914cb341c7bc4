//! `tether server ...`: flags, the socket's resolution, and views of the
//! server's answers.

use std::path::{Path, PathBuf};

use clap::Parser as _;

use super::client::{TETHER_SERVER_ADMIN_SOCKET, resolve_socket};
use super::*;
use crate::cli::Cli;
use crate::config::MapEnv;
use crate::proto::admin as admin_pb;

fn env(vars: &[(&str, &str)], euid: u32) -> MapEnv {
    MapEnv {
        vars: vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        euid,
    }
}

fn parse(args: &[&str]) -> ServerCommand {
    let cli = Cli::try_parse_from(args).expect("the flags parse");
    match cli.command {
        crate::cli::Command::Server(ServerArgs { command }) => command,
        other => panic!("parsed as {other:?}"),
    }
}

#[test]
fn the_socket_is_the_flag_then_the_environment_then_the_servers_default() {
    let with_env = env(&[(TETHER_SERVER_ADMIN_SOCKET, "/env/server.sock")], 0);
    assert_eq!(
        resolve_socket(Some(Path::new("/flag.sock")), &with_env).expect("resolved"),
        PathBuf::from("/flag.sock")
    );
    assert_eq!(
        resolve_socket(None, &with_env).expect("resolved"),
        PathBuf::from("/env/server.sock")
    );
    assert_eq!(
        resolve_socket(None, &env(&[], 0)).expect("resolved"),
        PathBuf::from("/run/tether-admin/server.sock")
    );
}

#[test]
fn token_and_entry_flags_become_requests() {
    let ServerCommand::Token(op) = parse(&[
        "tether", "server", "token", "create", "--node", "node-1", "--ttl", "1h",
    ]) else {
        panic!("not token");
    };
    let TokenCommand::Create(token) = op.command;
    assert_eq!(token.node, "node-1");
    assert_eq!(token.ttl, Duration::from_secs(3600));
    let ServerCommand::Token(op) = parse(&["tether", "server", "token", "create", "--node", "n"])
    else {
        panic!("not token");
    };
    let TokenCommand::Create(token) = op.command;
    assert_eq!(token.ttl, Duration::from_secs(600), "the default ttl");
    assert!(
        Cli::try_parse_from([
            "tether", "server", "token", "create", "--node", "n", "--ttl", "0s"
        ])
        .is_err()
    );

    let ServerCommand::Entry(op) = parse(&[
        "tether",
        "server",
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/a",
        "--selector",
        "k8s:ns:a",
        "--node",
        "node-1",
        "--node",
        "node-2",
        "--json",
        "--admin-socket",
        "/s.sock",
    ]) else {
        panic!("not entry");
    };
    assert_eq!(op.common.format(), output::Format::Json);
    let EntryCommand::Create(create) = op.command else {
        panic!("not create");
    };
    assert_eq!(create.nodes, ["node-1", "node-2"]);
    assert_eq!(create.spec.to_spec().selectors, ["k8s:ns:a"]);
    assert!(matches!(
        parse(&["tether", "server", "node", "evict", "node-1"]),
        ServerCommand::Node(Operator {
            command: NodeCommand::Evict(_),
            ..
        })
    ));
    assert!(matches!(
        parse(&["tether", "server", "bundle", "show", "--format", "pem"]),
        ServerCommand::Bundle(_)
    ));
}

#[test]
fn server_entries_and_nodes_become_views() {
    let entry = pb::ServerEntry {
        entry: Some(admin_pb::Entry {
            id: "ent-1".into(),
            spec: Some(admin_pb::EntrySpec {
                spiffe_id: "spiffe://example.org/a".into(),
                selectors: vec!["k8s:ns:a".into()],
                ..Default::default()
            }),
            source: admin_pb::EntrySource::Api.into(),
            revision: 1,
            created_at_ms: 1_700_000_000_000,
            updated_at_ms: 1_700_000_000_000,
        }),
        nodes: vec!["node-1".into()],
    };
    let view = serde_json::to_value(server_entry_view(entry).expect("a view")).expect("json");
    assert_eq!(view["id"], "ent-1");
    assert_eq!(view["source"], "api");
    assert_eq!(view["nodes"], serde_json::json!(["node-1"]));
    assert!(matches!(
        server_entry_view(pb::ServerEntry::default()),
        Err(ServerCliError::IncompleteEntry)
    ));

    let node = node_view(&pb::NodeInfo {
        name: "node-1".into(),
        attestation: "join_token".into(),
        attested_at_ms: 1_700_000_000_000,
        svid_serial: "0a".into(),
        svid_expires_at_ms: 0,
        evicted: true,
    });
    let json = serde_json::to_value(&node).expect("json");
    assert_eq!(
        json,
        serde_json::json!({
            "name": "node-1",
            "attestation": "join_token",
            "attested_at": "2023-11-14T22:13:20Z",
            "svid_serial": "0a",
            "svid_expires_at": null,
            "evicted": true,
        })
    );
}
