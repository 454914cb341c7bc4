//! What ends cost: the live tasks of every node but the last ended by
//! their owner's EndTask at `rate` a second (all nodes together), paced as
//! [`crate::latency::drive`] paces, for as long as `ends_for` and the live
//! tasks allow. Each end is stored by its agent, sent to the server
//! (EndTasks), stored in the fleet's index and pushed to every agent's
//! sync stream. The last node ends nothing: its CPU is what applying the
//! fleet's ends costs an agent. The same figures over an idle window of
//! the same length, just before, are the baseline.
//!
//! Afterwards, the last node is asked about tokens of ended tasks: each
//! must be refused.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tether::client::task::TaskClient;

use super::{Live, TaskFleet, validate_request};
use crate::latency::{Repeat, drive};
use crate::stats::Summary;

/// EndTask clients on each ending node.
pub const CLIENTS_PER_NODE: usize = 8;
/// Ended tasks whose tokens the last node is asked about afterwards.
const CHECKED: usize = 200;
/// How long after the run the last node is asked.
pub const SETTLE: Duration = Duration::from_secs(1);

/// CPU time and memory of the processes over one window.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    /// The server's CPU time.
    pub server_cpu: Duration,
    /// Each ending agent's CPU time.
    pub ending_cpu: Vec<Duration>,
    /// The last agent's CPU time.
    pub observer_cpu: Duration,
}

/// What the run measured.
#[derive(Debug, Clone)]
pub struct Load {
    /// Ends a second asked for.
    pub rate: f64,
    /// How long the ends ran.
    pub duration: Duration,
    /// Nodes ending tasks (the last node does not).
    pub ending_nodes: usize,
    /// EndTask calls: throughput and latency.
    pub summary: Summary,
    /// Over the run.
    pub busy: Usage,
    /// Over an idle window as long, before the run.
    pub idle: Usage,
    /// The server's VmRSS before and after the run, and its VmHWM after,
    /// KiB.
    pub server_rss_kib: (u64, u64, u64),
    /// The last agent's VmRSS before and after the run, KiB.
    pub observer_rss_kib: (u64, u64),
    /// Ended tasks' tokens the last node was asked about, and how many of
    /// them it refused.
    pub checked: (usize, usize),
}

/// A client ending its share of one node's live tasks.
struct Ender {
    client: TaskClient,
    tasks: Vec<Live>,
    ended: Arc<Mutex<Vec<String>>>,
}

impl Repeat for Ender {
    async fn once(&mut self) -> Option<Duration> {
        let task = self.tasks.pop()?;
        let began = Instant::now();
        self.client.end(task.id).await.ok()?;
        let took = began.elapsed();
        self.ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(task.token);
        Some(took)
    }
}

/// Ends `live` (each node's live tasks) at `rate` a second for at most
/// `ends_for`.
pub async fn run(fleet: &TaskFleet, live: Vec<Vec<Live>>, rate: f64, ends_for: Duration) -> Load {
    let nodes = fleet.agents.len();
    let ending_nodes = nodes - 1;
    let observer = &fleet.agents[nodes - 1].process;
    let pool: usize = live.iter().take(ending_nodes).map(Vec::len).sum();
    // Leave every client a few tasks to spare, so none runs dry.
    let duration = ends_for.min(Duration::from_secs_f64(0.9 * pool as f64 / rate.max(1.0)));
    let ended = Arc::new(Mutex::new(Vec::new()));
    let mut enders = Vec::new();
    for (node, tasks) in live.into_iter().take(ending_nodes).enumerate() {
        let mut shares: Vec<Vec<Live>> = vec![Vec::new(); CLIENTS_PER_NODE];
        for (i, task) in tasks.into_iter().enumerate() {
            shares[i % CLIENTS_PER_NODE].push(task);
        }
        for tasks in shares {
            enders.push(Ender {
                client: fleet.client(node).await,
                tasks,
                ended: Arc::clone(&ended),
            });
        }
    }
    // Interleave the nodes, so the paced clients' schedules alternate
    // between them.
    let enders = interleave(enders, CLIENTS_PER_NODE);

    let usage = |fleet: &TaskFleet| Usage {
        server_cpu: fleet.server.process.cpu_time(),
        ending_cpu: fleet.agents[..ending_nodes]
            .iter()
            .map(|a| a.process.cpu_time())
            .collect(),
        observer_cpu: observer.cpu_time(),
    };
    let idle_start = usage(fleet);
    tokio::time::sleep(duration).await;
    let idle = since(&idle_start, &usage(fleet));

    let rss_before = fleet.server.process.rss_kib();
    let observer_rss_before = observer.rss_kib();
    let busy_start = usage(fleet);
    let summary = drive(enders, duration, Some(rate)).await;
    let busy = since(&busy_start, &usage(fleet));
    let server_rss_kib = (
        rss_before,
        fleet.server.process.rss_kib(),
        fleet.server.process.peak_rss_kib(),
    );
    let observer_rss_kib = (observer_rss_before, observer.rss_kib());
    eprintln!(
        "tasks: {:.0} ends/s for {duration:?}: EndTask p50 {:?} p99 {:?}, {} failed; server CPU {:?} (idle {:?})",
        summary.per_second,
        summary.p50,
        summary.p99,
        summary.errors,
        busy.server_cpu,
        idle.server_cpu
    );

    tokio::time::sleep(SETTLE).await;
    let tokens: Vec<String> = {
        let ended = ended.lock().unwrap_or_else(PoisonError::into_inner);
        let step = (ended.len() / CHECKED).max(1);
        ended.iter().step_by(step).take(CHECKED).cloned().collect()
    };
    let mut on_observer = fleet.client(nodes - 1).await;
    let mut refused = 0;
    for token in &tokens {
        let answer = on_observer
            .validate(validate_request(token))
            .await
            .expect("ValidateTaskToken answers");
        refused += usize::from(!answer.valid);
    }
    Load {
        rate,
        duration,
        ending_nodes,
        summary,
        busy,
        idle,
        server_rss_kib,
        observer_rss_kib,
        checked: (tokens.len(), refused),
    }
}

/// `items`, runs of `group` in a row (one node's clients), reordered so
/// that neighbours come from different runs: the first of every run, then
/// the second of every run, and so on.
fn interleave<T>(items: Vec<T>, group: usize) -> Vec<T> {
    let mut columns: Vec<Vec<T>> = (0..group).map(|_| Vec::new()).collect();
    for (i, item) in items.into_iter().enumerate() {
        columns[i % group].push(item);
    }
    columns.into_iter().flatten().collect()
}

/// What was used between two readings.
fn since(start: &Usage, end: &Usage) -> Usage {
    Usage {
        server_cpu: end.server_cpu.saturating_sub(start.server_cpu),
        ending_cpu: end
            .ending_cpu
            .iter()
            .zip(&start.ending_cpu)
            .map(|(e, s)| e.saturating_sub(*s))
            .collect(),
        observer_cpu: end.observer_cpu.saturating_sub(start.observer_cpu),
    }
}
