//! The sync stream: a node's entries and the trust bundle, whole, first
//! when it connects and again whenever either changes; and the fleet's
//! task ends: after the snapshot, every end after the revision the node
//! asked from (a catch-up, in pages), then each new end as this replica
//! sees it (`server::tasks`), and a heartbeat every [`HEARTBEAT`] saying
//! which revision the node has. A heartbeat is sent only while this
//! replica is current with the store, and always after the ends it
//! vouches for, so a node that reads one knows it missed no end up to it.
//!
//! A snapshot holds only what the node may serve (`ServerEntry::identities`
//! non-empty on it, with the pods the Kubernetes API places on it), so a
//! node never learns another node's entries; a new pod list that changes
//! the node's view sends a new snapshot. The
//! stream ends when the server stops, and when the node is evicted (seen
//! at the next change or within [`RECHECK`]).

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use futures_util::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::{CallingNode, NodeApi, bundle_message};
use crate::admin_api::convert;
use crate::proto::server as pb;
use crate::server::k8s::{ClusterPods, Kubernetes};
use crate::server::registry::ServerEntries;
use crate::server::scope::NodeName;

/// How often an idle stream checks that its node is still admitted.
const RECHECK: Duration = Duration::from_secs(10);
/// How often a stream tells its node it is caught up.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// Most sync streams one node has open at once; an agent needs one.
pub const MAX_STREAMS_PER_NODE: usize = 2;

/// The sync streams open, per node, oldest first.
#[derive(Debug, Default)]
pub(super) struct OpenStreams {
    open: Mutex<HashMap<NodeName, VecDeque<(u64, CancellationToken)>>>,
    next_id: AtomicU64,
}

/// One open stream's place among its node's; leaves it when dropped.
struct StreamSlot {
    streams: Arc<OpenStreams>,
    node: NodeName,
    id: u64,
    /// Cancelled when a newer stream of the node replaces this one.
    replaced: CancellationToken,
}

// === impl OpenStreams ===

impl OpenStreams {
    /// A place for a new stream of `node`, ending its oldest streams
    /// beyond [`MAX_STREAMS_PER_NODE`].
    fn open(self: &Arc<Self>, node: &NodeName) -> StreamSlot {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let replaced = CancellationToken::new();
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let streams = open.entry(node.clone()).or_default();
        while streams.len() >= MAX_STREAMS_PER_NODE {
            if let Some((_, oldest)) = streams.pop_front() {
                oldest.cancel();
            }
        }
        streams.push_back((id, replaced.clone()));
        StreamSlot {
            streams: Arc::clone(self),
            node: node.clone(),
            id,
            replaced,
        }
    }

    /// How many streams `node` has open.
    #[cfg(test)]
    fn count(&self, node: &NodeName) -> usize {
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.get(node).map_or(0, VecDeque::len)
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self
            .streams
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(streams) = open.get_mut(&self.node) {
            streams.retain(|(id, _)| *id != self.id);
            if streams.is_empty() {
                open.remove(&self.node);
            }
        }
    }
}

