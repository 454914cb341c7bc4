//! tether's load generator: a real agent (the `tether` binary, a child
//! process) driven over its Unix socket by N concurrent clients, one
//! connection each, beside the limits of this machine measured in the same
//! run (in-process ES256 sign and verify, P-256 key generation plus X.509
//! signing).
//!
//! ```text
//! cargo bench --bench load -- [--duration 2s] [--clients 1,16,64,256,1024]
//!                             [--ops fetch_jwt,validate_jwt,...] [--write BENCHMARKS.md]
//! ```
//!
//! Each operation runs for `--duration` at each client count. Reported:
//! throughput, p50/p99/p99.9 latency, the agent's CPU time per operation
//! (from /proc/<pid>/stat), the agent's peak RSS (VmHWM), and the ratio of
//! the throughput to the limit the operation is bound by.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a benchmark fails by panicking"
)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tether::client::task::TaskClient;
use tether::client::workload::WorkloadClient;
use tether::proto::task as task_pb;
use tether::proto::workload as wl;

const AUDIENCE: &str = "spiffe://bench.local/mcp";
const TIMEOUT: Duration = Duration::from_secs(30);

/// One operation a client repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    FetchJwt,
    ValidateJwt,
    BeginEnd,
    ValidateTask,
    Exchange,
    X509First,
    NewConnection,
    WatchRefresh,
    ProcessCached,
    ProcessCold,
    ProcessBound,
    Empty,
}

impl Op {
    const ALL: [Op; 12] = [
        Op::Empty,
        Op::FetchJwt,
        Op::ValidateJwt,
        Op::BeginEnd,
        Op::WatchRefresh,
        Op::ValidateTask,
        Op::Exchange,
        Op::X509First,
        Op::NewConnection,
        Op::ProcessCached,
        Op::ProcessCold,
        Op::ProcessBound,
    ];

    /// Operations that start a process each time: run at up to this many
    /// clients (more would measure fork on two cores, not the agent).
    const MAX_PROCESS_CLIENTS: usize = 16;

    fn spawns_processes(self) -> bool {
        matches!(self, Op::ProcessCached | Op::ProcessCold | Op::ProcessBound)
    }

    fn name(self) -> &'static str {
        match self {
            Op::FetchJwt => "fetch_jwt",
            Op::ValidateJwt => "validate_jwt",
            Op::BeginEnd => "begin_end",
            Op::ValidateTask => "validate_task",
            Op::Exchange => "exchange",
            Op::X509First => "x509_first",
            Op::NewConnection => "new_connection",
            Op::WatchRefresh => "watch_refresh",
            Op::ProcessCached => "process_cached",
            Op::ProcessCold => "process_cold",
            Op::ProcessBound => "process_bound",
            Op::Empty => "empty",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Op::FetchJwt => "FetchJWTSVID",
            Op::ValidateJwt => "ValidateJWTSVID",
            Op::BeginEnd => "BeginTask + EndTask",
            Op::ValidateTask => "ValidateTaskToken with a tool",
            Op::Exchange => "ExchangeToken",
            Op::X509First => "FetchX509SVID, first message",
            Op::NewConnection => "new connection + FetchJWTSVID (attestation, hash cached)",
            Op::WatchRefresh => "WatchTask, one fresh token (re-check, policy, sign)",
            Op::ProcessCached => "new process: `tether api fetch jwt` (exe hash cached)",
            Op::ProcessCold => "new process: `tether api fetch jwt` (exe hash cold, 30 MB)",
            Op::ProcessBound => {
                "new process of a process-bound entry: `tether api fetch x509` (its own SVID each)"
            }
            Op::Empty => "empty unary gRPC call (the stack alone, no agent)",
        }
    }

    /// The limit this operation is bound by, and its name.
    fn limit(self, limits: &Limits) -> (f64, &'static str) {
        match self {
            Op::FetchJwt
            | Op::Exchange
            | Op::NewConnection
            | Op::WatchRefresh
            | Op::ProcessCached
            | Op::ProcessCold
            | Op::BeginEnd => (limits.sign, "ES256 sign"),
            Op::Empty => (f64::INFINITY, "—"),
            Op::ValidateJwt | Op::ValidateTask => (limits.verify, "ES256 verify"),
            Op::X509First | Op::ProcessBound => (limits.keygen_x509, "P-256 keygen + X.509 sign"),
        }
    }
}

/// Operations per second the machine manages in-process, on all cores.
#[derive(Debug, Clone, Copy)]
struct Limits {
    sign: f64,
    verify: f64,
    keygen_x509: f64,
}

struct Args {
    duration: Duration,
    clients: Vec<usize>,
    ops: Vec<Op>,
    write: Option<PathBuf>,
    scale: bool,
}

/// Where the clients connect, and a directory for what they make.
struct Targets {
    agent: PathBuf,
    /// The copy of `tether` the process-bound entry selects.
    bound: PathBuf,
    empty: PathBuf,
    work: PathBuf,
}

struct Row {
    op: Op,
    clients: usize,
    ops_per_sec: f64,
    p50: Duration,
    p99: Duration,
    p999: Duration,
    errors: usize,
    cpu_per_op: Duration,
}

