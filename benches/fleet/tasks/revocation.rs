//! Cross-node revocation latency: a task owned on node A ends, and node B
//! is asked ValidateTaskToken of its token, again and again with
//! `--poll` between, until it refuses it. Measured from the end (the
//! EndTask answer, or the SIGKILL of the owner process) to the answer
//! of the first refusal, so a sample is late by at most one poll pause
//! and one ValidateTaskToken round trip.
//!
//! Each sample begins a new task on A (so the live tasks of the fleet stay
//! as many), checks B accepts its token, then ends it. A and B move over
//! every pair of nodes. The owner a kill sample ends is a
//! `tether task run -- sleep 600`, its own process group, so the `sleep`
//! it leaves behind is killed with it afterwards.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt as _;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tether::client::task::TaskClient;

use super::{TOOL, TaskFleet, begin, validate_request};
use crate::processes::{Process, TIMEOUT};
use crate::stats::quantile;
use crate::topology::AUDIENCE;

/// How long B may keep accepting an ended task's token before the sample
/// counts as timed out.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(10);

/// The samples of one way of ending a task.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    /// From the end to B's first refusal, one per sample that was
    /// refused in time, ascending.
    pub latencies: Vec<Duration>,
    /// Samples B still accepted after [`REFUSAL_TIMEOUT`].
    pub timeouts: usize,
    /// The EndTask round trips (empty for kills), ascending.
    pub end_calls: Vec<Duration>,
    /// ValidateTaskToken calls to B while waiting, over every sample.
    pub polls: usize,
    /// B's refusal reasons, the task id cut out, and how often each.
    pub reasons: BTreeMap<String, usize>,
}

impl Samples {
    /// The latency at quantile `q`.
    pub fn at(&self, q: f64) -> Duration {
        quantile(&self.latencies, q)
    }

    /// The slowest sample.
    pub fn max(&self) -> Duration {
        self.latencies.last().copied().unwrap_or_default()
    }

    /// One line for the progress output.
    pub fn line(&self) -> String {
        format!(
            "{} refused: p50 {:?} p99 {:?} max {:?}, {} timed out",
            self.latencies.len(),
            self.at(0.5),
            self.at(0.99),
            self.max(),
            self.timeouts
        )
    }

    fn add(&mut self, refusal: Option<Refusal>, id: &str) {
        match refusal {
            Some(refusal) => {
                self.latencies.push(refusal.after);
                self.polls += refusal.polls;
                *self
                    .reasons
                    .entry(refusal.reason.replace(id, "<task>"))
                    .or_default() += 1;
            }
            None => self.timeouts += 1,
        }
    }

    fn sort(&mut self) {
        self.latencies.sort_unstable();
        self.end_calls.sort_unstable();
    }
}

/// Node A and node B of sample `i` of `nodes`: every ordered pair in turn.
fn pair(i: usize, nodes: usize) -> (usize, usize) {
    let a = i % nodes;
    let b = (a + 1 + (i / nodes) % (nodes - 1)) % nodes;
    (a, b)
}

/// `samples` tasks ended by their owner's EndTask.
pub async fn by_end_task(fleet: &TaskFleet, samples: usize, poll: Duration) -> Samples {
    let mut clients = Vec::with_capacity(fleet.agents.len());
    for node in 0..fleet.agents.len() {
        clients.push(fleet.client(node).await);
    }
    let mut out = Samples::default();
    for i in 0..samples {
        let (a, b) = pair(i, clients.len());
        let task = begin(&mut clients[a]).await;
        assert_accepted(&mut clients[b], &task.token).await;
        let called = Instant::now();
        clients[a]
            .end(task.id.clone())
            .await
            .expect("EndTask succeeds");
        let ended = Instant::now();
        out.end_calls.push(ended - called);
        let refusal = until_refused(&mut clients[b], &task.token, ended, poll).await;
        out.add(refusal, &task.id);
    }
    out.sort();
    out
}

