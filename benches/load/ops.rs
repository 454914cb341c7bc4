//! The operations a client repeats, and the loop that runs N clients, one
//! connection each, for a duration: latencies, throughput, errors.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tether::client::task::TaskClient;
use tether::client::workload::WorkloadClient;
use tether::proto::task as task_pb;
use tether::proto::workload as wl;

use crate::limits::Limits;
use crate::{AUDIENCE, TIMEOUT, Targets, empty};

/// One operation a client repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
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
    pub(crate) const ALL: [Op; 12] = [
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
    pub(crate) const MAX_PROCESS_CLIENTS: usize = 16;

    pub(crate) fn spawns_processes(self) -> bool {
        matches!(self, Op::ProcessCached | Op::ProcessCold | Op::ProcessBound)
    }

    pub(crate) fn name(self) -> &'static str {
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

    pub(crate) fn describe(self) -> &'static str {
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
    pub(crate) fn limit(self, limits: &Limits) -> (f64, &'static str) {
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

pub(crate) struct Row {
    pub(crate) op: Op,
    pub(crate) clients: usize,
    pub(crate) ops_per_sec: f64,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    pub(crate) p999: Duration,
    pub(crate) errors: usize,
    pub(crate) cpu_per_op: Duration,
}

pub(crate) async fn run(op: Op, clients: usize, duration: Duration, targets: &Targets) -> Row {
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
pub(crate) struct Client {
    pub(crate) workload: WorkloadClient,
    pub(crate) tasks: TaskClient,
    /// A connection to the empty service.
    pub(crate) empty: Option<tonic::client::Grpc<tonic::transport::Channel>>,
    /// A JWT-SVID to validate, or a task token to validate or exchange.
    pub(crate) token: String,
    /// The task it holds, if any.
    pub(crate) task_id: Option<String>,
}

impl Client {
    pub(crate) async fn prepare(op: Op, targets: &Targets) -> Self {
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
    pub(crate) async fn once(
        &mut self,
        op: Op,
        socket: &Path,
        work: &Path,
        bound: &Path,
    ) -> Option<Duration> {
        match op {
            Op::ProcessCached => {
                return spawn_fetch(env!("CARGO_BIN_EXE_tether").as_ref(), socket).await;
            }
            Op::ProcessBound => return spawn_fetch_x509(bound, socket).await,
            Op::ProcessCold => {
                // A copy is a new inode: its hash is not cached. Made before
                // the clock starts.
                pub(crate) static COPIES: AtomicU64 = AtomicU64::new(0);
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
    pub(crate) async fn once_in_process(&mut self, op: Op, socket: &Path) -> bool {
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

    pub(crate) async fn finish(mut self) {
        if let Some(id) = self.task_id.take() {
            let _ = self.tasks.end(id).await;
        }
    }
}

/// Runs `tether api fetch jwt` as a new process; how long it took, or
/// `None` when it failed.
pub(crate) async fn spawn_fetch(exe: &Path, socket: &Path) -> Option<Duration> {
    let args = ["fetch", "jwt", "--token-only", "--audience", AUDIENCE];
    spawn_api(exe, &args, socket).await
}

/// Runs `tether api fetch x509` as a new process (the first message of
/// FetchX509SVID, then it exits); how long it took, or `None` when it
/// failed.
pub(crate) async fn spawn_fetch_x509(exe: &Path, socket: &Path) -> Option<Duration> {
    spawn_api(exe, &["fetch", "x509"], socket).await
}

/// Runs `tether api <args> --socket <socket>` as a new process; how long it
/// took, or `None` when it failed.
pub(crate) async fn spawn_api(exe: &Path, args: &[&str], socket: &Path) -> Option<Duration> {
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

pub(crate) fn begin_request() -> task_pb::BeginTaskRequest {
    task_pb::BeginTaskRequest {
        audience: AUDIENCE.into(),
        intent: "benchmark".into(),
        tools: vec!["search".into(), "read".into()],
        ttl_ms: 600_000,
        ..task_pb::BeginTaskRequest::default()
    }
}
