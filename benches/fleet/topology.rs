//! What the benchmark runs: a `tether server` (the release binary, on a
//! loopback port, with a temporary data dir), standalone agents and agents
//! in fleet mode, each `tether run` with its own config, data dir and
//! sockets. The server is set up the way an operator does it, with the
//! CLI: `tether server token create`, `tether server entry create --node`,
//! `tether server bundle show --format spiffe`.
//!
//! Both kinds of agent get the same settings (budgets raised so the
//! benchmark measures the paths, not refusals) and the same entry for
//! the caller's uid: in the agent's file when standalone, on the server
//! scoped to the agent's node in fleet mode.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tether::proto::admin as admin_pb;

use crate::processes::{Process, TIMEOUT, free_port, tether};

/// The trust domain of every process the benchmark starts.
pub const TRUST_DOMAIN: &str = "bench.local";
/// The identity the benchmark's clients get.
pub const WORKLOAD_ID: &str = "spiffe://bench.local/agent";
/// The warm audience.
pub const AUDIENCE: &str = "spiffe://bench.local/mcp";

/// A `tether server` child process.
#[derive(Debug)]
pub struct Server {
    /// The process, for its CPU time and memory.
    pub process: Process,
    /// Where agents dial (`127.0.0.1:PORT`).
    pub address: String,
    admin_socket: PathBuf,
    dir: PathBuf,
}

impl Server {
    /// Starts `tether server run` in `dir` with `authority` as its
    /// `[authority]` table's keys (may be empty); returns once its admin
    /// socket answers.
    pub fn start(dir: &Path, authority: &str) -> Self {
        Self::start_with(dir, "", authority)
    }