fn main() {
    if let Ok(streams) = std::env::var(scale::CHILD_STREAMS) {
        scale::child(streams.parse().unwrap());
        return;
    }
    let args = parse_args();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    eprintln!("measuring this machine's limits ({cores} cores)...");
    let limits = measure_limits(cores, Duration::from_secs(1));
    eprintln!("{limits:?}");

    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("load"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    // The empty service gets a runtime of its own, as an agent would.
    let empty_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .enable_all()
        .build()
        .unwrap();
    let targets = Targets {
        agent: agent.socket.clone(),
        bound: agent.bound_exe(),
        empty: empty::serve(&empty_runtime, dir.path()),
        work: dir.path().to_owned(),
    };
    let idle_rss = agent.rss_kib();
    let mut rows = Vec::new();
    // (clients, p50 bound, p99 bound) of full attestations on new connections.
    let mut attestations = Vec::new();
    for &op in &args.ops {
        for &clients in &args.clients {
            if op.spawns_processes() && clients > Op::MAX_PROCESS_CLIENTS {
                continue;
            }
            let cpu_before = agent.cpu_time();
            let buckets_before = agent.attestation_buckets();
            let row = runtime.block_on(run(op, clients, args.duration, &targets));
            if op == Op::NewConnection {
                let during = bucket_diff(&buckets_before, &agent.attestation_buckets());
                attestations.push((
                    clients,
                    bucket_quantile(&during, 0.5),
                    bucket_quantile(&during, 0.99),
                ));
            }
            let cpu = agent.cpu_time().saturating_sub(cpu_before);
            let done = (row.ops_per_sec * args.duration.as_secs_f64()).max(1.0);
            let row = Row {
                cpu_per_op: cpu.div_f64(done),
                ..row
            };
            eprintln!(
                "{:<15} {:>5} clients: {:>9.0}/s p50 {:?} p99 {:?} errors {}",
                op.name(),
                clients,
                row.ops_per_sec,
                row.p50,
                row.p99,
                row.errors
            );
            rows.push(row);
        }
    }
    let peak_rss = agent.peak_rss_kib();
    agent.stop();
    let scale = args.scale.then(|| scale::run(&runtime, dir.path()));

    let report = report(
        &args,
        cores,
        &limits,
        &rows,
        &attestations,
        idle_rss,
        peak_rss,
        scale.as_ref(),
    );
    println!("{report}");
    if let Some(path) = &args.write {
        std::fs::write(path, &report).unwrap();
        eprintln!("wrote {}", path.display());
    }
}

fn parse_args() -> Args {
    let mut args = Args {
        duration: Duration::from_secs(2),
        clients: vec![1, 16, 64, 256, 1024],
        ops: Op::ALL.to_vec(),
        write: None,
        scale: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--duration" => {
                args.duration = humantime::parse_duration(&it.next().unwrap()).unwrap();
            }
            "--clients" => {
                args.clients = it
                    .next()
                    .unwrap()
                    .split(',')
                    .map(|n| n.parse().unwrap())
                    .collect();
            }
            "--ops" => {
                let wanted = it.next().unwrap();
                args.ops = wanted
                    .split(',')
                    .map(|name| {
                        *Op::ALL
                            .iter()
                            .find(|op| op.name() == name)
                            .unwrap_or_else(|| panic!("unknown op {name}"))
                    })
                    .collect();
            }
            "--write" => args.write = Some(it.next().unwrap().into()),
            "--scale" => args.scale = true,
            // cargo bench passes --bench to every harness.
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    args
}

// === the limits ===

fn measure_limits(threads: usize, each: Duration) -> Limits {
    let key = rcgen::KeyPair::generate().unwrap();
    let encoding = jsonwebtoken::EncodingKey::from_ec_der(&key.serialize_der());
    let decoding = jsonwebtoken::DecodingKey::from_ec_der(key.public_key_raw());
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    let claims = serde_json::json!({
        "sub": "spiffe://bench.local/agent", "aud": AUDIENCE, "exp": 4_102_444_800u64,
        "iat": 1_700_000_000u64, "jti": "0123456789abcdef",
    });
    let token = jsonwebtoken::encode(&header, &claims, &encoding).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(&[AUDIENCE]);

    let sign = per_second(threads, each, || {
        jsonwebtoken::encode(&header, &claims, &encoding).unwrap();
    });
    let verify = per_second(threads, each, || {
        jsonwebtoken::decode::<serde_json::Value>(&token, &decoding, &validation).unwrap();
    });
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let issuer = Arc::new(rcgen::Issuer::new(ca_params, ca_key));
    let keygen_x509 = per_second(threads, each, || {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://bench.local/agent".try_into().unwrap(),
        )];
        params.signed_by(&key, &issuer).unwrap();
    });
    Limits {
        sign,
        verify,
        keygen_x509,
    }
}

