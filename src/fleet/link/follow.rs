//! Following the server: the sync stream's messages applied as they come
//! ([`Link::run`]), and this node's task ends sent to the server
//! ([`report_ends`]).
//!
//! The sync stream carries three kinds of message: the entries and bundle
//! (a whole snapshot), other nodes' task ends, and heartbeats. Only a
//! heartbeat tells `ForeignTasks` the server was heard: it says every end
//! up to its revision was sent and that the server is current with the
//! store (a replica that is not sends no heartbeat, though its snapshots
//! and ends still flow), which is what keeps the agent fresh, and what
//! makes it current after it (re)connects. A stream silent for `server.revocation_staleness`
//! is dropped and a new one opened: the agent is stale by then anyway,
//! and a half-open connection would otherwise never be noticed.
//!
//! Ends go the other way through `EndTasks`, batched: whatever ended while
//! a call was in flight goes in the next one. An end the server has not
//! acknowledged is kept and sent again (after a backoff, on whichever
//! connection the link has then) until its task's deadline, after which no
//! token of it is valid anyway. The server keeps the first end of a task,
//! so sending one twice is harmless; at start, every ended task still
//! within its deadline is sent again.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{BACKOFF_MAX, BACKOFF_MIN, Link, jitter, lock};
use crate::error::Chain;
use crate::proto::server as pb;
use crate::registration::Registry;
use crate::task::{EndReason, ForeignEnd, LocalEnd, SKEW_MARGIN};
use crate::telemetry::metrics::metrics;

/// How often the sync age metric is updated.
const AGE_EVERY: Duration = Duration::from_secs(1);
/// Most ends in one `EndTasks` call (the server's bound).
const MAX_ENDS_PER_CALL: usize = 1024;
/// Longest task id and end reason taken from the server (its bounds).
const MAX_TXN_LEN: usize = 128;
const MAX_REASON_LEN: usize = 64;

// === impl Link ===

