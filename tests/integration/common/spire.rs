//! SPIRE v1.13.3 beside the agent under test: a real `spire-server` and
//! `spire-agent` as child processes on loopback, each in a temporary
//! directory of its own (config, data, socket, log), and the server's CLI
//! to bootstrap bundles, manage federation relationships and create
//! entries.
//!
//! The server: SQLite datastore, `memory` KeyManager, `join_token`
//! NodeAttestor, the API on 127.0.0.1 at a free port and on a socket, and
//! optionally its federation bundle endpoint on 127.0.0.1 with the profile
//! asked for. The agent: attested with a join token whose node alias is
//! `spiffe://<trust domain>/node` (the parent of [`SpireServer::create_entry`]'s
//! entries), the `unix` WorkloadAttestor, the server's bundle from
//! `spire-server bundle show` as its trust bundle. Each is ready once its
//! `healthcheck` says so, and killed when dropped (also when a test panics).
//!
//! The binaries come from the directory in `TETHER_SPIRE_BIN` (`scripts/spire
//! build` builds them and prints it; `scripts/test` exports it); without
//! them a test fails as a missing prerequisite that says so.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use super::{eventually, free_port, prerequisite};

/// The pause after a check that runs a child process (SPIRE's CLI,
/// go-spiffe) and finds what it awaits not there yet: such checks are
/// spaced wider than [`eventually`]'s own interval on a shared machine.
/// Pacing only, never a timing assertion.
pub const CHILD_POLL_PAUSE: Duration = Duration::from_millis(200);

/// `Err(why)` after [`CHILD_POLL_PAUSE`]: a paced "not yet" for a check.
pub async fn not_yet<T>(why: String) -> Result<T, String> {
    tokio::time::sleep(CHILD_POLL_PAUSE).await;
    Err(why)
}

/// The directory holding `spire-server` and `spire-agent`, from
/// `TETHER_SPIRE_BIN`; a missing prerequisite without them.
pub fn binaries() -> PathBuf {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    prerequisite(FOUND.get_or_init(find_binaries).clone())
}

fn find_binaries() -> Result<PathBuf, String> {
    const HOW: &str =
        "run `scripts/spire build` and export TETHER_SPIRE_BIN=<the directory it prints>";
    let dir = std::env::var_os("TETHER_SPIRE_BIN")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| format!("SPIRE v1.13.3's binaries: TETHER_SPIRE_BIN is not set; {HOW}"))?;
    for name in ["spire-server", "spire-agent"] {
        let binary = dir.join(name);
        if !binary.is_file() {
            return Err(format!(
                "SPIRE v1.13.3's binaries: no {} (TETHER_SPIRE_BIN); {HOW}",
                binary.display()
            ));
        }
    }
    Ok(dir)
}

/// How the server's federation bundle endpoint authenticates itself.
pub enum ServedProfile {
    /// `https_spiffe`: the server's own X.509-SVID.
    HttpsSpiffe,
    /// `https_web`: a certificate and key from files (`serving_cert_file`).
    HttpsWeb {
        /// The certificate (PEM).
        cert_path: String,
        /// Its private key (PEM).
        key_path: String,
    },
}

/// How the server authenticates a federated domain's bundle endpoint.
pub enum PeerProfile<'a> {
    /// `https_spiffe`: the endpoint presents an X.509-SVID naming this ID,
    /// chaining to the domain's bundle the server already holds.
    HttpsSpiffe {
        /// The endpoint's SPIFFE ID.
        endpoint_id: &'a str,
    },
    /// `https_web`: Web PKI, against the system roots of the server
    /// process (see [`ServerOptions::ssl_cert_file`]).
    HttpsWeb,
}

/// What a [`SpireServer`] is started with.
pub struct ServerOptions<'a> {
    /// Its trust domain (`spire.test`).
    pub trust_domain: &'a str,
    /// Its federation bundle endpoint, if it serves one.
    pub bundle_endpoint: Option<ServedProfile>,
    /// `SSL_CERT_FILE` for the server process alone: the roots Go's
    /// `crypto/x509` reads on Linux, hence the roots of `https_web`
    /// federation (the machine's trust store is left alone).
    pub ssl_cert_file: Option<PathBuf>,
}

