//! The fleet on one machine: a `tether server` (in this process, on a veth
//! address of the root namespace) and agents, each the `tether` binary
//! started inside its own network namespace (`ip netns`, a veth pair with
//! a /30), so each agent reaches the server over a real link as a node
//! would. Needs root.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use std::sync::Arc;
use std::time::Duration;

use spiffe::{SpiffeId, TrustDomain};
use tempfile::TempDir;
use tether::bundle::TrustBundle;
use tether::config::MapEnv;
use tether::proto::server as pb;
use tether::proto::server::server_admin_client::ServerAdminClient;
use tether::server::ServerConfig;
use tether::server::run::RunningServer;
use tokio::sync::watch;
use tonic::transport::Channel;

use super::{eventually, uds_channel};

/// The fleet's trust domain in tests.
pub const TRUST_DOMAIN: &str = "fleet.test";

/// A network namespace with a veth pair to the root namespace.
pub struct Netns {
    pub name: String,
    /// The root namespace's end (where the server listens).
    pub host_ip: String,
    /// The namespace's end (the node's address).
    #[allow(dead_code, reason = "the node's address, for tests that dial a node")]
    pub node_ip: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("prerequisite missing: ip (iproute2): {e}"));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// A fresh namespace named after the test and this process.
    pub fn new() -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // A /30 per namespace, from the process id and a counter: tests
        // running at once in other processes get other subnets.
        let net = (pid.wrapping_mul(7).wrapping_add(n * 4)) % (250 * 64);
        let (b, c) = (net / 64, (net % 64) * 4);
        let name = format!("tt{pid}n{n}");
        let (host, node) = (format!("vh{pid}n{n}"), format!("vn{pid}n{n}"));
        let host_ip = format!("10.{}.{b}.{}", 200 + (pid % 50), c + 1);
        let node_ip = format!("10.{}.{b}.{}", 200 + (pid % 50), c + 2);
        ip(&["netns", "add", &name]);
        ip(&["link", "add", &host, "type", "veth", "peer", "name", &node]);
        ip(&["link", "set", &node, "netns", &name]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host]);
        ip(&["link", "set", &host, "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{node_ip}/30"),
            "dev",
            &node,
        ]);
        ip(&["-n", &name, "link", "set", &node, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        // Everything else through the root namespace: a node reaches a
        // server listening on another namespace's veth end, as nodes of a
        // fleet reach one server.
        ip(&["-n", &name, "route", "add", "default", "via", &host_ip]);
        Self {
            name,
            host_ip,
            node_ip,
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, and so the pair.
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// A server and its directory.
pub struct FleetServer {
    pub running: Option<RunningServer>,
    pub dir: TempDir,
}

impl FleetServer {
    /// Starts a server listening on `listen_ip` (port chosen by the
    /// kernel) with `extra` appended to its config.
    pub async fn start(listen_ip: &str, extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let running = Self::run(&dir, &format!("{listen_ip}:0"), extra).await;
        Self {
            running: Some(running),
            dir,
        }
    }

    /// Stops the server for now, keeping its data dir, store, keys and
    /// trail for [`Self::start_again`]; returns its address.
    pub async fn pause(&mut self) -> String {
        let address = self.address();
        if let Some(running) = self.running.take() {
            running.stop().await.expect("clean server stop");
        }
        address
    }

    /// Starts a paused server again on `address`, as a restarted process.
    pub async fn start_again(&mut self, address: &str) {
        self.running = Some(Self::run(&self.dir, address, "").await);
    }

    async fn run(dir: &TempDir, listen: &str, extra: &str) -> RunningServer {
        let text = format!(
            "trust_domain = \"{TRUST_DOMAIN}\"\ndata_dir = \"{}\"\nlisten = \"{listen}\"\nadmin_socket_path = \"{}\"\n{extra}",
            dir.path().join("data").display(),
            dir.path().join("admin/server.sock").display(),
        );
        let config = ServerConfig::parse(Path::new("server.toml"), &text, &MapEnv::default())
            .expect("server config");
        tether::server::run::start(config)
            .await
            .expect("server starts")
    }

    pub fn address(&self) -> String {
        self.running().listen_addr().to_string()
    }

    pub fn running(&self) -> &RunningServer {
        self.running.as_ref().expect("server is running")
    }

    pub fn audit_dir(&self) -> PathBuf {
        self.dir.path().join("data/audit")
    }

    pub async fn admin(&self) -> ServerAdminClient<Channel> {
        ServerAdminClient::new(uds_channel(self.running().admin_socket_path()).await)
    }

    /// A single-use join token for `node`.
    pub async fn join_token(&self, node: &str) -> String {
        self.admin()
            .await
            .create_join_token(tether::proto::server::CreateJoinTokenRequest {
                node_name: node.into(),
                ttl_ms: 0,
            })
            .await
            .expect("token create")
            .into_inner()
            .token
    }

    /// The trust domain's bundle (SPIFFE JSON), as an operator hands it to
    /// a node to bootstrap.
    pub async fn bundle_json(&self) -> String {
        self.admin()
            .await
            .get_bundle(tether::proto::admin::GetBundleRequest {})
            .await
            .expect("bundle")
            .into_inner()
            .spiffe_json
    }

    /// Creates an entry served on `nodes`.
    pub async fn create_entry(
        &self,
        spec: tether::proto::admin::EntrySpec,
        nodes: &[&str],
    ) -> String {
        self.admin()
            .await
            .create_entry(tether::proto::server::CreateServerEntryRequest {
                spec: Some(spec),
                nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
            })
            .await
            .expect("entry create")
            .into_inner()
            .entry
            .expect("entry")
            .id
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await.expect("clean server stop");
        }
    }
}

/// An agent (the `tether` binary) in a network namespace, killed on drop.
pub struct FleetAgent {
    pub child: Child,
    pub dir: TempDir,
    pub socket: PathBuf,
    netns: String,
    /// The projected token's directory (`k8s_psat` agents).
    pub token_dir: Option<TempDir>,
}

fn spawn_agent(netns: &Netns, dir: &TempDir, join_token: Option<&str>) -> Child {
    spawn_agent_named(&netns.name, dir, join_token)
}

/// `tether run` in the namespace `netns`, logging to `agent.log` (appended).
fn spawn_agent_named(netns: &str, dir: &TempDir, join_token: Option<&str>) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.path().join("agent.log"))
        .expect("log file");
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", netns, env!("CARGO_BIN_EXE_tether")])
        .args(["run", "--config"])
        .arg(dir.path().join("agent.toml"))
        .env_remove("TETHER_JOIN_TOKEN")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    if let Some(token) = join_token {
        command.env("TETHER_JOIN_TOKEN", token);
    }
    command.spawn().expect("agent spawns")
}