/// How many times per second `threads` threads run `f`, together.
fn per_second(threads: usize, each: Duration, f: impl Fn() + Sync) -> f64 {
    let started = Instant::now();
    let total: u64 = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut n = 0u64;
                    while started.elapsed() < each {
                        f();
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    total as f64 / started.elapsed().as_secs_f64()
}

// === the agent ===

struct Agent {
    child: Child,
    socket: PathBuf,
    /// The agent's `/healthz`, `/readyz` and `/metrics` listener.
    http: std::net::SocketAddr,
}

impl Agent {
    /// Starts an agent in `dir` with the bench's entries: two for the
    /// uid, and a process-bound one for [`bound_exe`] only.
    fn start(dir: &Path) -> Self {
        let uid = nix::unistd::geteuid().as_raw();
        let bound = bound_exe(dir);
        std::fs::create_dir_all(dir).unwrap();
        std::fs::copy(env!("CARGO_BIN_EXE_tether"), &bound).unwrap();
        let entries = format!(
            r#"[[entries]]
spiffe_id = "spiffe://bench.local/agent"
selectors = ["unix:uid:{uid}"]

[[entries]]
spiffe_id = "{AUDIENCE}"
selectors = ["unix:uid:{uid}"]

[[entries]]
spiffe_id = "spiffe://bench.local/bound"
selectors = ["unix:uid:{uid}", "unix:path:{bound}"]
process_bound = true
"#,
            bound = bound.display(),
        );
        Self::start_with(dir, "", &entries)
    }

    /// Starts an agent in `dir` with `head` among the top-level settings
    /// and `tail` (entries) at the end of its config file.
    fn start_with(dir: &Path, head: &str, tail: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        // A port free a moment ago; the agent refuses to start if it is taken.
        let http = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                r#"trust_domain = "bench.local"
socket_path = "{socket}"
admin_socket_path = "{admin}"
data_dir = "{data}"
log.level = "warn"
{head}

[tasks]
max_tasks_per_process = 100000

[limits]
max_connections = 8192
max_connections_per_process = 8192

# Every client of the benchmark is one uid: its audit budget (64 KiB/s by
# default, issue 15) would measure refusals, not the paths.
[audit]
caller_bytes_per_second = 1073741824
caller_burst_bytes = 1073741824

[http]
listen = "{http}"

{tail}
"#,
                socket = dir.join("agent.sock").display(),
                admin = dir.join("admin/admin.sock").display(),
                data = dir.join("data").display(),
            ),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let socket = dir.join("agent.sock");
        let started = Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(started.elapsed() < TIMEOUT, "the agent did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            socket,
            http,
        }
    }

    /// The executable the process-bound entry selects.
    fn bound_exe(&self) -> PathBuf {
        bound_exe(self.socket.parent().unwrap())
    }

    /// The agent's attestation-time histogram: (upper bound in seconds,
    /// cumulative count) per bucket, from `/metrics`.
    fn attestation_buckets(&self) -> Vec<(f64, u64)> {
        use std::io::{Read as _, Write as _};
        let mut conn = std::net::TcpStream::connect(self.http).unwrap();
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        conn.read_to_string(&mut text).unwrap();
        text.lines()
            .filter_map(|line| line.strip_prefix("tether_attestation_seconds_bucket{le=\""))
            .filter_map(|rest| {
                let (le, count) = rest.split_once("\"} ")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, count.trim().parse().ok()?))
            })
            .collect()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// utime + stime of the agent so far.
    fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after_comm.split(' ').collect();
        // Fields 14 and 15 of stat (utime, stime), counted from `state` (3).
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100);
        Duration::from_secs_f64(ticks as f64 / hz as f64)
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
            .unwrap_or(0)
    }

    fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    fn stop(mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.pid()).unwrap()),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

// === the load ===

