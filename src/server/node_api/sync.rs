//! The sync stream: a node's entries and the trust bundle, whole, first
//! when it connects and again whenever either changes.
//!
//! A snapshot holds only what the node may serve (`ServerEntry::identities`
//! non-empty on it, with the pods the Kubernetes API places on it), so a
//! node never learns another node's entries; a new pod list that changes
//! the node's view sends a new snapshot. The
//! stream ends when the server stops, and when the node is evicted (seen
//! at the next change or within [`RECHECK`]).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::{CallingNode, NodeApi, bundle_message};
use crate::admin_api::convert;
use crate::proto::server as pb;
use crate::server::k8s::{ClusterPods, Kubernetes};
use crate::server::registry::ServerEntries;

/// How often an idle stream checks that its node is still admitted.
const RECHECK: Duration = Duration::from_secs(10);

/// The node's sync stream.
pub(super) fn stream(
    api: NodeApi,
    node: CallingNode,
) -> Pin<Box<dyn Stream<Item = Result<pb::SyncSnapshot, Status>> + Send>> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        if let Err(status) = feed(&api, &node, &tx).await {
            let _ = tx.send(Err(status)).await;
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

async fn feed(
    api: &NodeApi,
    node: &CallingNode,
    tx: &mpsc::Sender<Result<pb::SyncSnapshot, Status>>,
) -> Result<(), Status> {
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
            if tx.send(Ok(message)).await.is_err() {
                return Ok(()); // the node went away
            }
        }
        tokio::select! {
            () = api.inner.stop.cancelled() => {
                return Err(crate::edge::status::shutting_down());
            }
            () = tx.closed() => return Ok(()),
            changed = entries.changed() => if changed.is_err() { return Ok(()) },
            changed = bundle.changed() => if changed.is_err() { return Ok(()) },
            changed = pods_changed(pods.as_mut()) => if changed.is_err() { return Ok(()) },
            () = tokio::time::sleep(RECHECK) => {}
        }
        recheck(api, node).await?;
    }
}

/// Ends the stream of a node that was evicted or re-admitted since.
async fn recheck(api: &NodeApi, node: &CallingNode) -> Result<(), Status> {
    let row = api
        .inner
        .store
        .node(node.name.clone())
        .await
        .map_err(|e| crate::edge::status::agent_fault("reading the node registry", &e))?;
    match row {
        Some(row) if !row.evicted => Ok(()),
        _ => Err(crate::edge::status::unauthenticated(format!(
            "node {} was evicted; it must attest again",
            node.name
        ))),
    }
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

/// The entries `node` may serve and the bundle, without a revision.
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
    })
}