impl FleetAgent {
    /// Starts `tether run` in `netns` as node of `server` (dialled at the
    /// address it listens on), attesting with `join_token`; returns once
    /// its workload socket is up.
    pub async fn start(netns: &Netns, server: &FleetServer, join_token: &str) -> Self {
        Self::spawn(netns, server, "", Some(join_token)).await
    }

    /// [`Self::start`], with `extra_server` appended to the agent's
    /// `[server]` (`revocation_staleness = "2s"`).
    pub async fn start_with(
        netns: &Netns,
        server: &FleetServer,
        join_token: &str,
        extra_server: &str,
    ) -> Self {
        Self::spawn(netns, server, extra_server, Some(join_token)).await
    }

    /// Starts `tether run` in `netns` as node of `server`, attesting with
    /// the projected service account token `psat` (`k8s_psat`, the token in
    /// a file as the kubelet mounts it).
    pub async fn start_with_psat(netns: &Netns, server: &FleetServer, psat: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tether-server");
        std::fs::write(&path, format!("{psat}\n")).expect("token file");
        let extra = format!(
            "node_attestation = \"k8s_psat\"\npsat_path = \"{}\"\n",
            path.display()
        );
        let mut agent = Self::spawn(netns, server, &extra, None).await;
        agent.token_dir = Some(dir);
        agent
    }

    async fn spawn(
        netns: &Netns,
        server: &FleetServer,
        extra_server: &str,
        join_token: Option<&str>,
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let bundle = dir.path().join("bootstrap.json");
        std::fs::write(&bundle, server.bundle_json().await).expect("bootstrap bundle");
        let socket = dir.path().join("agent.sock");
        let config = format!(
            "trust_domain = \"{TRUST_DOMAIN}\"\nsocket_path = \"{}\"\nadmin_socket_path = \"{}\"\ndata_dir = \"{}\"\nlog.level = \"info\"\n\n[server]\naddress = \"{}\"\nbootstrap_bundle = \"{}\"\n{extra_server}",
            socket.display(),
            dir.path().join("admin/admin.sock").display(),
            dir.path().join("data").display(),
            server.address(),
            bundle.display(),
        );
        let config_path = dir.path().join("agent.toml");
        std::fs::write(&config_path, config).expect("agent config");
        let mut agent = Self {
            child: spawn_agent(netns, &dir, join_token),
            dir,
            socket,
            netns: netns.name.clone(),
            token_dir: None,
        };
        agent.until_started().await;
        agent
    }

