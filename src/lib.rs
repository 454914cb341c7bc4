//! tether: a node-local identity agent for AI and MCP agent processes.
//!
//! Processes talk to tether over a Unix socket. tether attests who they are
//! from kernel facts (peer credentials, `/proc`), matches them against
//! registration entries, and serves the SPIFFE Workload API: X.509-SVIDs,
//! JWT-SVIDs, trust bundles and JWT validation, so any SPIFFE client works
//! unchanged. See `ARCHITECTURE.md` for the picture and the reasons.
//!
//! # Codemap, in layer order (a module uses only modules above it)
//!
//! - [`trusted_fs`]: the rules for every directory and file the agent
//!   trusts (its own or root's, nobody else's to change, no symlinks).
//! - [`error`], [`proto`], [`telemetry`], [`bundle`], [`store`], [`audit`]:
//!   leaves. How an error is printed (with its whole source chain);
//!   generated gRPC code; logging, metrics and the HTTP endpoint; trust
//!   bundles as values and their three encodings; the SQLite database in
//!   the data dir; the tamper-evident audit trail of every identity
//!   decision.
//! - [`registration`]: entries (selectors -> SPIFFE ID) and subset
//!   matching. [`attestation`]: from a connected process to its selectors.
//!   [`authority`]: the signing seam ([`authority::Authority`]: sign a
//!   CSR, sign JWT claims, publish the bundle) and its local
//!   implementation, the CA and JWT keys on disk and rotated; the only
//!   module holding private signing keys. [`federation`]: foreign trust
//!   bundles read from files. [`mtls`]: SPIFFE mutual TLS over TCP
//!   between fleet agents and `tether server` (peers named by SPIFFE ID,
//!   chains checked against the current bundle at every handshake).
//! - [`svid`]: issuing, caching, rotating and validating SVIDs.
//!   [`task`]: task-bound tokens: begin, renew, exchange, validate, end,
//!   and the journal that survives restarts.
//!   [`transport`]: the Unix sockets both APIs serve on (binding, peer
//!   identity, budgets; no gRPC status). [`policy`]: the
//!   operator's Cedar policies, deciding each issuance, renewal and exchange
//!   at request time.
//! - [`edge`]: the kit the three APIs share: identify the caller, the
//!   policy gate, the security header, and the one mapping of domain
//!   errors to `tonic::Status`.
//! - [`workload_api`]: the SPIFFE Workload API over the Unix socket.
//!   [`task_api`]: the Task API beside it on the same socket.
//!   [`admin_api`]: the operators' API on a second, root-only socket.
//! - [`config`]: the TOML file, composed from each domain's settings type.
//! - [`daemon`]: the composition root; spawns every long-lived job.
//!   [`client`]: the Rust client for the agent's sockets (Workload API,
//!   Task API), as any workload uses them: [`proto`] on the wire, the
//!   socket defaults from [`config`], [`trusted_fs`] for a default
//!   socket's directory; never the agent's own modules.
//!   [`server`]: `tether server`, the fleet's authority: keys, entries,
//!   the node registry and the task index, served to fleet agents
//!   ([`fleet`]) over mutual TLS.
//! - [`cli`]: the `tether` command line; only [`cli::Cli`] and [`cli::run`]
//!   are public (for `main.rs`), the rest is its own.
//! - `testing` (unit tests only): helpers any module's tests may use.
//!
//! # Invariants
//!
//! - Identity comes from the kernel, never from what a caller sends: no
//!   request field names a selector or a pid.
//! - No key is used to sign before it is in the published bundle, and
//!   nothing outlives the key that signed it.
//! - Private signing keys never leave [`authority`] (workload SVID keys
//!   aside, which are handed to their workload, and the audit key, which
//!   [`daemon`] loads and hands to [`audit`] to seal the trail) and are
//!   never logged.
//! - Proto types never reach a domain module, and domain modules never see
//!   `tonic::Status`; a `Status` is built only in [`edge::status`].
//! - Nothing is spawned outside [`daemon`]'s cancellation tree.

pub mod error;

pub mod audit;
pub mod bundle;
pub mod proto;
pub mod store;
pub mod telemetry;
pub mod trusted_fs;
pub mod web;

pub mod attestation;
pub mod authority;
pub mod federation;
pub mod mtls;
pub mod registration;

pub mod policy;
pub mod svid;
pub mod task;
pub mod transport;

pub mod edge;

pub mod admin_api;
pub mod task_api;
pub mod workload_api;

pub mod fleet;

pub mod config;

pub mod client;
pub mod daemon;
pub mod server;

pub mod cli;

#[cfg(test)]
mod testing;
