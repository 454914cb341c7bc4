//! SPIRE v1.13.3 on loopback, for `--versus-spire`: a `spire-server`
//! (SQLite datastore, in-memory keys, `join_token` node attestation, trust
//! domain `bench.local`, bound to 127.0.0.1 on a free port) and a
//! `spire-agent` (attested by a join token, `unix` workload attestor, its
//! Workload API socket in the temp dir, the server's bundle from
//! `spire-server bundle show` as its trust bundle), with the bench's two
//! entries for this uid. Both run in process groups of their own, killed
//! when [`Spire`] is dropped (also while a panic unwinds).

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tether::client::workload::WorkloadClient;

use crate::{AUDIENCE, TIMEOUT};

/// The node every entry hangs from: the agent's ID from its join token.
const NODE_ID: &str = "spiffe://bench.local/node";
/// The bench's entries: the same SPIFFE IDs as tether's.
pub(crate) const AGENT_ID: &str = "spiffe://bench.local/agent";

/// A running SPIRE server and agent; both are killed on drop.
pub(crate) struct Spire {
    server: Child,
    agent: Option<Child>,
    bin: PathBuf,
    server_socket: PathBuf,
    /// The agent's Workload API socket.
    pub(crate) socket: PathBuf,
}

impl Spire {
    /// Starts the server in `dir`, creates the bench's entries, starts the
    /// agent with a join token and waits until the Workload API hands this
    /// process both SVIDs.
    pub(crate) fn start(bin: &Path, dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server_socket = dir.join("server.sock");
        let socket = dir.join("agent.sock");
        let server_config = dir.join("server.conf");
        std::fs::write(
            &server_config,
            format!(
                r#"server {{
  bind_address = "127.0.0.1"
  bind_port = "{port}"
  socket_path = "{server_socket}"
  trust_domain = "bench.local"
  data_dir = "{data}"
  log_level = "WARN"
}}

plugins {{
  DataStore "sql" {{
    plugin_data {{
      database_type = "sqlite3"
      connection_string = "{data}/datastore.sqlite3"
    }}
  }}
  KeyManager "memory" {{
    plugin_data {{}}
  }}
  NodeAttestor "join_token" {{
    plugin_data {{}}
  }}
}}
"#,
                server_socket = server_socket.display(),
                data = dir.join("server-data").display(),
            ),
        )
        .unwrap();
        let server = spawn_logged(
            Command::new(bin.join("spire-server"))
                .args(["run", "-config"])
                .arg(&server_config),
            &dir.join("server.log"),
        );
        let mut spire = Self {
            server,
            agent: None,
            bin: bin.to_owned(),
            server_socket,
            socket,
        };
        let started = Instant::now();
        while !spire
            .server_cli(&["healthcheck"])
            .is_ok_and(|out| out.status.success())
        {
            assert!(
                started.elapsed() < TIMEOUT,
                "spire-server did not become healthy: see {}",
                dir.join("server.log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let token = spire.server_ok(&["token", "generate", "-spiffeID", NODE_ID]);
        let token = token
            .trim()
            .strip_prefix("Token: ")
            .expect("`spire-server token generate` prints `Token: <token>`")
            .to_owned();
        let bundle = dir.join("bundle.pem");
        std::fs::write(&bundle, spire.server_ok(&["bundle", "show"])).unwrap();
        for id in [AGENT_ID, AUDIENCE] {
            wait_success(spire.create_entry(id));
        }

        let agent_config = dir.join("agent.conf");
        std::fs::write(
            &agent_config,
            format!(
                r#"agent {{
  data_dir = "{data}"
  log_level = "WARN"
  server_address = "127.0.0.1"
  server_port = "{port}"
  socket_path = "{socket}"
  trust_bundle_path = "{bundle}"
  trust_domain = "bench.local"
}}

plugins {{
  NodeAttestor "join_token" {{
    plugin_data {{}}
  }}
  KeyManager "memory" {{
    plugin_data {{}}
  }}
  WorkloadAttestor "unix" {{
    plugin_data {{}}
  }}
}}
"#,
                data = dir.join("agent-data").display(),
                socket = spire.socket.display(),
                bundle = bundle.display(),
            ),
        )
        .unwrap();
        spire.agent = Some(spawn_logged(
            Command::new(bin.join("spire-agent"))
                .args(["run", "-config"])
                .arg(&agent_config)
                .args(["-joinToken", &token]),
            &dir.join("agent.log"),
        ));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(wait_for_svids(&spire.socket, &[AGENT_ID, AUDIENCE]));
        spire
    }

    /// The server's process id.
    pub(crate) fn server_pid(&self) -> u32 {
        self.server.id()
    }

    /// The agent's process id.
    pub(crate) fn agent_pid(&self) -> u32 {
        self.agent.as_ref().expect("the agent runs").id()
    }

    /// Starts `spire-server entry create` for `spiffe_id` under the node,
    /// selecting this uid; the caller waits for it.
    pub(crate) fn create_entry(&self, spiffe_id: &str) -> Child {
        let uid = nix::unistd::geteuid().as_raw();
        Command::new(self.bin.join("spire-server"))
            .args(["entry", "create", "-socketPath"])
            .arg(&self.server_socket)
            .args(["-parentID", NODE_ID, "-spiffeID", spiffe_id])
            .args(["-selector", &format!("unix:uid:{uid}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Runs `spire-server <args> -socketPath <server socket>`.
    fn server_cli(&self, args: &[&str]) -> std::io::Result<Output> {
        Command::new(self.bin.join("spire-server"))
            .args(args)
            .arg("-socketPath")
            .arg(&self.server_socket)
            .output()
    }

    /// Runs `spire-server <args>`, which must succeed; its stdout.
    fn server_ok(&self, args: &[&str]) -> String {
        let out = self.server_cli(args).unwrap();
        assert!(
            out.status.success(),
            "spire-server {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Spire {
    fn drop(&mut self) {
        let children = self
            .agent
            .iter_mut()
            .chain(std::iter::once(&mut self.server));
        for child in children {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = child.wait();
        }
    }
}

/// Waits for a `spire-server` command and panics unless it succeeded.
pub(crate) fn wait_success(child: Child) {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "spire-server: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Spawns `command` in a process group of its own, its output in `log`.
fn spawn_logged(command: &mut Command, log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    command
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .process_group(0)
        .spawn()
        .unwrap()
}

/// Waits until a FetchX509SVID stream on `socket` carries every one of `ids`
/// (an agent answers PermissionDenied until it has an identity for the
/// caller).
pub(crate) async fn wait_for_svids(socket: &Path, ids: &[&str]) {
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < TIMEOUT,
            "no SVIDs {ids:?} on {}",
            socket.display()
        );
        let Ok(mut client) = WorkloadClient::connect(socket, TIMEOUT).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if let Ok(mut stream) = client.fetch_x509_svid().await {
            while let Ok(Some(message)) = client.first(&mut stream).await {
                if ids
                    .iter()
                    .all(|id| message.svids.iter().any(|svid| svid.spiffe_id == *id))
                {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
