//! The fleet's benchmark (issue 17, "Performance"): a real `tether server`
//! and agents in fleet mode (the release `tether` binary, child
//! processes, on loopback), each figure beside the same run's standalone
//! agent.
//!
//! ```text
//! cargo bench --bench fleet -- [--duration 5s] [--clients 1,16] [--ops warm_jwt,cold_jwt,begin_task]
//!                              [--paced 40] [--agents 100] [--key-ttl 2m] [--write FILE] [--keep]
//! ```
//!
//! 1. FetchJWTSVID with a warm JWT-SVID cache (the same audience), on a
//!    fleet agent and on a standalone agent (whose cache is warm too);
//! 2. FetchJWTSVID cold (a new audience each call: a signature each, in
//!    fleet mode a round trip to the server);
//! 3. BeginTask (the task token signed; in fleet mode by the server);
//!    2 and 3 run paced, `--paced` calls a second from all clients together
//!    (default 40), under the server's budget per node (50 a second after
//!    a burst of 500): unpaced, a fleet agent's clients are refused by the
//!    budget, and the run measures the refusals, not the round trip
//!    (`--paced 0` does that);
//! 4. one server with `--agents` agent processes: the server's CPU and
//!    memory while they attest and sync, at steady state, and around a key
//!    rotation (`--key-ttl` is the server's `ca_ttl` and `jwt_key_ttl`;
//!    `--agents 0` skips this part).
//!
//! With `--tasks`, the benchmark runs only the task part instead (issue
//! 18, "Performance"; [`tasks`]): `--nodes` agents and `--live-tasks`
//! live tasks, cross-node revocation latency (`--end-samples` ended by
//! EndTask, `--kill-samples` by killing the owner, node B polled every
//! `--poll`), validation of another node's task token against a local
//! one (`--duration`, `--clients`), and what `--ends-rate` ends a second
//! cost the server and the agents (for at most `--ends-for`):
//!
//! ```text
//! cargo bench --bench fleet -- --tasks [--nodes 10] [--live-tasks 10000] [--end-samples 200]
//!                              [--kill-samples 50] [--poll 1ms] [--ends-rate 1000] [--ends-for 10s]
//!                              [--duration 5s] [--clients 1,16] [--write FILE] [--keep]
//! ```
//!
//! The report (markdown, for BENCHMARKS.md) goes to stdout, and to
//! `--write FILE` when given. `--keep` keeps the processes' directories
//! (configs, logs, audit trails) and prints where they are.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a benchmark fails by panicking"
)]

mod latency;
mod many_agents;
mod processes;
mod report;
mod stats;
mod tasks;
mod topology;

use std::path::PathBuf;
use std::time::Duration;

use latency::Op;
use processes::{Process, load_average};
use stats::Summary;
use topology::{Agent, Mode, Server, WORKLOAD_ID, standalone_entries};

/// What the command line asks for.
#[derive(Debug)]
pub struct Args {
    /// How long each operation runs at each client count.
    pub duration: Duration,
    /// Client counts.
    pub clients: Vec<usize>,
    /// Operations.
    pub ops: Vec<Op>,
    /// Agents of the many-agents part (0: skip it).
    pub agents: usize,
    /// The server's key lifetime in the many-agents part.
    pub key_ttl: Duration,
    /// Calls per second (all clients together) of the operations that
    /// sign each time; 0: as fast as the clients can.
    pub paced: f64,
    /// Where to write the report.
    pub write: Option<PathBuf>,
    /// Keep the processes' directories (configs, logs, audit trails).
    pub keep: bool,
    /// Run the task part (issue 18) instead of the rest.
    pub tasks: bool,
    /// The task part's settings.
    pub task_args: tasks::TaskArgs,
}

/// One operation at one client count, on both kinds of agent.
#[derive(Debug)]
pub struct Pair {
    /// The operation.
    pub op: Op,
    /// Concurrent clients.
    pub clients: usize,
    /// On the standalone agent.
    pub standalone: Measured,
    /// On the fleet agent.
    pub fleet: Measured,
}

/// One run and what it cost each process.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    /// Throughput and latency.
    pub summary: Summary,
    /// The agent's CPU time per successful operation.
    pub agent_cpu_per_op: Duration,
    /// The server's CPU time per successful operation (fleet only).
    pub server_cpu_per_op: Option<Duration>,
}