impl Link {
    /// Follows the sync stream into `registry` until `cancel`, reconnecting
    /// after failures and renewing the node SVID at half life.
    pub async fn run(self, registry: Registry, cancel: CancellationToken) {
        let mut stream = lock(&self.inner.first_stream).take();
        let mut backoff = BACKOFF_MIN;
        let mut age = tokio::time::interval(AGE_EVERY);
        let silence = self.inner.config.revocation_staleness;
        let mut last_message = Instant::now();
        loop {
            let Some(mut sync) = stream.take() else {
                match self.reconnect().await {
                    Ok(sync) => {
                        backoff = BACKOFF_MIN;
                        last_message = Instant::now();
                        stream = Some(sync);
                        continue;
                    }
                    Err(error) => {
                        self.set_problem(format!("{}", Chain(&error)));
                        tracing::warn!(error = %Chain(&error), "the tether server is unreachable; retrying");
                        let wait = jitter(backoff);
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        let sleep = tokio::time::sleep(wait);
                        tokio::pin!(sleep);
                        loop {
                            tokio::select! {
                                () = cancel.cancelled() => return,
                                () = &mut sleep => break,
                                _ = age.tick() => self.publish_age(),
                            }
                        }
                        continue;
                    }
                }
            };
            let renew_in = self.renew_in();
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = age.tick() => {
                    self.publish_age();
                    stream = Some(sync);
                }
                () = tokio::time::sleep_until(last_message + silence) => {
                    self.inner.foreign.stream_lost();
                    tracing::warn!(silence = ?silence, "the sync stream has been silent for server.revocation_staleness; reconnecting");
                    self.set_problem(format!(
                        "the tether server's sync stream was silent for {}",
                        humantime::format_duration(silence)
                    ));
                }
                () = tokio::time::sleep(renew_in) => {
                    self.inner.foreign.stream_lost();
                    match self.renew().await {
                        Ok(()) => {} // reconnect with the new SVID
                        Err(error) => {
                            tracing::warn!(error = %Chain(&error), "node SVID renewal failed; retrying");
                            self.set_problem(format!("{}", Chain(&error)));
                            tokio::select! {
                                () = cancel.cancelled() => return,
                                () = tokio::time::sleep(jitter(BACKOFF_MAX)) => {}
                            }
                        }
                    }
                }
                message = sync.message() => match message {
                    Ok(Some(message)) => {
                        last_message = Instant::now();
                        self.take_message(message, &registry).await;
                        self.clear_problem();
                        stream = Some(sync);
                    }
                    Ok(None) => {
                        self.inner.foreign.stream_lost();
                        self.set_problem("the tether server ended the sync stream".into());
                    }
                    Err(status) => {
                        self.inner.foreign.stream_lost();
                        tracing::warn!(code = ?status.code(), message = status.message(), "the sync stream failed");
                        self.set_problem(format!("the sync stream failed: {}", status.message()));
                    }
                }
            }
        }
    }

    /// Applies one message of the sync stream.
    async fn take_message(&self, message: pb::SyncMessage, registry: &Registry) {
        let foreign = &self.inner.foreign;
        match message.kind {
            Some(pb::sync_message::Kind::Snapshot(snapshot)) => {
                match self.apply_bundle_and_entries(snapshot) {
                    Ok(entries) => {
                        if let Err(error) = registry.replace_synced(entries).await {
                            tracing::error!(error = %Chain(&error), "could not apply the server's entries");
                        }
                    }
                    Err(error) => {
                        tracing::error!(error = %Chain(&error), "the server's snapshot was refused");
                    }
                }
            }
            Some(pb::sync_message::Kind::TaskEnds(ends)) => {
                let count = ends.ends.len();
                self.end_own_tasks(&ends.ends);
                foreign.apply_ends(ends.ends.into_iter().filter_map(foreign_end));
                metrics().foreign_task_ends.set(gauge(foreign.len()));
                tracing::debug!(ends = count, "task ends from the fleet");
            }
            Some(pb::sync_message::Kind::Heartbeat(beat)) => {
                foreign.heartbeat(beat.task_ends_revision);
            }
            // A kind this agent does not know: a newer server; heard.
            None => {}
        }
    }

    /// Ends the tasks of this agent among `ends` that still live here: the
    /// fleet ended them (an operator's revoke on the server). Their tokens
    /// are refused already (`check_task` consults the fleet's ends); this
    /// ends them for their owners and the agent's own state.
    fn end_own_tasks(&self, ends: &[pb::TaskEnd]) {
        let Some(tasks) = self.inner.tasks.get() else {
            return;
        };
        for end in ends {
            let Some(task) = tasks.get(&end.txn).filter(|t| t.ended().is_none()) else {
                continue;
            };
            let tasks = tasks.clone();
            tokio::spawn(async move {
                if let Err(error) = tasks.finish(&task, EndReason::Revoked).await {
                    tracing::error!(task_id = %task.id, error = %Chain(&error), "could not end a task the fleet revoked");
                }
            });
        }
    }

    /// Sets the sync age metric.
    fn publish_age(&self) {
        let age = self
            .inner
            .foreign
            .last_heard_age()
            .map_or(-1.0, |age| age.as_secs_f64());
        metrics().server_sync_age_seconds.set(age);
    }
}

