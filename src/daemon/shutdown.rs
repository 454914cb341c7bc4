//! One cancellation tree for the whole agent: a [`Shutdown`] is a
//! `CancellationToken` (every loop selects on it), a `TaskTracker` (every
//! spawn goes through it, so stopping can wait for all of them), the names
//! of the long-lived jobs still running (so a stop that runs out of time
//! says which), and the first failure that stopped the agent.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The agent's cancellation tree.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    cancel: CancellationToken,
    jobs: TaskTracker,
    named: Arc<Mutex<Named>>,
    failure: Arc<OnceLock<String>>,
}

/// The long-lived jobs running, by spawn order.
#[derive(Debug, Default)]
struct Named {
    next: u64,
    running: BTreeMap<u64, &'static str>,
}

/// Takes a job's name off the list when the job ends, however it ends.
struct Finished {
    id: u64,
    named: Arc<Mutex<Named>>,
}

/// What a stop that ran out of time left running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StillRunning {
    /// The long-lived jobs, by name.
    pub jobs: Vec<&'static str>,
    /// Per-stream jobs (a client's stream being served).
    pub streams: usize,
}

// === impl Shutdown ===

impl Shutdown {
    /// The token loops select on.
    pub fn token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// The tracker per-stream jobs are spawned on.
    pub fn tracker(&self) -> TaskTracker {
        self.jobs.clone()
    }

    /// Spawns a long-lived job, known by `name` until it ends.
    pub fn spawn<F>(&self, name: &'static str, job: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let id = {
            let mut named = self.named.lock().unwrap_or_else(PoisonError::into_inner);
            let id = named.next;
            named.next += 1;
            named.running.insert(id, name);
            id
        };
        let finished = Finished {
            id,
            named: Arc::clone(&self.named),
        };
        self.jobs.spawn(async move {
            let _finished = finished;
            job.await;
        });
    }

    /// Records why the agent must stop (the first reason wins) and
    /// signals every job to stop.
    pub fn fail(&self, reason: String) {
        let _ = self.failure.set(reason);
        self.cancel.cancel();
    }

    /// The first failure that stopped the agent, if one did.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }

    /// Cancels, then waits up to `grace` for every job to finish. `Err`
    /// names what was still running when the grace period ran out.
    pub async fn stop(&self, grace: Duration) -> Result<(), StillRunning> {
        self.cancel.cancel();
        self.jobs.close();
        if tokio::time::timeout(grace, self.jobs.wait()).await.is_ok() {
            return Ok(());
        }
        let jobs: Vec<&'static str> = self
            .named
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .running
            .values()
            .copied()
            .collect();
        let streams = self.jobs.len().saturating_sub(jobs.len());
        Err(StillRunning { jobs, streams })
    }
}

impl Drop for Finished {
    fn drop(&mut self) {
        self.named
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .running
            .remove(&self.id);
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn os_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stop_that_runs_out_of_time_names_what_still_runs() {
        let shutdown = Shutdown::default();
        shutdown.spawn("polite", {
            let token = shutdown.token();
            async move { token.cancelled().await }
        });
        shutdown.spawn("stubborn", std::future::pending());
        shutdown.tracker().spawn(std::future::pending::<()>());
        let left = shutdown.stop(Duration::from_millis(50)).await.unwrap_err();
        assert_eq!(
            left,
            StillRunning {
                jobs: vec!["stubborn"],
                streams: 1
            }
        );
    }

    #[tokio::test]
    async fn the_first_failure_is_kept_and_stops_everything() {
        let shutdown = Shutdown::default();
        assert_eq!(shutdown.failure(), None);
        shutdown.fail("the workload API server failed: boom".into());
        shutdown.fail("the admin API server failed: later".into());
        assert!(shutdown.token().is_cancelled());
        assert_eq!(
            shutdown.failure(),
            Some("the workload API server failed: boom")
        );
        assert_eq!(shutdown.stop(Duration::from_secs(5)).await, Ok(()));
    }
}
