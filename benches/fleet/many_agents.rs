//! One server, many agents: each agent its own process, data dir, sockets,
//! node name, join token and entry (named to its node), all on loopback.
//! Measured on the server: CPU time and memory while every agent attests
//! and syncs, then second by second until its keys have rotated (the
//! server runs with a short `authority.ca_ttl` and `jwt_key_ttl`, so a
//! successor is prepared at half that, activated at five sixths and the
//! old key retired at the end, inside the run).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use tether::client::workload::WorkloadClient;

use crate::processes::TIMEOUT;
use crate::stats::Second;
use crate::topology::{Agent, Mode, Server, TRUST_DOMAIN};

/// What the server logs when its keys change (`authority::local`).
const ROTATION_EVENTS: [&str; 4] = [
    "prepared X.509 CA",
    "prepared JWT signing key",
    "retired expired X.509 CA",
    "retired expired JWT signing key",
];

/// The reason of a node SVID renewal on the server's audit trail.
const RENEWAL: &str = "node SVID renewed";

/// The figures of one run.
#[derive(Debug)]
pub struct Fleet {
    /// Agents started.
    pub agents: usize,
    /// The server's `ca_ttl` and `jwt_key_ttl`.
    pub key_ttl: Duration,
    /// The server's RSS before any agent, KiB.
    pub idle_rss_kib: u64,
    /// From the first agent's spawn to the last agent synced.
    pub sync_wall: Duration,
    /// The server's CPU time over that.
    pub sync_cpu: Duration,
    /// The server's RSS once every agent synced, KiB.
    pub synced_rss_kib: u64,
    /// Every second after that, to the end of the window.
    pub seconds: Vec<Second>,
    /// The server's peak RSS over the whole run (VmHWM), KiB.
    pub peak_rss_kib: u64,
    /// The agents' RSS at the end, summed, KiB.
    pub agents_rss_kib: u64,
    /// Agents whose JWT bundle had exactly the server's JWT keys at the
    /// end (the rotated bundle reached them).
    pub bundle_current: usize,
}

/// Runs `agents` fleet agents against one server whose keys live
/// `key_ttl`; watches until `key_ttl` plus `tail` after the server started.
pub fn run(
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    agents: usize,
    key_ttl: Duration,
    tail: Duration,
) -> Fleet {
    let ttl = humantime::format_duration(key_ttl).to_string();
    let server = Server::start(
        &dir.join("server"),
        &format!("ca_ttl = \"{ttl}\"\njwt_key_ttl = \"{ttl}\""),
    );
    let server_started = Instant::now();
    let bundle = server.bootstrap_bundle();
    let nodes: Vec<String> = (0..agents).map(|i| format!("node-{i:03}")).collect();
    let mut tokens = Vec::with_capacity(agents);
    for node in &nodes {
        server.create_entry(&format!("spiffe://{TRUST_DOMAIN}/{node}/agent"), node);
        tokens.push(server.join_token(node));
    }
    eprintln!(
        "fleet: {agents} entries and join tokens created in {:?}",
        server_started.elapsed()
    );
    let idle_rss_kib = server.process.rss_kib();

    let cpu_before = server.process.cpu_time();
    let spawned = Instant::now();
    let mut running = Vec::with_capacity(agents);
    for (node, token) in nodes.iter().zip(&tokens) {
        running.push(Agent::spawn(
            &dir.join(node),
            Mode::Fleet {
                server: &server,
                bundle: &bundle,
                join_token: token,
            },
        ));
    }
    runtime.block_on(async {
        for agent in &mut running {
            agent.until_synced().await;
        }
    });
    let sync_wall = spawned.elapsed();
    let sync_cpu = server.process.cpu_time().saturating_sub(cpu_before);
    let synced_rss_kib = server.process.rss_kib();
    eprintln!("fleet: {agents} agents synced in {sync_wall:?}, server CPU {sync_cpu:?}");

    let deadline = server_started + key_ttl + tail;
    let events =
        |server: &Server| -> usize { ROTATION_EVENTS.iter().map(|e| server.logged(e)).sum() };
    let mut seconds = Vec::new();
    let mut last = (
        server.process.cpu_time(),
        events(&server),
        server.audited(RENEWAL),
    );
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        let now = (
            server.process.cpu_time(),
            events(&server),
            server.audited(RENEWAL),
        );
        seconds.push(Second {
            cpu: now.0.saturating_sub(last.0).as_secs_f64(),
            rss_kib: server.process.rss_kib(),
            events: now.1.saturating_sub(last.1),
            renewals: now.2.saturating_sub(last.2),
        });
        last = now;
    }
    let peak_rss_kib = server.process.peak_rss_kib();
    let agents_rss_kib = running.iter().map(|a| a.process.rss_kib()).sum();
    let server_kids = jwt_kids_of_server(&server);
    let bundle_current = runtime.block_on(async {
        let mut current = 0;
        for agent in &running {
            if jwt_kids_of_agent(&agent.socket).await.as_ref() == Some(&server_kids) {
                current += 1;
            }
        }
        current
    });
    for agent in running {
        agent.process.stop();
    }
    server.process.stop();
    Fleet {
        agents,
        key_ttl,
        idle_rss_kib,
        sync_wall,
        sync_cpu,
        synced_rss_kib,
        seconds,
        peak_rss_kib,
        agents_rss_kib,
        bundle_current,
    }
}

/// The `kid`s of the JWT keys in the server's bundle.
fn jwt_kids_of_server(server: &Server) -> BTreeSet<String> {
    let path = server.bootstrap_bundle();
    let text = std::fs::read_to_string(path).expect("the server's bundle");
    kids(&text, Some("jwt-svid"))
}

/// The `kid`s of the JWT keys an agent serves for the trust domain.
async fn jwt_kids_of_agent(socket: &Path) -> Option<BTreeSet<String>> {
    let mut client = WorkloadClient::connect(socket, TIMEOUT).await.ok()?;
    let mut stream = client.fetch_jwt_bundles().await.ok()?;
    let first = client.first(&mut stream).await.ok()??;
    let jwks = first.bundles.get(&format!("spiffe://{TRUST_DOMAIN}"))?;
    Some(kids(std::str::from_utf8(jwks).ok()?, None))
}

/// The `kid`s of a JWKS (or SPIFFE bundle) document's keys, those with
/// `use` equal to `usage` when given.
fn kids(document: &str, usage: Option<&str>) -> BTreeSet<String> {
    let value: serde_json::Value = serde_json::from_str(document).unwrap_or_default();
    value["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|key| usage.is_none_or(|u| key["use"].as_str() == Some(u)))
        .filter_map(|key| key["kid"].as_str().map(str::to_owned))
        .collect()
}