/// `samples` tasks ended by SIGKILL of their owner, a `tether task run`.
pub async fn by_kill(fleet: &TaskFleet, samples: usize, poll: Duration) -> Samples {
    let mut clients = Vec::with_capacity(fleet.agents.len());
    for node in 0..fleet.agents.len() {
        clients.push(fleet.client(node).await);
    }
    let dir = fleet.dir.join("owners");
    std::fs::create_dir_all(&dir).expect("the owners' directory");
    let mut out = Samples::default();
    for i in 0..samples {
        let (a, b) = pair(i, clients.len());
        let token_file = dir.join(format!("{i}.token"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_tether"));
        command
            .args(["task", "run", "--socket"])
            .arg(&fleet.agents[a].socket)
            .args([
                "--audience",
                AUDIENCE,
                "--intent",
                "benchmark: owner killed",
            ])
            .args([
                "--tool",
                TOOL,
                "--tool",
                "read",
                "--ttl",
                "1h",
                "--token-file",
            ])
            .arg(&token_file)
            .args(["--", "sleep", "600"])
            .process_group(0);
        let mut owner = Process::spawn(command, &dir.join(format!("{i}.log")));
        let token = read_token(&mut owner, &token_file).await;
        assert_accepted(&mut clients[b], &token).await;
        let pid = Pid::from_raw(i32::try_from(owner.pid()).expect("a pid fits i32"));
        let killed = Instant::now();
        kill(pid, Signal::SIGKILL).expect("the owner is killed");
        let refusal = until_refused(&mut clients[b], &token, killed, poll).await;
        // The `sleep` the owner left behind.
        let _ = killpg(pid, Signal::SIGKILL);
        let id = refusal
            .as_ref()
            .map(|_| task_id_of(&token))
            .unwrap_or_default();
        out.add(refusal, &id);
        drop(owner);
    }
    out.sort();
    out
}

/// B's first refusal of a token.
struct Refusal {
    after: Duration,
    polls: usize,
    reason: String,
}

/// Asks `on_b` about `token` until it refuses it; `None` when it still
/// accepts it [`REFUSAL_TIMEOUT`] after `since`.
async fn until_refused(
    on_b: &mut TaskClient,
    token: &str,
    since: Instant,
    poll: Duration,
) -> Option<Refusal> {
    let mut polls = 0;
    loop {
        let answer = on_b
            .validate(validate_request(token))
            .await
            .expect("ValidateTaskToken answers");
        polls += 1;
        if !answer.valid {
            return Some(Refusal {
                after: since.elapsed(),
                polls,
                reason: answer.reason,
            });
        }
        if since.elapsed() > REFUSAL_TIMEOUT {
            return None;
        }
        tokio::time::sleep(poll).await;
    }
}

/// Panics unless `on_b` accepts `token` (a live task of another node).
async fn assert_accepted(on_b: &mut TaskClient, token: &str) {
    let answer = on_b
        .validate(validate_request(token))
        .await
        .expect("ValidateTaskToken answers");
    assert!(
        answer.valid,
        "node B refused a live task of node A: {}",
        answer.reason
    );
}

/// Waits for `tether task run` to write the task's token.
async fn read_token(owner: &mut Process, file: &std::path::Path) -> String {
    let started = Instant::now();
    loop {
        if let Ok(token) = std::fs::read_to_string(file)
            && !token.trim().is_empty()
        {
            return token.trim().to_owned();
        }
        owner.assert_alive("a `tether task run` owner");
        assert!(started.elapsed() < TIMEOUT, "no token file from the owner");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The `txn` of a task token (the benchmark's own tokens; unverified).
fn task_id_of(token: &str) -> String {
    use base64::Engine as _;
    let claims = token
        .split('.')
        .nth(1)
        .and_then(|b| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(b)
                .ok()
        })
        .and_then(|json| serde_json::from_slice::<serde_json::Value>(&json).ok())
        .unwrap_or_default();
    claims["txn"].as_str().unwrap_or_default().to_owned()
}
