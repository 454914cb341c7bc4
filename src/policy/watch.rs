//! The policy directory watcher: polls the `*.cedar` files' contents
//! (a SHA-256 over names and bytes) and reloads when they change.
//!
//! Polling, not inotify: it sees edits through symlink swaps (Kubernetes
//! ConfigMaps), on network file systems and in containers alike, and a
//! policy directory is small. A version that fails to load is reported
//! once and not retried until the files change again; the set in force
//! stays.

use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::cedar::{self, Digest};
use super::{Policy, PolicyError, PolicySummary};

/// What one poll found.
enum Poll {
    /// The files are those in force, or the version that already failed.
    Unchanged,
    /// A new version was loaded and put in force.
    Reloaded(PolicySummary),
    /// A new version failed to load; `digest` identifies it.
    Refused {
        digest: Option<Digest>,
        error: PolicyError,
    },
}

// === impl Policy ===

impl Policy {
    /// Polls the policy directory every `poll_interval` and reloads when
    /// the files change; logs the outcome and reports each reload attempt
    /// to `on_reload` (the summary, or the error as one line) so the caller
    /// can audit it. Returns at once without a policy directory, and when
    /// `cancel` fires.
    pub async fn run_watcher(
        self,
        on_reload: impl Fn(Result<PolicySummary, String>) + Send + 'static,
        cancel: CancellationToken,
    ) {
        let Some(dir) = self.dir().map(ToOwned::to_owned) else {
            return;
        };
        let mut ticks =
            tokio::time::interval(self.shared.poll_interval.max(Duration::from_millis(1)));
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The first tick is immediate; the files were just loaded.
        ticks.tick().await;
        let mut refused: Option<Digest> = None;
        let mut read_failing = false;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let policy = self.clone();
            let poll = match tokio::task::spawn_blocking(move || policy.poll(refused)).await {
                Ok(poll) => poll,
                Err(error) => {
                    tracing::error!(error = %crate::error::Chain(&error), "policy watcher: a poll failed");
                    continue;
                }
            };
            match poll {
                Poll::Unchanged => read_failing = false,
                Poll::Reloaded(summary) => {
                    refused = None;
                    read_failing = false;
                    tracing::info!(
                        dir = %dir.display(),
                        files = summary.files,
                        policies = summary.policies,
                        "policies reloaded"
                    );
                    for warning in &summary.warnings {
                        tracing::warn!(%warning, "policy warning");
                    }
                    on_reload(Ok(summary));
                }
                Poll::Refused {
                    digest: Some(digest),
                    error,
                } => {
                    refused = Some(digest);
                    tracing::warn!(
                        dir = %dir.display(),
                        error = %crate::error::Chain(&error),
                        "policy change refused; the policies in force stay"
                    );
                    on_reload(Err(crate::error::chain(&error)));
                }
                Poll::Refused {
                    digest: None,
                    error,
                } => {
                    // The directory cannot be read: say so once, not on
                    // every poll.
                    if read_failing {
                        tracing::debug!(error = %crate::error::Chain(&error), "policy directory still unreadable");
                    } else {
                        read_failing = true;
                        tracing::warn!(
                            dir = %dir.display(),
                            error = %crate::error::Chain(&error),
                            "policy directory unreadable; the policies in force stay"
                        );
                        on_reload(Err(crate::error::chain(&error)));
                    }
                }
            }
        }
    }

    /// Reads the directory and reloads if its files differ from those in
    /// force and from the version that last failed. Blocking.
    fn poll(&self, refused: Option<Digest>) -> Poll {
        let (Some(dir), Some(engine)) = (&self.shared.dir, &self.shared.engine) else {
            return Poll::Unchanged;
        };
        let files = match cedar::read_dir(dir) {
            Ok(files) => files,
            Err(error) => {
                return Poll::Refused {
                    digest: None,
                    error,
                };
            }
        };
        let digest = cedar::digest_of(&files);
        if refused == Some(digest) {
            return Poll::Unchanged;
        }
        let _one_at_a_time = self
            .shared
            .reloading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.snapshot().digest == digest {
            return Poll::Unchanged;
        }
        match engine.compile(&files) {
            Ok(snapshot) => Poll::Reloaded(self.install(snapshot)),
            Err(error) => Poll::Refused {
                digest: Some(digest),
                error,
            },
        }
    }
}
