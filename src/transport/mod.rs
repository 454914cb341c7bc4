//! Transport: the Unix sockets tether serves gRPC on, shared by the
//! Workload API and the admin API.
//!
//! [`listener`] binds a socket safely (never over a live agent or a file
//! that is not a stale socket) and accepts connections with the peer
//! identified from the kernel at accept time ([`PeerInfo`], a request
//! extension every RPC can read), within the connection budgets of
//! [`slots`]. [`idle`] closes connections with no request in flight.
//! [`h2_authority`] lets gRPC C-core clients (py-spiffe, grpc-java) through
//! the Rust HTTP/2 stack. Nothing here decides what a caller may do, and
//! nothing here speaks gRPC status: the edges (and their shared kit,
//! `crate::edge`) do.

pub mod h2_authority;
pub mod idle;
pub mod listener;
pub mod slots;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use idle::InFlightLayer;
pub use listener::{
    BindError, BoundSocket, ConnectionLimits, PeerInfo, PeerStream, SocketIdentity, incoming,
};
pub use slots::{Exhausted, ProcessSlots, Slot, StreamSlots};

/// Where an edge spawns per-stream work: the daemon's tracker, and the
/// token that stops it. Edges never import `daemon`.
#[derive(Debug, Clone)]
pub struct Jobs {
    /// Every stream job is spawned on this.
    pub tracker: TaskTracker,
    /// Fires when the agent stops.
    pub cancel: CancellationToken,
    /// Each process's budget of open streams.
    pub streams: StreamSlots,
}