    /// Stops the agent (SIGTERM) and starts it again on the same data dir
    /// and config, without a join token: it comes back as the same node.
    pub async fn restart(&mut self) {
        self.restart_with(None).await;
    }

    /// [`Self::restart`], presenting `join_token` (an evicted node's new
    /// token).
    pub async fn restart_with(&mut self, join_token: Option<&str>) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        // The log is appended to: the next start's line is looked for
        // after the old ones.
        let seen = self.log().matches("tether agent started").count();
        self.child = spawn_agent_named(&self.netns, &self.dir, join_token);
        let socket = self.socket.clone();
        eventually("the fleet agent's restart", async || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the fleet agent exited ({status}): {}", self.log());
            }
            socket.exists() && self.log().matches("tether agent started").count() > seen
        })
        .await;
    }

    /// Waits for the agent to say it started (the sockets are bound
    /// before the node joins); fails with its log if it exits.
    async fn until_started(&mut self) {
        eventually("the fleet agent's start", async || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the fleet agent exited ({status}): {}", self.log());
            }
            self.log().contains("tether agent started")
        })
        .await;
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The agent's own audit trail.
    pub fn audit_dir(&self) -> PathBuf {
        self.data_dir().join("audit")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The SPIFFE IDs of the X.509-SVIDs this process gets from the agent
    /// (the `spiffe` crate's client), or why there are none.
    pub async fn x509_ids(&self) -> Result<BTreeSet<String>, String> {
        let client = spiffe::WorkloadApiClient::connect_to(self.endpoint())
            .await
            .map_err(|e| e.to_string())?;
        let svids = client
            .fetch_all_x509_svids()
            .await
            .map_err(|e| e.to_string())?;
        Ok(svids.iter().map(|s| s.spiffe_id().to_string()).collect())
    }

    /// Waits until this process gets X.509-SVIDs for at least `ids`.
    pub async fn until_serves(&self, ids: &[&str]) {
        let want: BTreeSet<String> = ids.iter().map(|id| (*id).to_owned()).collect();
        eventually(format!("X.509-SVIDs for {want:?}"), async || {
            let ids = self.x509_ids().await?;
            if ids.is_superset(&want) {
                Ok(())
            } else {
                Err(format!("{ids:?}"))
            }
        })
        .await;
    }

    /// Waits until this process gets X.509-SVIDs for `ids` and no other.
    pub async fn until_serves_exactly(&self, ids: &[&str]) {
        let want: BTreeSet<String> = ids.iter().map(|id| (*id).to_owned()).collect();
        eventually(format!("X.509-SVIDs for {want:?} only"), async || {
            let ids = self.x509_ids().await?;
            if ids == want {
                Ok(())
            } else {
                Err(format!("{ids:?}"))
            }
        })
        .await;
    }
}

impl Drop for FleetAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server replica as the operator runs it: the `tether server run`
/// binary (so it can be killed), with its own data dir and admin socket,
/// on a shared store.
pub struct ServerProcess {
    pub child: Child,
    pub dir: TempDir,
    pub address: String,
}

