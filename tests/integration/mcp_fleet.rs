//! The MCP example across three simulated nodes, as a user runs it:
//! README's "MCP across nodes" read from README.md and run command by
//! command, as written. Real processes throughout: `fleet-setup.sh` makes
//! three network namespaces on a bridge, `tether server run` listens in
//! the root namespace, one `tether run` per namespace joins it with a join
//! token, and the example's three binaries run one per node, each attested
//! by its own node's agent.
//!
//! `/tmp/tether-fleet` becomes a temporary directory, the namespaces'
//! prefix and the subnet are this run's own (`TETHER_MCP_NETNS_PREFIX`,
//! `TETHER_MCP_SUBNET`), and `target/release` this build's target
//! directory. Each command is paired, in order, with what it must show
//! (`WALKTHROUGH`): a command added to or removed from the README without
//! a matching change here fails the test. The namespaces and processes go
//! when the test ends, however it ends.

use nix::sys::signal::Signal;

use crate::common::require_root;
use crate::common::walkthrough::{Expect, Ready, Shell};

/// The README's section, and the words of it that are this run's own.
const SECTION: &str = "## MCP across nodes";
const README_DIR: &str = "/tmp/tether-fleet";
const README_NETNS: &str = "netns exec tether-";
const README_SUBNET: &str = "10.77.0.";