/// A SPIRE process, killed and reaped when dropped.
struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Starts `binary run -config CONFIG`, its output to `log`.
    fn spawn(name: &'static str, mut command: Command, log: PathBuf) -> Self {
        let out = File::create(&log).expect("create the SPIRE log");
        let err = out.try_clone().expect("clone the log's handle");
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("{name} starts: {e}"));
        Self { name, child, log }
    }

    /// Fails the test, with the end of the log, if the process has exited.
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("wait on the SPIRE process") {
            self.died(status);
        }
    }

    fn died(&self, status: ExitStatus) -> ! {
        panic!(
            "{} exited ({status}); the end of its log:\n{}",
            self.name,
            self.log_tail()
        )
    }

    /// The last lines of its log, without the API's line per request (the
    /// test's own CLI calls, polling): what is left says what the process
    /// did of its own accord (fetches, syncs, their errors).
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text
            .lines()
            .filter(|line| !line.contains("subsystem_name=api"))
            .collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `command` to its end off the runtime: its stdout on success, else
/// its exit status and output.
async fn run(mut command: Command) -> Result<String, String> {
    let described = format!("{command:?}");
    let out = tokio::task::spawn_blocking(move || command.stdin(Stdio::null()).output())
        .await
        .expect("the command's thread")
        .unwrap_or_else(|e| panic!("{described} runs: {e}"));
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    Err(format!(
        "{described}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// Waits until `binary healthcheck -socketPath SOCKET` passes, failing at
/// once if the process exits meanwhile.
async fn until_healthy(process: &mut Process, binary: &Path, socket: &Path) {
    let what = format!("{} to be healthy", process.name);
    eventually(what, async || {
        process.assert_running();
        let mut command = Command::new(binary);
        command.arg("healthcheck").arg("-socketPath").arg(socket);
        match run(command).await {
            Ok(out) => Ok(out),
            Err(why) => not_yet(why).await,
        }
    })
    .await;
}

/// A running `spire-server`.
pub struct SpireServer {
    // Dropped first: the process goes before its directory.
    process: Process,
    binary: PathBuf,
    trust_domain: String,
    socket: PathBuf,
    bind_port: u16,
    bundle_endpoint_port: Option<u16>,
    dir: TempDir,
}

impl SpireServer {
    /// Starts a server and waits until it is healthy.
    pub async fn start(options: ServerOptions<'_>) -> Self {
        let binary = binaries().join("spire-server");
        let dir = tempfile::tempdir().expect("tempdir");
        let (socket, data) = (dir.path().join("server.sock"), dir.path().join("data"));
        let bind_port = free_port();
        let bundle_endpoint_port = options.bundle_endpoint.as_ref().map(|_| free_port());
        let federation = match (&options.bundle_endpoint, bundle_endpoint_port) {
            (Some(profile), Some(port)) => federation_block(profile, port),
            _ => String::new(),
        };
        let config = format!(
            r#"server {{
    bind_address = "127.0.0.1"
    bind_port = "{bind_port}"
    socket_path = "{socket}"
    trust_domain = "{td}"
    data_dir = "{data}"
    log_level = "DEBUG"
{federation}}}

plugins {{
    DataStore "sql" {{
        plugin_data {{
            database_type = "sqlite3"
            connection_string = "{data}/datastore.sqlite3"
        }}
    }}
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    KeyManager "memory" {{
        plugin_data {{}}
    }}
}}
"#,
            socket = socket.display(),
            td = options.trust_domain,
            data = data.display(),
        );
        let config_path = dir.path().join("server.conf");
        std::fs::write(&config_path, config).expect("write server.conf");
        let mut command = Command::new(&binary);
        command.arg("run").arg("-config").arg(&config_path);
        // Only what the test gives: no roots of the machine's own choosing.
        command
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR");
        if let Some(roots) = &options.ssl_cert_file {
            command.env("SSL_CERT_FILE", roots);
        }
        let mut process = Process::spawn("spire-server", command, dir.path().join("server.log"));
        until_healthy(&mut process, &binary, &socket).await;
        Self {
            process,
            binary,
            trust_domain: options.trust_domain.to_owned(),
            socket,
            bind_port,
            bundle_endpoint_port,
            dir,
        }
    }

    /// The SPIFFE ID it presents, on its `https_spiffe` bundle endpoint too.
    pub fn id(&self) -> String {
        format!("spiffe://{}/spire/server", self.trust_domain)
    }

    /// Its bundle endpoint's URL, if it serves one.
    pub fn bundle_endpoint_url(&self) -> Option<String> {
        self.bundle_endpoint_port
            .map(|port| format!("https://127.0.0.1:{port}/"))
    }

    /// The node alias its agents are attested under, the parent of the
    /// entries [`SpireServer::create_entry`] makes.
    pub fn node_id(&self) -> String {
        format!("spiffe://{}/node", self.trust_domain)
    }

    /// `spire-server COMMAND -socketPath SOCKET FLAGS`: its stdout, or why
    /// it failed (with the end of the server's log).
    pub async fn cli(&mut self, command: &[&str], flags: &[&str]) -> Result<String, String> {
        self.process.assert_running();
        let mut cli = Command::new(&self.binary);
        cli.args(command)
            .arg("-socketPath")
            .arg(&self.socket)
            .args(flags);
        run(cli).await.map_err(|e| {
            format!(
                "{e}\nthe end of the server's log:\n{}",
                self.process.log_tail()
            )
        })
    }

    /// [`SpireServer::cli`], which must succeed.
    async fn must(&mut self, command: &[&str], flags: &[&str]) -> String {
        self.cli(command, flags)
            .await
            .unwrap_or_else(|e| panic!("spire-server {}: {e}", command.join(" ")))
    }

    /// Its own bundle as a SPIFFE bundle document (`bundle show -format
    /// spiffe`).
    pub async fn bundle(&mut self) -> Value {
        let out = self.must(&["bundle", "show"], &["-format", "spiffe"]).await;
        serde_json::from_str(&out).expect("bundle show prints a SPIFFE bundle")
    }

    /// Its bundle of `trust_domain` as a SPIFFE bundle document (`bundle
    /// list -id`), or why there is none (yet).
    pub async fn federated_bundle(&mut self, trust_domain: &str) -> Result<Value, String> {
        let id = format!("spiffe://{trust_domain}");
        let out = self
            .cli(&["bundle", "list"], &["-id", &id, "-format", "spiffe"])
            .await?;
        serde_json::from_str(&out).map_err(|e| format!("not a SPIFFE bundle ({e}): {out}"))
    }

    /// Sets its bundle of `trust_domain` to `document` (`bundle set -format
    /// spiffe`): the bootstrap of an `https_spiffe` relationship.
    pub async fn set_federated_bundle(&mut self, trust_domain: &str, document: &Value) {
        let path = self.dir.path().join(format!("{trust_domain}.bundle.json"));
        std::fs::write(&path, document.to_string()).expect("write the bundle");
        let (id, path) = (
            format!("spiffe://{trust_domain}"),
            path.display().to_string(),
        );
        self.must(
            &["bundle", "set"],
            &["-id", &id, "-path", &path, "-format", "spiffe"],
        )
        .await;
    }

    /// Creates a federation relationship with `trust_domain`, whose bundle
    /// endpoint is at `url` (`federation create`). Creating one triggers
    /// the server's first fetch at once.
    pub async fn federate_with(&mut self, trust_domain: &str, url: &str, profile: PeerProfile<'_>) {
        let mut flags = vec![
            "-trustDomain",
            trust_domain,
            "-bundleEndpointURL",
            url,
            "-bundleEndpointProfile",
        ];
        match profile {
            PeerProfile::HttpsSpiffe { endpoint_id } => {
                flags.extend(["https_spiffe", "-endpointSpiffeID", endpoint_id]);
            }
            PeerProfile::HttpsWeb => flags.push("https_web"),
        }
        self.must(&["federation", "create"], &flags).await;
    }

    /// Creates a workload entry under [`SpireServer::node_id`] for
    /// `spiffe_id` with `selectors`, federating with `federates_with`
    /// (trust domain names, whose bundles the server must hold).
    pub async fn create_entry(
        &mut self,
        spiffe_id: &str,
        selectors: &[&str],
        federates_with: &[&str],
    ) {
        let parent = self.node_id();
        let mut flags = vec![
            "-parentID".to_owned(),
            parent,
            "-spiffeID".to_owned(),
            spiffe_id.to_owned(),
        ];
        for selector in selectors {
            flags.extend(["-selector".to_owned(), (*selector).to_owned()]);
        }
        for td in federates_with {
            flags.extend(["-federatesWith".to_owned(), format!("spiffe://{td}")]);
        }
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        self.must(&["entry", "create"], &flags).await;
    }

    /// Starts an agent of this server and waits until it is healthy.
    pub async fn start_agent(&mut self) -> SpireAgent {
        let binary = binaries().join("spire-agent");
        let dir = tempfile::tempdir().expect("tempdir");
        let node_id = self.node_id();
        let token = self
            .must(&["token", "generate"], &["-spiffeID", &node_id])
            .await;
        let token = token
            .trim()
            .strip_prefix("Token: ")
            .unwrap_or_else(|| panic!("token generate prints `Token: …`: {token}"))
            .to_owned();
        let bundle = dir.path().join("bundle.pem");
        let pem = self.must(&["bundle", "show"], &[]).await;
        std::fs::write(&bundle, pem).expect("write the agent's trust bundle");
        let (socket, data) = (dir.path().join("agent.sock"), dir.path().join("data"));
        let config = format!(
            r#"agent {{
    data_dir = "{data}"
    log_level = "DEBUG"
    server_address = "127.0.0.1"
    server_port = "{port}"
    socket_path = "{socket}"
    trust_bundle_path = "{bundle}"
    trust_domain = "{td}"
    join_token = "{token}"
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
            data = data.display(),
            port = self.bind_port,
            socket = socket.display(),
            bundle = bundle.display(),
            td = self.trust_domain,
        );
        let config_path = dir.path().join("agent.conf");
        std::fs::write(&config_path, config).expect("write agent.conf");
        let mut command = Command::new(&binary);
        command.arg("run").arg("-config").arg(&config_path);
        let mut process = Process::spawn("spire-agent", command, dir.path().join("agent.log"));
        until_healthy(&mut process, &binary, &socket).await;
        SpireAgent {
            process,
            socket,
            _dir: dir,
        }
    }
}

/// The server config's `federation` block serving a bundle endpoint on
/// 127.0.0.1:`port` with `profile` and the shortest refresh hint SPIRE's
/// own client honours (it rounds shorter ones up to a minute).
fn federation_block(profile: &ServedProfile, port: u16) -> String {
    let profile = match profile {
        ServedProfile::HttpsSpiffe => "profile \"https_spiffe\" {}".to_owned(),
        // `file_sync_interval` is required in practice: SPIRE parses it
        // with time.ParseDuration, which refuses "" (cmd/spire-server/cli/
        // run/run.go, configToDiskCertManager).
        ServedProfile::HttpsWeb {
            cert_path,
            key_path,
        } => format!(
            r#"profile "https_web" {{
                serving_cert_file {{
                    cert_file_path = "{cert_path}"
                    key_file_path = "{key_path}"
                    file_sync_interval = "1h"
                }}
            }}"#
        ),
    };
    format!(
        r#"    federation {{
        bundle_endpoint {{
            address = "127.0.0.1"
            port = {port}
            refresh_hint = "1m"
            {profile}
        }}
    }}
"#
    )
}

/// A running `spire-agent`.
pub struct SpireAgent {
    // Dropped first: the process goes before its directory.
    process: Process,
    socket: PathBuf,
    _dir: TempDir,
}

impl SpireAgent {
    /// Its Workload API, `unix:///…`, for SPIFFE clients.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Fails the test, with the end of its log, if the agent has exited.
    pub fn assert_running(&mut self) {
        self.process.assert_running();
    }
}
