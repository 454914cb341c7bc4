//! What validating another node's task costs: ValidateTaskToken on node B
//! of a token of B's own task, and of a token of node A's task (the same
//! audience, tool and claims; only the owner node differs), at each
//! client count, with [`crate::latency::drive`]'s clients. A local task is
//! checked against B's own task table; another node's against the ends B
//! was sent and the freshness of B's link to the server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tether::client::task::TaskClient;

use super::{TaskFleet, begin, validate_request};
use crate::latency::{Repeat, drive};
use crate::stats::Summary;

/// Whose task the validated token is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whose {
    /// A task of node B, the validating node.
    Own,
    /// A task of node A.
    Foreign,
}

impl Whose {
    /// What the report calls it.
    pub fn describe(self) -> &'static str {
        match self {
            Whose::Own => "B's own task",
            Whose::Foreign => "another node's task (A's)",
        }
    }
}

/// One run.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    /// Whose token.
    pub whose: Whose,
    /// Concurrent clients.
    pub clients: usize,
    /// Throughput and latency; an error is a refusal or a failed call.
    pub summary: Summary,
    /// Node B's CPU time per validation.
    pub cpu_per_op: Duration,
}

/// A client asking B about one token.
struct Validator {
    client: TaskClient,
    token: Arc<str>,
}

impl Repeat for Validator {
    async fn once(&mut self) -> Option<Duration> {
        let began = Instant::now();
        let answer = self
            .client
            .validate(validate_request(&self.token))
            .await
            .ok()?;
        answer.valid.then(|| began.elapsed())
    }
}

/// Validation on node 1 (B) of node 1's task and of node 0's (A), for
/// `duration` at each of `clients`.
pub async fn run(fleet: &TaskFleet, clients: &[usize], duration: Duration) -> Vec<Row> {
    let (a, b) = (0, 1);
    let own: Arc<str> = begin(&mut fleet.client(b).await).await.token.into();
    let foreign: Arc<str> = begin(&mut fleet.client(a).await).await.token.into();
    let agent = &fleet.agents[b].process;
    let mut rows = Vec::new();
    for &n in clients {
        for (whose, token) in [(Whose::Own, &own), (Whose::Foreign, &foreign)] {
            let mut prepared = Vec::with_capacity(n);
            for _ in 0..n {
                prepared.push(Validator {
                    client: fleet.client(b).await,
                    token: Arc::clone(token),
                });
            }
            let before = agent.cpu_time();
            let summary = drive(prepared, duration, None).await;
            let cpu = agent.cpu_time().saturating_sub(before);
            let done = u32::try_from(summary.done.max(1)).unwrap_or(u32::MAX);
            eprintln!(
                "tasks: validate {} at {n} clients: {:.0}/s p50 {:?} p99 {:?}, {} refused",
                whose.describe(),
                summary.per_second,
                summary.p50,
                summary.p99,
                summary.errors
            );
            rows.push(Row {
                whose,
                clients: n,
                summary,
                cpu_per_op: cpu / done,
            });
        }
    }
    rows
}