/// The README walkthrough, command by command: the start of the command,
/// and what it must do.
const WALKTHROUGH: &[(&str, Expect)] = &[
    ("cargo build", Expect::Built),
    ("export PATH=", Expect::Path),
    (
        "examples/mcp/fleet-setup.sh /tmp/tether-fleet",
        Expect::Succeeds(&[
            "node a: namespace ",
            "wrote /",
            "/server.toml",
            "/c/tether.toml",
        ]),
    ),
    (
        "tether server run --config /tmp/tether-fleet/server.toml &",
        Expect::Background(Ready::Socket("/tmp/tether-fleet/admin/server.sock")),
    ),
    ("export TETHER_SERVER_ADMIN_SOCKET=", Expect::Export),
    (
        "tether server entry create --spiffe-id spiffe://tether.local/mcp/agent",
        Expect::Succeeds(&["spiffe://tether.local/mcp/agent", "node-a"]),
    ),
    (
        "tether server entry create --spiffe-id spiffe://tether.local/mcp/notes",
        Expect::Succeeds(&["spiffe://tether.local/mcp/notes", "node-b"]),
    ),
    (
        "tether server entry create --spiffe-id spiffe://tether.local/api/publish",
        Expect::Succeeds(&["spiffe://tether.local/api/publish", "node-c"]),
    ),
    ("tether server bundle show", Expect::Succeeds(&[])),
    (
        "TETHER_JOIN_TOKEN=$(tether server token create --node node-a) ip netns exec tether-a tether run",
        Expect::Background(Ready::Socket("/tmp/tether-fleet/a/agent.sock")),
    ),
    (
        "TETHER_JOIN_TOKEN=$(tether server token create --node node-b) ip netns exec tether-b tether run",
        Expect::Background(Ready::Socket("/tmp/tether-fleet/b/agent.sock")),
    ),
    (
        "TETHER_JOIN_TOKEN=$(tether server token create --node node-c) ip netns exec tether-c tether run",
        Expect::Background(Ready::Socket("/tmp/tether-fleet/c/agent.sock")),
    ),
    (
        "tether healthcheck --admin-socket /tmp/tether-fleet/a/",
        Expect::SoonSucceeds(&["1 entry", "tether/node/node-a, connected to "]),
    ),
    (
        "tether healthcheck --admin-socket /tmp/tether-fleet/b/",
        Expect::SoonSucceeds(&["1 entry", "tether/node/node-b, connected to "]),
    ),
    (
        "tether healthcheck --admin-socket /tmp/tether-fleet/c/",
        Expect::SoonSucceeds(&["1 entry", "tether/node/node-c, connected to "]),
    ),
    (
        "ip netns exec tether-c notes-publish-api",
        Expect::Background(Ready::Line(
            "notes-publish-api: spiffe://tether.local/api/publish on http://",
        )),
    ),
    (
        "ip netns exec tether-b mcp-notes-server",
        Expect::Background(Ready::Line(
            "mcp-notes-server: spiffe://tether.local/mcp/notes on http://",
        )),
    ),
    (
        "ip netns exec tether-a mcp-agent",
        Expect::Succeeds(&[
            "tools offered: notes.publish, notes.read, notes.search",
            "notes.search -> ok: q3-summary",
            "notes.read -> ok: Q3 ticket summary",
            "notes.publish -> ok: published q3-summary",
            "\"subject\":\"spiffe://tether.local/mcp/agent\"",
            "\"actors\":[\"spiffe://tether.local/mcp/notes\"]",
            " ended",
        ]),
    ),
    (
        "tether server task list --all",
        Expect::SoonSucceeds(&[
            "node-a",
            "spiffe://tether.local/mcp/agent",
            "ended (completed)",
        ]),
    ),
    (
        "tether audit tail --config /tmp/tether-fleet/b/tether.toml",
        Expect::SoonSucceeds(&[
            "validate",
            "exchange",
            "policies=notes-server-exchanges-to-publish",
        ]),
    ),
    (
        "ip netns exec tether-a mcp-agent",
        Expect::Background(Ready::Line("holding task")),
    ),
    (
        "tether server task list",
        Expect::Succeeds(&["node-a", "active"]),
    ),
    (
        "ip netns exec tether-c mcp-agent --server http://10.77.0.12:7701/mcp present",
        Expect::Succeeds(&["notes.read -> ok: Q3 ticket summary"]),
    ),
    (
        "ip netns exec tether-c mcp-agent present --token-file /tmp/tether-fleet/token --publish-url",
        Expect::Fails(&[
            "POST /publish -> refused (401): Bearer realm=\"notes-publish-api\", error=\"invalid_token\"",
            "it is not addressed to audience 'spiffe://tether.local/api/publish'",
        ]),
    ),
    ("kill -9 $!", Expect::Signal(Signal::SIGKILL)),
    (
        "ip netns exec tether-c mcp-agent --server http://10.77.0.12:7701/mcp present",
        Expect::SoonFails(&[
            "the server refused (401)",
            "error=\"invalid_token\"",
            "has ended: owner exited",
        ]),
    ),
    (
        "tether server task list --all",
        Expect::SoonSucceeds(&["node-a", "ended (owner exited)"]),
    ),
    (
        "ip netns exec tether-b mcp-notes-server --socket /tmp/tether-fleet/b/agent.sock --tls",
        Expect::Background(Ready::Line(
            "mcp-notes-server: spiffe://tether.local/mcp/notes on https://",
        )),
    ),
    (
        "ip netns exec tether-a mcp-agent --socket /tmp/tether-fleet/a/agent.sock --tls",
        Expect::Background(Ready::Line("holding task")),
    ),
    (
        "ip netns exec tether-a mcp-agent --socket /tmp/tether-fleet/a/agent.sock --tls",
        Expect::Fails(&[
            "the server refused (401)",
            "error=\"invalid_token\"",
            "the presented certificate is not the one the token is bound to",
        ]),
    ),
    ("kill -INT $!", Expect::Signal(Signal::SIGINT)),
    ("kill $(jobs -p)", Expect::StopAll),
    (
        "examples/mcp/fleet-setup.sh --down",
        Expect::Succeeds(&["deleted "]),
    ),
];

#[test]
#[ignore = "needs root (network namespaces): scripts/test runs it"]
fn the_readme_fleet_walkthrough_runs_as_written() {
    require_root("network namespaces");
    let mut shell = Shell::new(README_DIR, "fleet");
    // This run's own namespaces and subnet (a /24 of 10.77.0.0/16 from
    // the process id: fleet tests of other processes use 10.200.0.0/13),
    // deleted however the test ends.
    let pid = std::process::id();
    let prefix = format!("tm{pid}-");
    let subnet = format!("10.77.{}", pid % 250);
    shell.set_env("TETHER_MCP_NETNS_PREFIX", &prefix);
    shell.set_env("TETHER_MCP_SUBNET", &subnet);
    shell.replace(README_NETNS, &format!("netns exec {prefix}"));
    shell.replace(README_SUBNET, &format!("{subnet}."));
    shell.cleanup_on_drop("examples/mcp/fleet-setup.sh --down");
    shell.run_walkthrough(SECTION, WALKTHROUGH);
}
