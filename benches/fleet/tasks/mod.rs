//! Tasks across the fleet (issue 18, "Performance"): one `tether server`
//! (SQLite store) and `--nodes` agents in fleet mode, each a release
//! `tether run` on loopback as in [`crate::topology`], one entry for the
//! benchmark's uid served on every node, and `--live-tasks` live tasks
//! begun through the agents' Task API and spread evenly over the nodes.
//! On that fleet, in order:
//!
//! 1. cross-node revocation latency ([`revocation`]): a task of node A
//!    ends, by its owner's EndTask or by its owner process killed, and
//!    node B is polled with ValidateTaskToken until it refuses the task's
//!    token;
//! 2. validation cost ([`validation`]): ValidateTaskToken on node B of
//!    B's own task's token against another node's, with the clients of
//!    [`crate::latency::drive`];
//! 3. the cost of ends ([`ends`]): the live tasks ended at `--ends-rate` a
//!    second across every node but the last, the server's CPU and memory
//!    and each agent's CPU over the run (the last node only applies the
//!    ends it is sent).
//!
//! The server's per-node request budget is raised (its
//! `node_requests_per_second` and `node_request_burst`) so that beginning
//! the tasks measures the paths, not the budget.

mod ends;
pub mod report;
mod revocation;
mod validation;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tether::client::task::TaskClient;
use tether::proto::task as task_pb;

use crate::latency::begin_request;
use crate::processes::TIMEOUT;
use crate::topology::{AUDIENCE, Agent, Mode, Server, WORKLOAD_ID};

pub use ends::Load;
pub use revocation::Samples;
pub use validation::{Row, Whose};

/// The server's settings: budgets no benchmark client reaches.
const SERVER_SETTINGS: &str = "node_requests_per_second = 1000000\nnode_request_burst = 1000000\n";
/// The lifetime of every task the benchmark begins (the agents' default
/// `tasks.max_ttl`), so none reaches its deadline during the run.
const TASK_TTL_MS: u64 = 3_600_000;
/// Clients beginning the live tasks on each node at once.
pub const FILL_CLIENTS_PER_NODE: usize = 4;
/// The tool every validation asks about (one of [`begin_request`]'s).
pub const TOOL: &str = "search";

/// The task part's command line.
#[derive(Debug, Clone)]
pub struct TaskArgs {
    /// Agents in fleet mode.
    pub nodes: usize,
    /// Live tasks begun before the measurements, spread over the nodes.
    pub live_tasks: usize,
    /// Revocation samples ended by the owner's EndTask.
    pub end_samples: usize,
    /// Revocation samples ended by killing the owner process.
    pub kill_samples: usize,
    /// The pause between two ValidateTaskToken polls of node B.
    pub poll: Duration,
    /// Ends a second of the cost part, all nodes together.
    pub ends_rate: f64,
    /// How long the cost part runs at most (the live tasks of the ending
    /// nodes bound it too).
    pub ends_for: Duration,
}

impl Default for TaskArgs {
    fn default() -> Self {
        Self {
            nodes: 10,
            live_tasks: 10_000,
            end_samples: 200,
            kill_samples: 50,
            poll: Duration::from_millis(1),
            ends_rate: 1000.0,
            ends_for: Duration::from_secs(10),
        }
    }
}

/// Everything the task part measured.
#[derive(Debug)]
pub struct Results {
    /// Beginning the live tasks.
    pub fill: Fill,
    /// Revocation after the owner's EndTask.
    pub end_task: Samples,
    /// Revocation after the owner process was killed.
    pub kill: Samples,
    /// Validation on node B, own and foreign tasks.
    pub validation: Vec<Row>,
    /// Ends at a pace: what they cost.
    pub ends: Load,
}

/// Beginning the live tasks.
#[derive(Debug, Clone, Copy)]
pub struct Fill {
    /// Tasks begun.
    pub begun: usize,
    /// How long it took.
    pub wall: Duration,
    /// The server's CPU time over it.
    pub server_cpu: Duration,
    /// Every agent's CPU time over it, summed.
    pub agents_cpu: Duration,
    /// The server's resident memory before and after, KiB.
    pub server_rss_kib: (u64, u64),
}

/// A live task: its id and its first token.
#[derive(Debug, Clone)]
pub struct Live {
    /// The task id (`txn`).
    pub id: String,
    /// The token BeginTask returned.
    pub token: String,
}

/// One server and its nodes.
#[derive(Debug)]
pub struct TaskFleet {
    /// The server.
    pub server: Server,
    /// The agents, node `node-00` first.
    pub agents: Vec<Agent>,
    /// Where the processes keep their files.
    pub dir: PathBuf,
}