impl ServerProcess {
    /// Starts `tether server run` listening on `ip` (a free port), keeping
    /// its state in `store` (a `postgres://` URL).
    pub async fn start(ip: &str, store: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        // A free port on `ip`: bound and released (nothing else binds
        // there meanwhile in a test's own namespace pair).
        let port = std::net::TcpListener::bind((ip, 0))
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let address = format!("{ip}:{port}");
        let config = format!(
            "trust_domain = \"{TRUST_DOMAIN}\"\ndata_dir = \"{}\"\nlisten = \"{address}\"\nadmin_socket_path = \"{}\"\nstore = \"{store}\"\n",
            dir.path().join("data").display(),
            dir.path().join("admin/server.sock").display(),
        );
        std::fs::write(dir.path().join("server.toml"), config).expect("server config");
        let log = std::fs::File::create(dir.path().join("server.log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(["server", "run", "--config"])
            .arg(dir.path().join("server.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("server spawns");
        let mut server = Self {
            child,
            dir,
            address,
        };
        eventually("the server replica's start", async || {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("the server exited ({status}): {}", server.log());
            }
            server.log().contains("tether server started")
        })
        .await;
        server
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub async fn admin(&self) -> ServerAdminClient<Channel> {
        ServerAdminClient::new(uds_channel(&self.dir.path().join("admin/server.sock")).await)
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

impl FleetAgent {
    /// Starts `tether run` in `netns` as a node of the replicas at
    /// `addresses` (tried in turn), bootstrapped with `bundle_json`.
    pub async fn start_at(
        netns: &Netns,
        addresses: &[String],
        bundle_json: &str,
        join_token: &str,
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let bundle = dir.path().join("bootstrap.json");
        std::fs::write(&bundle, bundle_json).expect("bootstrap bundle");
        let socket = dir.path().join("agent.sock");
        let list: Vec<String> = addresses.iter().map(|a| format!("\"{a}\"")).collect();
        let config = format!(
            "trust_domain = \"{TRUST_DOMAIN}\"\nsocket_path = \"{}\"\nadmin_socket_path = \"{}\"\ndata_dir = \"{}\"\nlog.level = \"info\"\n\n[server]\naddresses = [{}]\nbootstrap_bundle = \"{}\"\n",
            socket.display(),
            dir.path().join("admin/admin.sock").display(),
            dir.path().join("data").display(),
            list.join(", "),
            bundle.display(),
        );
        std::fs::write(dir.path().join("agent.toml"), config).expect("agent config");
        let mut agent = Self {
            child: spawn_agent(netns, &dir, Some(join_token)),
            dir,
            socket,
            netns: netns.name.clone(),
            token_dir: None,
        };
        agent.until_started().await;
        agent
    }
}

/// The next entries-and-bundle snapshot of a node's sync stream, past the
/// task ends and heartbeats between snapshots.
pub async fn next_snapshot(
    stream: &mut tonic::Streaming<tether::proto::server::SyncMessage>,
) -> tether::proto::server::SyncSnapshot {
    use tether::proto::server::sync_message::Kind;
    loop {
        let message = stream
            .message()
            .await
            .expect("the sync stream")
            .expect("a message before the stream ends");
        if let Some(Kind::Snapshot(snapshot)) = message.kind {
            return snapshot;
        }
    }
}

/// The fleet's trust bundle, as the server's admin API shows it.
pub async fn server_bundle(server: &FleetServer) -> TrustBundle {
    TrustBundle::from_spiffe_json(
        TrustDomain::new(TRUST_DOMAIN).expect("td"),
        server.bundle_json().await.as_bytes(),
    )
    .expect("bundle")
}

/// A node API client with the agent's own node SVID (read from its data
/// dir, as whoever roots the node can).
pub async fn node_client(
    agent: &FleetAgent,
    server: &FleetServer,
    bundle: &TrustBundle,
) -> pb::node_client::NodeClient<Channel> {
    let node_dir = agent.data_dir().join("node");
    let chain = decode_chain(&std::fs::read(node_dir.join("svid.der")).expect("node SVID"));
    let key = zeroize::Zeroizing::new(std::fs::read(node_dir.join("key.der")).expect("node key"));
    let identity = tether::mtls::SwappableIdentity::new(
        tether::mtls::Identity::new(chain, key).expect("node identity"),
    );
    let tls = tether::mtls::client_config(
        watch::channel(Arc::new(bundle.clone())).1,
        SpiffeId::new("spiffe://fleet.test/tether/server").expect("id"),
        Some(identity),
        false,
    );
    let channel = tether::mtls::connect(&[server.address()], tls, Duration::from_secs(10))
        .await
        .expect("mTLS to the server");
    pb::node_client::NodeClient::new(channel)
}

/// The node's stored chain: each DER certificate behind a 4-byte length.
fn decode_chain(mut bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut chain = Vec::new();
    while let Some((len, rest)) = bytes.split_first_chunk::<4>() {
        let len = u32::from_be_bytes(*len) as usize;
        chain.push(rest[..len].to_vec());
        bytes = &rest[len..];
    }
    chain
}
