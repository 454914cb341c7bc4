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
use std::time::{Duration, Instant};

use tether::cli::task_client::TaskClient;
use tether::cli::workload_client::WorkloadClient;
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
}

impl Op {
    const ALL: [Op; 7] = [
        Op::FetchJwt,
        Op::ValidateJwt,
        Op::BeginEnd,
        Op::ValidateTask,
        Op::Exchange,
        Op::X509First,
        Op::NewConnection,
    ];

    fn name(self) -> &'static str {
        match self {
            Op::FetchJwt => "fetch_jwt",
            Op::ValidateJwt => "validate_jwt",
            Op::BeginEnd => "begin_end",
            Op::ValidateTask => "validate_task",
            Op::Exchange => "exchange",
            Op::X509First => "x509_first",
            Op::NewConnection => "new_connection",
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
        }
    }

    /// The limit this operation is bound by, and its name.
    fn limit(self, limits: &Limits) -> (f64, &'static str) {
        match self {
            Op::FetchJwt | Op::Exchange | Op::NewConnection => (limits.sign, "ES256 sign"),
            Op::BeginEnd => (limits.sign, "ES256 sign"),
            Op::ValidateJwt | Op::ValidateTask => (limits.verify, "ES256 verify"),
            Op::X509First => (limits.keygen_x509, "P-256 keygen + X.509 sign"),
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
    let args = parse_args();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    eprintln!("measuring this machine's limits ({cores} cores)...");
    let limits = measure_limits(cores, Duration::from_secs(1));
    eprintln!("{limits:?}");

    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let idle_rss = agent.rss_kib();
    let mut rows = Vec::new();
    for &op in &args.ops {
        for &clients in &args.clients {
            let cpu_before = agent.cpu_time();
            let row = runtime.block_on(run(op, clients, args.duration, &agent.socket));
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

    let report = report(&args, cores, &limits, &rows, idle_rss, peak_rss);
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
}

impl Agent {
    fn start(dir: &Path) -> Self {
        let uid = nix::unistd::geteuid().as_raw();
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                r#"trust_domain = "bench.local"
socket_path = "{socket}"
admin_socket_path = "{admin}"
data_dir = "{data}"
log.level = "warn"

[tasks]
max_tasks_per_process = 100000

[limits]
max_connections = 8192

[[entries]]
spiffe_id = "spiffe://bench.local/agent"
selectors = ["unix:uid:{uid}"]

[[entries]]
spiffe_id = "{AUDIENCE}"
selectors = ["unix:uid:{uid}"]
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
        Self { child, socket }
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

async fn run(op: Op, clients: usize, duration: Duration, socket: &Path) -> Row {
    let mut workers = Vec::new();
    // Every client connects and prepares before the clock starts.
    let mut prepared = Vec::new();
    for _ in 0..clients {
        prepared.push(Client::prepare(op, socket).await);
    }
    let start = Instant::now() + Duration::from_millis(50);
    let socket = socket.to_owned();
    for mut client in prepared {
        let socket = socket.clone();
        workers.push(tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            let mut latencies = Vec::new();
            let mut errors = 0usize;
            while start.elapsed() < duration {
                let began = Instant::now();
                if client.once(op, &socket).await {
                    latencies.push(began.elapsed());
                } else {
                    errors += 1;
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
    /// A JWT-SVID to validate, or a task token to validate or exchange.
    token: String,
    /// The task it holds, if any.
    task_id: Option<String>,
}

impl Client {
    async fn prepare(op: Op, socket: &Path) -> Self {
        let mut workload = WorkloadClient::connect(socket, TIMEOUT).await.unwrap();
        let mut tasks = TaskClient::connect(socket, TIMEOUT).await.unwrap();
        let mut client_token = String::new();
        let mut task_id = None;
        match op {
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
            token: client_token,
            task_id,
        }
    }

    /// One operation; true when it succeeded.
    async fn once(&mut self, op: Op, socket: &Path) -> bool {
        match op {
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

fn begin_request() -> task_pb::BeginTaskRequest {
    task_pb::BeginTaskRequest {
        audience: AUDIENCE.into(),
        intent: "benchmark".into(),
        tools: vec!["search".into(), "read".into()],
        ttl_ms: 600_000,
        ..task_pb::BeginTaskRequest::default()
    }
}

// === the report ===

fn report(
    args: &Args,
    cores: usize,
    limits: &Limits,
    rows: &[Row],
    idle_rss_kib: u64,
    peak_rss_kib: u64,
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
        "Produced by `cargo bench --bench load -- --duration {} --clients {} --ops {} --write BENCHMARKS.md`.\n",
        humantime::format_duration(args.duration),
        clients.join(","),
        ops.join(","),
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
        "| operation | clients | per second | p50 | p99 | p99.9 | agent CPU / op | of its limit | errors |"
    );
    let _ = writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for row in rows {
        let (limit, limit_name) = row.op.limit(limits);
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {:.0}% of {} | {} |",
            row.op.describe(),
            row.clients,
            row.ops_per_sec,
            micros(row.p50),
            micros(row.p99),
            micros(row.p999),
            micros(row.cpu_per_op),
            100.0 * row.ops_per_sec / limit,
            limit_name,
            row.errors,
        );
    }
    let _ = writeln!(
        out,
        "\nAgent memory: {:.1} MiB resident when idle (after start), {:.1} MiB at its peak during the run.",
        idle_rss_kib as f64 / 1024.0,
        peak_rss_kib as f64 / 1024.0
    );
    out
}

fn micros(d: Duration) -> String {
    if d >= Duration::from_millis(10) {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{} µs", d.as_micros())
    }
}