/// Sends this node's task ends to the server until `cancel`: `ended`
/// first (every task that ended before this started, still within its
/// deadline), then each end from `ends` as it comes.
pub async fn report_ends(
    link: Link,
    mut ends: mpsc::UnboundedReceiver<LocalEnd>,
    ended: Vec<LocalEnd>,
    cancel: CancellationToken,
) {
    let mut pending: BTreeMap<String, LocalEnd> = ended
        .into_iter()
        .map(|end| (end.txn.clone(), end))
        .collect();
    let mut backoff = BACKOFF_MIN;
    loop {
        while let Ok(end) = ends.try_recv() {
            pending.insert(end.txn.clone(), end);
        }
        let now = SystemTime::now();
        // Kept a while past the deadline: an end *at* the deadline (the
        // lifecycle's) must still reach the index, and clocks differ.
        pending.retain(|_, end| end.deadline + SKEW_MARGIN > now);
        if !pending.is_empty() {
            let batch: Vec<pb::EndedTask> = pending
                .values()
                .take(MAX_ENDS_PER_CALL)
                .map(|end| pb::EndedTask {
                    txn: end.txn.clone(),
                    reason: end.reason.as_str().to_owned(),
                    ended_at_ms: unix_ms(end.at),
                })
                .collect();
            match send_ends(&link, batch.clone()).await {
                Ok(recorded) => {
                    for end in &batch {
                        pending.remove(&end.txn);
                    }
                    tracing::debug!(
                        sent = batch.len(),
                        recorded,
                        "task ends sent to the tether server"
                    );
                    backoff = BACKOFF_MIN;
                    continue;
                }
                Err(status) => {
                    tracing::warn!(pending = pending.len(), code = ?status.code(), message = status.message(), "could not send task ends to the tether server; retrying");
                    let wait = jitter(backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(wait) => continue,
                    }
                }
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            end = ends.recv() => match end {
                Some(end) => {
                    pending.insert(end.txn.clone(), end);
                }
                None => return,
            },
        }
    }
}

async fn send_ends(link: &Link, ends: Vec<pb::EndedTask>) -> Result<u32, tonic::Status> {
    let mut client = link
        .client()
        .ok_or_else(|| tonic::Status::unavailable("not connected to the tether server"))?;
    let reply = tokio::time::timeout(
        super::CONNECT_TIMEOUT,
        client.end_tasks(pb::EndTasksRequest { ends }),
    )
    .await
    .map_err(|_| tonic::Status::deadline_exceeded("EndTasks took too long"))??;
    Ok(reply.into_inner().recorded)
}

/// A task end from the server, bounded; `None` (logged) when its task id
/// is not one the server signs tokens for (so no token of it can be
/// presented here). A reason over its bound is cut, never a reason to
/// drop the end: the heartbeat after it vouches that it was applied.
fn foreign_end(end: pb::TaskEnd) -> Option<ForeignEnd> {
    if end.txn.is_empty() || end.txn.len() > MAX_TXN_LEN {
        tracing::warn!("a task end from the server has a task id out of bounds; skipped");
        return None;
    }
    let reason = if end.reason.len() > MAX_REASON_LEN {
        end.reason.chars().take(MAX_REASON_LEN).collect()
    } else {
        end.reason
    };
    Some(ForeignEnd {
        txn: end.txn,
        reason,
        deadline: UNIX_EPOCH + Duration::from_millis(u64::try_from(end.deadline_ms).unwrap_or(0)),
        revision: end.revision,
    })
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task_end(txn: &str, reason: &str) -> pb::TaskEnd {
        pb::TaskEnd {
            txn: txn.into(),
            reason: reason.into(),
            ended_at_ms: 1,
            deadline_ms: 4_000_000_000_000,
            revision: 7,
            owner_node: "node-a".into(),
        }
    }

    #[test]
    fn an_end_with_a_long_reason_is_kept_with_the_reason_cut() {
        // Review finding: an end whose reason was over the bound was
        // dropped, yet the heartbeat after it raised the watermark past
        // it: its task's tokens stayed valid on this node (fail open).
        let long = "r".repeat(MAX_REASON_LEN + 50);
        let end = foreign_end(task_end("t1", &long)).expect("kept");
        assert_eq!(end.txn, "t1");
        assert_eq!(end.reason.chars().count(), MAX_REASON_LEN);
        assert_eq!(end.revision, 7);
        let multibyte = "é".repeat(MAX_REASON_LEN);
        assert!(foreign_end(task_end("t1", &multibyte)).is_some());
        // A task id the server never signs for cannot be presented here.
        assert_eq!(foreign_end(task_end("", "completed")), None);
        assert_eq!(
            foreign_end(task_end(&"x".repeat(MAX_TXN_LEN + 1), "completed")),
            None
        );
    }
}