async fn run(op: Op, clients: usize, duration: Duration, targets: &Targets) -> Row {
    let mut workers = Vec::new();
    // Every client connects and prepares before the clock starts.
    let mut prepared = Vec::new();
    for _ in 0..clients {
        prepared.push(Client::prepare(op, targets).await);
    }
    let start = Instant::now() + Duration::from_millis(50);
    for mut client in prepared {
        let socket = targets.agent.clone();
        let work = targets.work.clone();
        let bound = targets.bound.clone();
        workers.push(tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            let mut latencies = Vec::new();
            let mut errors = 0usize;
            while start.elapsed() < duration {
                match client.once(op, &socket, &work, &bound).await {
                    Some(took) => latencies.push(took),
                    None => errors += 1,
                }
            }
            client.finish().await;
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for worker in workers {
        let (mine, failed) = worker.await.unwrap();
        latencies.extend(mine);
        errors += failed;
    }
    latencies.sort();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Row {
        op,
        clients,
        ops_per_sec: latencies.len() as f64 / duration.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
        errors,
        cpu_per_op: Duration::ZERO,
    }
}

/// One client: its own connection, and what its operation needs.
struct Client {
    workload: WorkloadClient,
    tasks: TaskClient,
    /// A connection to the empty service.
    empty: Option<tonic::client::Grpc<tonic::transport::Channel>>,
    /// A JWT-SVID to validate, or a task token to validate or exchange.
    token: String,
    /// The task it holds, if any.
    task_id: Option<String>,
}

impl Client {
    async fn prepare(op: Op, targets: &Targets) -> Self {
        let socket = &targets.agent;
        let mut workload = WorkloadClient::connect(socket, TIMEOUT).await.unwrap();
        let mut tasks = TaskClient::connect(socket, TIMEOUT).await.unwrap();
        let mut client_token = String::new();
        let mut task_id = None;
        let mut empty = None;
        match op {
            Op::Empty => {
                let channel = tether::client::channel::dial(&targets.empty, TIMEOUT)
                    .await
                    .unwrap();
                empty = Some(tonic::client::Grpc::new(channel));
            }
            Op::WatchRefresh => {
                let begun = tasks.begin(begin_request()).await.unwrap();
                task_id = Some(begun.task_id);
            }
            Op::ValidateJwt => {
                let response = workload
                    .fetch_jwt_svid(wl::JwtsvidRequest {
                        audience: vec![AUDIENCE.into()],
                        spiffe_id: String::new(),
                    })
                    .await
                    .unwrap();
                client_token = response.svids[0].svid.clone();
            }
            Op::ValidateTask | Op::Exchange => {
                let begun = tasks.begin(begin_request()).await.unwrap();
                client_token = begun.token.unwrap().token;
                task_id = Some(begun.task_id);
            }
            _ => {}
        }
        Self {
            workload,
            tasks,
            empty,
            token: client_token,
            task_id,
        }
    }

    /// One operation: how long it took, or `None` when it failed.
    async fn once(&mut self, op: Op, socket: &Path, work: &Path, bound: &Path) -> Option<Duration> {
        match op {
            Op::ProcessCached => {
                return spawn_fetch(env!("CARGO_BIN_EXE_tether").as_ref(), socket).await;
            }
            Op::ProcessBound => return spawn_fetch_x509(bound, socket).await,
            Op::ProcessCold => {
                // A copy is a new inode: its hash is not cached. Made before
                // the clock starts.
                static COPIES: AtomicU64 = AtomicU64::new(0);
                let copy = work.join(format!("tether-{}", COPIES.fetch_add(1, Ordering::Relaxed)));
                std::fs::copy(env!("CARGO_BIN_EXE_tether"), &copy).unwrap();
                let took = spawn_fetch(&copy, socket).await;
                let _ = std::fs::remove_file(&copy);
                return took;
            }
            _ => {}
        }
        let began = Instant::now();
        self.once_in_process(op, socket)
            .await
            .then(|| began.elapsed())
    }

    /// One operation over this client's connections; true when it succeeded.
    async fn once_in_process(&mut self, op: Op, socket: &Path) -> bool {
        match op {
            Op::Empty => {
                let Some(grpc) = self.empty.as_mut() else {
                    return false;
                };
                if grpc.ready().await.is_err() {
                    return false;
                }
                let path = http::uri::PathAndQuery::from_static(empty::PATH);
                let codec = tonic_prost::ProstCodec::<(), ()>::default();
                grpc.unary(tonic::Request::new(()), path, codec)
                    .await
                    .is_ok()
            }
            Op::WatchRefresh => {
                let Some(id) = self.task_id.clone() else {
                    return false;
                };
                let Ok(mut stream) = self.tasks.watch(id).await else {
                    return false;
                };
                matches!(self.tasks.next(&mut stream).await, Ok(Some(_)))
            }
            Op::ProcessCached | Op::ProcessCold | Op::ProcessBound => false,
            Op::FetchJwt => self
                .workload
                .fetch_jwt_svid(wl::JwtsvidRequest {
                    audience: vec![AUDIENCE.into()],
                    spiffe_id: String::new(),
                })
                .await
                .is_ok(),
            Op::ValidateJwt => self
                .workload
                .validate_jwt_svid(wl::ValidateJwtsvidRequest {
                    audience: AUDIENCE.into(),
                    svid: self.token.clone(),
                })
                .await
                .is_ok(),
            Op::BeginEnd => match self.tasks.begin(begin_request()).await {
                Ok(begun) => self.tasks.end(begun.task_id).await.is_ok(),
                Err(_) => false,
            },
            Op::ValidateTask => self
                .tasks
                .validate(task_pb::ValidateTaskTokenRequest {
                    token: self.token.clone(),
                    audience: AUDIENCE.into(),
                    tool: "search".into(),
                    presenter_certificate: Vec::new(),
                })
                .await
                .is_ok_and(|answer| answer.valid),
            Op::Exchange => self
                .tasks
                .exchange(task_pb::ExchangeTokenRequest {
                    subject_token: self.token.clone(),
                    audience: "spiffe://bench.local/downstream".into(),
                    tools: vec!["search".into()],
                    ..task_pb::ExchangeTokenRequest::default()
                })
                .await
                .is_ok(),
            Op::X509First => {
                let Ok(mut stream) = self.workload.fetch_x509_svid().await else {
                    return false;
                };
                matches!(self.workload.first(&mut stream).await, Ok(Some(_)))
            }
            Op::NewConnection => {
                let Ok(mut fresh) = WorkloadClient::connect(socket, TIMEOUT).await else {
                    return false;
                };
                fresh
                    .fetch_jwt_svid(wl::JwtsvidRequest {
                        audience: vec![AUDIENCE.into()],
                        spiffe_id: String::new(),
                    })
                    .await
                    .is_ok()
            }
        }
    }

    async fn finish(mut self) {
        if let Some(id) = self.task_id.take() {
            let _ = self.tasks.end(id).await;
        }
    }
}

/// Runs `tether api fetch jwt` as a new process; how long it took, or
/// `None` when it failed.
async fn spawn_fetch(exe: &Path, socket: &Path) -> Option<Duration> {
    let args = ["fetch", "jwt", "--token-only", "--audience", AUDIENCE];
    spawn_api(exe, &args, socket).await
}

/// Runs `tether api fetch x509` as a new process (the first message of
/// FetchX509SVID, then it exits); how long it took, or `None` when it
/// failed.
async fn spawn_fetch_x509(exe: &Path, socket: &Path) -> Option<Duration> {
    spawn_api(exe, &["fetch", "x509"], socket).await
}

/// Runs `tether api <args> --socket <socket>` as a new process; how long it
/// took, or `None` when it failed.
async fn spawn_api(exe: &Path, args: &[&str], socket: &Path) -> Option<Duration> {
    let exe = exe.to_owned();
    let args: Vec<String> = args.iter().map(|&a| a.to_owned()).collect();
    let socket = socket.to_owned();
    tokio::task::spawn_blocking(move || {
        for _ in 0..10 {
            let began = Instant::now();
            let status = Command::new(&exe)
                .arg("api")
                .args(&args)
                .arg("--socket")
                .arg(&socket)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            match status {
                Ok(status) => return status.success().then(|| began.elapsed()),
                // Another thread's child may still hold the copy open for
                // writing between its fork and exec: try again.
                Err(error) if error.raw_os_error() == Some(nix::errno::Errno::ETXTBSY as i32) => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return None,
            }
        }
        None
    })
    .await
    .unwrap()
}

/// The copy of `tether` the process-bound entry of the agent in `dir`
/// selects (by `unix:path`): its processes each get their own SVID, and
/// the processes of every other operation do not match it.
fn bound_exe(dir: &Path) -> PathBuf {
    dir.join("tether-bound")
}

fn begin_request() -> task_pb::BeginTaskRequest {
    task_pb::BeginTaskRequest {
        audience: AUDIENCE.into(),
        intent: "benchmark".into(),
        tools: vec!["search".into(), "read".into()],
        ttl_ms: 600_000,
        ..task_pb::BeginTaskRequest::default()
    }
}

// === scale ===

/// Figures at scale, each on a fresh agent: memory with many live tasks,
/// revocation latency when a task's owner dies, and CPU over time with
/// thousands of X.509-SVID streams rotating.
mod scale {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::process::CommandExt;
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use nix::sys::signal::{Signal, kill, killpg};
    use nix::unistd::Pid;
    use tether::client::task::TaskClient;
    use tether::client::workload::WorkloadClient;
    use tether::proto::task as task_pb;

    use super::{AUDIENCE, Agent, TIMEOUT, begin_request};

    /// Set in a child process: open this many X.509 streams and count updates.
    pub const CHILD_STREAMS: &str = "TETHER_BENCH_CHILD_STREAMS";
    const CHILD_SOCKET: &str = "TETHER_BENCH_CHILD_SOCKET";

    const TASK_STEPS: [usize; 2] = [10_000, 100_000];
    const BEGIN_CLIENTS: usize = 32;
    const REVOCATION_SAMPLES: usize = 100;
    const STREAM_PROCESSES: usize = 100;
    const STREAMS_PER_PROCESS: usize = 100;
    const STREAM_TTL: Duration = Duration::from_secs(30);
    /// Two and a half rotations of every SVID.
    const STREAM_WINDOW: Duration = Duration::from_secs(40);

    pub struct Scale {
        pub idle_rss_kib: u64,
        /// Live tasks, the agent's RSS then, and BeginTask/s getting there.
        pub tasks: Vec<(usize, u64, f64)>,
        /// Owner exit (SIGKILL sent) to the first refused validation, sorted.
        pub revocation: Vec<Duration>,
        pub streams: Streams,
    }

    pub struct Streams {
        pub streams: usize,
        pub processes: usize,
        pub ttl: Duration,
        /// The agent's CPU use in each second of the window (1.0 = one core).
        pub cpu_per_second: Vec<f64>,
        /// Updates the streams received after their first message.
        pub pushes: u64,
        /// Of those, the ones carrying a new certificate of the stream's own.
        pub rotations: u64,
        pub rss_kib: u64,
    }

    pub fn run(runtime: &tokio::runtime::Runtime, dir: &Path) -> Scale {
        let agent = Agent::start(&dir.join("tasks"));
        let idle_rss_kib = agent.rss_kib();
        let socket = agent.socket.clone();
        let tasks = runtime.block_on(fill_tasks(&agent));
        eprintln!("tasks: {tasks:?}");
        let revocation = runtime.block_on(revocation(&socket));
        agent.stop();
        let streams = streams(dir);
        Scale {
            idle_rss_kib,
            tasks,
            revocation,
            streams,
        }
    }

    /// Begins tasks from [`BEGIN_CLIENTS`] connections up to each step of
    /// [`TASK_STEPS`], reading the agent's RSS at each.
    async fn fill_tasks(agent: &Agent) -> Vec<(usize, u64, f64)> {
        let mut clients = Vec::new();
        for _ in 0..BEGIN_CLIENTS {
            clients.push(TaskClient::connect(&agent.socket, TIMEOUT).await.unwrap());
        }
        let mut live = 0;
        let mut out = Vec::new();
        for step in TASK_STEPS {
            let each = (step - live).div_ceil(BEGIN_CLIENTS);
            let began = Instant::now();
            let mut workers = Vec::new();
            for mut client in clients.drain(..) {
                workers.push(tokio::spawn(async move {
                    for _ in 0..each {
                        client.begin(begin_request()).await.unwrap();
                    }
                    client
                }));
            }
            for worker in workers {
                clients.push(worker.await.unwrap());
            }
            live += each * BEGIN_CLIENTS;
            let rate = (each * BEGIN_CLIENTS) as f64 / began.elapsed().as_secs_f64();
            out.push((live, agent.rss_kib(), rate));
        }
        out
    }

    /// Starts `tether task run` owning a task, kills it, and validates the
    /// task's token until the agent refuses it.
    async fn revocation(socket: &Path) -> Vec<Duration> {
        let mut validator = TaskClient::connect(socket, TIMEOUT).await.unwrap();
        let mut samples = Vec::new();
        for _ in 0..REVOCATION_SAMPLES {
            let mut runner = Command::new(env!("CARGO_BIN_EXE_tether"))
                .args(["task", "run", "--socket"])
                .arg(socket)
                .args([
                    "--audience",
                    AUDIENCE,
                    "--intent",
                    "revocation",
                    "--tool",
                    "search",
                ])
                .args([
                    "--",
                    "sh",
                    "-c",
                    "echo \"$TETHER_TASK_TOKEN\"; exec sleep 600",
                ])
                .stdout(Stdio::piped())
                .process_group(0)
                .spawn()
                .unwrap();
            let stdout = runner.stdout.take().unwrap();
            let token = tokio::task::spawn_blocking(move || {
                let mut line = String::new();
                BufReader::new(stdout).read_line(&mut line).unwrap();
                line.trim().to_owned()
            })
            .await
            .unwrap();
            let request = task_pb::ValidateTaskTokenRequest {
                token,
                audience: AUDIENCE.into(),
                tool: "search".into(),
                presenter_certificate: Vec::new(),
            };
            assert!(validator.validate(request.clone()).await.unwrap().valid);
            let pid = Pid::from_raw(i32::try_from(runner.id()).unwrap());
            let killed = Instant::now();
            kill(pid, Signal::SIGKILL).unwrap();
            while validator.validate(request.clone()).await.unwrap().valid {
                assert!(killed.elapsed() < TIMEOUT, "the task outlived its owner");
            }
            samples.push(killed.elapsed());
            let _ = killpg(pid, Signal::SIGKILL);
            let _ = runner.wait();
        }
        samples.sort();
        samples
    }

    /// [`STREAM_PROCESSES`] processes, each with [`STREAMS_PER_PROCESS`]
    /// FetchX509SVID streams and its own SVID (a process-bound entry), on
    /// an agent issuing [`STREAM_TTL`] SVIDs; the agent's CPU each second.
    fn streams(dir: &Path) -> Streams {
        let exe = std::env::current_exe().unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        let agent = Agent::start_with(
            &dir.join("streams"),
            &format!("x509_svid_ttl = \"{}s\"", STREAM_TTL.as_secs()),
            &format!(
                r#"[[entries]]
spiffe_id = "spiffe://bench.local/streams"
selectors = ["unix:uid:{uid}", "unix:path:{}"]
process_bound = true
"#,
                exe.display()
            ),
        );
        let mut children = Vec::new();
        for _ in 0..STREAM_PROCESSES {
            children.push(
                Command::new(&exe)
                    .env(CHILD_STREAMS, STREAMS_PER_PROCESS.to_string())
                    .env(CHILD_SOCKET, &agent.socket)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap(),
            );
        }
        let mut outputs = Vec::new();
        for child in &mut children {
            let mut out = BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            assert_eq!(line.trim(), "ready", "a stream process did not start");
            outputs.push(out);
        }
        let mut cpu_per_second = Vec::new();
        let mut last = agent.cpu_time();
        let started = Instant::now();
        while started.elapsed() < STREAM_WINDOW {
            std::thread::sleep(Duration::from_secs(1));
            let now = agent.cpu_time();
            cpu_per_second.push((now - last).as_secs_f64());
            last = now;
        }
        let rss_kib = agent.rss_kib();
        let (mut pushes, mut rotations) = (0, 0);
        for child in &mut children {
            let stdin = child.stdin.as_mut().unwrap();
            stdin.write_all(b"report\n").unwrap();
            stdin.flush().unwrap();
        }
        for out in &mut outputs {
            let mut counts = String::new();
            out.read_line(&mut counts).unwrap();
            let (updates, rotated) = counts.trim().split_once(' ').unwrap();
            pushes += updates.parse::<u64>().unwrap();
            rotations += rotated.parse::<u64>().unwrap();
        }
        for child in &mut children {
            drop(child.stdin.take());
            child.wait().unwrap();
        }
        agent.stop();
        Streams {
            streams: STREAM_PROCESSES * STREAMS_PER_PROCESS,
            processes: STREAM_PROCESSES,
            ttl: STREAM_TTL,
            cpu_per_second,
            pushes,
            rotations,
            rss_kib,
        }
    }

    /// A stream process: opens `streams` FetchX509SVID streams on one
    /// connection, says `ready` once each has its first message, counts
    /// the updates after that, and prints the count when stdin closes.
    pub fn child(streams: usize) {
        let socket = std::env::var_os(CHILD_SOCKET).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut client = WorkloadClient::connect(Path::new(&socket), TIMEOUT)
                .await
                .unwrap();
            let updates = Arc::new(AtomicU64::new(0));
            let rotations = Arc::new(AtomicU64::new(0));
            for _ in 0..streams {
                let mut stream = client.fetch_x509_svid().await.unwrap();
                let first = client.first(&mut stream).await.unwrap().unwrap();
                let mut held = first.svids[0].x509_svid.clone();
                let (updates, rotations) = (Arc::clone(&updates), Arc::clone(&rotations));
                tokio::spawn(async move {
                    loop {
                        match stream.message().await {
                            Ok(Some(update)) => {
                                updates.fetch_add(1, Ordering::Relaxed);
                                // A new certificate of its own, not another
                                // change (a CRL, a bundle).
                                if update.svids[0].x509_svid != held {
                                    held = update.svids[0].x509_svid.clone();
                                    rotations.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Ok(None) => break,
                            Err(status) => {
                                eprintln!("stream ended: {status}");
                                break;
                            }
                        }
                    }
                });
            }
            println!("ready");
            std::io::stdout().flush().unwrap();
            // A line on stdin asks for the counts, before any stream
            // process exits (an exit changes every stream's CRL).
            tokio::task::spawn_blocking(|| {
                let mut line = String::new();
                let _ = std::io::stdin().read_line(&mut line);
            })
            .await
            .unwrap();
            println!(
                "{} {}",
                updates.load(Ordering::Relaxed),
                rotations.load(Ordering::Relaxed)
            );
            std::io::stdout().flush().unwrap();
            tokio::task::spawn_blocking(|| {
                let mut sink = Vec::new();
                let _ = std::io::stdin().read_to_end(&mut sink);
            })
            .await
            .unwrap();
        });
    }
}

// === the empty service ===

/// The floor under every operation: a unary gRPC call with an empty request
/// and response over a Unix socket, served by the same stack as the agent
/// (tonic, hyper, h2, tokio) with nothing behind it.
mod empty {
    use std::convert::Infallible;
    use std::path::{Path, PathBuf};
    use std::task::{Context, Poll};

    use tonic::body::Body;
    use tonic::codegen::{BoxFuture, Service, http};

    pub const PATH: &str = "/bench.Empty/Call";

    /// Serves the empty call on `dir/empty.sock` on `runtime`; the socket path.
    pub fn serve(runtime: &tokio::runtime::Runtime, dir: &Path) -> PathBuf {
        let path = dir.join("empty.sock");
        let listener = {
            let _guard = runtime.enter();
            tokio::net::UnixListener::bind(&path).unwrap()
        };
        runtime.spawn(
            tonic::transport::Server::builder()
                .add_service(Empty)
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
        );
        path
    }

    #[derive(Clone)]
    struct Empty;

    impl tonic::server::NamedService for Empty {
        const NAME: &'static str = "bench.Empty";
    }

    struct Call;

    impl tonic::server::UnaryService<()> for Call {
        type Response = ();
        type Future = BoxFuture<tonic::Response<()>, tonic::Status>;

        fn call(&mut self, _request: tonic::Request<()>) -> Self::Future {
            Box::pin(async { Ok(tonic::Response::new(())) })
        }
    }

    impl Service<http::Request<Body>> for Empty {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = BoxFuture<Self::Response, Self::Error>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<Body>) -> Self::Future {
            Box::pin(async move {
                let codec = tonic_prost::ProstCodec::<(), ()>::default();
                Ok(tonic::server::Grpc::new(codec).unary(Call, request).await)
            })
        }
    }
}

// === the report ===

#[allow(
    clippy::too_many_arguments,
    reason = "one call, each argument a section"
)]
fn report(
    args: &Args,
    cores: usize,
    limits: &Limits,
    rows: &[Row],
    attestations: &[(usize, f64, f64)],
    idle_rss_kib: u64,
    peak_rss_kib: u64,
    scale: Option<&scale::Scale>,
) -> String {
    let mut out = String::new();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let clients: Vec<String> = args.clients.iter().map(ToString::to_string).collect();
    let ops: Vec<&str> = args.ops.iter().map(|op| op.name()).collect();
    let _ = writeln!(out, "# tether benchmarks\n");
    let _ = writeln!(
        out,
        "Produced by `cargo bench --bench load -- --duration {} --clients {} --ops {}{} --write BENCHMARKS.md`.\n",
        humantime::format_duration(args.duration),
        clients.join(","),
        ops.join(","),
        if args.scale { " --scale" } else { "" },
    );
    let _ = writeln!(
        out,
        "Machine: {cores} cores ({cpu}), Linux. The agent is the release-profile `tether` binary \
         (a child process); the clients share its cores.\n"
    );
    let _ = writeln!(
        out,
        "## The limits of this machine (in-process, all cores)\n"
    );
    let _ = writeln!(out, "| limit | per second |\n| --- | ---: |");
    let _ = writeln!(
        out,
        "| ES256 sign (jsonwebtoken, aws-lc-rs) | {:.0} |",
        limits.sign
    );
    let _ = writeln!(out, "| ES256 verify | {:.0} |", limits.verify);
    let _ = writeln!(
        out,
        "| P-256 key generation + X.509 signing (rcgen) | {:.0} |\n",
        limits.keygen_x509
    );
    let _ = writeln!(out, "## Operations over the Unix socket\n");
    let _ = writeln!(
        out,
        "| operation | clients | per second | p50 | p99 | p99.9 | agent CPU / op | of its limit | agent alone | of the empty call | errors |"
    );
    let _ = writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for row in rows {
        let (limit, limit_name) = row.op.limit(limits);
        let of_limit = if limit.is_finite() {
            format!("{:.0}% of {limit_name}", 100.0 * row.ops_per_sec / limit)
        } else {
            "—".to_owned()
        };
        let empty = rows
            .iter()
            .find(|r| r.op == Op::Empty && r.clients == row.clients)
            .filter(|_| row.op != Op::Empty)
            .map_or_else(
                || "—".to_owned(),
                |empty| format!("{:.0}%", 100.0 * row.ops_per_sec / empty.ops_per_sec),
            );
        // What the agent's own CPU cost per operation would allow on all
        // cores, as a share of the limit: the clients' share of the cores
        // taken out.
        let alone = if limit.is_finite() && row.cpu_per_op > Duration::ZERO {
            let ceiling = cores as f64 / row.cpu_per_op.as_secs_f64();
            format!("{:.0}%", 100.0 * ceiling / limit)
        } else {
            "—".to_owned()
        };
        let cpu = if row.op == Op::Empty {
            "—".to_owned()
        } else {
            micros(row.cpu_per_op)
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.op.describe(),
            row.clients,
            row.ops_per_sec,
            micros(row.p50),
            micros(row.p99),
            micros(row.p999),
            cpu,
            of_limit,
            alone,
            empty,
            row.errors,
        );
    }
    if !attestations.is_empty() {
        let _ = writeln!(
            out,
            "\nA new connection's attestation (hash cached), as the agent timed it \
             (`tether_attestation_seconds`; upper bounds of its power-of-two buckets):\n"
        );
        let _ = writeln!(
            out,
            "| clients | p50 at most | p99 at most |\n| ---: | ---: | ---: |"
        );
        for (clients, p50, p99) in attestations {
            let bound = |s: f64| {
                if s.is_finite() {
                    micros(Duration::from_secs_f64(s))
                } else {
                    "over the last bucket".to_owned()
                }
            };
            let _ = writeln!(out, "| {clients} | {} | {} |", bound(*p50), bound(*p99));
        }
    }
    let _ = writeln!(
        out,
        "\nAgent memory: {:.1} MiB resident when idle (after start), {:.1} MiB at its peak during the run.",
        idle_rss_kib as f64 / 1024.0,
        peak_rss_kib as f64 / 1024.0
    );
    if let Some(scale) = scale {
        scale_report(&mut out, scale);
    }
    out
}