fn main() {
    let args = parse_args();
    let load_before = load_average();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    if args.tasks {
        let results = tasks::run(
            &runtime,
            &dir.path().join("tasks"),
            &args.task_args,
            &args.clients,
            args.duration,
        );
        let load_after = load_average();
        let text = tasks::report::render(
            &args.task_args,
            args.duration,
            &args.clients,
            &results,
            (&load_before, &load_after),
        );
        finish(&args, &text, dir);
        return;
    }

    let standalone = Agent::spawn(
        &dir.path().join("standalone"),
        Mode::Standalone {
            entries: &standalone_entries(),
        },
    );
    let server = Server::start(&dir.path().join("server"), "");
    server.create_entry(WORKLOAD_ID, "node-bench");
    let token = server.join_token("node-bench");
    let bundle = server.bootstrap_bundle();
    let mut fleet = Agent::spawn(
        &dir.path().join("fleet"),
        Mode::Fleet {
            server: &server,
            bundle: &bundle,
            join_token: &token,
        },
    );
    runtime.block_on(fleet.until_synced());

    let mut pairs = Vec::new();
    for &op in &args.ops {
        for &clients in &args.clients {
            let on_standalone = measure(&runtime, op, clients, &args, &standalone, None);
            let on_fleet = measure(&runtime, op, clients, &args, &fleet, Some(&server.process));
            eprintln!(
                "{:<10} {clients:>4} clients: standalone {:>7.0}/s p50 {:?} p99 {:?} | fleet {:>7.0}/s p50 {:?} p99 {:?}",
                op.name(),
                on_standalone.summary.per_second,
                on_standalone.summary.p50,
                on_standalone.summary.p99,
                on_fleet.summary.per_second,
                on_fleet.summary.p50,
                on_fleet.summary.p99,
            );
            pairs.push(Pair {
                op,
                clients,
                standalone: on_standalone,
                fleet: on_fleet,
            });
        }
    }
    let rss = report::Memory {
        standalone_kib: standalone.process.peak_rss_kib(),
        fleet_kib: fleet.process.peak_rss_kib(),
        server_kib: server.process.peak_rss_kib(),
    };
    fleet.process.stop();
    server.process.stop();
    standalone.process.stop();

    let many = (args.agents > 0).then(|| {
        many_agents::run(
            &runtime,
            &dir.path().join("many"),
            args.agents,
            args.key_ttl,
            Duration::from_secs(15),
        )
    });
    let load_after = load_average();
    let text = report::render(
        &args,
        &pairs,
        &rss,
        many.as_ref(),
        (&load_before, &load_after),
    );
    finish(&args, &text, dir);
}

/// Prints the report, writes it to `--write`, keeps `dir` with `--keep`.
fn finish(args: &Args, text: &str, dir: tempfile::TempDir) {
    println!("{text}");
    if let Some(path) = &args.write {
        std::fs::write(path, text).expect("the report is written");
        eprintln!("wrote {}", path.display());
    }
    if args.keep {
        eprintln!("kept {}", dir.keep().display());
    }
}

/// Runs `op` at `clients` against `agent`, with the CPU the agent (and the
/// server, when given) spent on it.
fn measure(
    runtime: &tokio::runtime::Runtime,
    op: Op,
    clients: usize,
    args: &Args,
    agent: &Agent,
    server: Option<&Process>,
) -> Measured {
    let agent_before = agent.process.cpu_time();
    let server_before = server.map(Process::cpu_time);
    let pace = (op.is_paced() && args.paced > 0.0).then_some(args.paced);
    let summary = runtime.block_on(latency::run(
        op,
        clients,
        args.duration,
        pace,
        &agent.socket,
    ));
    let done = u32::try_from(summary.done.max(1)).unwrap_or(u32::MAX);
    let agent_cpu = agent.process.cpu_time().saturating_sub(agent_before);
    let server_cpu = server
        .zip(server_before)
        .map(|(server, before)| server.cpu_time().saturating_sub(before));
    Measured {
        summary,
        agent_cpu_per_op: agent_cpu / done,
        server_cpu_per_op: server_cpu.map(|cpu| cpu / done),
    }
}

fn parse_args() -> Args {
    let mut args = Args {
        duration: Duration::from_secs(5),
        clients: vec![1, 16],
        ops: Op::ALL.to_vec(),
        agents: 100,
        key_ttl: Duration::from_secs(120),
        paced: 40.0,
        write: None,
        keep: false,
        tasks: false,
        task_args: tasks::TaskArgs::default(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut next = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--duration" => {
                args.duration = humantime::parse_duration(&next()).expect("--duration: humantime");
            }
            "--clients" => {
                args.clients = next()
                    .split(',')
                    .map(|n| n.parse().expect("--clients: numbers"))
                    .collect();
            }
            "--ops" => {
                args.ops = next()
                    .split(',')
                    .map(|name| {
                        *Op::ALL
                            .iter()
                            .find(|op| op.name() == name)
                            .unwrap_or_else(|| panic!("unknown op {name}"))
                    })
                    .collect();
            }
            "--agents" => args.agents = next().parse().expect("--agents: a number"),
            "--key-ttl" => {
                args.key_ttl = humantime::parse_duration(&next()).expect("--key-ttl: humantime");
            }
            "--paced" => args.paced = next().parse().expect("--paced: calls per second"),
            "--write" => args.write = Some(next().into()),
            "--keep" => args.keep = true,
            "--tasks" => args.tasks = true,
            "--nodes" => args.task_args.nodes = next().parse().expect("--nodes: a number"),
            "--live-tasks" => {
                args.task_args.live_tasks = next().parse().expect("--live-tasks: a number");
            }
            "--end-samples" => {
                args.task_args.end_samples = next().parse().expect("--end-samples: a number");
            }
            "--kill-samples" => {
                args.task_args.kill_samples = next().parse().expect("--kill-samples: a number");
            }
            "--poll" => {
                args.task_args.poll =
                    humantime::parse_duration(&next()).expect("--poll: humantime");
            }
            "--ends-rate" => {
                args.task_args.ends_rate = next().parse().expect("--ends-rate: ends a second");
            }
            "--ends-for" => {
                args.task_args.ends_for =
                    humantime::parse_duration(&next()).expect("--ends-for: humantime");
            }
            // cargo bench passes --bench to every harness.
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    args
}