/// The node's sync stream.
pub(super) fn stream(
    api: NodeApi,
    node: CallingNode,
    ends_after: u64,
) -> Pin<Box<dyn Stream<Item = Result<pb::SyncMessage, Status>> + Send>> {
    let (tx, rx) = mpsc::channel(1);
    let slot = api.inner.streams.open(&node.name);
    tokio::spawn(async move {
        let result = tokio::select! {
            result = feed(&api, &node, &tx, ends_after) => result,
            () = slot.replaced.cancelled() => Err(crate::edge::status::unavailable(format!(
                "a newer sync stream of node {} replaced this one (at most {MAX_STREAMS_PER_NODE} per node)",
                node.name
            ))),
        };
        drop(slot);
        if let Err(status) = result {
            // Told to a node that reads; never waited on for longer.
            let _ = tokio::time::timeout(RECHECK, tx.send(Err(status))).await;
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

async fn feed(
    api: &NodeApi,
    node: &CallingNode,
    tx: &mpsc::Sender<Result<pb::SyncMessage, Status>>,
    ends_after: u64,
) -> Result<(), Status> {
    let mut ends = api.inner.tasks.subscribe();
    // The heartbeats say where the node is (`sent`), even when that is
    // below what it asked for, so it asks from there next time.
    let mut sent = api
        .inner
        .tasks
        .resume_after(ends_after)
        .await
        .map_err(|e| crate::edge::status::server_store("reading task ends", &e))?;
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rechecked = tokio::time::Instant::now();
    let mut entries = api.inner.registry.subscribe();
    let mut bundle = api.inner.authority.subscribe_bundle();
    let mut pods = api.inner.kubernetes.as_ref().map(Kubernetes::subscribe);
    let mut revision = 0u64;
    let mut last: Option<pb::SyncSnapshot> = None;
    loop {
        let snapshot = {
            let set = entries.borrow_and_update().clone();
            bundle.borrow_and_update();
            let on_nodes = match pods.as_mut() {
                Some(pods) => pods.borrow_and_update().clone(),
                None => api.pods(),
            };
            snapshot_for(api, node, &set, &on_nodes)?
        };
        // Only a change is sent: a bundle tick or an entry change
        // elsewhere in the fleet may leave this node's view as it was.
        if last.as_ref() != Some(&snapshot) {
            revision += 1;
            last = Some(snapshot.clone());
            let message = pb::SyncSnapshot {
                revision,
                ..snapshot
            };
            let message = pb::SyncMessage {
                kind: Some(pb::sync_message::Kind::Snapshot(message)),
            };
            if tx.send(Ok(message)).await.is_err() {
                return Ok(()); // the node went away
            }
        }
        if !send_ends(api, tx, &mut sent).await? {
            return Ok(());
        }
        tokio::select! {
            () = api.inner.stop.cancelled() => {
                return Err(crate::edge::status::shutting_down());
            }
            () = tx.closed() => return Ok(()),
            changed = entries.changed() => if changed.is_err() { return Ok(()) },
            changed = bundle.changed() => if changed.is_err() { return Ok(()) },
            changed = pods_changed(pods.as_mut()) => if changed.is_err() { return Ok(()) },
            changed = ends.changed() => if changed.is_err() { return Ok(()) },
            _ = heartbeat.tick() => {
                // Only a replica current with the store vouches for the
                // ends it sent; else the node goes stale and fails closed.
                if api.inner.tasks.is_current() {
                    if !send_ends(api, tx, &mut sent).await? {
                        return Ok(());
                    }
                    let beat = pb::SyncMessage {
                        kind: Some(pb::sync_message::Kind::Heartbeat(pb::Heartbeat {
                            task_ends_revision: sent,
                        })),
                    };
                    if tx.send(Ok(beat)).await.is_err() {
                        return Ok(());
                    }
                }
            }
            () = tokio::time::sleep(RECHECK) => {}
        }
        if rechecked.elapsed() >= RECHECK {
            recheck(api, node).await?;
            rechecked = tokio::time::Instant::now();
        }
    }
}

/// Sends every task end after `sent`, in pages, and moves `sent` past
/// them. False: the node went away.
async fn send_ends(
    api: &NodeApi,
    tx: &mpsc::Sender<Result<pb::SyncMessage, Status>>,
    sent: &mut u64,
) -> Result<bool, Status> {
    loop {
        let page = api
            .inner
            .tasks
            .ends_after(*sent)
            .await
            .map_err(|e| crate::edge::status::server_store("reading task ends", &e))?;
        let Some(last) = page
            .last()
            .and_then(|r| r.ended.as_ref())
            .map(|e| e.revision)
        else {
            return Ok(true);
        };
        let ends = page
            .iter()
            .filter_map(|row| {
                let end = row.ended.as_ref()?;
                Some(pb::TaskEnd {
                    txn: row.txn.clone(),
                    reason: end.reason.clone(),
                    ended_at_ms: super::unix_ms(end.at),
                    deadline_ms: super::unix_ms(row.deadline),
                    revision: end.revision,
                    owner_node: row.owner_node.to_string(),
                })
            })
            .collect();
        let message = pb::SyncMessage {
            kind: Some(pb::sync_message::Kind::TaskEnds(pb::TaskEnds { ends })),
        };
        if tx.send(Ok(message)).await.is_err() {
            return Ok(false);
        }
        *sent = last;
    }
}

/// Ends the stream when its node SVID is no longer admitted: the node
/// evicted (or gone), the SVID expired, or the node attested again since.
async fn recheck(api: &NodeApi, node: &CallingNode) -> Result<(), Status> {
    let row = api
        .inner
        .store
        .node(node.name.clone())
        .await
        .map_err(|e| crate::edge::status::agent_fault("reading the node registry", &e))?
        .ok_or_else(|| {
            crate::edge::status::unauthenticated(format!(
                "node {} is no longer registered; it must attest again",
                node.name
            ))
        })?;
    node.still_admitted(&row, SystemTime::now())
}

/// A new pod list; never, without `[kubernetes]`.
async fn pods_changed(
    pods: Option<&mut watch::Receiver<Arc<ClusterPods>>>,
) -> Result<(), watch::error::RecvError> {
    match pods {
        Some(pods) => pods.changed().await,
        None => std::future::pending().await,
    }
}

/// The entries `node` may serve, the bundle and the fleet's issuer,
/// without a revision.
fn snapshot_for(
    api: &NodeApi,
    node: &CallingNode,
    set: &ServerEntries,
    pods: &ClusterPods,
) -> Result<pb::SyncSnapshot, Status> {
    let on_node = pods.on(&node.name);
    let entries = set
        .entries
        .iter()
        .filter(|e| !e.identities(&node.name, on_node).is_empty())
        .map(|e| convert::entry(&e.entry))
        .collect();
    Ok(pb::SyncSnapshot {
        revision: 0,
        entries,
        bundle: Some(bundle_message(&api.inner.authority)?),
        issuer: api.inner.authority.issuer().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_keeps_at_most_its_newest_streams_and_a_closed_one_leaves() {
        // Review finding: sync streams per node were unbounded (each one a
        // job and three watches, held open by a node that never reads).
        let streams = Arc::new(OpenStreams::default());
        let (a, b) = (
            NodeName::new("node-a").expect("name"),
            NodeName::new("node-b").expect("name"),
        );
        let mut slots: Vec<StreamSlot> = (0..5).map(|_| streams.open(&a)).collect();
        let other = streams.open(&b);
        assert_eq!(streams.count(&a), MAX_STREAMS_PER_NODE);
        let replaced = slots.iter().filter(|s| s.replaced.is_cancelled()).count();
        assert_eq!(replaced, 5 - MAX_STREAMS_PER_NODE, "the oldest are ended");
        assert!(
            slots
                .iter()
                .rev()
                .take(MAX_STREAMS_PER_NODE)
                .all(|s| !s.replaced.is_cancelled()),
            "the newest are kept"
        );
        assert!(!other.replaced.is_cancelled(), "another node is untouched");
        slots.clear();
        assert_eq!(streams.count(&a), 0);
        drop(other);
        assert!(
            streams
                .open
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty(),
            "nodes without streams are forgotten"
        );
    }
}
