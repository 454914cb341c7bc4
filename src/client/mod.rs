//! The Rust client for tether's sockets: what a workload written in Rust
//! (the MCP examples, the load benchmark, the `tether` CLI itself) uses to
//! talk to a running agent.
//!
//! - [`workload`]: the SPIFFE Workload API on the workload socket: which
//!   socket to dial (`--socket`, `SPIFFE_ENDPOINT_SOCKET`,
//!   `TETHER_SOCKET_PATH`, the trusted default), the
//!   `workload.spiffe.io: true` header on every call, and one error type.
//! - [`task`]: the Task API beside it on the same socket, and this
//!   process's own X.509-SVID leaf to bind task tokens to.
//! - [`channel`]: what both share (and the CLI's admin client too): a tonic
//!   `Channel` over a Unix socket dialled under a timeout, calls bounded by
//!   it, and the reading of a gRPC status as a message and an exit status.
//!
//! It speaks the wire protocol only: it uses [`crate::proto`] and the
//! socket defaults of [`crate::config`], never a service module, so what it
//! can do is exactly what any other process on the node can.
//!
//! Invariant: every wait is bounded by the caller's timeout, except the
//! messages of a stream after its first one (updates come when they come).

pub mod channel;
pub mod task;
pub mod workload;

/// Exit status for bad configuration or usage (sysexits `EX_USAGE`): a
/// socket address that cannot be used.
pub const EXIT_USAGE: u8 = 64;
/// Exit status when the agent cannot be reached (`EX_UNAVAILABLE`).
pub const EXIT_UNAVAILABLE: u8 = 69;
/// Exit status when the agent refused the request (`EX_NOPERM`): no
/// identity, permission denied, or an untrusted default socket.
pub const EXIT_NOPERM: u8 = 77;