impl TaskFleet {
    /// Starts the server and `nodes` agents in `dir`; returns once every
    /// agent has synced.
    pub fn start(runtime: &tokio::runtime::Runtime, dir: &Path, nodes: usize) -> Self {
        assert!(nodes >= 2, "--nodes: at least two (an owner's and another)");
        let server = Server::start_with(&dir.join("server"), SERVER_SETTINGS, "");
        let names: Vec<String> = (0..nodes).map(|i| format!("node-{i:02}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        server.create_entry_on(WORKLOAD_ID, &refs);
        let bundle = server.bootstrap_bundle();
        let mut agents = Vec::with_capacity(nodes);
        for node in &names {
            let token = server.join_token(node);
            agents.push(Agent::spawn(
                &dir.join(node),
                Mode::Fleet {
                    server: &server,
                    bundle: &bundle,
                    join_token: &token,
                },
            ));
        }
        runtime.block_on(async {
            for agent in &mut agents {
                agent.until_synced().await;
            }
        });
        Self {
            server,
            agents,
            dir: dir.to_owned(),
        }
    }

    /// A Task API client of node `node`.
    pub async fn client(&self, node: usize) -> TaskClient {
        TaskClient::connect(&self.agents[node].socket, TIMEOUT)
            .await
            .expect("a client connects to an agent's socket")
    }

    /// Begins `total` tasks, spread evenly over the nodes; each node's in
    /// the result's slot of that node.
    pub async fn fill(&self, total: usize) -> (Vec<Vec<Live>>, Fill) {
        let nodes = self.agents.len();
        let server_before = self.server.process.cpu_time();
        let rss_before = self.server.process.rss_kib();
        let agents_before = self.agents_cpu();
        let started = Instant::now();
        let mut workers = Vec::new();
        for node in 0..nodes {
            let on_node = total / nodes + usize::from(node < total % nodes);
            for worker in 0..FILL_CLIENTS_PER_NODE {
                let mine = on_node / FILL_CLIENTS_PER_NODE
                    + usize::from(worker < on_node % FILL_CLIENTS_PER_NODE);
                let mut client = self.client(node).await;
                workers.push(tokio::spawn(async move {
                    let mut begun = Vec::with_capacity(mine);
                    for _ in 0..mine {
                        begun.push(begin(&mut client).await);
                    }
                    (node, begun)
                }));
            }
        }
        let mut live = vec![Vec::new(); nodes];
        for worker in workers {
            let (node, begun) = worker.await.expect("a filling client ends");
            live[node].extend(begun);
        }
        let fill = Fill {
            begun: live.iter().map(Vec::len).sum(),
            wall: started.elapsed(),
            server_cpu: self.server.process.cpu_time().saturating_sub(server_before),
            agents_cpu: self.agents_cpu().saturating_sub(agents_before),
            server_rss_kib: (rss_before, self.server.process.rss_kib()),
        };
        eprintln!(
            "tasks: {} begun on {nodes} nodes in {:?} (server CPU {:?})",
            fill.begun, fill.wall, fill.server_cpu
        );
        (live, fill)
    }

    /// Every agent's CPU time so far, summed.
    pub fn agents_cpu(&self) -> Duration {
        self.agents.iter().map(|a| a.process.cpu_time()).sum()
    }

    /// Stops every process.
    pub fn stop(self) {
        for agent in self.agents {
            agent.process.stop();
        }
        self.server.process.stop();
    }
}

/// Begins one task of the benchmark's through `client`.
pub async fn begin(client: &mut TaskClient) -> Live {
    let begun = client
        .begin(task_pb::BeginTaskRequest {
            ttl_ms: TASK_TTL_MS,
            ..begin_request()
        })
        .await
        .expect("BeginTask succeeds");
    Live {
        token: begun.token.expect("BeginTask answers with a token").token,
        id: begun.task_id,
    }
}

/// The ValidateTaskToken of every measurement: [`AUDIENCE`], [`TOOL`].
pub fn validate_request(token: &str) -> task_pb::ValidateTaskTokenRequest {
    task_pb::ValidateTaskTokenRequest {
        token: token.to_owned(),
        audience: AUDIENCE.into(),
        tool: TOOL.into(),
        ..task_pb::ValidateTaskTokenRequest::default()
    }
}

/// Runs the whole task part in `dir`.
pub fn run(
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    args: &TaskArgs,
    clients: &[usize],
    duration: Duration,
) -> Results {
    let fleet = TaskFleet::start(runtime, dir, args.nodes);
    eprintln!("tasks: {} agents synced", args.nodes);
    let (live, fill) = runtime.block_on(fleet.fill(args.live_tasks));
    let end_task = runtime.block_on(revocation::by_end_task(&fleet, args.end_samples, args.poll));
    eprintln!("tasks: EndTask samples {}", end_task.line());
    let kill = runtime.block_on(revocation::by_kill(&fleet, args.kill_samples, args.poll));
    eprintln!("tasks: owner-killed samples {}", kill.line());
    let validation = runtime.block_on(validation::run(&fleet, clients, duration));
    let ends = runtime.block_on(ends::run(&fleet, live, args.ends_rate, args.ends_for));
    fleet.stop();
    Results {
        fill,
        end_task,
        kill,
        validation,
        ends,
    }
}
