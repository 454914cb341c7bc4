//! Shared test harness: a real agent on a temporary socket and data dir,
//! driven through real clients (the `spiffe` crate, tether's own gRPC stubs).

pub mod apiserver;
pub mod ca;
pub mod cli;
pub mod eventually;
pub mod fleet;
pub mod go;
pub mod kubelet;
pub mod postgres;
pub mod spire;
pub mod walkthrough;

pub use eventually::{eventually, eventually_blocking, eventually_within};

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tempfile::TempDir;
use tether::config::{Config, MapEnv};
use tether::daemon::{self, Running};
use tether::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Upper bound on waiting for something that must happen; a failure guard,
/// never a performance assertion.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A loopback port nothing listens on now, for a config that must name
/// its port before the listener starts (another side's URL). Another
/// process may take it meanwhile: use it at once.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The uid this test runs as.
pub fn uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

// Prerequisites. A test that needs something of the machine beyond the
// suite's own parts (root, a system package) is `#[ignore = "needs …:
// scripts/test runs it"]`, so a plain `cargo nextest run` lists it as
// skipped; `scripts/test` and CI run it with `--run-ignored all`, and there
// a missing prerequisite fails it with the reason. No test passes without
// having run its body.

/// Fails the test, naming what needs root, unless it runs as root.
pub fn require_root(what: &str) {
    assert_eq!(
        uid(),
        0,
        "prerequisite missing: {what} needs root (running as uid {})",
        uid()
    );
}

/// The value, or a failure that names the missing prerequisite.
pub fn prerequisite<T>(ready: Result<T, String>) -> T {
    ready.unwrap_or_else(|reason| panic!("prerequisite missing: {reason}"))
}

/// A running agent and the directory it lives in.
pub struct TestAgent {
    pub running: Option<Running>,
    pub dir: TempDir,
    pub socket: PathBuf,
}

impl TestAgent {
    /// Starts an agent for trust domain example.org with `extra` appended
    /// to its config (entries, federation, TTLs).
    pub async fn start(extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let running = start_in(dir.path(), extra).await.expect("agent starts");
        let socket = running.socket_path().to_owned();
        Self {
            running: Some(running),
            dir,
            socket,
        }
    }

    /// Stops and starts the agent again on the same data dir and config.
    pub async fn restart(&mut self, extra: &str) {
        if let Some(running) = self.running.take() {
            running.stop().await.expect("clean stop");
        }
        self.running = Some(
            start_in(self.dir.path(), extra)
                .await
                .expect("agent restarts"),
        );
    }

    /// `unix:///...` for SPIFFE clients.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The Rust `spiffe` crate client, unmodified.
    pub async fn spiffe_client(&self) -> spiffe::WorkloadApiClient {
        spiffe::WorkloadApiClient::connect_to(self.endpoint())
            .await
            .expect("spiffe client connects")
    }

    /// tether's own generated client, with or without the security header.
    pub async fn raw_client(&self, with_header: bool) -> RawClient {
        raw_client(&self.socket, with_header).await
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("agent is running")
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await.expect("clean stop");
        }
    }
}

/// The config every test agent shares, plus `extra`.
pub fn config_text(dir: &Path, extra: &str) -> String {
    format!(
        "trust_domain = \"example.org\"\nsocket_path = \"{}\"\nadmin_socket_path = \"{}\"\ndata_dir = \"{}\"\nlog.level = \"warn\"\n{extra}",
        dir.join("agent.sock").display(),
        dir.join("admin/admin.sock").display(),
        dir.join("data").display(),
    )
}

pub async fn start_in(dir: &Path, extra: &str) -> anyhow::Result<Running> {
    let config = Config::from_toml(&config_text(dir, extra), &MapEnv::default())?;
    tether::telemetry::init(&config.log);
    daemon::start(config).await
}

/// An `[[entries]]` block for this test process's uid.
pub fn entry_for_me(path: &str, hint: &str) -> String {
    format!(
        "[[entries]]\nspiffe_id = \"spiffe://example.org/{path}\"\nselectors = [\"unix:uid:{}\"]\nhint = \"{hint}\"\n",
        uid()
    )
}

pub type HeaderFn = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;
pub type RawClient = SpiffeWorkloadApiClient<InterceptedService<Channel, HeaderFn>>;

fn add_header(mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    request.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    Ok(request)
}

fn no_header(request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    Ok(request)
}

pub async fn raw_client(socket: &Path, with_header: bool) -> RawClient {
    let header: HeaderFn = if with_header { add_header } else { no_header };
    SpiffeWorkloadApiClient::with_interceptor(uds_channel(socket).await, header)
}