fn scale_report(out: &mut String, scale: &scale::Scale) {
    let mib = |kib: u64| kib as f64 / 1024.0;
    let _ = writeln!(out, "\n## At scale\n");
    let _ = writeln!(
        out,
        "Live tasks (each begun over the socket, stored and watched; one owner process):\n"
    );
    let _ = writeln!(
        out,
        "| live tasks | agent RSS | BeginTask/s getting there |"
    );
    let _ = writeln!(out, "| ---: | ---: | ---: |");
    let _ = writeln!(out, "| 0 | {:.1} MiB | — |", mib(scale.idle_rss_kib));
    for (live, rss, rate) in &scale.tasks {
        let _ = writeln!(out, "| {live} | {:.1} MiB | {rate:.0} |", mib(*rss));
    }
    let at = |q: f64| {
        let n = scale.revocation.len();
        scale
            .revocation
            .get(((n as f64 * q) as usize).min(n.saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let _ = writeln!(
        out,
        "\nRevocation: a `tether task run` owning a task is killed (SIGKILL) and the \
         task's token is validated in a loop until refused, with 100,000 other tasks live; \
         {} samples: p50 {}, p99 {}, max {}.",
        scale.revocation.len(),
        micros(at(0.5)),
        micros(at(0.99)),
        micros(scale.revocation.last().copied().unwrap_or_default()),
    );
    let streams = &scale.streams;
    let mut cpu = streams.cpu_per_second.clone();
    cpu.sort_by(f64::total_cmp);
    let pct = |q: f64| {
        cpu.get(((cpu.len() as f64 * q) as usize).min(cpu.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
            * 100.0
    };
    let mean = cpu.iter().sum::<f64>() / cpu.len().max(1) as f64 * 100.0;
    let _ = writeln!(
        out,
        "\nX.509 streams: {} FetchX509SVID streams from {} processes, each process with its \
         own SVID (a process-bound entry) living {}, watched for {} seconds (each SVID rotates \
         at about half its life, jittered by ±10% of that): {} updates pushed, {} of them a \
         rotated SVID (a stream sees each of its process's rotations once); agent RSS {:.1} MiB; \
         agent CPU per second (100% = one core): mean {mean:.1}%, median {:.1}%, max {:.1}%.",
        streams.streams,
        streams.processes,
        humantime::format_duration(streams.ttl),
        streams.cpu_per_second.len(),
        streams.pushes,
        streams.rotations,
        mib(streams.rss_kib),
        pct(0.5),
        pct(1.0),
    );
    let seconds: Vec<String> = streams
        .cpu_per_second
        .iter()
        .map(|c| format!("{:.0}", c * 100.0))
        .collect();
    let _ = writeln!(out, "\nCPU % each second: {}.", seconds.join(" "));
}

/// Per-bucket counts added between two scrapes of a cumulative histogram.
fn bucket_diff(before: &[(f64, u64)], after: &[(f64, u64)]) -> Vec<(f64, u64)> {
    after
        .iter()
        .map(|&(le, n)| {
            let was = before.iter().find(|(b, _)| *b == le).map_or(0, |(_, n)| *n);
            (le, n.saturating_sub(was))
        })
        .collect()
}

/// The upper bound of the bucket holding quantile `q` of a cumulative histogram.
fn bucket_quantile(buckets: &[(f64, u64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0, |(_, n)| *n);
    let want = (total as f64 * q).ceil() as u64;
    buckets
        .iter()
        .find(|(_, n)| *n >= want.max(1))
        .map_or(f64::NAN, |(le, _)| *le)
}

fn micros(d: Duration) -> String {
    if d >= Duration::from_millis(10) {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{} µs", d.as_micros())
    }
}
