//! One cancellation tree for the whole agent: a [`Shutdown`] is a
//! `CancellationToken` (every loop selects on it) and a `TaskTracker`
//! (every spawn goes through it, so stopping can wait for all of them).

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The agent's cancellation tree.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    cancel: CancellationToken,
    jobs: TaskTracker,
}

impl Shutdown {
    /// The token loops select on.
    pub fn token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// The tracker per-stream jobs are spawned on.
    pub fn tracker(&self) -> TaskTracker {
        self.jobs.clone()
    }

    /// Spawns a long-lived job.
    pub fn spawn<F>(&self, job: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.jobs.spawn(job);
    }

    /// Signals every job to stop.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// Cancels, then waits up to `grace` for every job to finish. Returns
    /// false when the grace period ran out first.
    pub async fn stop(&self, grace: Duration) -> bool {
        self.cancel.cancel();
        self.jobs.close();
        tokio::time::timeout(grace, self.jobs.wait()).await.is_ok()
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