/// `tether` CLI arguments with the CLI's `--timeout` (how long it waits for
/// the agent, 5s by default) set to `timeout`, unless `args` set their own:
/// in these tests it is a failure guard, never what is tested. It goes
/// before a `--`, after which come a command's own arguments.
pub fn with_cli_timeout(args: &[&str], timeout: Duration) -> Vec<String> {
    let mut args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    if args
        .iter()
        .any(|a| a == "--timeout" || a.starts_with("--timeout="))
    {
        return args;
    }
    let at = args.iter().position(|a| a == "--").unwrap_or(args.len());
    args.splice(
        at..at,
        ["--timeout".to_owned(), format!("{}s", timeout.as_secs())],
    );
    args
}

/// Whether process `pid` has a handler installed for `signal` (its
/// `SigCgt` mask in /proc). A process that serves may not have installed
/// it yet; sending the signal before then would test the default action
/// (death), not the process's handling of it.
pub fn handles_signal(pid: u32, signal: nix::sys::signal::Signal) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let bit = 1u64 << (signal as u32 - 1);
    status
        .lines()
        .find_map(|line| line.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & bit != 0)
}

/// Waits until process `pid` handles `signal` (see [`handles_signal`]),
/// failing after [`PATIENCE`].
pub async fn until_handling(pid: u32, signal: nix::sys::signal::Signal) {
    eventually(format!("process {pid} to handle {signal}"), async || {
        handles_signal(pid, signal)
    })
    .await;
}

/// A CA for a foreign trust domain, and its SPIFFE bundle document with one
/// X.509 authority and one JWT authority (kid `fed-key`).
pub struct ForeignDomain {
    pub ca_der: Vec<u8>,
    pub jwt_key: rcgen::KeyPair,
}

impl ForeignDomain {
    pub fn new() -> Self {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).expect("ca");
        let jwt_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        Self {
            ca_der: ca.der().to_vec(),
            jwt_key,
        }
    }

    /// The SPIFFE bundle document.
    pub fn bundle_json(&self, kid: &str, sequence: u64) -> String {
        use base64::Engine as _;
        use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
        let point = self.jwt_key.public_key_raw();
        serde_json::json!({
            "keys": [
                {"use": "x509-svid", "kty": "EC", "crv": "P-256", "x5c": [STANDARD.encode(&self.ca_der)]},
                {"use": "jwt-svid", "kty": "EC", "crv": "P-256", "kid": kid,
                 "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65])}
            ],
            "spiffe_sequence": sequence,
        })
        .to_string()
    }

    /// A JWT-SVID from this domain, signed with its JWT key.
    pub fn sign_jwt(&self, kid: &str, sub: &str, aud: &str, exp: u64) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(kid.into());
        header.typ = Some("JWT".into());
        let claims = serde_json::json!({"sub": sub, "aud": [aud], "exp": exp});
        let key = jsonwebtoken::EncodingKey::from_ec_der(&self.jwt_key.serialize_der());
        jsonwebtoken::encode(&header, &claims, &key).expect("sign")
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

pub type AdminClient = tether::proto::admin::admin_client::AdminClient<Channel>;

/// A channel over a Unix socket.
pub async fn uds_channel(socket: &Path) -> Channel {
    try_uds_channel(socket).await.expect("connects")
}

/// A channel over a Unix socket, or why not.
pub async fn try_uds_channel(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = socket.to_owned();
    Endpoint::try_from("http://[::]:50051")
        .expect("static uri")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
}

/// tether's admin client on `socket`.
pub async fn admin_client(socket: &Path) -> AdminClient {
    tether::proto::admin::admin_client::AdminClient::new(uds_channel(socket).await)
}

impl TestAgent {
    /// The admin client of this agent.
    pub async fn admin(&self) -> AdminClient {
        admin_client(self.running().admin_socket_path()).await
    }
}

/// The ids of every entry the admin API lists.
pub async fn entry_ids(admin: &mut AdminClient) -> std::collections::HashSet<String> {
    admin
        .list_entries(tether::proto::admin::ListEntriesRequest::default())
        .await
        .expect("ListEntries")
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.id)
        .collect()
}

/// An admin API entry spec.
pub fn spec(spiffe_id: &str, selectors: &[&str]) -> tether::proto::admin::EntrySpec {
    tether::proto::admin::EntrySpec {
        spiffe_id: spiffe_id.into(),
        selectors: selectors.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

pub type TaskClient =
    tether::proto::task::tasks_client::TasksClient<InterceptedService<Channel, HeaderFn>>;

/// tether's Task API client on the workload socket (with the header).
pub async fn task_client(socket: &Path) -> TaskClient {
    tether::proto::task::tasks_client::TasksClient::with_interceptor(
        uds_channel(socket).await,
        add_header as HeaderFn,
    )
}

impl TestAgent {
    /// The Task API client of this agent.
    pub async fn tasks(&self) -> TaskClient {
        task_client(&self.socket).await
    }
}

/// Decodes a JWT's claims without checking anything (tests only).
pub fn claims_of(token: &str) -> serde_json::Value {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).expect("a JWS");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("JSON claims")
}