    /// [`Server::start`] with `settings` (top-level keys of the server's
    /// file, e.g. `node_requests_per_second = 1000`) added.
    pub fn start_with(dir: &Path, settings: &str, authority: &str) -> Self {
        std::fs::create_dir_all(dir).expect("the server's directory");
        let address = format!("127.0.0.1:{}", free_port());
        let admin_socket = dir.join("admin/server.sock");
        let config = dir.join("server.toml");
        std::fs::write(
            &config,
            format!(
                "trust_domain = \"{TRUST_DOMAIN}\"\ndata_dir = \"{}\"\nlisten = \"{address}\"\nadmin_socket_path = \"{}\"\n{settings}\n[authority]\n{authority}\n",
                dir.join("data").display(),
                admin_socket.display(),
            ),
        )
        .expect("the server's config");
        let mut command = Command::new(env!("CARGO_BIN_EXE_tether"));
        command
            .args(["server", "run", "--config"])
            .arg(&config)
            .env("TETHER_LOG_LEVEL", "info");
        let mut server = Self {
            process: Process::spawn(command, &dir.join("server.log")),
            address,
            admin_socket,
            dir: dir.to_owned(),
        };
        let started = Instant::now();
        while server
            .try_admin(&["bundle", "show", "--format", "spiffe"])
            .is_none()
        {
            server.process.assert_alive("the server");
            assert!(started.elapsed() < TIMEOUT, "the server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// A single-use join token for `node`.
    pub fn join_token(&self, node: &str) -> String {
        self.admin(&["token", "create", "--node", node])
            .trim()
            .to_owned()
    }

    /// Creates an entry for the caller's uid, served on `node`.
    pub fn create_entry(&self, spiffe_id: &str, node: &str) {
        self.create_entry_on(spiffe_id, &[node]);
    }

    /// Creates one entry for the caller's uid, served on every node of
    /// `nodes`.
    pub fn create_entry_on(&self, spiffe_id: &str, nodes: &[&str]) {
        let selector = format!("unix:uid:{}", nix::unistd::geteuid().as_raw());
        let mut args = vec![
            "entry",
            "create",
            "--spiffe-id",
            spiffe_id,
            "--selector",
            &selector,
        ];
        for node in nodes {
            args.extend_from_slice(&["--node", node]);
        }
        self.admin(&args);
    }

    /// Writes the trust domain's bundle (SPIFFE JSON), as an operator
    /// hands it to nodes, into the server's directory; its path.
    pub fn bootstrap_bundle(&self) -> PathBuf {
        let path = self.dir.join("bootstrap.json");
        let bundle = self.admin(&["bundle", "show", "--format", "spiffe"]);
        std::fs::write(&path, bundle).expect("the bootstrap bundle");
        path
    }

    /// How many times the server logged `needle` so far.
    pub fn logged(&self, needle: &str) -> usize {
        self.process.log().matches(needle).count()
    }

    /// How many records of the server's audit trail hold `needle`.
    pub fn audited(&self, needle: &str) -> usize {
        let Ok(files) = std::fs::read_dir(self.dir.join("data/audit")) else {
            return 0;
        };
        files
            .flatten()
            .filter(|f| f.file_name().to_string_lossy().ends_with(".jsonl"))
            .map(|f| {
                std::fs::read_to_string(f.path())
                    .unwrap_or_default()
                    .lines()
                    .filter(|line| line.contains(needle))
                    .count()
            })
            .sum()
    }

    fn admin(&self, args: &[&str]) -> String {
        let mut all = vec!["server"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--admin-socket", self.admin_socket.to_str().expect("UTF-8")]);
        tether(&all)
    }

    fn try_admin(&self, args: &[&str]) -> Option<String> {
        let out = Command::new(env!("CARGO_BIN_EXE_tether"))
            .arg("server")
            .args(args)
            .arg("--admin-socket")
            .arg(&self.admin_socket)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// How an agent gets its keys and entries.
#[derive(Debug, Clone, Copy)]
pub enum Mode<'a> {
    /// Its own keys; `entries` (TOML `[[entries]]`) in its file.
    Standalone {
        /// The `[[entries]]` tables.
        entries: &'a str,
    },
    /// Node `node` of `server`, attesting with `join_token`.
    Fleet {
        /// The server it joins.
        server: &'a Server,
        /// Its bootstrap bundle file.
        bundle: &'a Path,
        /// A single-use token for its node.
        join_token: &'a str,
    },
}

/// A `tether run` child process.
#[derive(Debug)]
pub struct Agent {
    /// The process, for its CPU time and memory.
    pub process: Process,
    /// Its workload socket.
    pub socket: PathBuf,
    admin_socket: PathBuf,
}

impl Agent {
    /// Starts an agent in `dir`; returns once its workload socket accepts
    /// connections (a fleet agent may not have joined yet: see
    /// [`Agent::until_synced`]).
    pub fn spawn(dir: &Path, mode: Mode<'_>) -> Self {
        std::fs::create_dir_all(dir).expect("the agent's directory");
        let socket = dir.join("agent.sock");
        let admin_socket = dir.join("admin/admin.sock");
        let tables = match mode {
            Mode::Standalone { entries } => entries.to_owned(),
            Mode::Fleet { server, bundle, .. } => format!(
                "[server]\naddress = \"{}\"\nbootstrap_bundle = \"{}\"\n",
                server.address,
                bundle.display()
            ),
        };
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                r#"trust_domain = "{TRUST_DOMAIN}"
socket_path = "{socket}"
admin_socket_path = "{admin}"
data_dir = "{data}"
log.level = "warn"

[tasks]
max_tasks_per_process = 100000

[limits]
max_connections = 8192
max_connections_per_process = 8192

# Every client of the benchmark is one uid: its audit budget would
# measure refusals, not the paths.
[audit]
caller_bytes_per_second = 1073741824
caller_burst_bytes = 1073741824

{tables}
"#,
                socket = socket.display(),
                admin = admin_socket.display(),
                data = dir.join("data").display(),
            ),
        )
        .expect("the agent's config");
        let mut command = Command::new(env!("CARGO_BIN_EXE_tether"));
        command
            .args(["run", "--config"])
            .arg(&config)
            .env_remove("TETHER_JOIN_TOKEN");
        if let Mode::Fleet { join_token, .. } = mode {
            command.env("TETHER_JOIN_TOKEN", join_token);
        }
        let mut agent = Self {
            process: Process::spawn(command, &dir.join("agent.log")),
            socket,
            admin_socket,
        };
        let started = Instant::now();
        while std::os::unix::net::UnixStream::connect(&agent.socket).is_err() {
            agent.process.assert_alive("an agent");
            assert!(started.elapsed() < TIMEOUT, "an agent did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        agent
    }

    /// Whether the agent serves and holds at least one entry (for a fleet
    /// agent: it has joined and its first sync arrived). Asks the agent's
    /// admin socket (Health), never the server.
    pub async fn is_synced(&self) -> bool {
        let Ok(channel) = tether::client::channel::dial(&self.admin_socket, TIMEOUT).await else {
            return false;
        };
        let mut admin = admin_pb::admin_client::AdminClient::new(channel);
        admin
            .health(admin_pb::HealthRequest {})
            .await
            .is_ok_and(|health| {
                let health = health.into_inner();
                health.serving && health.entries > 0
            })
    }

    /// Waits until [`Agent::is_synced`].
    pub async fn until_synced(&mut self) {
        let started = Instant::now();
        while !self.is_synced().await {
            self.process.assert_alive("an agent");
            assert!(started.elapsed() < TIMEOUT, "an agent did not sync");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The standalone agent's entry: the one the fleet agent gets from the
/// server. One entry, so that a FetchJWTSVID is one signature.
pub fn standalone_entries() -> String {
    let uid = nix::unistd::geteuid().as_raw();
    format!("[[entries]]\nspiffe_id = \"{WORKLOAD_ID}\"\nselectors = [\"unix:uid:{uid}\"]\n")
}
