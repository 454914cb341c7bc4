//! Fleet mode: an agent whose keys and entries are the `tether server`'s
//! (`[server]` in the agent's config; issue 17).
//!
//! The agent keeps every layer it has (attestation, the Workload and Task
//! APIs, local policy, its own audit trail); fleet mode changes three
//! things, all here:
//! - the authority is [`RemoteAuthority`], a second implementation of the
//!   `authority::Authority` seam: it sends CSRs and JWT claims to the
//!   server and holds no CA or JWT signing key;
//! - the entries are the server's, synced over [`Link`] and published in
//!   the registry as `EntrySource::Server` (the agent's own `[[entries]]`
//!   and admin API entries are refused);
//! - the node's identity is a node SVID from the server (attested once
//!   with a join token), kept in `data_dir/node/` (owner-only) so a
//!   restart needs no new token, and renewed at half life.
//!
//! The trust bundle comes from the server's sync stream; the first
//! contact is verified with the bootstrap bundle file (or, only with
//! `server.insecure_bootstrap = true`, not at all, with a warning).

pub mod config;
mod link;
mod node_files;
mod remote;

pub use config::{FleetConfig, RawFleetConfig};
pub use link::{Link, LinkError, report_ends};
pub use remote::RemoteAuthority;
