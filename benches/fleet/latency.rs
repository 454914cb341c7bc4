//! The per-request comparisons: N clients, one Unix-socket connection each,
//! repeat one operation against one agent for a fixed time; the same
//! operations run against a standalone agent and a fleet agent.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tether::client::task::TaskClient;
use tether::client::workload::WorkloadClient;
use tether::proto::task as task_pb;
use tether::proto::workload as wl;

use crate::processes::TIMEOUT;
use crate::stats::Summary;
use crate::topology::{AUDIENCE, TRUST_DOMAIN, WORKLOAD_ID};

/// One operation a client repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// FetchJWTSVID, the same audience every time (served from the agent's
    /// JWT-SVID cache after the first).
    WarmJwt,
    /// FetchJWTSVID, a new audience every time: a signature each (in fleet
    /// mode, a round trip to the server).
    ColdJwt,
    /// BeginTask (the task token signed; in fleet mode by the server).
    /// Only BeginTask is timed; the EndTask after it is not.
    BeginTask,
}

impl Op {
    /// Every operation, in report order.
    pub const ALL: [Op; 3] = [Op::WarmJwt, Op::ColdJwt, Op::BeginTask];

    /// The name `--ops` takes.
    pub fn name(self) -> &'static str {
        match self {
            Op::WarmJwt => "warm_jwt",
            Op::ColdJwt => "cold_jwt",
            Op::BeginTask => "begin_task",
        }
    }

    /// Whether the operation signs each time, and so in fleet mode is
    /// charged against the node's request budget at the server (50 a
    /// second after a burst of 500, `server::node_api::rate`): run paced.
    pub fn is_paced(self) -> bool {
        matches!(self, Op::ColdJwt | Op::BeginTask)
    }

    /// What the report calls it.
    pub fn describe(self) -> &'static str {
        match self {
            Op::WarmJwt => "FetchJWTSVID, warm cache (same audience)",
            Op::ColdJwt => "FetchJWTSVID, cold (a new audience each call)",
            Op::BeginTask => "BeginTask (EndTask after it, not timed)",
        }
    }
}

/// A client of the benchmark that repeats one operation.
pub trait Repeat: Send + 'static {
    /// One operation: how long it took, or `None` when it failed.
    fn once(&mut self) -> impl Future<Output = Option<Duration>> + Send;
}

/// Runs `op` from `clients` clients against the agent on `socket` for
/// `duration`; every client connects (and, for the warm cache, fetches
/// once) before the clock starts. `pace` as in [`drive`].
pub async fn run(
    op: Op,
    clients: usize,
    duration: Duration,
    pace: Option<f64>,
    socket: &Path,
) -> Summary {
    let mut prepared = Vec::with_capacity(clients);
    for _ in 0..clients {
        prepared.push(OpClient {
            client: Client::prepare(op, socket).await,
            op,
        });
    }
    drive(prepared, duration, pace).await
}

/// Runs every client of `prepared` for `duration`, each repeating its
/// operation. With `pace` (calls per second, all clients together), each
/// client starts its calls on a fixed schedule, the clients staggered,
/// instead of one after another as fast as they can; a late call starts
/// the next at once, without catching up.
pub async fn drive<C: Repeat>(prepared: Vec<C>, duration: Duration, pace: Option<f64>) -> Summary {
    let clients = prepared.len().max(1);
    let interval = pace
        .filter(|rate| *rate > 0.0)
        .map(|rate| Duration::from_secs_f64(clients as f64 / rate));
    let start = Instant::now() + Duration::from_millis(50);
    let mut workers = Vec::with_capacity(clients);
    for (index, mut client) in prepared.into_iter().enumerate() {
        let offset = interval.map_or(Duration::ZERO, |each| {
            each.mul_f64(index as f64 / clients as f64)
        });
        workers.push(tokio::spawn(async move {
            let mut next = start + offset;
            let (mut latencies, mut errors) = (Vec::new(), 0usize);
            loop {
                tokio::time::sleep_until(next.into()).await;
                if start.elapsed() >= duration {
                    break;
                }
                if let Some(each) = interval {
                    next = (next + each).max(Instant::now());
                }
                match client.once().await {
                    Some(took) => latencies.push(took),
                    None => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for worker in workers {
        let (mine, failed) = worker.await.expect("a client's loop ends");
        latencies.extend(mine);
        errors += failed;
    }
    Summary::of(latencies, errors, duration)
}

/// A new audience, never asked for before in this process.
fn fresh_audience() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "spiffe://{TRUST_DOMAIN}/cold/{}",
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn jwt_request(audience: String) -> wl::JwtsvidRequest {
    wl::JwtsvidRequest {
        audience: vec![audience],
        spiffe_id: WORKLOAD_ID.into(),
    }
}

/// A [`Client`] and the operation it repeats.
struct OpClient {
    client: Client,
    op: Op,
}

impl Repeat for OpClient {
    fn once(&mut self) -> impl Future<Output = Option<Duration>> + Send {
        self.client.once(self.op)
    }
}

/// One client: its connections to the Workload and Task APIs.
struct Client {
    workload: WorkloadClient,
    tasks: TaskClient,
}

impl Client {
    async fn prepare(op: Op, socket: &Path) -> Self {
        let mut workload = WorkloadClient::connect(socket, TIMEOUT)
            .await
            .expect("a client connects to the workload socket");
        let tasks = TaskClient::connect(socket, TIMEOUT)
            .await
            .expect("a client connects for the Task API");
        if op == Op::WarmJwt {
            workload
                .fetch_jwt_svid(jwt_request(AUDIENCE.into()))
                .await
                .expect("the first JWT-SVID (warms the cache)");
        }
        Self { workload, tasks }
    }

    /// One operation: how long it took, or `None` when it failed.
    async fn once(&mut self, op: Op) -> Option<Duration> {
        let began = Instant::now();
        match op {
            Op::WarmJwt => self
                .workload
                .fetch_jwt_svid(jwt_request(AUDIENCE.into()))
                .await
                .ok()
                .map(|_| began.elapsed()),
            Op::ColdJwt => self
                .workload
                .fetch_jwt_svid(jwt_request(fresh_audience()))
                .await
                .ok()
                .map(|_| began.elapsed()),
            Op::BeginTask => {
                let begun = self.tasks.begin(begin_request()).await.ok()?;
                let took = began.elapsed();
                self.tasks.end(begun.task_id).await.ok()?;
                Some(took)
            }
        }
    }
}

/// The BeginTask of every task the benchmark begins: [`AUDIENCE`], tools
/// `search` and `read`, ten minutes.
pub fn begin_request() -> task_pb::BeginTaskRequest {
    task_pb::BeginTaskRequest {
        audience: AUDIENCE.into(),
        intent: "benchmark".into(),
        tools: vec!["search".into(), "read".into()],
        ttl_ms: 600_000,
        ..task_pb::BeginTaskRequest::default()
    }
}
